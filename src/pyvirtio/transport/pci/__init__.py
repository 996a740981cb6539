"""virtio over PCI (virtio-v1.2 §4.1): register layouts (:mod:`.spec`), a generic PCI
function model that knows nothing of virtio (:mod:`.function`), the device-side
virtio-pci function built on it (:mod:`.device`), and the driver side (enumeration
and the modern and legacy transports)."""
