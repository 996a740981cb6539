"""The network device served over vhost-user to real Linux virtio_net drivers.

Peers: Linux's virtio_net driver in a guest under QEMU (TCG), with QEMU's
``-netdev vhost-user`` + ``virtio-net-pci`` front-end in front of
``python -m pyvirtio serve net``; both generations of :mod:`pyvirtio.vm.peers`
(QEMU 7.2 + Linux 6.1, QEMU 11.1 + Linux 7.3). The host side is a TAP that the
back-end creates inside a network namespace the test made (``ip netns``): the
guest's only neighbour is that namespace, at 10.77.0.1; nothing else is reachable.

Each scenario boots one guest, which configures 10.77.0.2/24, pings the namespace,
downloads 16 MiB from a TCP server in the namespace and uploads 16 MiB of its own
random bytes with busybox ``nc``; md5 sums are compared on both sides. Scenarios:
split ring with MRG_RXBUF, packed ring, MRG_RXBUF off, two queue pairs on two
vCPUs (each pair carries traffic), the transitional device through the legacy
interface (``virtio_pci.force_legacy=1``), guest TCP segmentation and checksum
offload through the TAP's vnet header, the back-end killed and restarted (the guest
sees the carrier go down and up), and two guests on pyvirtio's in-process switch
pinging each other.

QEMU 7.2 under TCG segfaults in ``vhost_net_start`` (``msix_set_vector_notifiers``)
as soon as a guest drives virtio-net-pci with MSI-X and the control queue over a
vhost-user netdev; QEMU 11.1 does not. The 7.2 cases run with ``vectors=0`` (INTx):
a limitation of that peer, not of the back-end.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtio.vm import (
    GENERATIONS,
    SYSTEM_GENERATION,
    TRIXIE_GENERATION,
    GuestVM,
    PeerGeneration,
    build_initramfs,
)
from pyvirtio.vm.initramfs import GUEST_MODULE_DIR
from pyvirtio.vm.netns import NetNamespace, netns_available
from tests.peer_generations import resolve_peers

pytestmark = [
    pytest.mark.interop,
    pytest.mark.slow,
    pytest.mark.skipif(netns_available() is not None, reason=str(netns_available())),
]

PEERS = {
    SYSTEM_GENERATION: "Linux 6.1 virtio_net (Debian 12 kernel) under the system QEMU 7.2",
    TRIXIE_GENERATION: "Linux 7.3 virtio_net (trixie-backports) under QEMU 11.1 (private root)",
}

HOST_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2"
TAP = "pvtap0"
XFER = 16 << 20
SEED = 0x9E7
_SRC = str(Path(__file__).resolve().parents[2] / "src")
#: QEMU 11.1 dropped the chardev socket option ``reconnect`` for ``reconnect-ms``.
RECONNECT_OPT = {SYSTEM_GENERATION: "reconnect=1", TRIXIE_GENERATION: "reconnect-ms=500"}

#: The namespace side of the transfers: 16 MiB served on 5001, 16 MiB taken on 5002.
HOST_PEER = r"""
import hashlib, random, socket, sys, threading
size, seed, ip = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data = random.Random(seed).randbytes(size)
srv_down = socket.create_server((ip, 5001))
srv_up = socket.create_server((ip, 5002))
print("HOST-READY", hashlib.md5(data).hexdigest(), flush=True)
def down():
    c, _ = srv_down.accept()
    c.sendall(data)
    c.close()
def up():
    c, _ = srv_up.accept()
    h, n = hashlib.md5(), 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        h.update(b)
        n += len(b)
    c.close()
    print("HOST-UP", n, h.hexdigest(), flush=True)
ts = [threading.Thread(target=down), threading.Thread(target=up)]
for t in ts:
    t.start()
for t in ts:
    t.join()
"""

WAIT_ETH0 = """
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 400 ]; do usleep 50000; n=$((n + 1)); done
"""

#: busybox insmod does not apply ``virtio_pci.force_legacy=1`` from the command line:
#: reload virtio_pci with it (Linux 7.3 has virtio_pci built in and applies it).
LEGACY_RELOAD = f"""
if [ -f {GUEST_MODULE_DIR}/virtio_pci.ko ]; then
rmmod virtio_net
rmmod virtio_pci
insmod {GUEST_MODULE_DIR}/virtio_pci.ko force_legacy=1
insmod {GUEST_MODULE_DIR}/virtio_net.ko
fi
"""


def guest_setup(ip: str = GUEST_IP) -> str:
    return f"""{WAIT_ETH0}
ip link set eth0 up
ip addr add {ip}/24 dev eth0
echo "NET-FEATURES $(cat /sys/class/net/eth0/device/features)"
echo "NET-CARRIER $(cat /sys/class/net/eth0/carrier)"
"""


TRANSFER = f"""
ping -c 3 -W 5 {HOST_IP} > /dev/null && echo "NET-PING ok"
nc {HOST_IP} 5001 < /dev/null > /tmp/down.bin
echo "NET-DOWN $(wc -c < /tmp/down.bin) $(md5sum < /tmp/down.bin | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/up.bin bs=1M count={XFER >> 20} 2>/dev/null
echo "NET-UP-SENT $(md5sum < /tmp/up.bin | cut -d' ' -f1)"
nc {HOST_IP} 5002 < /tmp/up.bin
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = _SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def peers(request: pytest.FixtureRequest) -> PeerGeneration:
    return resolve_peers(str(request.param))


def each_generation() -> pytest.MarkDecorator:
    return pytest.mark.parametrize("peers", GENERATIONS, indirect=True)


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    with NetNamespace("pvnet") as ns:
        yield ns


class ServeNet:
    """``python -m pyvirtio serve net ... -v`` inside the namespace."""

    def __init__(self, ns: NetNamespace, args: Sequence[str], sock: Path, log: Path) -> None:
        self.sock = sock
        self.log_path = log
        if sock.exists():
            sock.unlink()
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = ns.popen(
            [sys.executable, "-m", "pyvirtio", "serve", "net", "--socket", str(sock), "-v", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=_env(),
        )
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve net did not come up:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


@contextmanager
def serve_net(
    ns: NetNamespace, tmp: Path, args: Sequence[str], name: str = "net"
) -> Iterator[ServeNet]:
    be = ServeNet(ns, args, tmp / f"{name}.sock", tmp / f"{name}.log")
    try:
        yield be
    finally:
        rc = be.stop()
        assert rc == 0, f"serve net did not stop cleanly on Ctrl-C (rc={rc}):\n{be.log()}"


@contextmanager
def host_peer(ns: NetNamespace) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    proc = ns.python(HOST_PEER, str(XFER), str(SEED), HOST_IP, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("HOST-READY"), line
    try:
        yield proc, line.split()[1]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The next line ``proc`` prints, or "" if none comes within ``timeout``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().decode().strip() if ready else ""


def boot(
    peers: PeerGeneration,
    tmp: Path,
    script: str,
    netdevs: Sequence[tuple[str, str, str]],
    *,
    smp: int = 1,
    append: Sequence[str] = (),
    mac_index: int = 2,
) -> GuestVM:
    """A guest running ``script`` with one virtio-net-pci per ``(chardev, netdev
    options, device options)``."""
    tmp.mkdir(parents=True, exist_ok=True)
    ird = build_initramfs(
        tmp / "initramfs.gz", peers.kernel, "set -e\n" + script, modules=["virtio_net"]
    )
    vm = GuestVM(
        peers.kernel.boot_image,
        ird.path,
        memory_mib=320,
        shared_memory=True,
        smp=smp,
        append=append,
        peer=peers.qemu,
    )
    for i, (chardev, netdev, device) in enumerate(netdevs):
        vectors = ",vectors=0" if peers.name == SYSTEM_GENERATION else ""
        vm.chardev(f"socket,id=c{i},{chardev}")
        vm.netdev(f"vhost-user,id=n{i},chardev=c{i}{netdev}")
        mac = f"52:54:00:77:00:{i + mac_index:02x}"
        vm.device(f"virtio-net-pci,netdev=n{i},mac={mac}{vectors}{device}")
    return vm


@dataclass
class Outcome:
    console: str
    backend_log: str
    host_up: str

    def value(self, prefix: str) -> str:
        m = re.search(rf"^{re.escape(prefix)} (.*)$", self.console, re.M)
        assert m is not None, f"no {prefix} line:\n{self.console[-4000:]}\n{self.backend_log}"
        return m.group(1).strip()

    def queue_counts(self) -> dict[int, int]:
        """Chains fetched per ring, from the back-end's connection summary."""
        m = re.findall(r"chains fetched/completed ((?:q\d+=\d+/\d+ ?)+)", self.backend_log)
        assert m, self.backend_log
        return {int(q): int(f) for q, f in re.findall(r"q(\d+)=(\d+)/\d+", m[-1])}


def run_transfer(
    peers: PeerGeneration,
    tmp: Path,
    ns: NetNamespace,
    *,
    serve_args: Sequence[str] = (),
    netdev: str = "",
    device: str = "",
    smp: int = 1,
    append: Sequence[str] = (),
    prelude: str = "",
    extra: str = "",
) -> Outcome:
    """One guest: ping, 16 MiB down, 16 MiB up; both sides' checksums compared."""
    with serve_net(ns, tmp, ["--tap", TAP, *serve_args]) as be:
        ns.up(TAP, f"{HOST_IP}/24")
        with host_peer(ns) as (peer, down_md5):
            script = prelude + guest_setup() + TRANSFER + extra
            vm = boot(
                peers, tmp, script, [(f"path={be.sock}", netdev, device)], smp=smp, append=append
            )
            result = vm.run(timeout=300)
            up_line = _line(peer, 10 if result.guest_rc == 0 else 0.5)
        ctx = result.describe() + "\n--- back-end ---\n" + be.log()
        assert result.guest_rc == 0, ctx
        out = Outcome(result.console, "", up_line)
    out.backend_log = be.log()
    assert out.value("NET-PING") == "ok", ctx
    assert out.value("NET-DOWN") == f"{XFER} {down_md5}", ctx
    sent = out.value("NET-UP-SENT")
    assert up_line == f"HOST-UP {XFER} {sent}", ctx + "\n" + up_line
    print(f"{peers.name}: guest run {result.elapsed:.1f} s; {out.backend_log.splitlines()[-2:]}")
    return out


def feature_bit(out: Outcome, bit: int) -> bool:
    return out.value("NET-FEATURES")[bit] == "1"


@each_generation()
def test_split_ring_ping_and_16mib_each_way(
    tmp_path: Path, peers: PeerGeneration, netns: NetNamespace
) -> None:
    """Peer: Linux virtio_net under QEMU, both generations (PEERS). Split ring,
    MRG_RXBUF (negotiated: bit 15), link up (carrier 1)."""
    out = run_transfer(peers, tmp_path, netns)
    assert feature_bit(out, 15), "MRG_RXBUF not negotiated"
    assert not feature_bit(out, 34), "packed ring negotiated on a split-ring device"
    assert out.value("NET-CARRIER") == "1"


@each_generation()
def test_packed_ring(tmp_path: Path, peers: PeerGeneration, netns: NetNamespace) -> None:
    """Peer: Linux virtio_net under QEMU (``packed=on``), both generations."""
    out = run_transfer(peers, tmp_path, netns, device=",packed=on")
    assert feature_bit(out, 34), "VIRTIO_F_RING_PACKED not negotiated"


@each_generation()
def test_without_mrg_rxbuf(tmp_path: Path, peers: PeerGeneration, netns: NetNamespace) -> None:
    """Peer: Linux virtio_net under QEMU; the back-end offers no MRG_RXBUF, so every
    frame fits one receive buffer (Linux posts 1526-byte ones, or 64 KiB ones with
    guest TSO)."""
    out = run_transfer(peers, tmp_path, netns, serve_args=["--no-mrg-rxbuf"])
    assert not feature_bit(out, 15)


@each_generation()
def test_guest_offloads_through_the_tap(
    tmp_path: Path, peers: PeerGeneration, netns: NetNamespace
) -> None:
    """Peer: Linux virtio_net under QEMU. The TAP carries the virtio_net_hdr: the
    guest negotiates CSUM, GUEST_CSUM, HOST_TSO4 and GUEST_TSO4 and sends TCP in 64
    KiB segments the TAP cuts up (the guest's tx queue carries far fewer chains than
    16 MiB / 1448 would need)."""
    out = run_transfer(peers, tmp_path, netns)
    for bit in (0, 1, 7, 11):
        assert feature_bit(out, bit), f"offload feature bit {bit} not negotiated"
    counts = out.queue_counts()
    # 16 MiB up in MSS-sized frames would be > 11,000 transmit chains; TSO sends
    # far fewer
    assert counts[1] < 6000, counts


@each_generation()
def test_host_mtu_reaches_the_back_end_and_the_guest(
    tmp_path: Path, peers: PeerGeneration, netns: NetNamespace
) -> None:
    """Peer: Linux virtio_net under QEMU with ``host_mtu=4000``: QEMU sends
    VHOST_USER_NET_SET_MTU (the back-end offers VHOST_USER_PROTOCOL_F_MTU and
    VIRTIO_NET_F_MTU), the guest gets MTU 4000 and 4000-byte IP packets pass both
    ways unfragmented (the TAP has the same MTU)."""
    sock = tmp_path / "net.sock"
    script = (
        guest_setup()
        + f"""
echo "NET-MTU $(cat /sys/class/net/eth0/mtu)"
ping -c 3 -s 3972 -W 5 {HOST_IP} > /tmp/ping.txt && echo "NET-BIG-PING ok"
tail -3 /tmp/ping.txt
"""
    )
    with serve_net(netns, tmp_path, ["--tap", TAP]) as be:
        netns.up(TAP, f"{HOST_IP}/24", mtu=4000)
        vm = boot(peers, tmp_path, script, [(f"path={sock}", "", ",host_mtu=4000")])
        result = vm.run(timeout=240)
    ctx = result.describe() + "\n" + be.log()
    assert result.guest_rc == 0, ctx
    out = Outcome(result.console, be.log(), "")
    assert feature_bit(out, 3), "VIRTIO_NET_F_MTU not negotiated"
    assert out.value("NET-MTU") == "4000", ctx
    assert out.value("NET-BIG-PING") == "ok", ctx


@each_generation()
def test_two_queue_pairs_on_two_vcpus(
    tmp_path: Path, peers: PeerGeneration, netns: NetNamespace
) -> None:
    """Peer: Linux virtio_net under QEMU, ``mq=on`` with 2 pairs and 2 vCPUs; a
    multiqueue TAP. A second transfer runs from vCPU 1, so both transmit queues and
    both receive queues carry traffic."""
    extra = f"""
taskset 2 ping -c 20 -i 0.05 -W 5 {HOST_IP} > /dev/null && echo "NET-PING-CPU1 ok"
echo "NET-QUEUES $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')"
"""
    out = run_transfer(
        peers,
        tmp_path,
        netns,
        serve_args=["--queues", "2"],
        netdev=",queues=2",
        device=",mq=on",
        smp=2,
        prelude="",
        extra=extra,
    )
    assert feature_bit(out, 22), "VIRTIO_NET_F_MQ not negotiated"
    assert out.value("NET-PING-CPU1") == "ok"
    assert set(out.value("NET-QUEUES").split()) == {"rx-0", "rx-1", "tx-0", "tx-1"}
    counts = out.queue_counts()
    assert all(counts.get(q, 0) > 0 for q in range(4)), counts


@each_generation()
def test_transitional_device_through_the_legacy_interface(
    tmp_path: Path, peers: PeerGeneration, netns: NetNamespace
) -> None:
    """Peer: Linux virtio_net under QEMU, the transitional virtio-net-pci driven
    through its legacy interface (``virtio_pci.force_legacy=1``): no VERSION_1, so
    the 12-byte header comes from MRG_RXBUF alone."""
    out = run_transfer(
        peers, tmp_path, netns, append=["virtio_pci.force_legacy=1"], prelude=LEGACY_RELOAD
    )
    features = out.value("NET-FEATURES")
    assert len(features) == 32 or features[32] == "0", "VERSION_1 negotiated on legacy"


@each_generation()
def test_backend_restart_is_seen_as_carrier_down_then_up(
    tmp_path: Path, peers: PeerGeneration, netns: NetNamespace
) -> None:
    """Peer: Linux virtio_net under QEMU with ``reconnect``. The back-end is killed:
    QEMU's netdev goes link-down and the guest's carrier drops to 0; a new back-end
    takes the socket, QEMU reconnects, the carrier comes back and ping works again."""
    sock = tmp_path / "net.sock"
    script = (
        guest_setup()
        + f"""
ping -c 2 -W 5 {HOST_IP} > /dev/null && echo "NET-PING ok"
echo NET-BEFORE-KILL
n=0
while [ "$(cat /sys/class/net/eth0/carrier)" = 1 ] && [ $n -lt 600 ]; do
  usleep 50000; n=$((n + 1))
done
echo "NET-CARRIER-DOWN $(cat /sys/class/net/eth0/carrier)"
n=0
while [ "$(cat /sys/class/net/eth0/carrier)" != 1 ] && [ $n -lt 600 ]; do
  usleep 50000; n=$((n + 1))
done
echo "NET-CARRIER-UP $(cat /sys/class/net/eth0/carrier)"
n=0
until ping -c 1 -W 2 {HOST_IP} > /dev/null; do n=$((n + 1)); [ $n -lt 20 ]; done
echo "NET-PING-AFTER ok"
"""
    )
    first = ServeNet(netns, ["--tap", TAP], sock, tmp_path / "first.log")
    second: ServeNet | None = None
    netns.up(TAP, f"{HOST_IP}/24")
    vm = boot(peers, tmp_path, script, [(f"path={sock},{RECONNECT_OPT[peers.name]}", "", "")])
    try:
        with vm.start(tmp_path / "console.log") as guest:
            assert guest.wait_for(r"NET-BEFORE-KILL", 240), guest.diagnostics()
            first.kill()
            assert guest.wait_for(r"NET-CARRIER-DOWN 0", 60), guest.diagnostics()
            if sock.exists():
                sock.unlink()
            second = ServeNet(netns, ["--tap", TAP], sock, tmp_path / "second.log")
            netns.up(TAP, f"{HOST_IP}/24")  # a new TAP: the old one went with its owner
            result = guest.wait(240)
        ctx = result.describe() + "\n--- second ---\n" + second.log()
        assert result.guest_rc == 0, ctx
        assert "NET-CARRIER-UP 1" in result.console, ctx
        assert "NET-PING-AFTER ok" in result.console, ctx
    finally:
        if second is not None:
            assert second.stop() == 0
        if first.proc.poll() is None:
            first.kill()


@each_generation()
def test_two_guests_on_the_in_process_switch(
    tmp_path: Path, peers: PeerGeneration, netns: NetNamespace
) -> None:
    """Peers: two Linux guests under QEMU, each on its own vhost-user socket of one
    ``pyvirtio serve net --switch --switch-port`` process: no host networking at all
    (the namespace is only where the process runs). They ping each other; the
    switch learns both addresses."""
    sock_b = tmp_path / "b.sock"
    with serve_net(netns, tmp_path, ["--switch", "--switch-port", str(sock_b)]) as be:
        while not sock_b.exists():
            time.sleep(0.02)
        a = boot(
            peers,
            tmp_path / "a",
            guest_setup("10.78.0.1")
            + """
n=0
until ping -c 1 -W 2 10.78.0.2 > /dev/null; do n=$((n + 1)); [ $n -lt 60 ]; done
ping -c 5 -W 5 10.78.0.2 > /dev/null && echo "NET-PING-B ok"
sleep 3
""",
            [(f"path={be.sock}", "", "")],
        )
        b = boot(
            peers,
            tmp_path / "b",
            guest_setup("10.78.0.2")
            + """
n=0
until ping -c 1 -W 2 10.78.0.1 > /dev/null; do n=$((n + 1)); [ $n -lt 60 ]; done
ping -c 5 -W 5 10.78.0.1 > /dev/null && echo "NET-PING-A ok"
sleep 3
""",
            [(f"path={sock_b}", "", "")],
            mac_index=3,
        )
        with a.start(tmp_path / "a.console") as ga, b.start(tmp_path / "b.console") as gb:
            ra = ga.wait(300)
            rb = gb.wait(300)
    ctx = ra.describe() + "\n" + rb.describe() + "\n" + be.log()
    assert ra.guest_rc == 0 and rb.guest_rc == 0, ctx
    assert "NET-PING-B ok" in ra.console and "NET-PING-A ok" in rb.console, ctx
