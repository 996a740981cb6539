"""The network device's host back-ends: SocketBackend (datagram and length-prefixed
stream), the in-process Switch and its ports, and TapBackend in a network namespace
the test makes (the TAP is created inside it; addresses, if any, only there)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.devices.net import NetDevice, SocketBackend, Switch, TapBackend
from pyvirtio.devices.net.backend import MAX_FRAME
from pyvirtio.devices.net.switch import PORT_BACKLOG
from pyvirtio.errors import ConfigurationError
from pyvirtio.spec.net import NetCtrlClass, NetCtrlMq, NetFeature
from pyvirtio.vm.netns import NetNamespace, netns_available
from tests.devices._net_support import MAC, PEER, eth, hdr, unhdr
from tests.devices.test_net_device import CTRL, Rig, frame_of

F = NetFeature
OTHER = bytes.fromhex("5254009999aa")
ETH_P_TEST = 0x88B5  # IEEE 802 local experimental


def _buf() -> memoryview:
    return memoryview(bytearray(MAX_FRAME))


# ---------------------------------------------------------------------------------------
# SocketBackend
# ---------------------------------------------------------------------------------------


def test_dgram_backend_one_frame_per_datagram_both_ways(tmp_path: Path) -> None:
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(str(tmp_path / "peer"))
    be = SocketBackend.dgram(str(tmp_path / "dev"), str(tmp_path / "peer"))
    try:
        assert be.channels == 1 and not be.vnet_hdr
        assert be.send(0, [b"ab", memoryview(b"cd"), bytearray(b"ef")])
        assert peer.recv(100) == b"abcdef"
        peer.sendto(b"x" * 1500, str(tmp_path / "dev"))
        buf = _buf()
        assert be.recv_into(0, buf) == 1500 and bytes(buf[:1500]) == b"x" * 1500
        assert be.recv_into(0, buf) is None
    finally:
        be.close()
        peer.close()


def test_dgram_backend_without_remote_answers_the_last_sender(tmp_path: Path) -> None:
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(str(tmp_path / "peer"))
    be = SocketBackend.dgram(str(tmp_path / "dev"))
    try:
        assert not be.send(0, [b"nobody"])  # no peer known yet: dropped, counted
        assert be.dropped == 1
        peer.sendto(b"hello", str(tmp_path / "dev"))
        assert be.recv_into(0, _buf()) == 5
        assert be.send(0, [b"reply"])
        assert peer.recv(10) == b"reply"
    finally:
        be.close()
        peer.close()


def test_dgram_backend_peer_gone_drops_and_counts(tmp_path: Path) -> None:
    be = SocketBackend.dgram(str(tmp_path / "dev"), str(tmp_path / "nobody"))
    try:
        assert not be.send(0, [b"x" * 60])
        assert be.dropped == 1
    finally:
        be.close()


def stream_pair() -> tuple[SocketBackend, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return SocketBackend.stream(a), b


def test_stream_backend_length_prefixed_framing_both_ways() -> None:
    be, peer = stream_pair()
    try:
        assert be.send(0, [b"abc", b"def"])
        assert peer.recv(100) == b"\x00\x00\x00\x06abcdef"
        # two frames in one write, a third cut over two writes
        peer.sendall(struct.pack(">I", 3) + b"one" + struct.pack(">I", 5) + b"three")
        peer.sendall(struct.pack(">I", 4) + b"fo")
        buf = _buf()
        assert be.recv_into(0, buf) == 3 and bytes(buf[:3]) == b"one"
        assert be.recv_into(0, buf) == 5 and bytes(buf[:5]) == b"three"
        assert be.recv_into(0, buf) is None  # half a frame: waits
        peer.sendall(b"ur")
        assert be.recv_into(0, buf) == 4 and bytes(buf[:4]) == b"four"
    finally:
        be.close()
        peer.close()


def test_stream_peer_sending_a_length_above_MAX_FRAME_is_disconnected() -> None:
    be, peer = stream_pair()
    try:
        peer.sendall(struct.pack(">I", MAX_FRAME + 1) + b"x" * 100)
        with pytest.raises(EOFError):
            be.recv_into(0, _buf())
        assert be.disconnected and be.dropped == 1
        with pytest.raises(EOFError):
            be.recv_into(0, _buf())
        assert not be.send(0, [b"x" * 60])  # nothing goes to a broken peer
    finally:
        be.close()
        peer.close()


def test_stream_backend_exactly_MAX_FRAME_is_carried() -> None:
    be, peer = stream_pair()
    try:
        frame = bytes(range(256)) * (MAX_FRAME // 256) + b"\x01" * (MAX_FRAME % 256)
        peer.setblocking(True)
        t = threading.Thread(target=peer.sendall, args=(struct.pack(">I", MAX_FRAME) + frame,))
        t.start()
        buf = _buf()
        deadline = time.monotonic() + 5
        n = None
        while n is None and time.monotonic() < deadline:
            select.select([be.fileno(0)], [], [], 1)
            n = be.recv_into(0, buf)
        t.join()
        assert n == MAX_FRAME and bytes(buf[:n]) == frame
    finally:
        be.close()
        peer.close()


def test_stream_peer_hanging_up_is_EOF() -> None:
    be, peer = stream_pair()
    peer.close()
    try:
        with pytest.raises(EOFError):
            be.recv_into(0, _buf())
        assert be.disconnected
    finally:
        be.close()


def test_stream_backend_bounds_what_it_holds_back() -> None:
    be, peer = stream_pair()
    try:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        be.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = dropped = 0
        for _ in range(200):
            if be.send(0, [b"z" * 60000]):
                sent += 1
            else:
                dropped += 1
        assert dropped > 0 and be.dropped == dropped
        assert len(be._outbuf) <= (1 << 20) + 60004
        assert not be.flush()  # the peer reads nothing: still waiting
    finally:
        be.close()
        peer.close()


@pytest.mark.parametrize("how", ["oversize", "hangup"])
def test_device_stops_watching_a_stream_peer_that_broke_and_does_not_spin(how: str) -> None:
    be, peer = stream_pair()
    r = Rig(backend=be, features=CTRL)
    try:
        r.post(1600, token="b")
        r.h.kick(0)
        peer.sendall(struct.pack(">I", 60) + frame_of(60))
        r.pump()
        assert r.rx_used() == [("b", 72)]
        if how == "oversize":
            peer.sendall(struct.pack(">I", 0xFFFFFFFF))
        else:
            peer.close()
        r.pump()
        assert r.dev.metrics.errors["backend_gone"] == 1
        assert r.dev.events.readers() == {}  # not watched any more: no busy loop
        assert r.h.poll(0) == 0
        assert not r.h.needs_reset
        # transmit still answers (frames dropped by the back-end)
        r.tx(hdr(), frame_of(60, OTHER))
        assert r.dev.metrics.errors["tx_backend_full"] == 1
    finally:
        r.close()
        with contextlib.suppress(OSError):
            peer.close()


def test_device_over_a_stream_socketpair_carries_frames_byte_exact() -> None:
    be, peer = stream_pair()
    r = Rig(backend=be, features=CTRL | F.MRG_RXBUF.mask, queue_size=64)
    try:
        frames = [frame_of(n, OTHER, seed=n) for n in (60, 1514, 9000)]
        for f in frames:
            r.tx(hdr(), f)
        got = b""
        peer.settimeout(5)
        while len(got) < sum(4 + len(f) for f in frames):
            got += peer.recv(1 << 16)
        pos, out = 0, []
        while pos < len(got):
            (n,) = struct.unpack_from(">I", got, pos)
            out.append(got[pos + 4 : pos + 4 + n])
            pos += 4 + n
        assert out == frames
        segs = [r.post(2048, token=i)[0] for i in range(8)]
        r.h.kick(0)
        inn = frame_of(5000, seed=1)
        peer.sendall(struct.pack(">I", len(inn)) + inn)
        for _ in range(50):
            r.pump()
            if r.dev.rx_frames:
                break
            select.select([be.fileno(0)], [], [], 0.1)
        used = r.rx_used()
        data = b"".join(r.read(segs[i], n) for i, (_, n) in enumerate(used))
        assert unhdr(data)[6] == len(used) == 3 and data[12:] == inn
    finally:
        r.close()
        peer.close()


# ---------------------------------------------------------------------------------------
# Switch and SwitchPort
# ---------------------------------------------------------------------------------------


def recv_all(port: Any) -> list[bytes]:
    out, buf = [], _buf()
    while (n := port.recv_into(0, buf)) is not None:
        out.append(bytes(buf[:n]))
    return out


def test_switch_floods_unknown_and_broadcast_then_forwards_to_the_learned_port() -> None:
    sw = Switch()
    a, b, c = sw.port("a"), sw.port("b"), sw.port("c")
    A, B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
    f1 = eth(B, A)
    assert a.send(0, [f1])  # B unknown: flooded to b and c
    assert recv_all(b) == [f1] and recv_all(c) == [f1] and recv_all(a) == []
    assert sw.lookup(A) is a and sw.flooded == 1
    f2 = eth(A, B)
    assert b.send(0, [f2])  # A learned: to a only
    assert recv_all(a) == [f2] and recv_all(c) == []
    f3 = eth(B, A)
    a.send(0, [f3])
    assert recv_all(b) == [f3] and recv_all(c) == []
    assert sw.forwarded == 2
    bc = eth(b"\xff" * 6, A)
    a.send(0, [bc])
    assert recv_all(b) == [bc] and recv_all(c) == [bc]
    mc = eth(bytes.fromhex("01005e000001"), A)
    a.send(0, [mc])
    assert recv_all(b) == [mc] and recv_all(c) == [mc]
    assert (a.sent, b.received, c.received) == (4, 4, 3)
    for p in (a, b, c):
        p.close()


def test_switch_does_not_learn_multicast_sources_or_send_back() -> None:
    sw = Switch()
    a, b = sw.port(), sw.port()
    M = bytes.fromhex("01005e000001")
    a.send(0, [eth(OTHER, M)])
    assert sw.lookup(M) is None
    A = bytes.fromhex("020000000001")
    a.send(0, [eth(OTHER, A)])
    recv_all(b)
    # a frame for A arriving on A's own port goes nowhere
    assert not a.send(0, [eth(A, bytes.fromhex("020000000003"))])
    assert recv_all(b) == []
    assert not a.send(0, [b"\x00" * 13])  # a runt is not switched
    a.close()
    b.close()


def test_switch_table_is_bounded_oldest_first() -> None:
    sw = Switch(max_table=4)
    a, b = sw.port(), sw.port()
    macs = [bytes([2, 0, 0, 0, 0, i]) for i in range(6)]
    for m in macs:
        a.send(0, [eth(OTHER, m)])
    assert [sw.lookup(m) for m in macs] == [None, None, a, a, a, a]
    assert len(sw._table) == 4
    a.close()
    b.close()


def test_switch_port_backlog_bound_and_counters() -> None:
    sw = Switch()
    a, b = sw.port(), sw.port("slow", backlog=3)
    assert b.backlog == 3 and sw.port().backlog == PORT_BACKLOG
    for i in range(5):
        a.send(0, [eth(OTHER, PEER, bytes([i]) * 46)])
    assert (b.received, b.dropped) == (3, 2)
    got = recv_all(b)
    assert [g[14] for g in got] == [0, 1, 2]
    # the eventfd is readable while frames wait, not after
    assert not select.select([b.fileno(0)], [], [], 0)[0]
    a.send(0, [eth(OTHER)])
    assert select.select([b.fileno(0)], [], [], 0)[0]
    # a long frame is cut to the buffer
    a.send(0, [eth(OTHER, PEER, b"q" * 200)])
    recv_all(b)[:0]
    small = memoryview(bytearray(20))
    a.send(0, [eth(OTHER, PEER, b"q" * 200)])
    assert b.recv_into(0, small) == 20
    b.close()
    a.send(0, [eth(OTHER)])  # a closed port takes nothing
    assert b not in sw.ports
    a.close()


def test_removing_a_port_forgets_its_addresses() -> None:
    sw = Switch()
    a, b = sw.port(), sw.port()
    A = bytes.fromhex("020000000001")
    a.send(0, [eth(OTHER, A)])
    assert sw.lookup(A) is a
    a.close()
    assert sw.lookup(A) is None
    a.close()  # twice is harmless
    b.close()


# ---------------------------------------------------------------------------------------
# TapBackend in a private network namespace
# ---------------------------------------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(ns: NetNamespace) -> Iterator[None]:
    """Run this thread inside ``ns`` (setns(2)): a TAP opened meanwhile is created
    there, never in the host's namespace."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    try:
        if _libc.setns(there, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if _libc.setns(here, _CLONE_NEWNET) != 0:  # pragma: no cover
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(here)
        os.close(there)


_PEER_CODE = r"""
import select, socket, sys
dev, out_hex, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
s.bind((dev, 0x88B5))
print("ready", flush=True)
sys.stdin.readline()
s.send(bytes.fromhex(out_hex))
for _ in range(want):
    if not select.select([s], [], [], 10)[0]:
        print("timeout", flush=True)
        break
    data, addr = s.recvfrom(70000)
    print(data.hex(), flush=True)
"""


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    why = netns_available()
    if why is not None:
        pytest.skip(why)
    with NetNamespace("pvnet") as ns:
        subprocess.run(
            ns.exec_argv(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]),
            check=True,
            capture_output=True,
        )
        yield ns


def tap_in(ns: NetNamespace, name: str, **kw: Any) -> TapBackend:
    with in_netns(ns):
        be = TapBackend(name, **kw)
    ns.up(name)
    return be


def test_tap_is_created_inside_the_namespace_only(netns: NetNamespace) -> None:
    be = tap_in(netns, "pvtap0")
    try:
        assert "pvtap0" in netns.ip("link", "show")
        host = subprocess.run(["ip", "link", "show", "pvtap0"], capture_output=True)
        assert host.returncode != 0  # not in the host's namespace
    finally:
        be.close()


@pytest.mark.parametrize("vnet", [True, False], ids=["vnet-hdr", "no-vnet-hdr"])
def test_tap_frames_both_ways_through_the_device(netns: NetNamespace, vnet: bool) -> None:
    be = tap_in(netns, "pvtap1", vnet_hdr=vnet)
    r = Rig(backend=be, features=CTRL)
    to_guest = eth(MAC, PEER, b"in" * 30, etype=ETH_P_TEST)
    from_guest = eth(PEER, MAC, b"out" * 20, etype=ETH_P_TEST)
    peer = netns.python(
        _PEER_CODE,
        "pvtap1",
        to_guest.hex(),
        "1",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert peer.stdout is not None and peer.stdin is not None
        assert peer.stdout.readline().strip() == b"ready"
        segs = [r.post(1600, token=i)[0] for i in range(8)]
        r.h.kick(0)
        peer.stdin.write(b"go\n")
        peer.stdin.flush()
        got = None
        deadline = time.monotonic() + 10
        while got is None and time.monotonic() < deadline:
            r.h.poll(0.1)
            for i, (_t, n) in enumerate(r.rx_used()):
                data = r.read(segs[i], n)[12:]
                if data[12:14] == ETH_P_TEST.to_bytes(2, "big"):
                    got = data
        assert got == to_guest
        r.tx(hdr(), from_guest)
        line = peer.stdout.readline().strip()
        assert bytes.fromhex(line.decode()) == from_guest
    finally:
        peer.kill()
        peer.wait()
        r.close()


def test_tap_vnet_hdr_offers_offloads_and_sets_them(netns: NetNamespace) -> None:
    be = tap_in(netns, "pvtap2", vnet_hdr=True)
    try:
        d = NetDevice(be, mac=MAC, owns_backend=False)
        assert d.device_features() & F.CSUM.mask and d.device_features() & F.GUEST_TSO4.mask
        for flags in (0, 0x01, 0x01 | 0x02 | 0x04 | 0x08):
            be.set_offloads(flags)  # TUNSETOFFLOAD accepted by the kernel
        plain = tap_in(netns, "pvtap3", vnet_hdr=False)
        assert not NetDevice(plain, mac=MAC).device_features() & F.CSUM.mask
        plain.close()
    finally:
        be.close()


def test_tap_bad_name_and_missing_queues_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        TapBackend("x" * 16)
    with pytest.raises(ConfigurationError):
        TapBackend("")
    with pytest.raises(ConfigurationError):
        TapBackend("pvtapq", queues=0)


_SENDER = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for h in sys.argv[2:]:
    s.send(bytes.fromhex(h))
"""


def udp_frame(sport: int) -> bytes:
    ip = bytes([0x45, 0, 0, 30, 0, 0, 0, 0, 64, 17, 0, 0, 10, 9, 0, 1, 10, 9, 0, 2])
    udp = sport.to_bytes(2, "big") + b"\x00\x35\x00\x0a\x00\x00" + b"hi"
    return eth(MAC, PEER, ip + udp)


def per_channel(be: TapBackend, ns: NetNamespace, dev: str, n: int) -> list[int]:
    """Send ``n`` UDP flows into the TAP from the namespace; frames read per queue."""
    frames = [udp_frame(10000 + i).hex() for i in range(n)]
    subprocess.run(ns.exec_argv([sys.executable, "-c", _SENDER, dev, *frames]), check=True)
    counts = [0] * be.channels
    buf = _buf()
    deadline = time.monotonic() + 5
    while sum(counts) < n and time.monotonic() < deadline:
        select.select([be.fileno(i) for i in range(be.channels)], [], [], 0.1)
        for ch in range(be.channels):
            while be.recv_into(ch, buf) is not None:
                counts[ch] += 1
    return counts


def test_multiqueue_tap_set_active_channels(netns: NetNamespace) -> None:
    be = tap_in(netns, "pvtapmq", queues=2, vnet_hdr=False)
    try:
        assert be.channels == 2
        be.set_active_channels(1)
        assert per_channel(be, netns, "pvtapmq", 32) == [32, 0]  # queue 2 detached
        be.set_active_channels(2)
        be.set_active_channels(2)  # already attached: fine
        counts = per_channel(be, netns, "pvtapmq", 32)
        assert sum(counts) == 32 and counts[1] > 0  # the kernel steers flows to both
        be.set_active_channels(5)  # capped at the channels there are
        assert be._active == 2
    finally:
        be.close()


def test_device_on_a_multiqueue_tap_survives_fewer_queue_pairs(netns: NetNamespace) -> None:
    """After VQ_PAIRS_SET 1 the second TAP queue is detached: its descriptor polls
    as an error and reads/writes fail with EBADFD. The device must neither crash
    nor spin on it."""
    be = tap_in(netns, "pvtapmq2", queues=2)
    r = Rig(backend=be, features=CTRL | F.MQ.mask, queue_pairs=2)
    try:
        assert be._active == 1  # receiveq1 only after reset: queue 2 detached
        r.post(1600, token="a")
        r.h.kick(0)
        for _ in range(5):
            r.h.poll(0.01)
        assert not r.h.needs_reset, r.host.resets
        # a driver transmitting on transmitq2 it did not enable: dropped, counted
        r.tx(hdr(), eth(PEER, MAC, etype=ETH_P_TEST), queue=3)
        assert not r.h.needs_reset, r.host.resets
        assert r.ctrl(NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, b"\x02\x00") == 0
        assert be._active == 2
        r.tx(hdr(), eth(PEER, MAC, etype=ETH_P_TEST), queue=3)
        for _ in range(5):
            r.h.poll(0.01)
        assert not r.h.needs_reset, r.host.resets
    finally:
        r.close()


def test_tap_open_failure_is_a_configuration_error(netns: NetNamespace) -> None:
    be = tap_in(netns, "pvtapx", vnet_hdr=True)
    try:
        with in_netns(netns), pytest.raises(ConfigurationError):
            TapBackend("pvtapx", queues=2)  # exists single-queue: the kernel refuses
    finally:
        be.close()
