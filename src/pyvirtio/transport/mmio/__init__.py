"""virtio over MMIO (virtio-v1.2 §4.2), version 2 and legacy version 1: register
layouts (:mod:`.spec`), the device-side model (:mod:`.device`) and the driver side."""
