"""BlkDevice (virtio-v1.2 §5.2) driven with raw request chains over split and packed
rings: framing, statuses, used lengths, read-only, writeback rules, configuration."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtio.core.driver import RingOptions
from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.drivers.blk import BlkDriver
from pyvirtio.errors import ConfigurationError
from pyvirtio.spec.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_CONFIG,
    VIRTIO_BLK_DISCARD_WRITE_ZEROES,
    VIRTIO_BLK_OUTHDR,
    BlkFeature,
    BlkReqType,
    BlkStatus,
)
from pyvirtio.spec.features import Feature, bit, has
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.testing import place_buffers
from pyvirtio.transport.loopback import LoopbackTransport, connect

RING = [pytest.param(False, id="split"), pytest.param(True, id="packed")]
OK, IOERR, UNSUPP = BlkStatus.OK, BlkStatus.IOERR, BlkStatus.UNSUPP
DISK = 64 * SECTOR_SIZE


def hdr(rtype: int, sector: int = 0) -> bytes:
    return VIRTIO_BLK_OUTHDR.pack_values(rtype, 0, sector)


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack_values(sector, num, flags)


class Raw:
    """A BlkDevice on a loopback transport, fed hand-made request chains."""

    def __init__(self, dev: BlkDevice, packed: bool, **ring_kw: Any) -> None:
        self.dev = dev
        self.drv = connect(BlkDriver, dev, ring=RingOptions(packed=packed, **ring_kw))
        self.t = self.drv.transport
        self.mem = self.t.mem

    def request(
        self, readable: Sequence[bytes], writable: Sequence[int], queue: int = 0
    ) -> tuple[int, list[bytes]] | None:
        """Submit one chain; returns (used length, writable segment contents) or None."""
        alloc = self.t.allocator
        q = self.drv.queues[queue]
        in_, addrs = place_buffers(self.mem, alloc, q, readable, writable, "raw")
        self.drv.kick(queue)
        item = q.get_used()
        result = None
        if item is not None:
            assert item[0] == "raw"
            result = (item[1], [self.mem.read(a, n) for a, n in in_])
        if item is not None:
            for a in addrs:
                alloc.free(a)
        return result

    def status_of(self, readable: Sequence[bytes], writable: Sequence[int]) -> int:
        r = self.request(readable, writable)
        assert r is not None
        return r[1][-1][-1]

    def needs_reset(self) -> bool:
        return bool(self.t.get_status() & DeviceStatus.DEVICE_NEEDS_RESET)

    def close(self) -> None:
        self.drv.close()
        self.t.close()


@pytest.fixture
def raw() -> Iterator[Any]:
    made: list[Raw] = []

    def make(packed: bool = False, backend: Any = None, **dev_kw: Any) -> Raw:
        drv_kw = {k: dev_kw.pop(k) for k in ("indirect", "event_idx") if k in dev_kw}
        dev = BlkDevice(backend or MemoryBackend(DISK), **dev_kw)
        r = Raw(dev, packed, **drv_kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# -- requests that succeed, with any descriptor arrangement (§2.7.4) -----------------


@pytest.mark.parametrize("packed", RING)
def test_read_with_arbitrary_descriptor_layout(raw: Any, packed: bool) -> None:
    """§2.7.4: "The device MUST NOT make assumptions about the particular arrangement
    of descriptors" - header split 8+8, data split oddly, status sharing a buffer."""
    r = raw(packed)
    r.dev.backend.data[SECTOR_SIZE : 3 * SECTOR_SIZE] = pattern(1024)
    h = hdr(BlkReqType.IN, 1)
    res = r.request([h[:5], h[5:9], h[9:]], [100, 412, 300, 213])
    assert res is not None
    used, bufs = res
    assert used == 1024 + 1
    data = b"".join(bufs)
    assert data[:1024] == pattern(1024)
    assert data[-1] == OK


@pytest.mark.parametrize("packed", RING)
def test_write_with_header_and_data_in_one_descriptor(raw: Any, packed: bool) -> None:
    r = raw(packed)
    payload = pattern(1536, 3)
    res = r.request([hdr(BlkReqType.OUT, 4) + payload[:700], payload[700:]], [1])
    assert res == (1, [bytes([OK])])
    assert r.dev.backend.data[4 * SECTOR_SIZE : 4 * SECTOR_SIZE + 1536] == payload
    assert r.dev.metrics.writes == 1
    assert r.dev.metrics.bytes_written == 1536


@pytest.mark.parametrize("packed", RING)
@pytest.mark.parametrize("indirect", [False, True])
def test_every_request_type_with_raw_chains(raw: Any, packed: bool, indirect: bool) -> None:
    r = raw(packed, indirect=indirect)
    assert r.request([hdr(BlkReqType.OUT, 2), pattern(512)], [1]) == (1, [b"\x00"])
    assert r.request([hdr(BlkReqType.IN, 2)], [512, 1]) == (513, [pattern(512), b"\x00"])
    assert r.request([hdr(BlkReqType.FLUSH)], [1]) == (1, [b"\x00"])
    got = r.request([hdr(BlkReqType.GET_ID)], [20, 1])
    assert got == (21, [b"pyvirtio".ljust(20, b"\0"), b"\x00"])
    assert r.request([hdr(BlkReqType.DISCARD), seg(2, 1)], [1]) == (1, [b"\x00"])
    assert r.request([hdr(BlkReqType.WRITE_ZEROES), seg(2, 1, 1)], [1]) == (1, [b"\x00"])
    assert r.dev.backend.data[1024:1536] == bytes(512)
    m = r.dev.metrics
    assert (m.reads, m.writes, m.flushes, m.get_ids, m.discards, m.write_zeroes) == (
        1,
        1,
        1,
        1,
        1,
        1,
    )


def test_get_id_is_nul_padded_or_exactly_twenty_bytes(raw: Any) -> None:
    r = raw(serial=b"A" * 20)
    res = r.request([hdr(BlkReqType.GET_ID)], [21])
    assert res == (21, [b"A" * 20 + b"\x00"])


def test_multi_segment_discard_and_write_zeroes(raw: Any) -> None:
    r = raw()
    r.dev.backend.data[:] = b"\xff" * DISK
    table = seg(0, 1) + seg(4, 2) + seg(10, 0)
    assert r.status_of([hdr(BlkReqType.WRITE_ZEROES), table], [1]) == OK
    data = r.dev.backend.data
    assert data[:512] == bytes(512)
    assert data[512 : 4 * 512] == b"\xff" * 1536
    assert data[4 * 512 : 6 * 512] == bytes(1024)
    assert data[6 * 512 :] == b"\xff" * (DISK - 6 * 512)


# -- malformed framing ---------------------------------------------------------------


@pytest.mark.parametrize("packed", RING)
def test_request_without_device_writable_status_needs_reset(raw: Any, packed: bool) -> None:
    """No writable byte: no status can be written -> DEVICE_NEEDS_RESET, queue stops."""
    r = raw(packed)
    assert r.request([hdr(BlkReqType.IN)], []) is None
    assert r.needs_reset()
    assert r.dev.queues[0] is not None and r.dev.queues[0].broken
    assert r.dev.metrics.errors.get("driver_error", 0) >= 1


@pytest.mark.parametrize("packed", RING)
def test_header_shorter_than_16_bytes_is_ioerr(raw: Any, packed: bool) -> None:
    r = raw(packed)
    assert r.status_of([hdr(BlkReqType.IN)[:12]], [1]) == IOERR
    assert r.status_of([], [64, 1]) == IOERR  # no device-readable part at all
    assert not r.needs_reset()


def test_in_data_length_must_be_multiple_of_512(raw: Any) -> None:
    """§5.2.6.1: "The length of data MUST be a multiple of 512 bytes for
    VIRTIO_BLK_T_IN and VIRTIO_BLK_T_OUT requests." -> IOERR, nothing read."""
    r = raw()
    res = r.request([hdr(BlkReqType.IN)], [500, 1])
    assert res == (1, [b"\xee" * 500, bytes([IOERR])])
    assert r.dev.metrics.bytes_read == 0


def test_out_data_length_must_be_multiple_of_512(raw: Any) -> None:
    r = raw()
    assert r.status_of([hdr(BlkReqType.OUT), b"x" * 513], [1]) == IOERR
    assert r.dev.backend.data == bytes(DISK)


@pytest.mark.parametrize(
    ("sector", "nbytes"),
    [(64, 512), (63, 1024), (2**64 - 1, 512), (2**63, 0), (2**55, 512)],
)
def test_read_beyond_capacity_is_ioerr(raw: Any, sector: int, nbytes: int) -> None:
    """§5.2.6.1: "A driver MUST NOT submit a request which would cause a read or write
    beyond capacity" - the device answers IOERR (also for sector*512 overflowing)."""
    r = raw()
    assert r.status_of([hdr(BlkReqType.IN, sector)], [nbytes, 1] if nbytes else [1]) == IOERR


@pytest.mark.parametrize(("sector", "nbytes"), [(64, 512), (63, 1024), (2**64 - 1, 512)])
def test_write_beyond_capacity_is_ioerr_and_writes_nothing(
    raw: Any, sector: int, nbytes: int
) -> None:
    r = raw()
    assert r.status_of([hdr(BlkReqType.OUT, sector), b"\x55" * nbytes], [1]) == IOERR
    assert r.dev.backend.data == bytes(DISK)


def test_read_of_last_sector_and_zero_length_read_succeed(raw: Any) -> None:
    r = raw()
    assert r.status_of([hdr(BlkReqType.IN, 63)], [512, 1]) == OK
    assert r.request([hdr(BlkReqType.IN, 64)], [1]) == (1, [b"\x00"])


def test_in_with_device_readable_data_is_ioerr(raw: Any) -> None:
    """Data in the wrong direction: a read's data is device-writable."""
    r = raw()
    assert r.status_of([hdr(BlkReqType.IN), b"\0" * 512], [512, 1]) == IOERR


def test_out_with_device_writable_data_is_ioerr(raw: Any) -> None:
    r = raw()
    assert r.status_of([hdr(BlkReqType.OUT), b"\1" * 512], [512, 1]) == IOERR
    assert r.dev.backend.data == bytes(DISK)


@pytest.mark.parametrize("n", [0, 19, 21, 512])
def test_get_id_data_must_be_20_bytes(raw: Any, n: int) -> None:
    """§5.2.6.1: "The length of data MUST be 20 bytes for VIRTIO_BLK_T_GET_ID"."""
    r = raw()
    assert r.status_of([hdr(BlkReqType.GET_ID)], [n, 1] if n else [1]) == IOERR


def test_flush_sector_must_be_zero(raw: Any) -> None:
    """§5.2.6.1: "A driver MUST set sector to 0 for a VIRTIO_BLK_T_FLUSH request."."""
    r = raw()
    assert r.status_of([hdr(BlkReqType.FLUSH, 5)], [1]) == IOERR
    # data in a flush is only a SHOULD NOT: tolerated
    assert r.status_of([hdr(BlkReqType.FLUSH), b"junk"], [1]) == OK


@pytest.mark.parametrize(
    "rtype", [2, 3, 5, BlkReqType.GET_LIFETIME, BlkReqType.SECURE_ERASE, 15, 16, 26, 0xFFFFFFFF]
)
def test_unknown_request_type_is_unsupp(raw: Any, rtype: int) -> None:
    r = raw()
    res = r.request([hdr(rtype)], [64, 1])
    assert res == (1, [b"\xee" * 64, bytes([UNSUPP])])
    assert r.dev.metrics.unsupported == 1


def test_legacy_flush_out_is_a_flush(raw: Any) -> None:
    """§5.2.6.3: VIRTIO_BLK_T_FLUSH_OUT "was a synonym for VIRTIO_BLK_T_FLUSH"."""
    dev = BlkDevice(MemoryBackend(DISK))
    drv = connect(BlkDriver, dev, legacy=True)
    try:
        assert not drv.has_feature(Feature.VERSION_1)
        req = drv.submit_request(5)
        drv.complete([req])
        assert req.status == OK
        assert dev.metrics.flushes == 1
    finally:
        drv.close()
        drv.transport.close()


# -- discard / write zeroes rules (§5.2.6.2) ------------------------------------------


@pytest.mark.parametrize("rtype", [BlkReqType.DISCARD, BlkReqType.WRITE_ZEROES])
def test_unknown_discard_write_zeroes_flags_are_unsupp(raw: Any, rtype: int) -> None:
    """§5.2.6.2: "The device MUST set the status byte to VIRTIO_BLK_S_UNSUPP for
    discard, secure erase and write zeroes commands if any unknown flag is set"."""
    r = raw()
    r.dev.backend.data[:] = b"\xff" * DISK
    assert r.status_of([hdr(rtype), seg(0, 1), seg(1, 1, 2)], [1]) == UNSUPP
    assert r.dev.backend.data == b"\xff" * DISK


def test_discard_with_unmap_flag_is_unsupp(raw: Any) -> None:
    """§5.2.6.2: "...MUST set the status byte to VIRTIO_BLK_S_UNSUPP for discard
    commands if the unmap flag is set"."""
    r = raw()
    assert r.status_of([hdr(BlkReqType.DISCARD), seg(0, 1, 1)], [1]) == UNSUPP


@pytest.mark.parametrize("rtype", [BlkReqType.DISCARD, BlkReqType.WRITE_ZEROES])
@pytest.mark.parametrize(
    "table",
    [
        pytest.param(b"", id="no-segment"),
        pytest.param(seg(0, 1)[:15], id="partial-segment"),
        pytest.param(seg(0, 1) * 5, id="more-than-max-seg"),
        pytest.param(seg(63, 2), id="beyond-capacity"),
        pytest.param(seg(2**63, 1), id="sector-overflow"),
        pytest.param(seg(0, 9), id="more-than-max-sectors"),
    ],
)
def test_discard_write_zeroes_framing_is_ioerr(raw: Any, rtype: int, table: bytes) -> None:
    """§5.2.6.1: data "MUST be a multiple of the size of struct
    virtio_blk_discard_write_zeroes", "MUST NOT contain more than max_discard_seg
    [max_write_zeroes_seg] segments"; ranges stay within capacity and the limits."""
    r = raw(
        max_discard_seg=4,
        max_write_zeroes_seg=4,
        max_discard_sectors=8,
        max_write_zeroes_sectors=8,
    )
    r.dev.backend.data[:] = b"\xff" * DISK
    readable = [hdr(rtype), table] if table else [hdr(rtype)]
    assert r.status_of(readable, [1]) == IOERR
    assert r.dev.backend.data == b"\xff" * DISK


def test_discard_not_negotiated_is_unsupp(raw: Any) -> None:
    class NoDiscard(BlkDriver):
        def specific_features(self, offered: int) -> int:
            return super().specific_features(offered) & ~bit(BlkFeature.DISCARD)

    dev = BlkDevice(MemoryBackend(DISK))
    drv = connect(NoDiscard, dev)
    try:
        req = drv.submit_request(BlkReqType.DISCARD, out=seg(0, 1))
        drv.wait_all()
        assert req.status == UNSUPP
    finally:
        drv.close()
        drv.transport.close()


# -- read-only (§5.2.6.2) --------------------------------------------------------------


@pytest.mark.parametrize(
    "readable",
    [
        pytest.param([hdr(BlkReqType.OUT), b"\1" * 512], id="out"),
        pytest.param([hdr(BlkReqType.DISCARD), seg(0, 1)], id="discard"),
        pytest.param([hdr(BlkReqType.WRITE_ZEROES), seg(0, 1)], id="write-zeroes"),
    ],
)
def test_read_only_device_must_fail_writes_and_write_nothing(
    raw: Any, readable: list[bytes]
) -> None:
    """§5.2.6.2: "A device MUST set the status byte to VIRTIO_BLK_S_IOERR for a write
    request if the VIRTIO_BLK_F_RO feature if offered, and MUST NOT write any data"."""
    backend = MemoryBackend(DISK, readonly=True, data=b"\x77" * DISK)
    r = raw(backend=backend)
    assert has(r.drv.features, BlkFeature.RO)
    assert r.status_of(readable, [1]) == IOERR
    assert backend.data == b"\x77" * DISK
    # reads and flushes still work
    assert r.status_of([hdr(BlkReqType.IN)], [512, 1]) == OK
    assert r.status_of([hdr(BlkReqType.FLUSH)], [1]) == OK


# -- backend errors -----------------------------------------------------------------


class FailingBackend(MemoryBackend):
    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        raise OSError(5, "EIO")

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        return 0  # short write


def test_backend_errors_are_ioerr(raw: Any) -> None:
    r = raw(backend=FailingBackend(DISK))
    assert r.status_of([hdr(BlkReqType.IN)], [512, 1]) == IOERR
    assert r.status_of([hdr(BlkReqType.OUT), b"a" * 512], [1]) == IOERR
    assert r.dev.metrics.errors["backend"] == 1
    assert r.dev.metrics.io_errors == 2
    assert not r.needs_reset()


# -- configuration and features (§5.2.3 - §5.2.5) ---------------------------------------


def test_offered_features() -> None:
    dev = BlkDevice(MemoryBackend(DISK))
    f = dev.specific_features()
    for b in (
        BlkFeature.SIZE_MAX,
        BlkFeature.SEG_MAX,
        BlkFeature.BLK_SIZE,
        BlkFeature.FLUSH,
        BlkFeature.TOPOLOGY,
        BlkFeature.CONFIG_WCE,
        BlkFeature.DISCARD,
        BlkFeature.WRITE_ZEROES,
    ):
        assert has(f, b), b
    for b in (BlkFeature.MQ, BlkFeature.RO, BlkFeature.GEOMETRY, BlkFeature.ZONED):
        assert not has(f, b), b
    f2 = BlkDevice(
        MemoryBackend(DISK, readonly=True), num_queues=3, geometry=(4, 2, 8), discard=False
    ).specific_features()
    assert has(f2, BlkFeature.MQ) and has(f2, BlkFeature.RO) and has(f2, BlkFeature.GEOMETRY)
    assert not has(f2, BlkFeature.DISCARD)


def test_config_wce_offered_only_with_flush() -> None:
    """§5.2.5.2: devices "MUST offer [VIRTIO_BLK_F_FLUSH] if they offer
    VIRTIO_BLK_F_CONFIG_WCE"."""
    f = BlkDevice(MemoryBackend(DISK)).specific_features()
    assert not has(f, BlkFeature.CONFIG_WCE) or has(f, BlkFeature.FLUSH)


def test_config_layout() -> None:
    dev = BlkDevice(
        MemoryBackend(DISK + 100),
        num_queues=3,
        queue_max_size=128,
        blk_size=4096,
        geometry=(10, 4, 16),
        max_discard_seg=5,
    )
    raw_cfg = dev.config_bytes()
    assert len(raw_cfg) == VIRTIO_BLK_CONFIG.size == 60
    cfg = VIRTIO_BLK_CONFIG.unpack(raw_cfg)
    assert cfg.capacity == 64
    assert cfg.seg_max == 126
    assert cfg.blk_size == 4096
    assert (cfg.cylinders, cfg.heads, cfg.sectors) == (10, 4, 16)
    assert cfg.num_queues == 3
    assert cfg.max_discard_seg == 5
    assert cfg.discard_sector_alignment == 8
    assert cfg.writeback == 1
    # §5.2.5.2: "The device MUST initialize padding bytes unused0 and unused1 to 0."
    assert raw_cfg[VIRTIO_BLK_CONFIG.offset_of("writeback") + 1] == 0
    assert raw_cfg[-3:] == b"\0\0\0"


def test_config_wce_without_flush_must_initialize_writeback_to_zero() -> None:
    """§5.2.5.2: "If VIRTIO_BLK_F_CONFIG_WCE is negotiated but VIRTIO_BLK_F_FLUSH is
    not, the device MUST initialize writeback to 0."."""
    dev = BlkDevice(MemoryBackend(DISK), writeback=True)
    wce = bit(BlkFeature.CONFIG_WCE) | Feature.VERSION_1.mask
    assert dev.validate_features(wce)
    assert VIRTIO_BLK_CONFIG.unpack(dev.config_bytes()).writeback == 0
    assert not dev.writeback
    dev.reset()
    assert dev.validate_features(wce | bit(BlkFeature.FLUSH))
    assert VIRTIO_BLK_CONFIG.unpack(dev.config_bytes()).writeback == 1


def test_writeback_field_writable_only_with_config_wce() -> None:
    dev = BlkDevice(MemoryBackend(DISK))
    off = VIRTIO_BLK_CONFIG.offset_of("writeback")
    v1 = Feature.VERSION_1.mask
    dev.validate_features(v1 | bit(BlkFeature.FLUSH))
    dev.write_config(off, b"\0")
    assert dev.writeback  # ignored
    dev.reset()
    dev.validate_features(v1 | bit(BlkFeature.FLUSH) | bit(BlkFeature.CONFIG_WCE))
    dev.write_config(off - 2, b"\0\0\0\0")  # a wider write covering the field
    assert not dev.writeback
    assert VIRTIO_BLK_CONFIG.unpack(dev.config_bytes()).writeback == 0
    dev.write_config(off, b"\x05")
    assert dev.writeback


def test_legacy_cache_mode_not_modified_by_feature_bits_or_status() -> None:
    """§5.2.5.3: a legacy driver "MAY read or write writeback before setting the DRIVER
    or DRIVER_OK" bit and "the device MUST NOT modify the cache mode ... as a result of
    a driver modifying the driver feature bits" (here CONFIG_WCE without FLUSH)."""
    dev = BlkDevice(MemoryBackend(DISK), writeback=True)
    t = LoopbackTransport(dev, legacy=True)
    try:
        S = DeviceStatus
        t.reset()
        t.set_status(S.ACKNOWLEDGE | S.DRIVER)
        t.write_config(VIRTIO_BLK_CONFIG.offset_of("writeback"), b"\0")
        assert not dev.writeback
        t.write_config(VIRTIO_BLK_CONFIG.offset_of("writeback"), b"\1")
        t.set_driver_features(bit(BlkFeature.CONFIG_WCE))
        t.set_status(S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK)
        assert dev.writeback
        assert VIRTIO_BLK_CONFIG.unpack(t.read_config(0, VIRTIO_BLK_CONFIG.size)).writeback == 1
    finally:
        t.close()


def test_writes_are_stable_when_flush_offered_but_not_negotiated(raw: Any) -> None:
    """§5.2.6.2 case 1: neither CONFIG_WCE nor FLUSH negotiated but FLUSH offered: the
    device commits each write before completing it (backend flush per write)."""

    class NoFlush(BlkDriver):
        def specific_features(self, offered: int) -> int:
            mask = bit(BlkFeature.FLUSH) | bit(BlkFeature.CONFIG_WCE)
            return super().specific_features(offered) & ~mask

    backend = MemoryBackend(DISK)
    dev = BlkDevice(backend, writeback=True)
    drv = connect(NoFlush, dev)
    try:
        assert not dev.writeback and not drv.writeback
        for i in range(3):
            drv.write(i, bytes(512))
        assert backend.flushes == 3
        drv.flush()  # nothing to send
        assert dev.metrics.flushes == 0
    finally:
        drv.close()
        drv.transport.close()


def test_writethrough_flushes_after_each_write_writeback_does_not(raw: Any) -> None:
    r = raw()
    backend = r.dev.backend
    assert r.drv.writeback
    r.drv.write(0, bytes(1024))
    r.drv.write_zeroes(0, 1)
    assert backend.flushes == 0
    r.drv.writeback = False
    assert not r.dev.writeback
    r.drv.write(0, bytes(1024))
    r.drv.write_zeroes(0, 1)
    r.drv.discard(0, 1)
    assert backend.flushes == 3
    assert r.dev.metrics.backend_flushes == 3


def test_device_reset_restores_initial_cache_mode(raw: Any) -> None:
    r = raw()
    r.drv.writeback = False
    r.drv.close()
    assert r.dev.writeback
    r.drv.initialize()
    assert r.drv.writeback


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        BlkDevice(MemoryBackend(DISK), serial=b"x" * 21)
    with pytest.raises(ConfigurationError):
        BlkDevice(MemoryBackend(DISK), blk_size=1000)
    with pytest.raises(ConfigurationError):
        BlkDevice(MemoryBackend(DISK), num_queues=0)
    with pytest.raises(ConfigurationError):
        BlkDevice(MemoryBackend(DISK), max_discard_seg=0)


def test_capacity_change_notifies_driver(raw: Any) -> None:
    """§5.2.6.2: on a capacity change "the device SHOULD trigger a configuration change
    notification"; §5.2.6.1: the driver "SHOULD check if ... capacity ... changed"."""
    r = raw()
    assert r.drv.capacity == 64
    r.dev.backend.data.extend(bytes(8 * SECTOR_SIZE))
    assert r.dev.refresh_capacity()
    assert not r.dev.refresh_capacity()
    r.drv.wait(0)
    assert r.drv.capacity == 72
    r.drv.write(70, os.urandom(1024))


def test_used_length_counts_data_and_status(raw: Any) -> None:
    r = raw()
    assert r.request([hdr(BlkReqType.IN)], [2048, 1])[0] == 2049  # type: ignore[index]
    assert r.request([hdr(BlkReqType.IN, 100)], [2048, 1])[0] == 1  # type: ignore[index]
    assert r.request([hdr(BlkReqType.OUT), bytes(512)], [1])[0] == 1  # type: ignore[index]


# -- any descriptor arrangement (hypothesis) ---------------------------------------------


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} - {0, len(data)})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    packed=st.booleans(),
    sector=st.integers(0, 60),
    nsect=st.integers(0, 4),
    out_cuts=st.lists(st.integers(0, 4096), max_size=5),
    in_cuts=st.lists(st.integers(0, 4096), max_size=5),
)
def test_device_must_not_assume_descriptor_arrangement(
    raw: Any, packed: bool, sector: int, nsect: int, out_cuts: list[int], in_cuts: list[int]
) -> None:
    """§2.7.4: "The device MUST NOT make assumptions about the particular arrangement
    of descriptors" - a write then a read, each cut into random descriptors, behave
    exactly as with the canonical layout."""
    r = raw(packed)
    payload = pattern(nsect * SECTOR_SIZE, sector)
    res = r.request(split_at(hdr(BlkReqType.OUT, sector) + payload, out_cuts), [1])
    assert res == (1, [bytes([OK])])
    in_sizes = [len(p) for p in split_at(bytes(nsect * SECTOR_SIZE + 1), in_cuts)]
    res = r.request(split_at(hdr(BlkReqType.IN, sector), out_cuts), in_sizes)
    assert res is not None
    assert res[0] == nsect * SECTOR_SIZE + 1
    got = b"".join(res[1])
    assert got[:-1] == payload and got[-1] == OK


def test_request_longer_than_seg_max_times_size_max_is_ioerr(raw: Any) -> None:
    """§5.2.3: "Maximum number of segments in a request is in seg_max", "Maximum size of
    any single segment is in size_max": more data than both allow gets IOERR, and
    nothing is read or written."""
    r = raw(size_max=1024, seg_max=2)
    assert r.status_of([hdr(BlkReqType.IN)], [2048, 1]) == OK
    assert r.status_of([hdr(BlkReqType.IN)], [2560, 1]) == IOERR
    assert r.status_of([hdr(BlkReqType.OUT), b"x" * 2560], [1]) == IOERR
    assert r.dev.backend.data == bytes(DISK)
    assert not r.needs_reset()


def test_seg_max_default_fits_the_ring_a_front_end_uses_not_the_largest_accepted() -> None:
    """A seg_max derived from the largest ring accepted (1022 for 1024) lets Linux
    build requests longer than a 128-entry ring without indirect descriptors, and
    hang; the default is 126 (qemu-storage-daemon's), never above queue_max_size - 2."""

    def seg_max(dev: BlkDevice) -> int:
        return VIRTIO_BLK_CONFIG.unpack(dev.config_bytes()).seg_max

    assert seg_max(BlkDevice(MemoryBackend(DISK), queue_max_size=1024)) == 126
    assert seg_max(BlkDevice(MemoryBackend(DISK), queue_max_size=16)) == 14
    assert seg_max(BlkDevice(MemoryBackend(DISK), queue_max_size=1024, seg_max=500)) == 500


def test_serve_blk_seg_max_flag() -> None:
    from pyvirtio.cli.main import build_parser
    from pyvirtio.devices.blk import DEVICE_TYPE

    args = build_parser().parse_args(
        ["serve", "blk", "--socket", "/tmp/x", "--null", "1M", "--seg-max", "30"]
    )
    assert DEVICE_TYPE.create is not None
    dev = DEVICE_TYPE.create(args)
    assert VIRTIO_BLK_CONFIG.unpack(dev.config_bytes()).seg_max == 30
    args = build_parser().parse_args(["serve", "blk", "--socket", "/tmp/x", "--null", "1M"])
    dev = DEVICE_TYPE.create(args)
    assert VIRTIO_BLK_CONFIG.unpack(dev.config_bytes()).seg_max == 126
