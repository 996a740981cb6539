"""A small vfio-user client for tests: a :class:`~pyvirtio.transport.bus.Bus` with one
PCI function (at 00:01.0) that lives behind a vfio-user socket.

It does what QEMU's vfio-user-pci does, in miniature: VERSION, DMA_MAP of a memfd
guest RAM, region and IRQ information, configuration space and BAR accesses as
REGION_READ/WRITE, and the MSI-X table and PBA kept on the client side (as QEMU's
vfio-pci traps them): when the function's MSI-X is enabled every vector gets an
eventfd (SET_IRQS), and a signalled vector becomes an MSI message from the local
table unless the local entry is masked. INTx gets an eventfd too, unmasked after each
interrupt. So our own PCI driver transports run unchanged against the server.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
from collections.abc import Sequence
from typing import Any

from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.transport.bus import Interrupt
from pyvirtio.transport.pci.spec import (
    MSIX_CONTROL_ENABLE,
    PCI_BAR_IO_ADDR_MASK,
    PCI_BAR_MEM_ADDR_MASK,
    PCI_BAR_MEM_TYPE_64,
    PCI_BAR_SPACE_IO,
    PciCapId,
    PciCfg,
    PciCommand,
    bar_offset,
)
from pyvirtio.transport.vfio_user.codec import (
    Message,
    MessageReader,
    decode_version,
    encode_command,
    encode_version,
)
from pyvirtio.transport.vfio_user.spec import (
    DEVICE_INFO,
    DMA_MAP,
    DMA_UNMAP,
    IRQ_INFO,
    IRQ_SET,
    REGION_ACCESS,
    REGION_INFO,
    Command,
    DeviceInfo,
    DmaFlags,
    DmaMap,
    DmaUnmap,
    HeaderFlags,
    IrqInfo,
    IrqSet,
    IrqSetFlags,
    PciIrqIndex,
    PciRegion,
    RegionAccess,
    RegionInfo,
)

BDF = 1 << 3  # 00:01.0
INTX_LINE = 11


class VfioUserError(Exception):
    """The server answered with an error."""

    def __init__(self, command: int, err: int) -> None:
        super().__init__(f"command {command} failed with errno {err}")
        self.errno = err


class VfioUserClient:
    """Synchronous command/reply over a vfio-user socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.reader = MessageReader(expect_replies=True)
        self._id = 0
        self._queued: list[Message] = []

    def send(
        self, command: int, payload: bytes = b"", fds: Sequence[int] = (), *, no_reply: bool = False
    ) -> None:
        """Send one command."""
        self._id = (self._id + 1) & 0xFFFF
        data = encode_command(self._id, command, payload, no_reply=no_reply)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", list(fds)).tobytes())]
        self.sock.sendmsg([data], anc if fds else [])

    def recv(self) -> Message:
        """The next reply."""
        while not self._queued:
            data, anc, _, _ = self.sock.recvmsg(1 << 21, socket.CMSG_SPACE(64))
            if not data:
                raise ConnectionError("server hung up")
            fds: Sequence[int] = ()
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", raw[: len(raw) - len(raw) % 4]))
            self._queued.extend(self.reader.feed(data, fds))
        return self._queued.pop(0)

    def call(self, command: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """Send and wait for the reply; raise :class:`VfioUserError` on an error reply."""
        self.send(command, payload, fds)
        reply = self.recv()
        reply.close()
        assert reply.header.command == command and reply.header.msg_id == self._id
        if reply.header.flags & HeaderFlags.ERROR:
            raise VfioUserError(command, reply.header.error_no)
        return reply.payload

    def close(self) -> None:
        """Hang up."""
        self.sock.close()
        self.reader.close()


class VfioUserBus:
    """A :class:`~pyvirtio.transport.bus.Bus` with the server's function at 00:01.0."""

    def __init__(self, path: str, ram_size: int = 8 << 20) -> None:
        self.client = VfioUserClient(path)
        self.mem = GuestMemory.create(ram_size, name="vfio-user-test-ram")
        self.allocator = GuestAllocator(1 << 20, ram_size - (1 << 20))
        c = self.client
        reply = c.call(Command.VERSION, encode_version(0, 0, {"max_msg_fds": 16}))
        self.version, self.server_caps = decode_version(reply)
        region = self.mem.regions[0]
        c.call(
            Command.DMA_MAP,
            DMA_MAP.pack(DmaMap(32, DmaFlags.READ | DmaFlags.WRITE, 0, 0, ram_size)),
            [region.fd],
        )
        self.info = DEVICE_INFO.unpack(
            c.call(Command.DEVICE_GET_INFO, DEVICE_INFO.pack(DeviceInfo(16, 0, 0, 0)))
        )
        self.regions = {
            i: REGION_INFO.unpack(
                c.call(
                    Command.DEVICE_GET_REGION_INFO, REGION_INFO.pack(RegionInfo(32, 0, i, 0, 0, 0))
                )
            )
            for i in range(PciRegion.NUM)
        }
        self.irqs = {
            i: IRQ_INFO.unpack(
                c.call(Command.DEVICE_GET_IRQ_INFO, IRQ_INFO.pack(IrqInfo(16, 0, i, 0)))
            )
            for i in range(PciIrqIndex.NUM)
        }
        # MSI-X, kept here: find the capability
        self.msix_cap = 0
        self.msix_bar = -1
        self.msix_table_off = 0
        self.msix_pba_off = 0
        n = self.irqs[PciIrqIndex.MSIX].irq_count
        self.msix_table = bytearray(16 * n)
        for v in range(n):
            self.msix_table[v * 16 + 12] = 1
        cap = self._cfg(PciCfg.CAPABILITY_LIST, 1)
        while cap:
            if self._cfg(cap, 1) == PciCapId.MSIX:
                self.msix_cap = cap
                table = self._cfg(cap + 4, 4)
                pba = self._cfg(cap + 8, 4)
                self.msix_bar, self.msix_table_off = table & 7, table & ~7
                self.msix_pba_off = pba & ~7
            cap = self._cfg(cap + 1, 1)
        self._vector_fds: Sequence[int] = ()
        self._msix_on = False
        self.intx_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if self.irqs[PciIrqIndex.INTX].irq_count:
            self._set_irqs(PciIrqIndex.INTX, 0, 1, [self.intx_fd])
        self._bars: dict[int, tuple[int, int, bool]] | None = None

    def dma_unmap(self) -> None:
        """DMA_UNMAP guest RAM (the server must stop using it)."""
        size = self.mem.regions[0].size
        self.client.call(Command.DMA_UNMAP, DMA_UNMAP.pack(DmaUnmap(24, 0, 0, size)))

    def dma_map(self) -> None:
        """DMA_MAP guest RAM again (a new descriptor for the same memfd)."""
        region = self.mem.regions[0]
        fd = os.dup(region.fd)
        try:
            self.client.call(
                Command.DMA_MAP,
                DMA_MAP.pack(DmaMap(32, DmaFlags.READ | DmaFlags.WRITE, 0, 0, region.size)),
                [fd],
            )
        finally:
            os.close(fd)

    # -- helpers --------------------------------------------------------------------------

    def _set_irqs(self, index: int, start: int, count: int, fds: list[int]) -> None:
        flags = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
        self.client.call(
            Command.DEVICE_SET_IRQS, IRQ_SET.pack(IrqSet(20, flags, index, start, count)), fds
        )

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        """REGION_READ; returns the data."""
        reply = self.client.call(
            Command.REGION_READ, REGION_ACCESS.pack(RegionAccess(offset, region, count))
        )
        head = REGION_ACCESS.unpack_from(reply, 0)
        assert head == RegionAccess(offset, region, count)
        return reply[REGION_ACCESS.size :]

    def region_write(self, region: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        """REGION_WRITE (``posted``: no reply asked, as QEMU's BAR writes)."""
        payload = REGION_ACCESS.pack(RegionAccess(offset, region, len(data))) + data
        if posted:
            self.client.send(Command.REGION_WRITE, payload, no_reply=True)
        else:
            self.client.call(Command.REGION_WRITE, payload)

    def _cfg(self, offset: int, size: int) -> int:
        return int.from_bytes(self.region_read(PciRegion.CONFIG, offset, size), "little")

    def _decode(self) -> dict[int, tuple[int, int, bool]]:
        if self._bars is None:
            cmd = self._cfg(PciCfg.COMMAND, 2)
            bars: dict[int, tuple[int, int, bool]] = {}
            i = 0
            while i < 6:
                size = self.regions[i].size
                raw = self._cfg(bar_offset(i), 4)
                io = bool(raw & PCI_BAR_SPACE_IO)
                if io:
                    base = raw & PCI_BAR_IO_ADDR_MASK
                else:
                    base = raw & PCI_BAR_MEM_ADDR_MASK
                    if raw & PCI_BAR_MEM_TYPE_64:
                        base |= self._cfg(bar_offset(i + 1), 4) << 32
                enabled = cmd & (PciCommand.IO if io else PciCommand.MEMORY)
                if size and base and enabled:
                    bars[i] = (base, size, io)
                i += 2 if not io and raw & PCI_BAR_MEM_TYPE_64 else 1
            self._bars = bars
        return self._bars

    def _find(self, addr: int, size: int, io: bool) -> tuple[int, int] | None:
        for i, (base, n, is_io) in self._decode().items():
            if is_io == io and base <= addr and addr + size <= base + n:
                return i, addr - base
        return None

    # -- Bus ------------------------------------------------------------------------------

    def pci_cfg_read(self, bdf: int, offset: int, size: int) -> int:
        if bdf != BDF:
            return (1 << 8 * size) - 1
        return self._cfg(offset, size)

    def pci_cfg_write(self, bdf: int, offset: int, size: int, value: int) -> None:
        if bdf != BDF:
            return
        self.region_write(PciRegion.CONFIG, offset, value.to_bytes(size, "little"))
        self._bars = None
        cap = self.msix_cap
        if cap and offset < cap + 4 and cap + 2 < offset + size:
            on = bool(self._cfg(cap + 2, 2) & MSIX_CONTROL_ENABLE)
            if on and not self._msix_on:
                n = len(self.msix_table) // 16
                self._vector_fds = [
                    os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)
                ]
                self._set_irqs(PciIrqIndex.MSIX, 0, n, self._vector_fds)
            elif not on and self._msix_on:
                self.client.call(
                    Command.DEVICE_SET_IRQS,
                    IRQ_SET.pack(
                        IrqSet(20, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 2, 0, 0)
                    ),
                )
                for fd in self._vector_fds:
                    os.close(fd)
                self._vector_fds = []
            self._msix_on = on

    def _msix_local(self, index: int, offset: int, size: int) -> str | None:
        if index != self.msix_bar:
            return None
        if self.msix_table_off <= offset < self.msix_table_off + len(self.msix_table):
            return "table"
        if self.msix_pba_off <= offset < self.msix_pba_off + 8:
            return "pba"
        return None

    def mmio_read(self, addr: int, size: int) -> int:
        hit = self._find(addr, size, False)
        if hit is None:
            return (1 << 8 * size) - 1
        index, off = hit
        local = self._msix_local(index, off, size)
        if local == "table":
            o = off - self.msix_table_off
            return int.from_bytes(self.msix_table[o : o + size], "little")
        if local == "pba":
            return 0
        return int.from_bytes(self.region_read(index, off, size), "little")

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        hit = self._find(addr, size, False)
        if hit is None:
            return
        index, off = hit
        local = self._msix_local(index, off, size)
        if local == "table":
            o = off - self.msix_table_off
            self.msix_table[o : o + size] = value.to_bytes(size, "little")
            return
        if local == "pba":
            return
        self.region_write(index, off, value.to_bytes(size, "little"), posted=True)

    def io_read(self, port: int, size: int) -> int:
        hit = self._find(port, size, True)
        if hit is None:
            return (1 << 8 * size) - 1
        return int.from_bytes(self.region_read(hit[0], hit[1], size), "little")

    def io_write(self, port: int, size: int, value: int) -> None:
        hit = self._find(port, size, True)
        if hit is not None:
            self.region_write(hit[0], hit[1], value.to_bytes(size, "little"), posted=True)

    def interrupt_fds(self) -> list[int]:
        return [self.intx_fd, *self._vector_fds]

    def wait_interrupts(self, timeout: float | None) -> list[Interrupt]:
        fds = self.interrupt_fds()
        ready, _, _ = select.select(fds, [], [], timeout)
        out: list[Interrupt] = []
        for fd in ready:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            if fd == self.intx_fd:
                out.append(Interrupt("intx", line=INTX_LINE))
                unmask = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK
                self.client.call(Command.DEVICE_SET_IRQS, IRQ_SET.pack(IrqSet(20, unmask, 0, 0, 1)))
                continue
            v = self._vector_fds.index(fd)
            entry = self.msix_table[v * 16 : v * 16 + 16]
            if entry[12] & 1:
                continue  # masked: a real platform would set the pending bit
            addr = int.from_bytes(entry[0:8], "little")
            out.append(Interrupt("msi", address=addr, data=int.from_bytes(entry[8:12], "little")))
        return out

    def close(self) -> None:
        self.client.close()
        for fd in [self.intx_fd, *self._vector_fds]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._vector_fds = []
        self.mem.close()

    def __enter__(self) -> VfioUserBus:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
