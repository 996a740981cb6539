"""The sans-I/O vfio-user server core: a PCI function served to a vfio-user client.

:class:`VfioUserBackend` answers the client's commands (QEMU
``docs/interop/vfio-user.rst``) for one
:class:`~pyvirtio.transport.pci.function.PciFunction` - normally a
:class:`~pyvirtio.transport.pci.device.VirtioPciFunction`, so that the client (QEMU's
``vfio-user-pci``) shows our virtio-pci function to its guest, whose own driver then
drives it. It takes :class:`~.codec.Message`\\ s and returns reply bytes; interrupts
it wants delivered are eventfds to signal, collected with :meth:`take_signals`. The
socket, the eventfd writes and the selector loop live in :mod:`.server`.

What is served:

- ``VFIO_USER_VERSION``: major 0, minor 1 (at most the client's), capabilities
  ``max_msg_fds``, ``max_data_xfer_size``, ``pgsizes``; no migration, no twin socket.
  Any other command before VERSION is refused with EINVAL.
- ``DMA_MAP`` with a descriptor: the range is mapped (``mmap`` of the fd at
  ``offset``) as a :class:`~pyvirtio.memory.guest_memory.MemoryRegion` of the
  function's guest memory at the DMA address (guest-physical: there is no vIOMMU).
  A map over an existing one is refused with EEXIST; a descriptor that cannot be
  mapped, or that could shrink under the mapping (unless ``trust_client``), is
  refused. A map *without* a descriptor (memory the client cannot share, such as
  QEMU's ROMs) is accepted and recorded, but the device cannot reach it (pyvirtio
  does not send DMA_READ/DMA_WRITE): an access there is a guest memory error.
- ``DMA_UNMAP``: the device is quiesced first (host I/O touching guest memory
  finishes), then the region is removed and unmapped; ``VFIO_DMA_UNMAP_FLAG_ALL``
  removes every region. A live queue whose rings were in it is detached (parked,
  position kept) and resumed when a later DMA_MAP brings its rings back.
- ``DEVICE_GET_INFO``: PCI | RESET, 9 regions, 5 IRQ indexes (``<linux/vfio.h>``).
- ``DEVICE_GET_REGION_INFO``: BAR0-5 with the sizes the function declares (0 for an
  absent BAR), ROM and VGA of size 0, configuration space (index 7, 256 bytes);
  read/write, never mmap.
- ``DEVICE_GET_IRQ_INFO``: INTx (1 if the function has an interrupt pin: eventfd,
  maskable, automasked), MSI (0), MSI-X (the function's table size: eventfd, no
  NORESIZE, so vectors are set one by one), ERR and REQ (0).
- ``DEVICE_SET_IRQS``: TRIGGER with DATA_EVENTFD assigns (or, without descriptors,
  de-assigns) eventfds to INTx / MSI-X vectors; DATA_NONE with count 0 disables an
  index; INTx MASK / UNMASK (DATA_NONE or DATA_BOOL); TRIGGER with DATA_NONE/BOOL
  raises the interrupt from the client.
- ``REGION_READ`` / ``REGION_WRITE``: configuration space through the function's
  ``cfg_read``/``cfg_write`` (naturally aligned 1, 2 and 4 byte accesses; any other
  span byte by byte - a bulk read takes the bytes without side effects), BARs through
  ``bar_read``/``bar_write`` (1, 2, 4 or 8 bytes inside the BAR).
- ``DEVICE_RESET``: a function-level reset of the function (which resets the virtio
  device).

Interrupts: MSI-X is the client's (QEMU's vfio-pci traps the table and the PBA), so
the function is told to signal a vector and nothing else
(:meth:`~pyvirtio.transport.pci.function.PciFunction.connect_msix`); INTx follows
VFIO's level-triggered model: the eventfd is signalled when the line rises, the
interrupt is then masked until the client's UNMASK, which signals again if the line
is still high.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass

from pyvirtio.core.device import VirtioDevice
from pyvirtio.errors import GuestMemoryError, VirtioError
from pyvirtio.memory.guest_memory import GuestMemory, MemoryRegion, seal_against_shrinking
from pyvirtio.transport.pci.function import PciFunction
from pyvirtio.transport.pci.spec import PCI_CONFIG_SPACE_SIZE, PCI_NUM_BARS, PciCfg
from pyvirtio.transport.vfio_user.codec import (
    Message,
    PeerCapabilities,
    VfioUserError,
    command_name,
    decode_version,
    encode_error,
    encode_reply,
    encode_version,
)
from pyvirtio.transport.vfio_user.spec import (
    ACTION_TYPE_MASK,
    DATA_TYPE_MASK,
    DEVICE_INFO,
    DMA_MAP,
    DMA_UNMAP,
    IRQ_INFO,
    IRQ_SET,
    MAX_DATA_XFER_SIZE,
    MAX_MSG_FDS,
    PGSIZES,
    REGION_ACCESS,
    REGION_INFO,
    VFIO_USER_MAJOR,
    VFIO_USER_MINOR,
    Command,
    DeviceFlags,
    DeviceInfo,
    DmaFlags,
    IrqInfo,
    IrqInfoFlags,
    IrqSetFlags,
    PciIrqIndex,
    PciRegion,
    RegionAccess,
    RegionFlags,
    RegionInfo,
)
from pyvirtio.virtqueue import make_device_queue
from pyvirtio.virtqueue.common import QueueAddresses, QueueState

__all__ = ["DmaWindow", "VfioUserBackend", "VfioUserMetrics"]

_log = logging.getLogger("pyvirtio.vfio_user")

#: ``VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`` / ``VFIO_DMA_UNMAP_FLAG_ALL``.
_UNMAP_DIRTY = 1 << 0
_UNMAP_ALL = 1 << 1
_ST = "vfio-user.rst"


@dataclass(frozen=True)
class DmaWindow:
    """A DMA_MAP the client made: address, size, flags; ``mapped`` if we could mmap it."""

    address: int
    size: int
    flags: int
    mapped: bool

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.address + self.size


class VfioUserMetrics:
    """What a connection did: commands by name, errors replied, interrupts signalled."""

    def __init__(self) -> None:
        self.commands: dict[str, int] = {}
        self.errors = 0
        self.msix_signals = 0
        self.intx_signals = 0
        #: register-level violations the device model logged during the connection
        self.driver_violations = 0

    def summary(self) -> str:
        """One line for the log."""
        cmds = " ".join(f"{k.removeprefix('VFIO_USER_')}={v}" for k, v in self.commands.items())
        return (
            f"{sum(self.commands.values())} commands ({cmds}), {self.errors} refused, "
            f"{self.msix_signals} MSI-X and {self.intx_signals} INTx interrupts, "
            f"{self.driver_violations} driver violations"
        )


class VfioUserBackend:
    """Serves ``function`` to one vfio-user client (see the module docs).

    ``mem`` is the function's guest memory (the regions DMA_MAP adds); the function
    must already be connected to it. ``trust_client`` accepts DMA descriptors that
    cannot be sealed against shrinking.
    """

    def __init__(
        self, function: PciFunction, mem: GuestMemory, *, trust_client: bool = False
    ) -> None:
        self.function = function
        self.mem = mem
        self.trust_client = trust_client
        self.metrics = VfioUserMetrics()
        self.peer: PeerCapabilities | None = None
        self.windows: list[DmaWindow] = []
        self._msix_fds: dict[int, int] = {}
        self._intx_fd: int | None = None
        self._intx_masked = False
        self._signals: list[int] = []
        self._parked: dict[int, tuple[int, QueueAddresses, QueueState]] = {}
        self._quiesce = self._default_quiesce
        self._handlers: dict[int, Callable[[Message], bytes]] = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._get_info,
            Command.DEVICE_GET_REGION_INFO: self._region_info,
            Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.DEVICE_RESET: self._reset,
        }
        #: a record of every command handled (name, ok), bounded, for tests and traces
        self.history: list[tuple[str, bool]] = []
        function.connect(mem, self._dma_write, self._intx_line)
        function.connect_msix(self._msix_signal)

    # -- hooks ----------------------------------------------------------------------------

    def set_quiesce(self, fn: Callable[[], None]) -> None:
        """Replace what runs before guest memory is removed (the device's quiesce)."""
        self._quiesce = fn

    def _default_quiesce(self) -> None:
        device: VirtioDevice | None = getattr(self.function, "device", None)
        if device is not None:
            device.guarded("quiesce", device.quiesce)

    # -- interrupts -------------------------------------------------------------------------

    def _dma_write(self, addr: int, data: bytes) -> None:
        # MSI-X messages never come here (connect_msix); nothing else writes
        _log.debug("unexpected device write of %d bytes at %#x", len(data), addr)

    def _msix_signal(self, vector: int) -> None:
        fd = self._msix_fds.get(vector)
        if fd is not None:
            self.metrics.msix_signals += 1
            self._signals.append(fd)

    def _intx_line(self, level: bool) -> None:
        if level:
            self._intx_fire()

    def _intx_fire(self) -> None:
        if self._intx_fd is None or self._intx_masked:
            return
        # VFIO INTx is level-triggered and automasked: masked until the client unmasks
        self._intx_masked = True
        self.metrics.intx_signals += 1
        self._signals.append(self._intx_fd)

    def take_signals(self) -> list[int]:
        """Eventfds to signal now (one write of 1 each), in order."""
        out, self._signals = self._signals, []
        return out

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, msg: Message) -> bytes | None:
        """Answer one command: the reply bytes, or None when the client asked for
        none. Every descriptor of ``msg`` is owned here: kept (DMA_MAP, SET_IRQS) or
        closed."""
        name = command_name(msg.command)
        self.metrics.commands[name] = self.metrics.commands.get(name, 0) + 1
        try:
            payload = self._dispatch(msg)
            ok = True
            reply = encode_reply(msg.header, payload)
        except VfioUserError as e:
            ok = False
            self.metrics.errors += 1
            _log.info("%s refused: %s", name, e)
            reply = encode_error(msg.header, e.errno)
        finally:
            msg.close()
        if len(self.history) < 4096:
            self.history.append((name, ok))
        return None if msg.no_reply else reply

    def _dispatch(self, msg: Message) -> bytes:
        cmd = msg.command
        if cmd != Command.VERSION and self.peer is None:
            raise VfioUserError(f'{command_name(cmd)} before VFIO_USER_VERSION ({_ST} "Version")')
        if msg.fds and cmd not in (Command.DMA_MAP, Command.DEVICE_SET_IRQS):
            raise VfioUserError(f"{command_name(cmd)} carries {len(msg.fds)} descriptors")
        handler = self._handlers.get(cmd)
        if handler is None:
            raise VfioUserError(f"{command_name(cmd)} is not supported", errno.ENOTSUP)
        return handler(msg)

    @staticmethod
    def _exact(msg: Message, size: int) -> None:
        if len(msg.payload) != size:
            raise VfioUserError(
                f"{command_name(msg.command)} body of {len(msg.payload)} bytes, expected {size}"
            )

    # -- VERSION ------------------------------------------------------------------------------

    def _version(self, msg: Message) -> bytes:
        """vfio-user.rst "VFIO_USER_VERSION": "The major version in the reply must be
        the same as proposed ... The minor version in the reply must be equal to or
        less than the minor version proposed"; our capabilities are a subset."""
        if self.peer is not None:
            raise VfioUserError("a second VFIO_USER_VERSION")
        ver, peer = decode_version(msg.payload)
        if ver.major != VFIO_USER_MAJOR:
            raise VfioUserError(f"protocol major {ver.major}, pyvirtio speaks {VFIO_USER_MAJOR}")
        self.peer = peer
        _log.info("client speaks vfio-user %d.%d, capabilities %s", ver.major, ver.minor, peer.raw)
        caps = {
            "max_msg_fds": MAX_MSG_FDS,
            "max_data_xfer_size": MAX_DATA_XFER_SIZE,
            "pgsizes": PGSIZES,
        }
        return encode_version(VFIO_USER_MAJOR, min(ver.minor, VFIO_USER_MINOR), caps)

    # -- DMA -----------------------------------------------------------------------------------

    def _dma_map(self, msg: Message) -> bytes:
        """vfio-user.rst "VFIO_USER_DMA_MAP"."""
        self._exact(msg, DMA_MAP.size)
        m = DMA_MAP.unpack(msg.payload)
        if m.argsz != DMA_MAP.size:
            raise VfioUserError(f"DMA_MAP argsz {m.argsz}")
        if len(msg.fds) > 1:
            raise VfioUserError(f"DMA_MAP with {len(msg.fds)} descriptors")
        if m.flags & ~(DmaFlags.READ | DmaFlags.WRITE):
            raise VfioUserError(f"DMA_MAP flags {m.flags:#x}")
        if m.size == 0 or m.address + m.size > 1 << 64 or m.address % PGSIZES or m.size % PGSIZES:
            raise VfioUserError(f"DMA_MAP of {m.address:#x}+{m.size:#x}")
        if any(m.address < w.end and w.address < m.address + m.size for w in self.windows):
            # "A command to map over an existing region must be failed by the server
            # with EEXIST"
            raise VfioUserError(f"DMA_MAP {m.address:#x}+{m.size:#x} overlaps", errno.EEXIST)
        if not msg.fds:
            self.windows.append(DmaWindow(m.address, m.size, m.flags, mapped=False))
            _log.info(
                "DMA window %#x+%#x without a descriptor: not reachable by the device",
                m.address, m.size,
            )  # fmt: skip
            return b""
        fd = msg.take_fds()[0]
        try:
            if not self.trust_client:
                why = seal_against_shrinking(fd)
                if why is not None:
                    raise VfioUserError(f"DMA descriptor refused: {why}", errno.EPERM)
            if m.offset % mmap.PAGESIZE:
                raise VfioUserError(f"DMA_MAP offset {m.offset:#x} not page aligned")
            if os.fstat(fd).st_size < m.offset + m.size:
                raise VfioUserError("DMA_MAP range beyond the end of its file")
            region = MemoryRegion(
                guest_phys_addr=m.address, size=m.size, fd=fd, mmap_offset=m.offset
            )
            fd = -1  # the region owns it now
            try:
                self.mem.add_region(region)
            except (OSError, ValueError, GuestMemoryError) as e:
                region.close()
                raise VfioUserError(f"DMA_MAP cannot be mapped: {e}", errno.EINVAL) from None
        except OSError as e:
            raise VfioUserError(f"DMA_MAP: {e}", e.errno or errno.EINVAL) from None
        finally:
            if fd >= 0:
                os.close(fd)
        self.windows.append(DmaWindow(m.address, m.size, m.flags, mapped=True))
        self._resume_parked_rings()
        return b""

    def _dma_unmap(self, msg: Message) -> bytes:
        """vfio-user.rst "VFIO_USER_DMA_UNMAP": "the server must release all references
        to that DMA region before replying"; the reply is the request's entry."""
        self._exact(msg, DMA_UNMAP.size)
        u = DMA_UNMAP.unpack(msg.payload)
        if u.flags & _UNMAP_DIRTY or u.flags & ~(_UNMAP_DIRTY | _UNMAP_ALL):
            raise VfioUserError(f"DMA_UNMAP flags {u.flags:#x} (no dirty page tracking)")
        if u.flags & _UNMAP_ALL:
            gone = list(self.windows)
        else:
            gone = [w for w in self.windows if w.address == u.address and w.size == u.size]
            if not gone:
                raise VfioUserError(f"DMA_UNMAP {u.address:#x}+{u.size:#x} matches no map")
        if any(w.mapped for w in gone):
            self._quiesce()
        for w in gone:
            self.windows.remove(w)
            if w.mapped:
                self.mem.remove_region(w.address, w.size).close()
        if any(w.mapped for w in gone):
            self._park_lost_rings()
        return msg.payload

    def unmap_all(self) -> None:
        """Forget every DMA window (the client went away)."""
        if any(w.mapped for w in self.windows):
            self._quiesce()
        for w in self.windows:
            if w.mapped:
                self.mem.remove_region(w.address, w.size).close()
        self.windows.clear()
        self._parked.clear()

    # -- live rings across DMA window changes ---------------------------------------------

    def _live_queues(self) -> tuple[VirtioDevice, int] | None:
        state = getattr(self.function, "state", None)
        if state is None or not state.status:
            self._parked.clear()  # the device was reset meanwhile
            return None
        device: VirtioDevice = state.device
        return device, state.negotiated_features

    def _park_lost_rings(self) -> None:
        """After DMA_UNMAP: a live queue whose rings are no longer all inside guest
        memory is detached ("the server must release all references to that DMA
        region before replying"), its position kept, and resumed by
        :meth:`_resume_parked_rings` once a DMA_MAP brings its rings back (QEMU unmaps
        and maps the same RAM again whenever the guest changes the memory layout,
        e.g. SeaBIOS' PAM writes while its virtio-blk queue is live)."""
        live = self._live_queues()
        if live is None:
            return
        device, features = live
        with device.lock:
            for i, vq in enumerate(device.queues):
                if vq is None:
                    continue
                try:
                    make_device_queue(self.mem, vq.size, vq.addrs, features, index=i)
                except (VirtioError, ValueError):
                    self._parked[i] = (vq.size, vq.addrs, vq.get_state())
                    device.detach_queue(i)
                    _log.info("queue %d parked: its rings are no longer in guest memory", i)

    def _resume_parked_rings(self) -> None:
        if not self._parked:
            return
        live = self._live_queues()
        if live is None:
            return
        device, features = live
        with device.lock:
            for i, (size, addrs, qstate) in list(self._parked.items()):
                try:
                    vq = make_device_queue(self.mem, size, addrs, features, index=i, state=qstate)
                except (VirtioError, ValueError):
                    continue
                del self._parked[i]
                device.attach_queue(i, vq)
                _log.info("queue %d resumed: its rings are back in guest memory", i)

    @property
    def parked_queues(self) -> list[int]:
        """Live queues whose rings are (partly) outside guest memory now."""
        return sorted(self._parked)

    # -- device information -------------------------------------------------------------------

    def _get_info(self, msg: Message) -> bytes:
        """vfio-user.rst "VFIO_USER_DEVICE_GET_INFO"."""
        self._exact(msg, DEVICE_INFO.size)
        req = DEVICE_INFO.unpack(msg.payload)
        if req.argsz < DEVICE_INFO.size:
            raise VfioUserError(f"DEVICE_GET_INFO argsz {req.argsz}")
        return DEVICE_INFO.pack(
            DeviceInfo(
                DEVICE_INFO.size,
                DeviceFlags.PCI | DeviceFlags.RESET,
                PciRegion.NUM,
                PciIrqIndex.NUM,
            )
        )

    def region_size(self, index: int) -> int:
        """Size of region ``index`` (0 for one the function does not have)."""
        if 0 <= index < PCI_NUM_BARS:
            return self.function.bar_size(index)
        if index == PciRegion.CONFIG:
            return PCI_CONFIG_SPACE_SIZE
        return 0

    def _region_info(self, msg: Message) -> bytes:
        """vfio-user.rst "VFIO_USER_DEVICE_GET_REGION_INFO" (no mmap, no capabilities)."""
        self._exact(msg, REGION_INFO.size)
        req = REGION_INFO.unpack(msg.payload)
        if req.argsz < REGION_INFO.size:
            raise VfioUserError(f"DEVICE_GET_REGION_INFO argsz {req.argsz}")
        if not 0 <= req.region < PciRegion.NUM:
            raise VfioUserError(f"region {req.region} does not exist")
        size = self.region_size(req.region)
        flags = RegionFlags.READ | RegionFlags.WRITE if size else RegionFlags(0)
        return REGION_INFO.pack(RegionInfo(REGION_INFO.size, flags, req.region, 0, size, 0))

    def irq_count(self, index: int) -> int:
        """Interrupts of IRQ index ``index``."""
        if index == PciIrqIndex.INTX:
            return 1 if self.function.config[PciCfg.INTERRUPT_PIN] else 0
        if index == PciIrqIndex.MSIX:
            return self.function.msix_table_size
        return 0

    def _irq_info(self, msg: Message) -> bytes:
        """vfio-user.rst "VFIO_USER_DEVICE_GET_IRQ_INFO"."""
        self._exact(msg, IRQ_INFO.size)
        req = IRQ_INFO.unpack(msg.payload)
        if req.argsz < IRQ_INFO.size:
            raise VfioUserError(f"DEVICE_GET_IRQ_INFO argsz {req.argsz}")
        if not 0 <= req.irq_index < PciIrqIndex.NUM:
            raise VfioUserError(f"IRQ index {req.irq_index} does not exist")
        count = self.irq_count(req.irq_index)
        flags = IrqInfoFlags(0)
        if count:
            flags = IrqInfoFlags.EVENTFD
            if req.irq_index == PciIrqIndex.INTX:
                flags |= IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED
        return IRQ_INFO.pack(IrqInfo(IRQ_INFO.size, flags, req.irq_index, count))

    # -- interrupts set-up ---------------------------------------------------------------------

    def _set_irqs(self, msg: Message) -> bytes:
        """vfio-user.rst "VFIO_USER_DEVICE_SET_IRQS" (``struct vfio_irq_set``)."""
        if len(msg.payload) < IRQ_SET.size:
            raise VfioUserError(f"DEVICE_SET_IRQS body of {len(msg.payload)} bytes")
        s = IRQ_SET.unpack_from(msg.payload, 0)
        data_kind = s.flags & DATA_TYPE_MASK
        action = s.flags & ACTION_TYPE_MASK
        if s.flags & ~(DATA_TYPE_MASK | ACTION_TYPE_MASK):
            raise VfioUserError(f"SET_IRQS flags {s.flags:#x}")
        # "The flags are mutually exclusive for both sets"
        if bin(data_kind).count("1") != 1 or bin(action).count("1") != 1:
            raise VfioUserError(f"SET_IRQS flags {s.flags:#x}: one DATA and one ACTION bit")
        extra = s.irq_count if data_kind == IrqSetFlags.DATA_BOOL else 0
        if len(msg.payload) != IRQ_SET.size + extra or s.argsz != len(msg.payload):
            raise VfioUserError(f"SET_IRQS argsz {s.argsz}, body {len(msg.payload)} bytes")
        if data_kind != IrqSetFlags.DATA_EVENTFD and msg.fds:
            raise VfioUserError("SET_IRQS carries descriptors without DATA_EVENTFD")
        if not 0 <= s.irq_index < PciIrqIndex.NUM:
            raise VfioUserError(f"IRQ index {s.irq_index} does not exist")
        n = self.irq_count(s.irq_index)
        if data_kind == IrqSetFlags.DATA_NONE and s.irq_count == 0:
            if action != IrqSetFlags.ACTION_TRIGGER or s.start != 0:
                raise VfioUserError("SET_IRQS count 0 is only 'disable the index'")
            self._disable(s.irq_index)
            return b""
        if s.irq_count == 0 or s.start + s.irq_count > n:
            raise VfioUserError(
                f"SET_IRQS {s.start}+{s.irq_count} of index {s.irq_index} ({n} IRQs)"
            )
        selected = list(range(s.start, s.start + s.irq_count))
        if data_kind == IrqSetFlags.DATA_BOOL:
            flags = msg.payload[IRQ_SET.size :]
            if any(b > 1 for b in flags):
                raise VfioUserError("SET_IRQS DATA_BOOL byte that is not 0 or 1")
            selected = [v for v, b in zip(selected, flags, strict=True) if b]
        if s.irq_index == PciIrqIndex.INTX:
            return self._set_intx(msg, action, data_kind)
        if s.irq_index != PciIrqIndex.MSIX or action != IrqSetFlags.ACTION_TRIGGER:
            raise VfioUserError(
                f"SET_IRQS action {action:#x} on index {s.irq_index}", errno.ENOTSUP
            )
        if data_kind == IrqSetFlags.DATA_EVENTFD:
            if msg.fds and len(msg.fds) != s.irq_count:
                raise VfioUserError(f"SET_IRQS {s.irq_count} vectors, {len(msg.fds)} descriptors")
            _make_nonblocking(msg.fds)
            fds = msg.take_fds()
            for i, v in enumerate(selected):
                old = self._msix_fds.pop(v, None)
                if old is not None:
                    os.close(old)
                if fds:
                    self._msix_fds[v] = fds[i]
            return b""
        for v in selected:  # the client triggers vectors itself
            self._msix_signal(v)
        return b""

    def _set_intx(self, msg: Message, action: int, data_kind: int) -> bytes:
        if data_kind == IrqSetFlags.DATA_EVENTFD:
            if action != IrqSetFlags.ACTION_TRIGGER:
                # mask/unmask notifier eventfds: not offered
                raise VfioUserError("INTx mask/unmask eventfds are not supported", errno.ENOTSUP)
            if len(msg.fds) > 1:
                raise VfioUserError(f"INTx with {len(msg.fds)} descriptors")
            _make_nonblocking(msg.fds)
            fds = msg.take_fds()
            if self._intx_fd is not None:
                os.close(self._intx_fd)
            self._intx_fd = fds[0] if fds else None
            self._intx_masked = False
            if self._intx_fd is not None and self.function.intx_asserted:
                self._intx_fire()
            return b""
        if data_kind == IrqSetFlags.DATA_BOOL and msg.payload[IRQ_SET.size] == 0:
            return b""
        if action == IrqSetFlags.ACTION_MASK:
            self._intx_masked = True
        elif action == IrqSetFlags.ACTION_UNMASK:
            self._intx_masked = False
            if self.function.intx_asserted:
                self._intx_fire()
        else:  # TRIGGER from the client
            if self._intx_fd is not None:
                self.metrics.intx_signals += 1
                self._signals.append(self._intx_fd)
        return b""

    def _disable(self, index: int) -> None:
        if index == PciIrqIndex.MSIX:
            for fd in self._msix_fds.values():
                os.close(fd)
            self._msix_fds.clear()
        elif index == PciIrqIndex.INTX and self._intx_fd is not None:
            os.close(self._intx_fd)
            self._intx_fd = None
            self._intx_masked = False

    @property
    def msix_eventfds(self) -> dict[int, int]:
        """Vector -> eventfd assigned by the client."""
        return dict(self._msix_fds)

    # -- region access -----------------------------------------------------------------------

    def _check_access(self, a: RegionAccess) -> None:
        if a.data_count > MAX_DATA_XFER_SIZE:
            raise VfioUserError(f"region access of {a.data_count} bytes > max_data_xfer_size")
        size = self.region_size(a.region) if 0 <= a.region < PciRegion.NUM else 0
        if a.data_count == 0 or a.offset + a.data_count > size:
            raise VfioUserError(
                f"region {a.region} access {a.offset:#x}+{a.data_count} outside its {size} bytes"
            )
        if a.region < PCI_NUM_BARS and a.data_count not in (1, 2, 4, 8):
            raise VfioUserError(f"BAR access of {a.data_count} bytes (1, 2, 4 or 8)")

    def _region_read(self, msg: Message) -> bytes:
        """vfio-user.rst "VFIO_USER_REGION_READ": the reply repeats the request's
        offset, region and count, then the data."""
        self._exact(msg, REGION_ACCESS.size)
        a = REGION_ACCESS.unpack(msg.payload)
        self._check_access(a)
        fn = self.function
        if a.region == PciRegion.CONFIG:
            if a.data_count in (1, 2, 4) and a.offset % a.data_count == 0:
                data = fn.cfg_read(a.offset, a.data_count).to_bytes(a.data_count, "little")
            else:  # a bulk read (QEMU reads the whole space at start): no side effects
                data = bytes(fn.config[a.offset : a.offset + a.data_count])
        else:
            data = fn.bar_read(a.region, a.offset, a.data_count).to_bytes(a.data_count, "little")
        return msg.payload + data

    def _region_write(self, msg: Message) -> bytes:
        """vfio-user.rst "VFIO_USER_REGION_WRITE": the reply is offset, region, count."""
        if len(msg.payload) < REGION_ACCESS.size:
            raise VfioUserError(f"REGION_WRITE body of {len(msg.payload)} bytes")
        a = REGION_ACCESS.unpack_from(msg.payload, 0)
        data = msg.payload[REGION_ACCESS.size :]
        if len(data) != a.data_count:
            raise VfioUserError(f"REGION_WRITE count {a.data_count} with {len(data)} bytes of data")
        self._check_access(a)
        fn = self.function
        if a.region == PciRegion.CONFIG:
            if a.data_count in (1, 2, 4) and a.offset % a.data_count == 0:
                fn.cfg_write(a.offset, a.data_count, int.from_bytes(data, "little"))
            else:
                for i, b in enumerate(data):
                    fn.cfg_write(a.offset + i, 1, b)
        else:
            fn.bar_write(a.region, a.offset, a.data_count, int.from_bytes(data, "little"))
        return msg.payload[: REGION_ACCESS.size]

    def _reset(self, msg: Message) -> bytes:
        """vfio-user.rst "VFIO_USER_DEVICE_RESET": neither request nor reply has a
        payload."""
        self._exact(msg, 0)
        self.function.function_reset()
        self._intx_masked = False
        self._parked.clear()
        return b""

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """The client is gone: reset the function, drop memory and eventfds."""
        self.function.function_reset()
        self.unmap_all()
        self._disable(PciIrqIndex.MSIX)
        self._disable(PciIrqIndex.INTX)
        self._signals.clear()
        self.function.connect_msix(None)


def _make_nonblocking(fds: list[int]) -> None:
    """Interrupt eventfds are written from the server loop: a blocking one whose
    counter is at its maximum (or a full pipe) would hang the server, so each is made
    non-blocking (the file description is shared with the client, which reads it
    non-blocking anyway); one that cannot be is refused (the message closes it)."""
    for fd in fds:
        try:
            os.set_blocking(fd, False)
        except OSError as e:
            raise VfioUserError(f"interrupt descriptor cannot be made non-blocking: {e}") from None
