"""Our virtio-pci function model against Linux's own virtio_pci driver, over vfio-user.

Peer: QEMU 11.1's ``vfio-user-pci`` client (trixie-backports, private trixie root)
with a Linux 7.3 guest (trixie-backports kernel), generation ``qemu11.1-linux7.3`` of
:mod:`pyvirtio.vm.peers` only: the system's QEMU 7.2 has no vfio-user client (it
came with QEMU 10.1). ``python -m pyvirtio serve blk --vfio-user SOCK --image IMG``
serves :class:`~pyvirtio.transport.pci.device.VirtioPciFunction` (our PCI function:
configuration space, capabilities, BARs, MSI-X) and QEMU shows it to the guest as a
PCI device; the guest's virtio_pci and virtio_blk (or virtio-rng) drivers find it,
negotiate, set up rings in guest RAM (shared with the server by memfd: DMA_MAP) and
drive it through REGION_READ/WRITE of its BARs, with MSI-X interrupts on eventfds.

Scenarios: the block device (pattern written with O_DIRECT, sync, read back; the host
checks the image file) as a modern function, a transitional one driven through either
interface, a legacy-only one, with INTx instead of MSI-X (``pci=nomsi``), with two
request queues written from two vCPUs, and under eight concurrent writers then
readers; the entropy device (``/dev/hwrng``); the network device on a TAP in a
private namespace (ping, 16 MiB each way); the console with MULTIPORT (hvc0 and a
named port both ways, 1 MiB each way over the named port with MD5 sums compared,
the size from RESIZE). Every scenario requires that the server
refused no command and logged no driver violation.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pyvirtio.vm import TRIXIE_GENERATION, GuestVM, PeerGeneration, build_initramfs
from tests.interop.test_vhost_user_guest import (
    CONC_BS,
    CONC_DATA,
    CONC_SEEK,
    Backend,
    check_concurrent,
    concurrent_snippet,
)
from tests.peer_generations import resolve_peers

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PEER = (
    "Linux 7.3 virtio_pci + virtio_blk/virtio-rng (trixie-backports kernel) under QEMU "
    "11.1 vfio-user-pci (trixie-backports, private trixie root)"
)
DISK_SIZE = 16 << 20
BLOCK = 4096
SEEK = 1024
PATTERN = random.Random(0xF10).randbytes(256 << 10)


@pytest.fixture(scope="module")
def peers() -> PeerGeneration:
    """QEMU 11.1 and Linux 7.3 (a missing set-up is a failure, never a skip)."""
    return resolve_peers(TRIXIE_GENERATION)


@contextmanager
def serve_vfio_user(args: list[str], tmp: Path, name: str) -> Iterator[Backend]:
    """``python -m pyvirtio serve ARGS --vfio-user SOCK --trace`` for a block."""
    sock = tmp / f"{name}.sock"
    be = Backend(
        ["-m", "pyvirtio", "serve", *args, "--vfio-user", str(sock), "-v", "--trace"],
        sock,
        tmp / f"{name}.log",
    )
    try:
        yield be
    finally:
        rc = be.stop()
        assert rc == 0, f"server {name} did not stop cleanly on Ctrl-C (rc={rc}):\n{be.log()}"
        assert not sock.exists(), "the server left its socket behind"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def boot(
    peers: PeerGeneration,
    tmp: Path,
    script: str,
    sock: Path,
    modules: list[str],
    append: tuple[str, ...] = (),
    smp: int = 1,
    files: dict[str, bytes] | None = None,
) -> GuestVM:
    ird = build_initramfs(
        tmp / "initramfs.gz",
        peers.kernel,
        "set -e\n" + script,
        modules=modules,
        files={"pattern.bin": PATTERN, **(files or {})},
    )
    vm = GuestVM(
        peers.kernel.boot_image,
        ird.path,
        memory_mib=256,
        shared_memory=True,
        peer=peers.qemu,
        append=append,
        smp=smp,
    )
    vm.device(
        json.dumps({"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(sock)}})
    )
    return vm


BLK_SCRIPT = f"""
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do usleep 100000; n=$((n + 1)); done
echo "BLK-SECTORS $(cat /sys/block/vda/size)"
echo "BLK-FEATURES $(cat /sys/bus/virtio/drivers/virtio_blk/virtio*/features)"
dd if=/pattern.bin of=/dev/vda bs={BLOCK} seek={SEEK} oflag=direct conv=notrunc 2>/dev/null
sync
echo "BLK-READBACK $(dd if=/dev/vda bs={BLOCK} skip={SEEK} count={len(PATTERN) // BLOCK} \
iflag=direct 2>/dev/null | md5sum)"
echo "BLK-IOERRORS $(dmesg | grep -c 'I/O error' || true)"
echo "PCI-IRQS $(grep -c virtio /proc/interrupts || true)"
"""


#: (scenario, --pci-mode, kernel arguments, VIRTIO_F_VERSION_1 expected, INTx expected)
BLK_SCENARIOS = [
    ("modern", "modern", (), True, False),
    # the transitional function, driven through its modern capabilities
    ("transitional", "transitional", (), True, False),
    # ... and through its legacy I/O BAR
    ("transitional-as-legacy", "transitional", ("virtio_pci.force_legacy=1",), False, False),
    # a legacy-only function (no virtio capabilities): Linux falls back to legacy
    ("legacy", "legacy", (), False, False),
    # no MSI-X in the guest: INTx through the eventfd, masked until QEMU unmasks it
    ("modern-intx", "modern", ("pci=nomsi",), True, True),
]


@pytest.mark.parametrize(
    ("scenario", "pci_mode", "append", "modern", "intx"),
    BLK_SCENARIOS,
    ids=[s[0] for s in BLK_SCENARIOS],
)
def test_linux_virtio_pci_drives_our_blk_function_over_vfio_user(
    tmp_path: Path,
    peers: PeerGeneration,
    scenario: str,
    pci_mode: str,
    append: tuple[str, ...],
    modern: bool,
    intx: bool,
) -> None:
    """Peer: PEER. The guest's virtio_pci finds our function, virtio_blk writes a
    pattern (O_DIRECT), syncs and reads it back; the host checks the image. Scenarios:
    modern, transitional (modern and legacy interface), legacy-only, and INTx instead
    of MSI-X (``pci=nomsi``)."""
    tmp = tmp_path
    original = random.Random(0xD15C).randbytes(DISK_SIZE)
    image = tmp / "disk.img"
    image.write_bytes(original)
    args = ["blk", "--image", str(image), "--pci-mode", pci_mode]
    with serve_vfio_user(args, tmp, "blk") as be:
        vm = boot(peers, tmp, BLK_SCRIPT, be.socket_path, ["virtio_blk"], append)
        result = vm.run(timeout=240, console_path=tmp / "console.log")
        ctx = result.describe() + "\n--- server ---\n" + be.log()[-20000:]
        assert result.guest_rc == 0, ctx
    assert result.marker_value("BLK-SECTORS") == str(DISK_SIZE // 512), ctx
    assert result.marker_value("BLK-READBACK").split()[0] == hashlib.md5(PATTERN).hexdigest(), ctx
    assert result.marker_value("BLK-IOERRORS") == "0", ctx
    features = result.marker_value("BLK-FEATURES")
    assert features[32:33] == ("1" if modern else "0"), features
    if modern:
        # Linux 7.3 negotiates VIRTIO_F_RING_PACKED (34), VIRTIO_F_IN_ORDER (35),
        # VIRTIO_F_NOTIFICATION_DATA (38) and VIRTIO_F_RING_RESET (40) with our function
        assert [features[b] for b in (34, 35, 38, 40)] == ["1"] * 4, features
    data = image.read_bytes()
    expected = bytearray(original)
    expected[SEEK * BLOCK : SEEK * BLOCK + len(PATTERN)] = PATTERN
    assert data == bytes(expected), "image differs from what the guest wrote"
    log = be.log()
    m = re.search(
        r"(\d+) refused, (\d+) MSI-X and (\d+) INTx interrupts, (\d+) driver violations", log
    )
    assert m is not None, log[-4000:]
    refused, msix, intx_count, violations = (int(x) for x in m.groups())
    assert refused == 0, log
    # register-level quirks of our PCI model the real driver ran into would show here
    assert violations == 0, re.findall(r"driver violation: .*", log)
    if intx:
        assert intx_count > 0 and msix == 0, m.group(0)
    else:
        assert msix > 0 and intx_count == 0, m.group(0)
    print(f"vfio-user {scenario}: {m.group(0)}, boot+run {result.elapsed:.1f} s")


MQ_SCRIPT = (
    BLK_SCRIPT
    + f"""
echo "BLK-MQ $(ls /sys/block/vda/mq | wc -l)"
taskset 1 dd if=/pattern.bin of=/dev/vda bs={BLOCK} seek=2048 oflag=direct conv=notrunc \
2>/dev/null &
taskset 2 dd if=/pattern.bin of=/dev/vda bs={BLOCK} seek=3072 oflag=direct conv=notrunc \
2>/dev/null
wait
sync
"""
)


def test_linux_virtio_blk_two_queues_from_two_vcpus_over_vfio_user(
    tmp_path: Path, peers: PeerGeneration
) -> None:
    """Peer: PEER. Two request queues (one MSI-X vector each) written from two vCPUs at
    once; the host checks both regions of the image."""
    original = random.Random(0xD15C).randbytes(DISK_SIZE)
    image = tmp_path / "disk.img"
    image.write_bytes(original)
    args = ["blk", "--image", str(image), "--num-queues", "2"]
    with serve_vfio_user(args, tmp_path, "blk") as be:
        vm = boot(peers, tmp_path, MQ_SCRIPT, be.socket_path, ["virtio_blk"], smp=2)
        result = vm.run(timeout=240, console_path=tmp_path / "console.log")
        ctx = result.describe() + "\n--- server ---\n" + be.log()[-20000:]
        assert result.guest_rc == 0, ctx
    assert result.marker_value("BLK-MQ") == "2", ctx
    assert result.marker_value("BLK-READBACK").split()[0] == hashlib.md5(PATTERN).hexdigest(), ctx
    data = image.read_bytes()
    for seek in (SEEK, 2048, 3072):
        assert data[seek * BLOCK : seek * BLOCK + len(PATTERN)] == PATTERN, seek
    log = be.log()
    assert "0 refused" in log and ", 0 driver violations" in log, log[-3000:]
    # a vector per queue: interrupts on both request queues' eventfds
    vectors = set(
        re.findall(r"DEVICE_SET_IRQS .*irq_index=0x2 start=(0x[0-9a-f]+) irq_count=0x1", log)
    )
    assert len(vectors) >= 3, vectors  # config + two queues


def test_linux_concurrent_writers_and_readers_over_vfio_user(
    tmp_path: Path, peers: PeerGeneration
) -> None:
    """Peer: PEER. Eight O_DIRECT writers of different block sizes at once, then eight
    readers at once: the server's I/O threads complete out of order, the packed ring
    with VIRTIO_F_IN_ORDER publishes in order, completions reach the guest through the
    device's host event (the worker pool's eventfd) in the server loop."""
    size = 64 << 20
    original = random.Random(0xD15C).randbytes(size)
    image = tmp_path / "disk.img"
    image.write_bytes(original)
    script = (
        "n=0\nwhile [ ! -b /dev/vda ] && [ $n -lt 100 ]; do usleep 100000; n=$((n + 1)); done\n"
    )
    script += concurrent_snippet()
    files = {f"conc{i}.bin": data for i, data in enumerate(CONC_DATA)}
    with serve_vfio_user(["blk", "--image", str(image)], tmp_path, "blk") as be:
        vm = boot(peers, tmp_path, script, be.socket_path, ["virtio_blk"], files=files)
        result = vm.run(timeout=240, console_path=tmp_path / "console.log")
        ctx = result.describe() + "\n--- server ---\n" + be.log()[-20000:]
        assert result.guest_rc == 0, ctx
    assert not result.marker_lines("CONC-FAILED"), ctx
    check_concurrent(result.marker_values("CONC-MD5"))
    data = image.read_bytes()
    for i, chunk in enumerate(CONC_DATA):
        off = CONC_SEEK * BLOCK + i * len(chunk)
        assert data[off : off + len(chunk)] == chunk, (i, CONC_BS[i])
    assert ", 0 driver violations" in be.log()


def test_linux_virtio_net_over_vfio_user_pings_and_transfers(
    tmp_path: Path, peers: PeerGeneration
) -> None:
    """Peer: Linux 7.3 virtio_net under QEMU 11.1 vfio-user-pci. ``serve net --tap``
    in a private namespace, as a whole virtio-pci function (with its own control
    queue); the guest pings the namespace and moves 16 MiB each way (md5 compared)."""
    from pyvirtio.vm.netns import NetNamespace
    from tests.interop.test_net_guest import (
        HOST_IP,
        TAP,
        TRANSFER,
        XFER,
        _line,
        guest_setup,
        host_peer,
    )

    sock = tmp_path / "net.sock"
    log = tmp_path / "net.log"
    with NetNamespace("pvvfu") as ns, open(log, "ab") as logf:
        argv = [sys.executable, "-m", "pyvirtio", "serve", "net", "--tap", TAP]
        argv += ["--mac", "52:54:00:77:00:02", "--vfio-user", str(sock), "-v"]
        proc = ns.popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=_env())
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
            ns.up(TAP, f"{HOST_IP}/24")
            with host_peer(ns) as (peer, down_md5):
                build = build_initramfs(
                    tmp_path / "initramfs.gz",
                    peers.kernel,
                    "set -e\n" + guest_setup() + TRANSFER,
                    modules=["virtio_net"],
                )
                vm = GuestVM(
                    peers.kernel.boot_image,
                    build.path,
                    memory_mib=320,
                    shared_memory=True,
                    peer=peers.qemu,
                )
                vm.device(
                    json.dumps(
                        {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(sock)}}
                    )
                )
                result = vm.run(timeout=300, console_path=tmp_path / "console.log")
                up_line = _line(peer, 10 if result.guest_rc == 0 else 0.5)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(20)
    text = log.read_text(errors="replace")
    ctx = result.describe() + "\n--- server ---\n" + text[-8000:]
    assert proc.returncode == 0, ctx
    assert result.guest_rc == 0, ctx
    assert result.marker_value("NET-PING") == "ok", ctx
    assert result.marker_value("NET-DOWN") == f"{XFER} {down_md5}", ctx
    assert up_line == f"HOST-UP {XFER} {result.marker_value('NET-UP-SENT')}", ctx + up_line
    features = result.marker_value("NET-FEATURES")
    assert features[17] == "1", features  # VIRTIO_NET_F_CTRL_VQ: the device's own
    assert "0 refused" in text and ", 0 driver violations" in text, text[-3000:]


def test_linux_virtio_console_multiport_over_vfio_user(
    tmp_path: Path, peers: PeerGeneration
) -> None:
    """Peer: Linux 7.3 virtio_console under QEMU 11.1 vfio-user-pci. The console as a
    whole PCI function (its configuration space read straight from our function, no
    front-end in between): the guest writes to /dev/hvc0 and to the named port 1 and
    reads what the host sends back through the ports' sockets; ``stty size`` shows
    the size from VIRTIO_CONSOLE_RESIZE; then 1 MiB each way over port 1, MD5 sums
    compared on both sides."""
    from tests.interop.test_console_guest import (
        _BULK,
        _HVC,
        _PORT1,
        _WAIT_HVC,
        HVC_IN,
        NAME,
        PORT_IN,
        Exchange,
        _connect,
    )

    p0, p1 = tmp_path / "p0.sock", tmp_path / "p1.sock"
    args = ["console", "--cols", "132", "--rows", "43", "--port", f"socket:{p0}"]
    args += ["--port", f"{NAME}=socket:{p1}", "--max-ports", "2"]
    with serve_vfio_user(args, tmp_path, "console") as be:
        hosts = {0: _connect(p0), 1: _connect(p1)}
        try:
            ird = build_initramfs(
                tmp_path / "initramfs.gz", peers.kernel, _WAIT_HVC + _HVC + _PORT1 + _BULK
            )
            vm = GuestVM(
                peers.kernel.boot_image,
                ird.path,
                memory_mib=256,
                shared_memory=True,
                peer=peers.qemu,
            )
            vm.device(
                json.dumps(
                    {
                        "driver": "vfio-user-pci",
                        "socket": {"type": "unix", "path": str(be.socket_path)},
                    }
                )
            )
            ex = Exchange(hosts, bulk=True)
            with vm.start(tmp_path / "console.log") as guest:
                deadline = time.monotonic() + 240
                while guest.alive() and time.monotonic() < deadline:
                    ex.step(be.log)
                result = guest.wait(30)
        finally:
            for sk in hosts.values():
                sk.close()
    ctx = result.describe() + "\n--- server ---\n" + be.log()[-8000:]
    assert result.check(), ctx
    assert b"guest-hvc0-out" in ex.got[0] and b"guest-port1-out" in ex.got[1], ctx
    assert result.marker_value("CON-HVC0-IN") == HVC_IN.decode().strip(), ctx
    assert result.marker_value("CON-PORT1-IN") == PORT_IN.decode(), ctx
    assert result.marker_values("CON-VPORT") == ["vport0p0 name=", f"vport0p1 name={NAME}"], ctx
    assert result.marker_value("CON-HVC0-SIZE") == "43 132", ctx
    ex.check_bulk(result, ctx)
    log = be.log()
    assert "0 refused" in log and ", 0 driver violations" in log, log[-3000:]


RNG_SCRIPT = """
n=0
while [ ! -e /sys/class/misc/hw_random/rng_current ] && [ $n -lt 100 ]; do usleep 100000; \
n=$((n + 1)); done
echo "RNG-CURRENT $(cat /sys/class/misc/hw_random/rng_current)"
echo "RNG-BYTES $(head -c 64 /dev/hwrng | od -An -tx1 -v | tr -d ' \\n')"
"""


def test_linux_virtio_rng_reads_our_rng_function_over_vfio_user(
    tmp_path: Path, peers: PeerGeneration
) -> None:
    """Peer: PEER. The guest's virtio-rng driver reads /dev/hwrng from our function."""
    with serve_vfio_user(["rng"], tmp_path, "rng") as be:
        vm = boot(peers, tmp_path, RNG_SCRIPT, be.socket_path, ["virtio-rng"])
        result = vm.run(timeout=180, console_path=tmp_path / "console.log")
        ctx = result.describe() + "\n--- server ---\n" + be.log()[-20000:]
        assert result.guest_rc == 0, ctx
    assert result.marker_value("RNG-CURRENT").startswith("virtio_rng"), ctx
    rnd = bytes.fromhex(result.marker_value("RNG-BYTES"))
    assert len(rnd) == 64 and len(set(rnd)) > 8, ctx
