"""virtio over PCI (virtio-v1.2 §4.1): register layouts (:mod:`.spec`), the device-side
function model (:mod:`.device`), and the driver side (enumeration and the modern and
legacy transports)."""
