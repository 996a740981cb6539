"""The network device and driver against DPDK 22.11's testpmd, both directions.

Peer: "DPDK 22.11 dpdk-testpmd" (Debian 12 package ``dpdk-dev``, installed by
``scripts/install-deps.sh``; its absence is a failure, not a skip), started by
:class:`pyvirtio.vm.testpmd.Testpmd` without hugepages.

- testpmd's ``net_virtio_user`` (DPDK's vhost-user front-end and virtio PMD; it runs
  the control queue itself) drives pyvirtio's back-end: a :class:`NetDevice` on a
  datagram socket served by :class:`VhostUserServer` in this process, so the
  device's and the socket back-end's counters can be read; split, packed, in-order,
  MRG_RXBUF offered and taken, declined by DPDK (``mrg_rxbuf=0``) or not offered
  (``--no-mrg-rxbuf``). ``txonly``: every frame testpmd counts as sent reaches the
  socket peer or is counted as dropped by the back-end (its queue full), none is
  lost; ``rxonly``: frames written to the socket peer (blocking, so none is dropped
  on the way) all appear in testpmd's RX counters. The same through
  ``python -m pyvirtio serve net`` once.
- pyvirtio's :class:`NetDriver` over :class:`VhostUserFrontend` drives testpmd's
  ``net_vhost`` (DPDK's vhost library as the back-end) in ``macswap`` and ``io``
  forwarding: each frame comes back, MACs swapped (or unchanged), payload intact;
  split and packed rings.

Our back-end refuses a memfd that cannot be sealed unless told to trust the
front-end; DPDK's ``--no-huge`` memory is such a memfd, so the back-end runs with
``trust_frontend`` (``--trust-frontend``).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtio.core.driver import RingOptions
from pyvirtio.devices.net.backend import SocketBackend
from pyvirtio.devices.net.device import NetDevice
from pyvirtio.drivers.net import NetDriver
from pyvirtio.spec.features import Feature, has
from pyvirtio.spec.net import NetFeature
from pyvirtio.transport.vhost_user.frontend import connect
from pyvirtio.transport.vhost_user.server import VhostUserServer
from pyvirtio.vm.testpmd import Testpmd, find_testpmd, vhost_vdev, virtio_user_vdev

pytestmark = pytest.mark.interop

PEER = "DPDK 22.11 dpdk-testpmd"
TESTPMD_MAC = "00:01:02:03:04:05"
DEVICE_MAC = bytes.fromhex("525400123456")


@pytest.fixture(autouse=True)
def _testpmd_installed() -> None:
    # scripts/install-deps.sh installs it: missing is a broken set-up, not a skip
    assert find_testpmd() is not None, f"{PEER}: dpdk-testpmd missing (scripts/install-deps.sh)"


def _frame(i: int, size: int, dst: bytes, src: bytes) -> bytes:
    """An IPv4-ethertype frame of ``size`` bytes carrying ``i`` and a pattern."""
    body = i.to_bytes(4, "big") + bytes((i + k) & 0xFF for k in range(size - 18))
    return dst + src + b"\x08\x00" + body


# ---------------------------------------------------------------------------
# testpmd net_virtio_user -> pyvirtio's back-end
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One ring/feature combination for testpmd's virtio_user against our device."""

    name: str
    packed: bool = False
    in_order: bool = False
    #: virtio_user's mrg_rxbuf= (None: DPDK's default, on)
    dpdk_mrg: bool | None = None
    #: our device offers MRG_RXBUF (False: --no-mrg-rxbuf)
    device_mrg: bool = True

    @property
    def mrg(self) -> bool:
        """Whether MRG_RXBUF ends up negotiated."""
        return self.device_mrg and self.dpdk_mrg is not False


CASES = [
    Case("split"),
    Case("split-dpdk-mrg0", dpdk_mrg=False),
    Case("split-no-mrg-rxbuf", device_mrg=False),
    Case("packed", packed=True),
    Case("packed-no-mrg-rxbuf", packed=True, device_mrg=False),
    Case("split-in-order", in_order=True),
    Case("packed-in-order-dpdk-mrg0", packed=True, in_order=True, dpdk_mrg=False),
]


class InProcessBackend:
    """pyvirtio's network back-end on a datagram socket, served from a thread; the
    test holds the peer end of the socket (connected back to the device's, so the
    kernel's max_dgram_qlen does not apply and only the socket buffer bounds it)."""

    def __init__(self, tmp: Path, *, mrg_rxbuf: bool) -> None:
        self.sock_path = tmp / "net.sock"
        local, remote = str(tmp / "dev.dgram"), str(tmp / "peer.dgram")
        self.peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.peer.bind(remote)
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.backend = SocketBackend.dgram(local, remote)
        self.peer.connect(local)
        self.device = NetDevice(
            self.backend,
            mac=DEVICE_MAC,
            ctrl_vq=False,
            mrg_rxbuf=mrg_rxbuf,
            offloads=False,
            queue_max_size=1024,
        )
        self.server = VhostUserServer(
            self.device, socket_path=self.sock_path, backend_options={"trust_frontend": True}
        )
        self.thread = threading.Thread(target=self.server.serve, name="net-backend", daemon=True)
        self.thread.start()
        assert self.server.ready.wait(10)

    def close(self) -> None:
        self.server.stop()
        self.thread.join(10)
        self.device.close()
        self.peer.close()


class Collector:
    """Reads the peer socket in a thread while testpmd sends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.count = 0
        self.bytes = 0
        self.sizes: set[int] = set()
        self._stop = False
        sock.settimeout(0.05)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buf = bytearray(65536)
        while not self._stop:
            try:
                n = self.sock.recv_into(buf)
            except TimeoutError:
                continue
            except OSError:
                return
            self.count += 1
            self.bytes += n
            self.sizes.add(n)

    def stop(self) -> None:
        self._stop = True
        self.thread.join(5)
        self.sock.settimeout(None)


def _wait(cond: object, timeout: float, what: str) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.02)


@pytest.fixture
def tmp() -> Iterator[Path]:
    # unix socket paths are limited to 107 bytes: pytest's tmp_path may be too long
    d = Path("/tmp") / f"pv-dpdk-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    d.mkdir()
    yield d
    for f in d.iterdir():
        with contextlib.suppress(OSError):
            f.unlink()
    d.rmdir()


def _txonly_then_rxonly(
    tpmd: Testpmd, be: InProcessBackend, *, seconds: float, rx_frames: int, size: int
) -> None:
    """testpmd sends for ``seconds`` (txonly, ``size``-byte frames), then receives
    ``rx_frames`` frames the test writes at the socket peer (rxonly)."""
    dev = be.device
    col = Collector(be.peer)
    try:
        tpmd.clear_stats()
        tpmd.start_forwarding()
        time.sleep(seconds)
        tpmd.stop_forwarding()
        sent = tpmd.port_stats()[0]
        assert sent.tx_packets > 0 and sent.tx_errors == 0
        # the device drains what testpmd queued; each frame reached the peer or was
        # dropped because the peer's socket was full, and was counted
        _wait(
            lambda: dev.tx_frames + dev.metrics.errors.get("tx_backend_full", 0) >= sent.tx_packets,
            20,
            "the device to drain the transmit ring",
        )
        _wait(lambda: col.count >= dev.tx_frames, 10, "the peer to read every frame")
    finally:
        col.stop()
    dropped = dev.metrics.errors.get("tx_backend_full", 0)
    assert dev.tx_frames + dropped == sent.tx_packets
    assert be.backend.dropped == dropped
    assert col.count == dev.tx_frames
    assert col.sizes == {size}
    assert dev.metrics.bytes_read == dev.tx_frames * size
    # drops are the test's reader falling behind (the peer socket full), counted
    # exactly above; most frames must still have gone through
    assert dropped <= sent.tx_packets // 2, f"{dropped} of {sent.tx_packets} dropped"
    bad = {
        k: v
        for k, v in dev.metrics.errors.items()
        if k.startswith("tx_") and k != "tx_backend_full"
    }
    assert not bad

    # rxonly: frames of every size the ring options allow, none lost
    tpmd.command("set fwd rxonly")
    tpmd.clear_stats()
    tpmd.start_forwarding()
    sizes = [60, 64, 128, 1000, 1514]
    total = 0
    src = bytes.fromhex("020000000001")
    dst = bytes.fromhex(TESTPMD_MAC.replace(":", ""))
    for i in range(rx_frames):
        f = _frame(i, sizes[i % len(sizes)], dst, src)
        be.peer.send(f)  # blocking: the device's socket takes it or we wait
        total += len(f)
    deadline = time.monotonic() + 20
    while True:
        got = tpmd.port_stats()[0]
        if got.rx_packets >= rx_frames or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    tpmd.stop_forwarding()
    assert (got.rx_packets, got.rx_bytes) == (rx_frames, total)
    assert got.rx_errors == 0 and got.rx_missed == 0 and got.rx_nombuf == 0
    assert dev.rx_frames == rx_frames


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_testpmd_virtio_user_drives_our_backend(tmp: Path, case: Case) -> None:
    be = InProcessBackend(tmp, mrg_rxbuf=case.device_mrg)
    try:
        vdev = virtio_user_vdev(
            be.sock_path,
            mac=TESTPMD_MAC,
            packed=case.packed,
            in_order=case.in_order,  # DPDK negotiates IN_ORDER unless told not to
            mrg_rxbuf=case.dpdk_mrg,
        )
        with Testpmd(
            [vdev],
            prefix=f"pv-vu-{os.getpid()}",
            forward_mode="txonly",
            txpkts=64,
            log=tmp / "testpmd.log",
        ) as tpmd:
            _wait(lambda: be.device.features != 0, 10, "feature negotiation")
            f = be.device.features
            assert has(f, Feature.RING_PACKED) is case.packed
            assert has(f, Feature.IN_ORDER) is case.in_order
            assert has(f, NetFeature.MRG_RXBUF) is case.mrg
            assert has(f, Feature.VERSION_1)
            _txonly_then_rxonly(tpmd, be, seconds=1.0, rx_frames=600, size=64)
        # no ring violation, driver or device error (each would set DEVICE_NEEDS_RESET)
        errors = be.device.metrics.errors
        assert not {
            k: errors[k]
            for k in ("broken_queue", "driver_error", "device_error", "ring")
            if k in errors
        }
    finally:
        be.close()


def test_testpmd_virtio_user_drives_pyvirtio_serve_net(tmp: Path) -> None:
    """The command line: ``pyvirtio serve net --socket-peer dgram:LOCAL,REMOTE``."""
    sock, local, remote = tmp / "net.sock", tmp / "dev.dgram", tmp / "peer.dgram"
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    peer.bind(str(remote))
    argv = [sys.executable, "-m", "pyvirtio", "serve", "net", "--socket", str(sock)]
    argv += ["--socket-peer", f"dgram:{local},{remote}", "--trust-frontend", "-v"]
    argv += ["--mac", "52:54:00:12:34:56", "--queues", "1"]
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        _wait(lambda: (sock.exists() and local.exists()) or proc.poll() is not None, 20, "serve")
        assert proc.poll() is None, log.read_text()
        peer.connect(str(local))
        col = Collector(peer)
        with Testpmd(
            [virtio_user_vdev(sock, mac=TESTPMD_MAC)],
            prefix=f"pv-cli-{os.getpid()}",
            forward_mode="txonly",
            txpkts=128,
            log=tmp / "testpmd.log",
        ) as tpmd:
            tpmd.start_forwarding()
            time.sleep(1.0)
            tpmd.stop_forwarding()
            sent = tpmd.port_stats()[0].tx_packets
            time.sleep(0.5)
            col.stop()
            assert 0 < col.count <= sent
            tpmd.command("set fwd rxonly")
            tpmd.clear_stats()
            tpmd.start_forwarding()
            dst = bytes.fromhex(TESTPMD_MAC.replace(":", ""))
            for i in range(300):
                peer.send(_frame(i, 100, dst, bytes.fromhex("020000000001")))
            _wait(lambda: tpmd.port_stats()[0].rx_packets >= 300, 20, "testpmd RX")
            assert tpmd.port_stats()[0].rx_packets == 300
        # when testpmd hung up, the server logged what each ring did: the transmitq
        # completed exactly what testpmd sent (received by the peer or dropped)
        _wait(lambda: "connection ended" in log.read_text(), 10, "the connection summary")
        m = re.search(r"q0=(\d+)/(\d+) q1=(\d+)/(\d+)", log.read_text())
        assert m is not None, log.read_text()
        assert int(m.group(4)) == sent
        assert int(m.group(2)) >= 300
    finally:
        proc.terminate()
        proc.wait(10)
        peer.close()


# ---------------------------------------------------------------------------
# pyvirtio's driver -> testpmd net_vhost
# ---------------------------------------------------------------------------


class _DpdkNetDriver(NetDriver):
    """NetDriver without VIRTIO_NET_F_MTU: DPDK's vhost library offers the bit but has
    no configuration space (QEMU's virtio-net keeps it, and vhost-user's GET_CONFIG
    is not offered), so the ``mtu`` field cannot be read."""

    def specific_features(self, offered: int) -> int:
        return super().specific_features(offered) & ~NetFeature.MTU.mask


@contextlib.contextmanager
def _vhost_testpmd(tmp: Path, mode: str) -> Iterator[tuple[Testpmd, Path]]:
    sock = tmp / "vhost.sock"
    with Testpmd(
        [vhost_vdev(sock)],
        prefix=f"pv-vh-{os.getpid()}",
        forward_mode=mode,
        log=tmp / "testpmd.log",
    ) as tpmd:
        tpmd.start_forwarding()
        yield tpmd, sock


@pytest.mark.parametrize("mode", ["macswap", "io"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_our_driver_against_testpmd_vhost(tmp: Path, mode: str, packed: bool) -> None:
    n, window = 1024, 64
    with _vhost_testpmd(tmp, mode) as (tpmd, sock):
        drv = connect(
            _DpdkNetDriver,
            sock,
            connect_timeout=20,
            ctrl_vq=False,
            ring=RingOptions(packed=packed),
        )
        try:
            assert drv.has_feature(Feature.RING_PACKED) is packed
            assert not drv.has_feature(NetFeature.CTRL_VQ)
            tpmd.wait_link_up()
            peer = bytes.fromhex("020000000002")
            sizes = [60, 64, 200, 1514]
            for base in range(0, n, window):
                sent = [_frame(i, sizes[i % 4], peer, drv.mac) for i in range(base, base + window)]
                for f in sent:
                    drv.send(f)
                for f in sent:
                    back = drv.recv(timeout=10)
                    if mode == "macswap":
                        assert back[:6] == f[6:12] and back[6:12] == f[:6]
                    else:
                        assert back[:12] == f[:12]
                    assert back[12:] == f[12:]
            drv.flush_tx(timeout=10)
            st = tpmd.port_stats()[0]
            assert (st.rx_packets, st.tx_packets) == (n, n)
            assert st.rx_errors == st.tx_errors == st.rx_missed == 0
            assert drv.stats.rx_packets == drv.stats.tx_packets == n
            assert drv.stats.device_errors == 0
        finally:
            drv.close()
            drv.transport.close()
