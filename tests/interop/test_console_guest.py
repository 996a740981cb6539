"""The console back-end (``pyvirtio serve console``) against Linux's virtio_console.

Peer: the Linux 7.3 virtio_console driver (built into the trixie-backports kernel)
under QEMU 11.1, generation ``qemu11.1-linux7.3`` of :mod:`pyvirtio.vm.peers` only.
QEMU has no vhost-user console front-end; QEMU 11.1's generic
``vhost-user-test-device-pci`` (``virtio-id=3``, ``num_vqs``, ``config_size=12``)
carries any device type and passes the configuration space through
VHOST_USER_GET_CONFIG. QEMU 7.2 (the other generation) has no such front-end: that
is a property of the peer, so the test runs on the trixie generation only (a missing
trixie root is a failure, never a skip).

The ports' host sides are unix sockets the test drives. The guest writes to
``/dev/hvc0`` (port 0, a console port) and reads what the host writes back; with
VIRTIO_CONSOLE_F_MULTIPORT it also finds the named port 1 in
``/sys/class/virtio-ports/vport*p1/name`` and uses ``/dev/vport*p1`` both ways, and
shows the console size the device sent (VIRTIO_CONSOLE_RESIZE) with ``stty size``,
then moves 1 MiB of random bytes each way over port 1 (a generic port: no tty line
discipline in the way of binary data) and both sides compare MD5 sums. A third test
changes the device while the guest runs, through ``serve console --control``: a
named port added (and used both ways, then removed) and a resize of hvc0.
"""

from __future__ import annotations

import hashlib
import random
import select
import socket
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from pyvirtio.vm import (
    TRIXIE_GENERATION,
    GuestResult,
    GuestVM,
    PeerGeneration,
    build_initramfs,
)
from tests.interop.test_vhost_user_guest import serve
from tests.peer_generations import resolve_peers

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PEER = (
    "Linux 7.3 virtio_console (trixie-backports kernel) under QEMU 11.1's "
    "vhost-user-test-device-pci (private trixie root)"
)
NAME = "org.pyvirtio.test"
HVC_IN = b"host-to-hvc\n"  # 12 bytes
PORT_IN = b"host-to-port1"  # 13 bytes
BULK = 1 << 20
PORT1_OUT = b"guest-port1-out\n"

_WAIT_HVC = """
n=0
while [ ! -e /dev/hvc0 ] && [ $n -lt 100 ]; do usleep 100000; n=$((n + 1)); done
echo "CON-FEATURES $(cat /sys/bus/virtio/drivers/virtio_console/virtio*/features)"
for p in /sys/class/virtio-ports/vport*; do
  [ -e "$p" ] && echo "CON-VPORT $(basename $p) name=$(cat $p/name 2>/dev/null)"
done
"""

_HVC = """
exec 3<>/dev/hvc0
stty -F /dev/hvc0 raw -echo
echo "CON-HVC0-SIZE $(stty -F /dev/hvc0 size)"
printf 'guest-hvc0-out\\n' >&3
echo "CON-HVC0-IN $(timeout 30 dd bs=1 count=12 <&3 2>/dev/null)"
"""

_PORT1 = """
dev=$(ls /dev/vport*p1 | head -n 1)
echo "CON-PORT1-DEV $dev"
exec 4<>$dev
printf 'guest-port1-out\\n' >&4
echo "CON-PORT1-IN $(timeout 30 dd bs=13 count=1 <&4 2>/dev/null)"
"""

# after _PORT1 (fd 4 is the open port 1): 1 MiB up, then 1 MiB down, MD5 of each
_BULK = f"""
head -c {BULK} /dev/urandom > /tmp/up
echo "CON-UP $(wc -c < /tmp/up) $(md5sum /tmp/up | cut -d' ' -f1)"
cat /tmp/up >&4
timeout 120 head -c {BULK} <&4 > /tmp/down
echo "CON-DOWN $(wc -c < /tmp/down) $(md5sum /tmp/down | cut -d' ' -f1)"
"""


@pytest.fixture(scope="module")
def peers() -> PeerGeneration:
    """QEMU 11.1 + Linux 7.3: the only generation with vhost-user-test-device-pci."""
    return resolve_peers(TRIXIE_GENERATION)


def _connect(path: Path, timeout: float = 30) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            s.setblocking(False)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Exchange:
    """The host ends of the ports while a guest runs ``_HVC``, ``_PORT1`` and
    ``_BULK``: it answers each port's greeting and, with ``bulk``, after port 1's
    greeting takes the guest's 1 MiB, then sends 1 MiB of its own."""

    def __init__(self, hosts: dict[int, socket.socket], bulk: bool) -> None:
        self.hosts = hosts
        self.bulk = bulk
        self.got = {i: b"" for i in hosts}
        self.answered: set[int] = set()
        self.down = random.Random(0xC0450).randbytes(BULK) if bulk else b""
        self.out: dict[int, memoryview] = {}

    @property
    def upload(self) -> bytes:
        """What port 1 received after the guest's greeting line."""
        data = self.got.get(1, b"")
        at = data.find(PORT1_OUT)
        return data[at + len(PORT1_OUT) :] if at >= 0 else b""

    def step(self, log: Callable[[], str], timeout: float = 0.2) -> None:
        """One select round: read what came, answer greetings, send what waits."""
        answer = {0: (b"guest-hvc0-out", HVC_IN), 1: (b"guest-port1-out", PORT_IN)}
        writers = [self.hosts[i] for i, b in self.out.items() if b]
        ready, writable, _ = select.select(list(self.hosts.values()), writers, [], timeout)
        for i, s in self.hosts.items():
            if s in writable:
                with_buf = self.out[i]
                try:
                    n = s.send(with_buf[:65536])
                except BlockingIOError:
                    n = 0
                self.out[i] = with_buf[n:]
            if s not in ready:
                continue
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                raise AssertionError(f"port {i} socket closed by the device\n{log()}")
            self.got[i] += data
            want, reply = answer.get(i, (b"", b""))
            if want and i not in self.answered and want in self.got[i]:
                self.answered.add(i)
                s.sendall(reply)
            if i == 1 and self.bulk and 1 not in self.out and len(self.upload) >= BULK:
                self.out[1] = memoryview(self.down)

    def check_bulk(self, result: GuestResult, ctx: str) -> None:
        """Exactly 1 MiB each way, MD5 equal on both sides."""
        up_md5 = hashlib.md5(self.upload).hexdigest()
        assert result.marker_value("CON-UP") == f"{BULK} {up_md5}", ctx
        assert len(self.upload) == BULK, ctx
        down = f"{BULK} {hashlib.md5(self.down).hexdigest()}"
        assert result.marker_value("CON-DOWN") == down, ctx


@pytest.mark.parametrize("multiport", [True, False], ids=["multiport", "port0-only"])
def test_linux_virtio_console_against_pyvirtio_backend(
    tmp_path: Path,
    peers: PeerGeneration,
    multiport: bool,
    record_property: Callable[[str, object], None],
) -> None:
    """Peer: PEER. Linux's virtio_console brings the device up through the generic
    front-end; the guest writes to /dev/hvc0 and reads what the host sends through
    the port's socket; with MULTIPORT also over the named generic port 1, and then
    1 MiB each way over port 1 with MD5 sums compared."""
    record_property("peer", PEER)
    p0, p1 = tmp_path / "p0.sock", tmp_path / "p1.sock"
    serve_args = ["console", "--cols", "132", "--rows", "43", "--port", f"socket:{p0}"]
    if multiport:
        serve_args += ["--port", f"{NAME}=socket:{p1}", "--max-ports", "2"]
        num_vqs = 6  # 2 * (max_nr_ports + 1)
    else:
        serve_args += ["--no-multiport"]
        num_vqs = 2
    script = _WAIT_HVC + _HVC + (_PORT1 + _BULK if multiport else "")
    with ExitStack() as stack:
        be = stack.enter_context(serve(serve_args, tmp_path, "console"))
        hosts = {0: _connect(p0)}
        if multiport:
            hosts[1] = _connect(p1)
        for s in hosts.values():
            stack.callback(s.close)
        ird = build_initramfs(tmp_path / "initramfs.gz", peers.kernel, script)
        vm = GuestVM(
            peers.kernel.boot_image, ird.path, memory_mib=256, shared_memory=True, peer=peers.qemu
        )
        vm.chardev(f"socket,id=con0,path={be.socket_path}")
        vm.device(
            f"vhost-user-test-device-pci,chardev=con0,virtio-id=3,num_vqs={num_vqs},config_size=12"
        )
        ex = Exchange(hosts, bulk=multiport)
        with vm.start(tmp_path / "console.log") as guest:
            deadline = time.monotonic() + 240
            while guest.alive() and time.monotonic() < deadline:
                ex.step(be.log)
            result = guest.wait(30)
        ctx = result.describe() + "\n--- back-end ---\n" + be.log()
        record_property("guest_seconds", round(result.elapsed, 1))
        record_property("guest_features", result.marker_values("CON-FEATURES"))
        record_property("guest_ports", result.marker_values("CON-VPORT"))
        record_property("hvc0_size", result.marker_values("CON-HVC0-SIZE"))
        assert result.check(), ctx
        assert b"guest-hvc0-out" in ex.got[0], ctx
        assert result.marker_value("CON-HVC0-IN") == HVC_IN.decode().strip(), ctx
        if multiport:
            assert result.marker_values("CON-VPORT") == [
                "vport0p0 name=",
                f"vport0p1 name={NAME}",
            ], ctx
            assert result.marker_value("CON-HVC0-SIZE") == "43 132", ctx
            assert b"guest-port1-out" in ex.got[1], ctx
            assert result.marker_value("CON-PORT1-IN") == PORT_IN.decode(), ctx
            ex.check_bulk(result, ctx)


HOT = "org.pyvirtio.hot"
_HOTPLUG = """
exec 3<>/dev/hvc0
stty -F /dev/hvc0 raw -echo
echo "CON-HVC0-SIZE $(stty -F /dev/hvc0 size)"
exec 4<>/dev/vport0p1
printf 'guest-ready\\n' >&4
n=0
while [ ! -e /sys/class/virtio-ports/vport0p2/name ] && [ $n -lt 300 ]; do
  usleep 100000; n=$((n + 1))
done
echo "CON-HOT-NAME $(cat /sys/class/virtio-ports/vport0p2/name)"
n=0
while [ ! -e /dev/vport0p2 ] && [ $n -lt 100 ]; do usleep 100000; n=$((n + 1)); done
exec 5<>/dev/vport0p2
printf 'guest-hot-out\\n' >&5
echo "CON-HOT-IN $(timeout 30 dd bs=6 count=1 <&5 2>/dev/null)"
exec 5>&-
printf 'guest-hot-done\\n' >&4
n=0
while [ -e /sys/class/virtio-ports/vport0p2 ] && [ $n -lt 300 ]; do
  usleep 100000; n=$((n + 1))
done
echo "CON-HOT-GONE $([ -e /sys/class/virtio-ports/vport0p2 ] && echo no || echo yes)"
n=0
while [ "$(stty -F /dev/hvc0 size)" != "30 100" ] && [ $n -lt 100 ]; do
  usleep 100000; n=$((n + 1))
done
echo "CON-HVC0-RESIZED $(stty -F /dev/hvc0 size)"
"""


def test_linux_sees_ports_added_and_removed_and_a_resize_at_run_time(
    tmp_path: Path,
    peers: PeerGeneration,
    record_property: Callable[[str, object], None],
) -> None:
    """Peer: PEER. With the guest up, the host adds a named port through the control
    socket (``serve console --control``): Linux shows it in
    /sys/class/virtio-ports/vport0p2/name and /dev/vport0p2 works both ways; a
    ``resize`` reaches hvc0 (``stty size``, VIRTIO_CONSOLE_RESIZE); a ``remove``
    takes the port away again (VIRTIO_CONSOLE_DEVICE_REMOVE)."""
    from pyvirtio.devices.console import console_command

    record_property("peer", PEER)
    p0, p1, p2 = tmp_path / "p0.sock", tmp_path / "p1.sock", tmp_path / "p2.sock"
    ctl = str(tmp_path / "ctl.sock")
    serve_args = ["console", "--cols", "132", "--rows", "43", "--port", f"socket:{p0}"]
    serve_args += ["--port", f"{NAME}=socket:{p1}", "--max-ports", "4", "--control", ctl]
    replies: dict[str, dict[str, object]] = {}
    with ExitStack() as stack:
        be = stack.enter_context(serve(serve_args, tmp_path, "console"))
        hosts = {0: _connect(p0), 1: _connect(p1)}
        stack.callback(lambda: [s.close() for s in hosts.values()])
        ird = build_initramfs(tmp_path / "initramfs.gz", peers.kernel, _WAIT_HVC + _HOTPLUG)
        vm = GuestVM(
            peers.kernel.boot_image, ird.path, memory_mib=256, shared_memory=True, peer=peers.qemu
        )
        vm.chardev(f"socket,id=con0,path={be.socket_path}")
        vm.device("vhost-user-test-device-pci,chardev=con0,virtio-id=3,num_vqs=10,config_size=12")
        got = {0: b"", 1: b"", 2: b""}
        with vm.start(tmp_path / "console.log") as guest:
            deadline = time.monotonic() + 240
            while guest.alive() and time.monotonic() < deadline:
                ready, _, _ = select.select(list(hosts.values()), [], [], 0.2)
                for i, s in list(hosts.items()):
                    if s not in ready:
                        continue
                    data = s.recv(65536)
                    if not data:
                        assert i == 2 and "remove" in replies, f"port {i} closed\n{be.log()}"
                        s.close()
                        del hosts[i]
                        continue
                    got[i] += data
                    if i == 1 and b"guest-ready" in got[1] and "add" not in replies:
                        replies["add"] = console_command(ctl, f"add {HOT}=socket:{p2}")
                        replies["resize"] = console_command(ctl, "resize 100 30")
                        hosts[2] = _connect(p2)
                    if i == 2 and b"guest-hot-out" in got[2] and "sent" not in replies:
                        replies["sent"] = {}
                        s.sendall(b"hot-in")
                    if i == 1 and b"guest-hot-done" in got[1] and "remove" not in replies:
                        replies["remove"] = console_command(ctl, "remove 2")
            result = guest.wait(30)
        replies["info"] = console_command(ctl, "info")
    ctx = result.describe() + f"\n--- replies ---\n{replies}\n--- back-end ---\n" + be.log()
    record_property("guest_seconds", round(result.elapsed, 1))
    assert result.check(), ctx
    assert replies["add"].get("added") == 2, ctx
    assert "error" not in replies["resize"] and "error" not in replies["remove"], ctx
    assert result.marker_value("CON-HVC0-SIZE") == "43 132", ctx
    assert result.marker_value("CON-HOT-NAME") == HOT, ctx
    assert b"guest-hot-out" in got[2], ctx
    assert result.marker_value("CON-HOT-IN") == "hot-in", ctx
    assert result.marker_value("CON-HOT-GONE") == "yes", ctx
    assert result.marker_value("CON-HVC0-RESIZED") == "30 100", ctx
    ports = replies["info"]["ports"]
    assert isinstance(ports, list) and [p["id"] for p in ports] == [0, 1], ctx
