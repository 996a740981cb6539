"""The sans-I/O vfio-user server core (transport/vfio_user/backend.py), message by
message, against a VirtioPciFunction."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence

import pytest

from pyvirtio.devices.rng import RngDevice
from pyvirtio.memory.guest_memory import GuestMemory, create_memfd
from pyvirtio.transport.pci.device import VirtioPciFunction
from pyvirtio.transport.pci.spec import PciCfg
from pyvirtio.transport.vfio_user import spec
from pyvirtio.transport.vfio_user.backend import VfioUserBackend
from pyvirtio.transport.vfio_user.codec import (
    Message,
    MessageReader,
    encode_command,
    encode_version,
)
from pyvirtio.transport.vfio_user.spec import (
    HEADER,
    Command,
    DmaFlags,
    HeaderFlags,
    IrqSetFlags,
    PciIrqIndex,
    PciRegion,
)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class Rig:
    def __init__(self, mode: str = "modern") -> None:
        self.mem = GuestMemory()
        self.fn = VirtioPciFunction(RngDevice(), mode=mode, mem=self.mem)  # type: ignore[arg-type]
        self.be = VfioUserBackend(self.fn, self.mem)
        self.ids = 0

    def msg(self, cmd: int, payload: bytes = b"", fds: Sequence[int] = ()) -> Message:
        self.ids += 1
        (m,) = MessageReader().feed(encode_command(self.ids, cmd, payload), list(fds))
        return m

    def call(self, cmd: int, payload: bytes = b"", fds: Sequence[int] = ()) -> tuple[int, bytes]:
        """(errno or 0, reply payload)."""
        raw = self.be.handle(self.msg(cmd, payload, fds))
        assert raw is not None
        h = HEADER.unpack(raw[:16])
        assert h.flags & HeaderFlags.REPLY and h.size == len(raw)
        return (h.error_no if h.flags & HeaderFlags.ERROR else 0), raw[16:]

    def version(self) -> None:
        assert self.call(Command.VERSION, encode_version(0, 0, {}))[0] == 0

    def close(self) -> None:
        self.be.close()
        self.fn.close()
        self.mem.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def test_commands_before_version_are_refused(rig: Rig) -> None:
    assert rig.call(Command.DEVICE_GET_INFO, bytes(16))[0] == errno.EINVAL


def test_version_reply_caps_and_minor(rig: Rig) -> None:
    err, body = rig.call(Command.VERSION, encode_version(0, 5, {"max_msg_fds": 4}))
    assert err == 0
    from pyvirtio.transport.vfio_user.codec import decode_version

    ver, caps = decode_version(body)
    assert ver.major == 0 and ver.minor == 1  # at most the client's
    assert caps.max_msg_fds == spec.MAX_MSG_FDS <= 16 and "migration" not in caps.raw
    assert rig.call(Command.VERSION, encode_version(0, 0, {}))[0] == errno.EINVAL  # twice


def test_wrong_major_is_refused(rig: Rig) -> None:
    assert rig.call(Command.VERSION, encode_version(1, 0, {}))[0] == errno.EINVAL


def test_device_info_region_info_irq_info(rig: Rig) -> None:
    rig.version()
    err, body = rig.call(
        Command.DEVICE_GET_INFO, spec.DEVICE_INFO.pack(spec.DeviceInfo(16, 0, 0, 0))
    )
    info = spec.DEVICE_INFO.unpack(body)
    assert err == 0 and info.flags == 3 and info.num_regions == 9 and info.num_irqs == 5
    sizes = {}
    for i in range(9):
        _, body = rig.call(
            Command.DEVICE_GET_REGION_INFO,
            spec.REGION_INFO.pack(spec.RegionInfo(32, 0, i, 0, 0, 0)),
        )
        ri = spec.REGION_INFO.unpack(body)
        sizes[i] = ri.size
        assert ri.region == i and not ri.flags & spec.RegionFlags.MMAP
    assert sizes[PciRegion.CONFIG] == 256
    assert sizes[4] == rig.fn.bar_size(4) > 0 and sizes[1] == rig.fn.bar_size(1) > 0
    assert sizes[0] == sizes[2] == sizes[6] == 0
    err, _ = rig.call(
        Command.DEVICE_GET_REGION_INFO, spec.REGION_INFO.pack(spec.RegionInfo(32, 0, 9, 0, 0, 0))
    )
    assert err == errno.EINVAL
    _, body = rig.call(Command.DEVICE_GET_IRQ_INFO, spec.IRQ_INFO.pack(spec.IrqInfo(16, 0, 2, 0)))
    assert spec.IRQ_INFO.unpack(body).irq_count == rig.fn.msix_table_size
    _, body = rig.call(Command.DEVICE_GET_IRQ_INFO, spec.IRQ_INFO.pack(spec.IrqInfo(16, 0, 0, 0)))
    intx = spec.IRQ_INFO.unpack(body)
    assert intx.irq_count == 1 and intx.flags & spec.IrqInfoFlags.AUTOMASKED


def test_config_space_reads_bulk_and_aligned(rig: Rig) -> None:
    rig.version()
    access = spec.REGION_ACCESS.pack(spec.RegionAccess(0, PciRegion.CONFIG, 256))
    err, body = rig.call(Command.REGION_READ, access)
    assert err == 0 and body[:16] == access and body[16:] == bytes(rig.fn.config)
    assert int.from_bytes(body[16:18], "little") == 0x1AF4


@pytest.mark.parametrize(
    ("region", "offset", "count"),
    [(PciRegion.CONFIG, 250, 8), (4, 0, 3), (4, 0, 16), (0, 0, 4), (9, 0, 4),
     (PciRegion.CONFIG, 0, 0)],
)  # fmt: skip
def test_region_access_outside_or_odd_is_refused(
    rig: Rig, region: int, offset: int, count: int
) -> None:
    rig.version()
    err, _ = rig.call(
        Command.REGION_READ, spec.REGION_ACCESS.pack(spec.RegionAccess(offset, region, count))
    )
    assert err == errno.EINVAL


def test_region_write_count_must_match_data(rig: Rig) -> None:
    rig.version()
    body = spec.REGION_ACCESS.pack(spec.RegionAccess(4, PciRegion.CONFIG, 2)) + b"\x06"
    assert rig.call(Command.REGION_WRITE, body)[0] == errno.EINVAL


def test_dma_map_adds_guest_memory_and_unmap_removes_it(rig: Rig) -> None:
    rig.version()
    fd = create_memfd(1 << 20)
    m = spec.DMA_MAP.pack(spec.DmaMap(32, DmaFlags.READ | DmaFlags.WRITE, 0, 0x100000, 1 << 20))
    assert rig.call(Command.DMA_MAP, m, [fd])[0] == 0
    assert rig.mem.contains(0x100000, 1 << 20)
    rig.mem.write(0x100000, b"hi")
    assert os.pread(fd, 2, 0) == b"hi"
    # "A command to map over an existing region must be failed ... with EEXIST"
    fd2 = create_memfd(1 << 20)
    assert rig.call(Command.DMA_MAP, m, [fd2])[0] == errno.EEXIST
    assert not _fd_open(fd2)
    u = spec.DMA_UNMAP.pack(spec.DmaUnmap(24, 0, 0x100000, 1 << 20))
    err, body = rig.call(Command.DMA_UNMAP, u)
    assert err == 0 and body == u  # "responds with the original DMA entry"
    assert not rig.mem.contains(0x100000, 1)
    assert not _fd_open(fd)
    assert rig.call(Command.DMA_UNMAP, u)[0] == errno.EINVAL  # no longer mapped


def test_dma_map_without_fd_is_recorded_not_reachable(rig: Rig) -> None:
    rig.version()
    m = spec.DMA_MAP.pack(spec.DmaMap(32, DmaFlags.READ, 0, 0xC0000, 0x20000))
    assert rig.call(Command.DMA_MAP, m)[0] == 0
    assert not rig.mem.contains(0xC0000, 1) and rig.be.windows[0].mapped is False
    u = spec.DMA_UNMAP.pack(spec.DmaUnmap(24, 2, 0, 0))  # VFIO_DMA_UNMAP_FLAG_ALL
    assert rig.call(Command.DMA_UNMAP, u)[0] == 0 and rig.be.windows == []


def test_dma_map_beyond_the_file_is_refused_and_fd_closed(rig: Rig) -> None:
    rig.version()
    fd = create_memfd(4096)
    m = spec.DMA_MAP.pack(spec.DmaMap(32, 3, 0, 0, 1 << 20))
    assert rig.call(Command.DMA_MAP, m, [fd])[0] == errno.EINVAL
    assert not _fd_open(fd) and rig.mem.regions == ()


def test_dma_map_of_a_file_that_can_shrink_is_refused(rig: Rig, tmp_path: object) -> None:
    rig.version()
    fd = os.memfd_create("unsealable", 0)  # no MFD_ALLOW_SEALING
    os.ftruncate(fd, 1 << 20)
    m = spec.DMA_MAP.pack(spec.DmaMap(32, 3, 0, 0, 1 << 20))
    assert rig.call(Command.DMA_MAP, m, [fd])[0] == errno.EPERM
    assert not _fd_open(fd)


def test_fds_on_a_command_that_takes_none_are_refused_and_closed(rig: Rig) -> None:
    rig.version()
    fd = os.eventfd(0)
    assert rig.call(Command.DEVICE_RESET, b"", [fd])[0] == errno.EINVAL
    assert not _fd_open(fd)


def _irq_set(flags: int, index: int, start: int, count: int, data: bytes = b"") -> bytes:
    return spec.IRQ_SET.pack(spec.IrqSet(20 + len(data), flags, index, start, count)) + data


def test_msix_eventfds_are_signalled_for_vectors(rig: Rig) -> None:
    rig.version()
    fds = [os.eventfd(0) for _ in range(2)]
    trig = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
    assert rig.call(Command.DEVICE_SET_IRQS, _irq_set(trig, PciIrqIndex.MSIX, 0, 2), fds)[0] == 0
    # the client keeps the table: our function signals whatever its own masks say
    cap = rig.fn.msix_cap_offset
    assert cap is not None
    rig.fn.cfg_write(cap + 2, 2, 0x8000)
    rig.fn._msix_notify(1)
    assert rig.be.take_signals() == [fds[1]]
    # DATA_BOOL trigger from the client
    rig.call(
        Command.DEVICE_SET_IRQS,
        _irq_set(IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_TRIGGER, 2, 0, 2, b"\1\0"),
    )
    assert rig.be.take_signals() == [fds[0]]
    # count 0 + DATA_NONE: disable the index (the fds are closed)
    none = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER
    assert rig.call(Command.DEVICE_SET_IRQS, _irq_set(none, 2, 0, 0))[0] == 0
    assert not any(_fd_open(fd) for fd in fds)


def test_set_irqs_malformed(rig: Rig) -> None:
    rig.version()
    fd = os.eventfd(0)
    trig = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
    n = rig.fn.msix_table_size
    assert rig.call(Command.DEVICE_SET_IRQS, _irq_set(trig, 2, n, 1), [fd])[0] == errno.EINVAL
    assert not _fd_open(fd)
    both = IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_TRIGGER
    assert rig.call(Command.DEVICE_SET_IRQS, _irq_set(both, 2, 0, 1))[0] == errno.EINVAL
    # argsz that does not match the body
    bad = spec.IRQ_SET.pack(spec.IrqSet(99, trig, 2, 0, 1))
    assert rig.call(Command.DEVICE_SET_IRQS, bad)[0] == errno.EINVAL


def test_intx_is_automasked_until_unmask(rig: Rig) -> None:
    rig.version()
    fd = os.eventfd(0)
    trig = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
    assert rig.call(Command.DEVICE_SET_IRQS, _irq_set(trig, 0, 0, 1), [fd])[0] == 0
    rig.fn._raise_intx(1)  # ISR queue bit: INTA# rises
    assert rig.be.take_signals() == [fd]
    rig.fn._raise_intx(1)  # still masked: nothing
    assert rig.be.take_signals() == []
    unmask = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK
    assert rig.call(Command.DEVICE_SET_IRQS, _irq_set(unmask, 0, 0, 1))[0] == 0
    assert rig.be.take_signals() == [fd]  # the line is still high
    rig.fn._read_isr()
    rig.call(Command.DEVICE_SET_IRQS, _irq_set(unmask, 0, 0, 1))
    assert rig.be.take_signals() == []


def test_device_reset_is_a_function_level_reset(rig: Rig) -> None:
    rig.version()
    rig.fn.cfg_write(PciCfg.COMMAND, 2, 0x7)
    assert rig.call(Command.DEVICE_RESET)[0] == 0
    assert rig.fn.command == 0 and not rig.fn.msix_enabled
    assert rig.call(Command.DEVICE_RESET, b"x")[0] == errno.EINVAL


def test_unknown_and_unsupported_commands(rig: Rig) -> None:
    rig.version()
    assert rig.call(99)[0] == errno.ENOTSUP
    assert rig.call(Command.DMA_READ, bytes(16))[0] == errno.ENOTSUP


def test_no_reply_gets_no_reply(rig: Rig) -> None:
    rig.version()
    (m,) = MessageReader().feed(
        encode_command(
            5,
            Command.REGION_WRITE,
            spec.REGION_ACCESS.pack(spec.RegionAccess(0x3C, 7, 1)) + b"\x0a",
            no_reply=True,
        )
    )
    assert rig.be.handle(m) is None
    assert rig.fn.config[PciCfg.INTERRUPT_LINE] == 0x0A


def test_interrupt_descriptors_are_made_nonblocking(rig: Rig) -> None:
    """A blocking descriptor that cannot take a write (a full pipe) must not hang the
    server loop: SET_IRQS makes every interrupt descriptor non-blocking."""
    rig.version()
    r, w = os.pipe()
    os.set_blocking(w, True)
    trig = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
    assert rig.call(Command.DEVICE_SET_IRQS, _irq_set(trig, PciIrqIndex.MSIX, 0, 1), [w])[0] == 0
    assert not os.get_blocking(w)
    with pytest.raises(BlockingIOError):
        while True:
            os.write(w, bytes(65536))
    os.close(r)
