"""Block and entropy devices over loopback, fed random request chains.

Property (the quality bar's device clause, end to end through
:class:`~pyvirtio.transport.loopback.LoopbackTransport`): whatever a driver puts in a
request (type, reserved field, sector, data lengths, discard/write-zeroes segments
and flags, how the bytes are cut into descriptors), ``notify`` never raises; the
device answers every request with a status byte and a used length within the
buffer's device-writable part, or sets DEVICE_NEEDS_RESET; guest memory changes only
inside the writable segments of the requests and the device's ring area; and the
block backend changes only for an OUT / WRITE_ZEROES / DISCARD answered with OK.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.devices.rng import CallableSource, RngDevice
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.blk import BlkFeature, BlkReqType, BlkStatus
from pyvirtio.spec.features import Feature
from pyvirtio.spec.ring import split_used_size
from pyvirtio.spec.status import DeviceStatus as S
from pyvirtio.transport.loopback import LoopbackTransport
from pyvirtio.virtqueue import make_driver_queue
from pyvirtio.virtqueue.common import DriverVirtqueue
from tests.fuzz._support import assert_changes_within, time_limit, weighted

SECTORS = 64
MEM = 1 << 20
_HDR = struct.Struct("<IIQ")
_SEG = struct.Struct("<QII")
CHANGING = {BlkReqType.OUT, BlkReqType.WRITE_ZEROES, BlkReqType.DISCARD}

ring_features = st.sets(
    st.sampled_from(
        [Feature.RING_PACKED, Feature.INDIRECT_DESC, Feature.EVENT_IDX, Feature.IN_ORDER]
    )
).map(lambda fs: sum(f.mask for f in fs))

rtypes = weighted(
    (6, st.sampled_from(list(BlkReqType))),
    (1, st.integers(0, 0xFFFF_FFFF)),
)
sectors = weighted((4, st.integers(0, SECTORS + 2)), (1, st.integers(0, (1 << 64) - 1)))
seg_lens = weighted(
    (4, st.sampled_from([0, 1, 15, 16, 17, 20, 21, 512, 513, 1024, 1025, 4096])),
    (2, st.integers(0, 2048)),
)
discard_segs = st.lists(
    st.tuples(
        sectors,
        weighted((3, st.integers(0, 8)), (1, st.integers(0, 0xFFFF_FFFF))),
        st.integers(0, 3),
    ),
    max_size=20,
)
blk_requests = st.tuples(
    rtypes,
    weighted((5, st.just(0)), (1, st.integers(0, 0xFFFF_FFFF))),  # reserved
    sectors,
    weighted((3, st.sampled_from([0, 512, 1024, 4096])), (1, st.integers(0, 5000))),  # data bytes
    discard_segs,
    st.lists(st.integers(1, 64), max_size=3),  # cuts of the readable part
    weighted(  # writable segments: the status byte alone, data + status, or anything
        (3, st.just([1])),
        (
            3,
            st.lists(st.sampled_from([512, 1024, 20]), min_size=1, max_size=3).map(
                lambda x: [*x, 1]
            ),
        ),
        (2, st.lists(seg_lens, min_size=0, max_size=4)),
    ),
)


def start(t: LoopbackTransport, feats: int, size: int) -> DriverVirtqueue[Any]:
    t.set_status(S.ACKNOWLEDGE | S.DRIVER)
    feats &= t.get_device_features()
    t.set_driver_features(feats)
    t.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    assert t.get_status() & S.FEATURES_OK
    q = make_driver_queue(t.mem, t.allocator, size, feats)
    t.setup_queue(0, size, q.addrs)
    t.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    return q


def ring_area(q: DriverVirtqueue[Any], packed: bool) -> list[tuple[int, int]]:
    a = q.addrs
    if packed:
        return [(a.desc, 16 * q.size), (a.device, 4)]
    return [(a.device, split_used_size(q.size))]


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    pieces = []
    pos = 0
    for c in cuts:
        if pos >= len(data):
            break
        pieces.append(data[pos : pos + c])
        pos += c
    if pos < len(data) or not pieces:
        pieces.append(data[pos:])
    return pieces


class Batch:
    """Requests placed in guest RAM, answered by one notification."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.writable: list[tuple[int, int]] = []
        self.reqs: dict[int, tuple[int, list[tuple[int, int]]]] = {}  # token -> type, in_


def place(
    t: LoopbackTransport, q: DriverVirtqueue[Any], batch: Batch, token: int, req: Any
) -> bool:
    rtype, reserved, sector, nbytes, segs, cuts, wlens = req
    rng = random.Random(token)
    if rtype in (BlkReqType.DISCARD, BlkReqType.WRITE_ZEROES) and segs:
        data = b"".join(_SEG.pack(s, n & 0xFFFF_FFFF, f) for s, n, f in segs)
    else:
        data = rng.randbytes(nbytes) if rtype == BlkReqType.OUT else bytes(nbytes % 64)
    readable = _HDR.pack(rtype, reserved, sector) + data
    out = []
    for piece in cut(readable, cuts):
        if not piece:
            continue
        addr = t.allocator.alloc(len(piece))
        t.mem.write(addr, piece)
        out.append((addr, len(piece)))
    in_ = []
    for n in wlens:
        if n == 0:
            continue
        addr = t.allocator.alloc(n)
        t.mem.write(addr, b"\xee" * n)
        in_.append((addr, n))
    if not out and not in_:
        return False
    try:
        q.add(out, in_, token)
    except Exception:  # no room / too many segments for this queue: skip the request
        return False
    batch.writable += in_
    batch.reqs[token] = (rtype, in_)
    return True


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    feats=ring_features,
    size_exp=st.integers(2, 4),
    batches=st.lists(st.lists(blk_requests, min_size=1, max_size=4), min_size=1, max_size=4),
    writeback=st.booleans(),
)
def test_blk_answers_every_request_or_needs_reset(
    feats: int, size_exp: int, batches: list[list[Any]], writeback: bool
) -> None:
    backend = MemoryBackend(SECTORS * 512, data=random.Random(0).randbytes(SECTORS * 512))
    device = BlkDevice(backend, writeback=writeback, queue_max_size=16)
    t = LoopbackTransport(device, MEM)
    packed = bool(feats & Feature.RING_PACKED.mask)
    feats |= (
        Feature.VERSION_1.mask
        | (1 << BlkFeature.FLUSH)
        | (1 << BlkFeature.DISCARD)
        | (1 << BlkFeature.WRITE_ZEROES)
    )
    try:
        q = start(t, feats, 1 << size_exp)
        token = 0
        with time_limit(20):
            for reqs in batches:
                batch = Batch(t.mem)
                for req in reqs:
                    if place(t, q, batch, token, req):
                        token += 1
                before = [bytes(r.view) for r in t.mem.regions]
                image = bytes(backend.data)
                t.notify(0)  # must not raise, whatever the requests say
                assert_changes_within(
                    t.mem, before, [*batch.writable, *ring_area(q, packed)], "the block device"
                )
                if t.get_status() & S.DEVICE_NEEDS_RESET:
                    event("needs reset")
                    assert bytes(backend.data) == image or any(
                        r[0] in CHANGING for r in batch.reqs.values()
                    )
                    return
                statuses = []
                while (got := q.get_used()) is not None:
                    tok, ln = got
                    rtype, in_ = batch.reqs.pop(tok)
                    assert 1 <= ln <= sum(n for _, n in in_)
                    last_addr, last_n = in_[-1]
                    status = t.mem.read(last_addr + last_n - 1, 1)[0]
                    assert status in (BlkStatus.OK, BlkStatus.IOERR, BlkStatus.UNSUPP)
                    statuses.append((rtype, status))
                    event(f"status {BlkStatus(status).name}")
                assert not batch.reqs, "every request is answered"
                if bytes(backend.data) != image:
                    assert any(r in CHANGING and s == BlkStatus.OK for r, s in statuses), (
                        "the backend changed without a successful write request"
                    )
    finally:
        t.close()


rng_requests = st.tuples(
    weighted((4, st.just([])), (1, st.lists(seg_lens, max_size=2))),  # readable: a driver error
    st.lists(weighted((4, st.integers(1, 300)), (1, st.integers(0, 70000))), max_size=4),
)


@pytest.mark.timeout(120)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    feats=ring_features,
    size_exp=st.integers(2, 4),
    batches=st.lists(st.lists(rng_requests, min_size=1, max_size=4), min_size=1, max_size=4),
    dry=st.booleans(),
)
def test_rng_fills_only_the_writable_buffers(
    feats: int, size_exp: int, batches: list[list[Any]], dry: bool
) -> None:
    rng = random.Random(1)
    source = CallableSource(lambda n: b"" if dry and rng.random() < 0.3 else rng.randbytes(n))
    t = LoopbackTransport(RngDevice(source, queue_max_size=16), MEM)
    packed = bool(feats & Feature.RING_PACKED.mask)
    try:
        q = start(t, feats | Feature.VERSION_1.mask, 1 << size_exp)
        token = 0
        pending: dict[int, int] = {}
        outstanding: dict[int, list[tuple[int, int]]] = {}
        with time_limit(20):
            for reqs in batches:
                for rlens, wlens in reqs:
                    out = [(t.allocator.alloc(n), n) for n in rlens if n]
                    in_ = [(t.allocator.alloc(n), n) for n in wlens if n]
                    if not out and not in_:
                        continue
                    try:
                        q.add(out, in_, token)
                    except Exception:
                        continue
                    pending[token] = sum(n for _, n in in_)
                    outstanding[token] = in_
                    token += 1
                before = [bytes(r.view) for r in t.mem.regions]
                t.notify(0)
                # a request kept waiting for entropy is served by a later notification
                writable = [seg for segs in outstanding.values() for seg in segs]
                assert_changes_within(
                    t.mem, before, [*writable, *ring_area(q, packed)], "the entropy device"
                )
                if t.get_status() & S.DEVICE_NEEDS_RESET:
                    event("needs reset")
                    return
                while (got := q.get_used()) is not None:
                    tok, ln = got
                    assert 1 <= ln <= pending.pop(tok)
                    del outstanding[tok]
    finally:
        t.close()


class _CountingMemory:
    """Guest memory stand-in that only counts the bytes written."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, addr: int, data: bytes) -> None:
        self.written += len(data)


class _BigSource:
    """An entropy source that hands out one preallocated block (no per-read copy)."""

    def __init__(self, chunk: int) -> None:
        self.block = bytes(chunk)

    def read(self, n: int) -> bytes:
        return self.block if n == len(self.block) else self.block[:n]


def test_rng_used_length_of_a_2_pow_32_byte_buffer_fits_le32() -> None:
    """A driver may offer a chain of exactly 2^32 writable bytes (overlapping segments:
    "MUST NOT add a descriptor chain longer than 2^32 bytes" allows it); the used
    ``len`` is a le32, so the device must report at most 2^32 - 1 bytes instead of
    failing to encode 2^32 (which escaped ``notify`` as ``struct.error``)."""
    from pyvirtio.virtqueue.common import DescriptorChain

    chunk = 1 << 24
    device = RngDevice(_BigSource(chunk), chunk_size=chunk)
    chain = DescriptorChain(0, [], [(0x10000, 1 << 31), (0x10000, 1 << 31)])
    assert chain.writable_len == 1 << 32

    class _Queue:
        mem = _CountingMemory()

    written = device._fill(_Queue(), chain)  # type: ignore[arg-type]
    assert written == 0xFFFF_FFFF == _Queue.mem.written
