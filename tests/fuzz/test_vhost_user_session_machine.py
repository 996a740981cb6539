"""The vhost-user back-end as a hypothesis state machine: every front-end message, in
any state, in any order, with plausible and implausible values (vhost-user.rst).

After every message: nothing raised out of the back-end; a request that waits for an
answer (a natural reply payload, or NEED_REPLY) got exactly one reply - or the
back-end closed the connection; one that does not wait got none. At the end of every
session, every descriptor the front-end passed is closed (the process's descriptor
count is back where it started). The default run takes 40 examples; ``pytest -m
long`` runs 1000.
"""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.memory.guest_memory import create_memfd
from pyvirtio.transport.vhost_user.backend import Disconnect, Reply, VhostUserBackend
from pyvirtio.transport.vhost_user.codec import encode
from pyvirtio.transport.vhost_user.spec import (
    FRONTEND_REPLY_PAYLOAD,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserLog,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostVringAddr,
    VhostVringState,
)
from pyvirtio.transport.vhost_user.spec import FrontendRequest as R

MEM = 1 << 20
UADDR = 0x7F00_0000_0000
ring = st.integers(0, 3)  # the device has 2 queues: 2 and 3 are out of range
u64 = st.one_of(st.integers(0, 0xFF), st.integers(0, (1 << 64) - 1))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Session(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.baseline = _fds()
        self.be = VhostUserBackend(BlkDevice(MemoryBackend(1 << 16), num_queues=2, io_threads=0))
        self.closed = False

    def _send(
        self,
        request: R,
        body: object = None,
        *,
        need_reply: bool = False,
        fds: tuple[int, ...] = (),
    ) -> None:
        data = encode(request, body, need_reply=need_reply, fds=fds)  # type: ignore[arg-type]
        actions = self.be.receive(data, list(fds))
        replies = [a for a in actions if isinstance(a, Reply)]
        if any(isinstance(a, Disconnect) for a in actions):
            self.closed = True
            return
        waits = request in FRONTEND_REPLY_PAYLOAD or need_reply
        assert len(replies) == (1 if waits else 0), (request, need_reply, actions)

    def _eventfd(self) -> int:
        return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @precondition(lambda self: not self.closed)
    @rule(
        request=st.sampled_from(
            [
                R.GET_FEATURES,
                R.GET_PROTOCOL_FEATURES,
                R.GET_QUEUE_NUM,
                R.GET_MAX_MEM_SLOTS,
                R.GET_STATUS,
                R.SET_OWNER,
                R.RESET_OWNER,
                R.RESET_DEVICE,
            ]
        ),
        need_reply=st.booleans(),
    )
    def plain(self, request: R, need_reply: bool) -> None:
        self._send(request, need_reply=need_reply)

    @precondition(lambda self: not self.closed)
    @rule(
        request=st.sampled_from([R.SET_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_STATUS]),
        value=u64,
        need_reply=st.booleans(),
    )
    def set_u64(self, request: R, value: int, need_reply: bool) -> None:
        if request is R.SET_FEATURES and value < 0x100:
            value |= 1 << 32 | 1 << 30  # VERSION_1, PROTOCOL_FEATURES: the usual case
        self._send(request, value, need_reply=need_reply)

    @precondition(lambda self: not self.closed)
    @rule(
        how=st.sampled_from(["table", "add", "remove"]),
        size=st.sampled_from([MEM, 4096, 0]),
        offset=st.sampled_from([0, 4096, MEM]),
        need_reply=st.booleans(),
    )
    def memory(self, how: str, size: int, offset: int, need_reply: bool) -> None:
        region = VhostUserMemoryRegion(0, size, UADDR, offset)
        if how == "remove":
            self._send(R.REM_MEM_REG, region, need_reply=need_reply)
            return
        fd = create_memfd(MEM, "session")
        if how == "table":
            self._send(
                R.SET_MEM_TABLE, VhostUserMemory((region,)), need_reply=need_reply, fds=(fd,)
            )
        else:
            self._send(R.ADD_MEM_REG, region, need_reply=need_reply, fds=(fd,))

    @precondition(lambda self: not self.closed)
    @rule(
        request=st.sampled_from(
            [R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE]
        ),
        index=ring,
        num=st.sampled_from([0, 1, 8, 16, 64, 1 << 15, 0xFFFFFFFF]),
        need_reply=st.booleans(),
    )
    def vring_state(self, request: R, index: int, num: int, need_reply: bool) -> None:
        self._send(request, VhostVringState(index, num), need_reply=need_reply)

    @precondition(lambda self: not self.closed)
    @rule(
        index=ring,
        offset=st.sampled_from([0, 0x1000, 0x2000, MEM - 16, MEM]),
        flags=st.sampled_from([0, 1]),
        need_reply=st.booleans(),
    )
    def vring_addr(self, index: int, offset: int, flags: int, need_reply: bool) -> None:
        a = UADDR + offset
        self._send(
            R.SET_VRING_ADDR,
            VhostVringAddr(index, flags, a, a + 0x1000, a + 0x800, 0),
            need_reply=need_reply,
        )

    @precondition(lambda self: not self.closed)
    @rule(
        request=st.sampled_from([R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR]),
        index=ring,
        nofd=st.booleans(),
        need_reply=st.booleans(),
    )
    def vring_fd(self, request: R, index: int, nofd: bool, need_reply: bool) -> None:
        if nofd:
            self._send(request, index | 1 << 8, need_reply=need_reply)
        else:
            self._send(request, index, need_reply=need_reply, fds=(self._eventfd(),))

    @precondition(lambda self: not self.closed)
    @rule(index=st.integers(0, 1))
    def kick(self, index: int) -> None:
        actions = self.be.kick(index)
        assert not any(isinstance(a, Reply) for a in actions)
        self.be.run_pending()

    @precondition(lambda self: not self.closed)
    @rule(
        offset=st.integers(0, 80),
        size=st.integers(0, 300),
        write=st.booleans(),
        need_reply=st.booleans(),
    )
    def config(self, offset: int, size: int, write: bool, need_reply: bool) -> None:
        if write:
            self._send(
                R.SET_CONFIG,
                VhostUserConfig(offset, min(size, 256), 0, bytes(min(size, 256))),
                need_reply=need_reply,
            )
        else:
            self._send(
                R.GET_CONFIG,
                VhostUserConfig(offset, min(size, 256), 0, bytes(min(size, 256))),
                need_reply=need_reply,
            )

    @precondition(lambda self: not self.closed)
    @rule(
        get=st.booleans(),
        queues=st.integers(0, 4),
        size=st.sampled_from([0, 16, 256, 0xFFFF]),
        need_reply=st.booleans(),
    )
    def inflight(self, get: bool, queues: int, size: int, need_reply: bool) -> None:
        if get:
            self._send(
                R.GET_INFLIGHT_FD, VhostUserInflight(0, 0, queues, size), need_reply=need_reply
            )
        else:
            fd = create_memfd(1 << 16, "inflight")
            self._send(
                R.SET_INFLIGHT_FD,
                VhostUserInflight(1 << 16, 0, queues, size),
                need_reply=need_reply,
                fds=(fd,),
            )

    @precondition(lambda self: not self.closed)
    @rule(size=st.sampled_from([0, 4096, 1 << 20]), need_reply=st.booleans())
    def log_base(self, size: int, need_reply: bool) -> None:
        fd = create_memfd(1 << 16, "log")
        self._send(R.SET_LOG_BASE, VhostUserLog(size, 0), need_reply=need_reply, fds=(fd,))

    @precondition(lambda self: not self.closed)
    @rule(need_reply=st.booleans())
    def backend_channel(self, need_reply: bool) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._send(R.SET_BACKEND_REQ_FD, need_reply=need_reply, fds=(os.dup(theirs.fileno()),))
        finally:
            ours.close()
            theirs.close()

    @precondition(lambda self: not self.closed)
    @rule(index=st.integers(0, 1))
    def qemu_opening(self, index: int) -> None:
        """What QEMU sends to bring a ring up, all at once (so that later random
        messages meet started rings, mapped memory and negotiated features)."""
        offered = self.be.offered_features
        self._send(R.GET_FEATURES)
        self._send(R.SET_FEATURES, offered & (1 << 32 | 1 << 30 | 1 << 28 | 1 << 29))
        self._send(R.SET_PROTOCOL_FEATURES, self.be.offered_protocol_features)
        region = VhostUserMemoryRegion(0, MEM, UADDR, 0)
        self._send(R.SET_MEM_TABLE, VhostUserMemory((region,)), fds=(create_memfd(MEM, "q"),))
        self._send(R.SET_VRING_NUM, VhostVringState(index, 16))
        self._send(R.SET_VRING_BASE, VhostVringState(index, 0))
        a = UADDR + 0x1000 * (1 + 4 * index)
        self._send(R.SET_VRING_ADDR, VhostVringAddr(index, 0, a, a + 0x1000, a + 0x800, 0))
        self._send(R.SET_VRING_CALL, index, fds=(self._eventfd(),))
        self._send(R.SET_VRING_KICK, index, fds=(self._eventfd(),))
        self._send(R.SET_VRING_ENABLE, VhostVringState(index, 1))

    @precondition(lambda self: self.closed)
    @rule()
    def reconnect(self) -> None:
        """The back-end closed the connection: the front-end comes back (a new one)."""
        device = self.be.device
        self.be.close()
        self.be = VhostUserBackend(device)
        self.closed = False

    def teardown(self) -> None:
        self.be.close()
        self.be.device.close()
        assert _fds() == self.baseline, "descriptors the front-end passed were not all closed"


TestSession = Session.TestCase
TestSession.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.long
def test_vhost_user_session_machine_long_run() -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        Session,
        settings=settings(
            max_examples=1000,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
