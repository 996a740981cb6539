"""vfio-user transport: a pyvirtio device as a PCI function of a VM that runs elsewhere.

The protocol is QEMU's ``docs/interop/vfio-user.rst``. :mod:`.spec` declares its
constants and layouts, :mod:`.codec` frames messages (sans-I/O), :mod:`.backend`
answers a client's commands for a
:class:`~pyvirtio.transport.pci.function.PciFunction` (sans-I/O), :mod:`.server` is
the socket and event loop around it. QEMU's ``vfio-user-pci`` (10.1 and later) is the
client: it shows our :class:`~pyvirtio.transport.pci.device.VirtioPciFunction` to its
guest, whose own virtio-pci driver drives it.
"""

from __future__ import annotations

from pyvirtio.transport.vfio_user.backend import DmaWindow, VfioUserBackend, VfioUserMetrics
from pyvirtio.transport.vfio_user.codec import (
    Message,
    MessageReader,
    VfioUserError,
    VfioUserProtocolError,
)
from pyvirtio.transport.vfio_user.server import VfioUserServer

__all__ = [
    "DmaWindow",
    "Message",
    "MessageReader",
    "VfioUserBackend",
    "VfioUserError",
    "VfioUserMetrics",
    "VfioUserProtocolError",
    "VfioUserServer",
]
