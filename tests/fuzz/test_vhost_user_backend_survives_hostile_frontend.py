"""The vhost-user back-end (sans-I/O) fed hostile message streams.

Property (the quality bar's vhost-user clause): whatever the front-end sends - valid
headers with random bodies, plausible messages with random values (memory tables,
vring sizes, addresses, bases, features, status), valid messages in the wrong order,
eventfds and memfds of random sizes attached anywhere - ``receive`` never raises; every
reply decodes as a well-formed reply; every descriptor the back-end asks the I/O layer
to signal is still open; after ``close`` the process has exactly the descriptors it
had before; and host (Python heap) memory stays bounded whatever sizes the messages
name.
"""

from __future__ import annotations

import os
import struct
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.devices.rng import CallableSource, RngDevice
from pyvirtio.memory.guest_memory import create_memfd
from pyvirtio.spec.features import Feature
from pyvirtio.transport.vhost_user.backend import Action, Disconnect, Reply
from pyvirtio.transport.vhost_user.codec import Decoder, MessageRejected
from pyvirtio.transport.vhost_user.spec import REPLY_FLAGS, FrontendRequest
from tests.fuzz._support import time_limit, weighted
from tests.transport.vhost_user.test_backend import UADDR, Front, fd_count

R = FrontendRequest
_HDR = struct.Struct("<III")
#: bound on Python heap growth during one session (guest RAM is mmap'd, not counted)
HEAP_LIMIT = 16 << 20

u64 = weighted(
    (3, st.sampled_from([0, 1, 2, 0x1000, 0x100000, UADDR, UADDR + 0x1000, (1 << 64) - 1])),
    (2, st.integers(0, 1 << 20)),
    (1, st.integers(0, (1 << 64) - 1)),
)
u32 = weighted((3, st.integers(0, 300)), (1, st.integers(0, 0xFFFF_FFFF)))
ring = weighted((6, st.integers(0, 1)), (1, st.integers(0, 0xFFFF_FFFF)))
#: feature words: subsets of what a blk/rng back-end offers, or anything
features = weighted(
    (
        4,
        st.sets(st.sampled_from([30, 32, 33, 34, 28, 29, 9, 13, 14, 42])).map(
            lambda b: sum(1 << x for x in b)
        ),
    ),
    (1, u64),
)
BODYLESS = {
    R.GET_FEATURES,
    R.SET_OWNER,
    R.RESET_OWNER,
    R.GET_PROTOCOL_FEATURES,
    R.GET_QUEUE_NUM,
    R.GET_MAX_MEM_SLOTS,
    R.RESET_DEVICE,
    R.POSTCOPY_ADVISE,
    R.POSTCOPY_LISTEN,
    R.POSTCOPY_END,
    R.GPU_SET_SOCKET,
    R.CHECK_DEVICE_STATE,
    R.GET_STATUS,
    R.SET_BACKEND_REQ_FD,
    R.SET_LOG_FD,
}
region = st.tuples(u64, u64, u64, u64).map(lambda t: struct.pack("<QQQQ", *t))


def body_for(request: int) -> st.SearchStrategy[bytes]:
    """A plausible body for ``request`` with random values, or random bytes."""
    plausible: st.SearchStrategy[bytes]
    if request in BODYLESS:
        plausible = st.just(b"")
    elif request in (R.SET_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_STATUS):
        plausible = features.map(lambda v: struct.pack("<Q", v))
    elif request in (R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE):
        plausible = st.tuples(ring, u32).map(lambda t: struct.pack("<II", *t))
    elif request in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        plausible = st.tuples(ring, st.sampled_from([0, 1 << 8])).map(
            lambda t: struct.pack("<Q", t[0] | t[1])
        )
    elif request == R.SET_VRING_ADDR:
        plausible = st.tuples(ring, st.integers(0, 3), u64, u64, u64, u64).map(
            lambda t: struct.pack("<IIQQQQ", *t)
        )
    elif request == R.SET_MEM_TABLE:
        plausible = st.lists(region, min_size=0, max_size=3).map(
            lambda rs: struct.pack("<II", len(rs), 0) + b"".join(rs)
        )
    elif request in (R.ADD_MEM_REG, R.REM_MEM_REG):
        plausible = region.map(lambda r: bytes(8) + r)
    elif request in (R.SET_LOG_BASE, R.SET_INFLIGHT_FD, R.GET_INFLIGHT_FD):
        plausible = st.tuples(u64, u64, st.integers(0, 4), st.integers(0, 0xFFFF)).map(
            lambda t: (
                struct.pack("<QQHH", *t)
                if request != R.SET_LOG_BASE
                else struct.pack("<QQ", t[0], t[1])
            )
        )
    elif request in (R.GET_CONFIG, R.SET_CONFIG):
        plausible = st.tuples(
            u32, st.integers(0, 300), st.integers(0, 1), st.binary(max_size=300)
        ).map(lambda t: struct.pack("<III", t[0], t[1], t[2]) + t[3])
    else:
        plausible = u64.map(lambda v: struct.pack("<Q", v))
    return weighted((30, plausible), (1, st.binary(max_size=64)))


requests = weighted(
    (40, st.sampled_from([r for r in R if 0 < r <= 43])),
    (1, st.integers(0, 0xFFFF_FFFF)),
)
#: the descriptors a well-behaved front-end attaches
FDS = {
    R.SET_VRING_KICK: ["eventfd"],
    R.SET_VRING_CALL: ["eventfd"],
    R.SET_VRING_ERR: ["eventfd"],
    R.SET_MEM_TABLE: ["memfd_big"],
    R.ADD_MEM_REG: ["memfd_big"],
    R.REM_MEM_REG: ["memfd"],
    R.SET_LOG_BASE: ["memfd"],
    R.SET_INFLIGHT_FD: ["memfd"],
    R.SET_BACKEND_REQ_FD: ["eventfd"],
    R.SET_LOG_FD: ["eventfd"],
}
fd_kinds = st.lists(st.sampled_from(["eventfd", "memfd0", "memfd", "memfd_big"]), max_size=2)


@st.composite
def messages(draw: Any) -> tuple[bytes, list[str]]:
    request = draw(requests)
    body = draw(body_for(request))
    # mostly NEED_REPLY, so that a refusal is an error reply and the session goes on
    flags = draw(weighted((6, st.just(1)), (24, st.just(1 | 8)), (1, st.integers(0, 0xFFFF_FFFF))))
    size = len(body) if draw(weighted((40, st.just(True)), (1, st.just(False)))) else draw(u32)
    kinds = draw(weighted((6, st.just(FDS.get(request, []))), (1, fd_kinds)))
    return _HDR.pack(request, flags, size) + body, kinds


#: failure replies the codec makes deliberately unacceptable (``codec.error_reply``:
#: "whose size QEMU refuses (it sees the failure)")
DELIBERATE = {R.POSTCOPY_ADVISE, R.GET_INFLIGHT_FD, R.CREATE_CRYPTO_SESSION}


def apply(front: Front, actions: list[Action]) -> None:
    """Check every reply decodes as a well-formed reply, then carry the actions out."""
    rest: list[Action] = []
    for a in actions:
        if not isinstance(a, Reply):
            rest.append(a)
            continue
        request, flags, size = _HDR.unpack_from(a.data)
        assert flags == REPLY_FLAGS and size == len(a.data) - _HDR.size
        dec = Decoder(replies=True)
        dec.feed(a.data, [os.dup(fd) for fd in a.fds])
        try:
            for msg in dec:
                assert msg.request == request
                msg.close()
        except MessageRejected:
            assert request in DELIBERATE, f"malformed reply to {request}"
        dec.close()
    front.apply(rest)


def make_fd(kind: str) -> int:
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    size = {"memfd0": 0, "memfd": 0x1000, "memfd_big": 1 << 22}[kind]
    return create_memfd(size) if size else os.memfd_create("fuzz", os.MFD_CLOEXEC)


@pytest.mark.timeout(180)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    device_kind=st.sampled_from(["blk", "rng"]),
    prefix=st.sampled_from(["none", "connect", "running", "running-packed"]),
    stream=st.lists(
        weighted(
            (4, st.lists(messages(), min_size=1, max_size=1)),
            (1, st.lists(messages(), min_size=1, max_size=3)),
        ),
        min_size=1,
        max_size=14,
    ),
)
def test_backend_survives_any_message_stream(
    device_kind: str, prefix: str, stream: list[list[tuple[bytes, list[str]]]]
) -> None:
    device: Any
    if device_kind == "blk":
        device = BlkDevice(MemoryBackend(1 << 16), num_queues=2)
    else:
        device = RngDevice(CallableSource(lambda n: bytes(n)))
    before = fd_count()
    front = Front(device)
    tracemalloc.start()
    try:
        with time_limit(20):
            if prefix != "none":
                front.connect(num_rings=1)
            if prefix.startswith("running"):
                packed = Feature.RING_PACKED.mask if prefix.endswith("packed") else 0
                front.start(Feature.VERSION_1.mask | packed, sizes=(16,))
            base = tracemalloc.get_traced_memory()[0]
            for n, chunk in enumerate(stream):
                if front.disconnected is not None:
                    break
                # descriptors travel with the first byte of a message and belong to the
                # last message starting in a recvmsg chunk: the chunk ends there
                data = b"".join(m for m, _ in chunk)
                fds = [make_fd(k) for k in chunk[-1][1]]
                if any(kinds for _, kinds in chunk[:-1]):
                    event("descriptors of an earlier message in the chunk")
                    fds += [make_fd(k) for _, kinds in chunk[:-1] for k in kinds]
                actions = front.be.receive(data, fds)  # owns fds now; must not raise
                apply(front, actions)  # checks every reply, signals every Signal fd
                gone = [a for a in actions if isinstance(a, Disconnect)]
                if gone:
                    event(f"disconnect after {n} chunks: {gone[0].reason[:50]}")
                for ring in range(device.num_queues):
                    apply(front, front.be.kick(ring))
                apply(front, front.be.run_pending())
            grown = tracemalloc.get_traced_memory()[1] - base
            assert grown < HEAP_LIMIT, f"the back-end's heap grew by {grown} bytes"
    finally:
        tracemalloc.stop()
        front.close()
    assert fd_count() == before, "a received descriptor leaked (or was closed twice)"
