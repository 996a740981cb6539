"""Constants and wire layouts of the VIRTIO 1.2 specification; nothing above them."""
