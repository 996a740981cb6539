"""pyvirtio: the OASIS VIRTIO 1.x standard in Python, device side and driver side.

Layers (see ``docs/architecture.md``): :mod:`pyvirtio.spec` (constants and wire
layouts), :mod:`pyvirtio.memory` (guest memory), :mod:`pyvirtio.virtqueue` (split and
packed rings), :mod:`pyvirtio.core` (device and driver cores), :mod:`pyvirtio.transport`
(loopback, vhost-user, PCI, MMIO), :mod:`pyvirtio.devices` and :mod:`pyvirtio.drivers`.
"""

__version__ = "0.1.0"
