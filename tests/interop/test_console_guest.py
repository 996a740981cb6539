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
shows the console size the device sent (VIRTIO_CONSOLE_RESIZE) with ``stty size``.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from pyvirtio.vm import TRIXIE_GENERATION, GuestVM, PeerGeneration, build_initramfs
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


@pytest.mark.parametrize("multiport", [True, False], ids=["multiport", "port0-only"])
def test_linux_virtio_console_against_pyvirtio_backend(
    tmp_path: Path,
    peers: PeerGeneration,
    multiport: bool,
    record_property: Callable[[str, object], None],
) -> None:
    """Peer: PEER. Linux's virtio_console brings the device up through the generic
    front-end; the guest writes to /dev/hvc0 and reads what the host sends through
    the port's socket; with MULTIPORT also over the named generic port 1."""
    record_property("peer", PEER)
    p0, p1 = tmp_path / "p0.sock", tmp_path / "p1.sock"
    serve_args = ["console", "--cols", "132", "--rows", "43", "--port", f"socket:{p0}"]
    if multiport:
        serve_args += ["--port", f"{NAME}=socket:{p1}", "--max-ports", "2"]
        num_vqs = 6  # 2 * (max_nr_ports + 1)
    else:
        serve_args += ["--no-multiport"]
        num_vqs = 2
    script = _WAIT_HVC + _HVC + (_PORT1 if multiport else "")
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
        got = {i: b"" for i in hosts}
        answer = {0: (b"guest-hvc0-out", HVC_IN), 1: (b"guest-port1-out", PORT_IN)}
        answered: set[int] = set()
        with vm.start(tmp_path / "console.log") as guest:
            deadline = time.monotonic() + 240
            while guest.alive() and time.monotonic() < deadline:
                ready, _, _ = select.select(list(hosts.values()), [], [], 0.2)
                for i, s in hosts.items():
                    if s not in ready:
                        continue
                    try:
                        data = s.recv(4096)
                    except BlockingIOError:
                        continue
                    if not data:
                        hosts_closed = f"port {i} socket closed by the back-end"
                        raise AssertionError(hosts_closed + "\n" + be.log())
                    got[i] += data
                    want, reply = answer[i]
                    if i not in answered and want in got[i]:
                        answered.add(i)
                        s.sendall(reply)
            result = guest.wait(30)
        ctx = result.describe() + "\n--- back-end ---\n" + be.log()
        record_property("guest_seconds", round(result.elapsed, 1))
        record_property("guest_features", result.marker_values("CON-FEATURES"))
        record_property("guest_ports", result.marker_values("CON-VPORT"))
        record_property("hvc0_size", result.marker_values("CON-HVC0-SIZE"))
        assert result.check(), ctx
        assert b"guest-hvc0-out" in got[0], ctx
        assert result.marker_value("CON-HVC0-IN") == HVC_IN.decode().strip(), ctx
        if multiport:
            assert result.marker_values("CON-VPORT") == [
                "vport0p0 name=",
                f"vport0p1 name={NAME}",
            ], ctx
            assert result.marker_value("CON-HVC0-SIZE") == "43 132", ctx
            assert b"guest-port1-out" in got[1], ctx
            assert result.marker_value("CON-PORT1-IN") == PORT_IN.decode(), ctx
