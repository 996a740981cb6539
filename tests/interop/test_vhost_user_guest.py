"""The vhost-user back-end against real drivers, two generations of them.

Peers: Linux virtio_blk/virtio-rng drivers in a guest under QEMU (TCG), talking to
``python -m pyvirtio serve ...`` through QEMU's vhost-user-blk-pci / vhost-user-rng-pci
front-ends (``-object memory-backend-memfd,share=on``). Every Linux-guest case runs
against both generations of :mod:`pyvirtio.vm.peers`:

- ``qemu7.2-linux6.1``: the system's QEMU 7.2 and Debian 12's kernel 6.1;
- ``qemu11.1-linux7.3``: QEMU 11.1 and Linux 7.3 from trixie-backports, run from the
  private trixie root that ``scripts/install-trixie-peers.sh`` sets up. A missing root
  is a failure (the set-up was not run), never a skip.

Each scenario boots one guest: the guest writes a pattern with O_DIRECT, syncs, reads
it back, has eight writers of different block sizes write at once and eight readers
read it back at once (so the back-end's I/O threads complete requests out of order),
times a sequential write and read (printed, never asserted), and the host then checks
the image file byte for byte. Scenarios: split ring (plus the entropy device), packed
ring, two request queues used from two vCPUs, the transitional device driven through
the legacy interface, and, with QEMU 11.1 and Linux 7.3 only, VIRTIO_F_IN_ORDER
(``in_order=on``) on split and packed rings, the latter also without indirect
descriptors; plus a back-end killed in the middle of a write and restarted while the
guest keeps writing (QEMU ``reconnect=1``; ``reconnect-ms`` on 11.1) and a live
migration.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from tests.peer_generations import resolve_peers

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PEERS = {
    SYSTEM_GENERATION: "Linux 6.1 virtio_blk/virtio-rng drivers (Debian 12 kernel) under "
    "the system QEMU 7.2",
    TRIXIE_GENERATION: "Linux 7.3 virtio_blk/virtio-rng drivers (trixie-backports kernel) "
    "under QEMU 11.1 (trixie-backports, private trixie root)",
}

DISK_SIZE = 64 << 20
BLOCK = 4096
# Disk layout (4 KiB blocks): timed 1 MiB I/O in the first 16 MiB, timed 4 KiB I/O at
# 16 MiB, the pattern at 24 MiB, the mq writes at 28 and 32 MiB, reconnect at 40 MiB.
SEEK = 6144
PATTERN = random.Random(0x7E57).randbytes(1 << 20)  # 256 blocks: two laps of a 128 ring
BENCH_MIB = 16
SMALL_SEEK = 4096
SMALL_COUNT = 1024  # 4 KiB requests, one at a time
MQ_SEEKS = (7168, 8192)
# Concurrent I/O at 48 MiB: eight 1 MiB regions, each written by its own dd with its
# own block size, all at once, then read back by eight dd at once.
CONC_SEEK = 12288
CONC_BS = (4096, 65536, 8192, 131072, 16384, 4096, 32768, 262144)
CONC_DATA = [random.Random(0xC0C0 + i).randbytes(1 << 20) for i in range(len(CONC_BS))]

_SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def peers(request: pytest.FixtureRequest) -> PeerGeneration:
    """The QEMU and guest kernel of one generation (``request.param``); the second
    must be set up (a failure, never a skip)."""
    return resolve_peers(str(request.param))


def each_generation() -> pytest.MarkDecorator:
    """Run the decorated test once per generation of peers (fixture ``peers``)."""
    return pytest.mark.parametrize("peers", GENERATIONS, indirect=True)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = _SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Backend:
    """A back-end subprocess serving one socket; its stderr is collected in a file."""

    def __init__(self, argv: Sequence[str], socket_path: Path, log: Path) -> None:
        self.socket_path = socket_path
        self.log_path = log
        if socket_path.exists():
            socket_path.unlink()
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=_env(),
        )
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"back-end did not come up:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        """Everything the back-end wrote so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait for ``pattern`` in the back-end's output."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.log())
            if m is not None:
                return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"back-end never logged {pattern!r}:\n{self.log()}")
            time.sleep(0.01)

    def wait_count(self, pattern: str, count: int, timeout: float) -> None:
        """Wait until ``pattern`` occurs ``count`` times in the back-end's output."""
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.log())) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"back-end never logged {pattern!r} {count} times")
            time.sleep(0.005)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up (the crash case)."""
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def stop(self) -> int:
        """Ctrl-C, as a user would; returns the exit status."""
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
def serve(args: Sequence[str], tmp: Path, name: str) -> Iterator[Backend]:
    """``python -m pyvirtio serve ARGS --socket SOCK -v`` for the duration of a block."""
    sock = tmp / f"{name}.sock"
    be = Backend(
        ["-m", "pyvirtio", "serve", *args, "--socket", str(sock), "-v"], sock, tmp / f"{name}.log"
    )
    try:
        yield be
    finally:
        rc = be.stop()
        assert rc == 0, f"back-end {name} did not stop cleanly on Ctrl-C (rc={rc}):\n{be.log()}"
        assert not sock.exists(), "the back-end left its socket behind"


def concurrent_snippet(dev: str = "/dev/vda") -> str:
    """Guest: eight O_DIRECT writers at once, sync, then eight O_DIRECT readers at once,
    each printing ``CONC-MD5 <i> <md5>`` of its region; ``CONC-FAILED`` on a dd error."""
    mib = 1 << 20
    writers, readers = [], []
    for i, bs in enumerate(CONC_BS):
        seek = (CONC_SEEK * BLOCK + i * mib) // bs
        writers.append(
            f"(dd if=/conc{i}.bin of={dev} bs={bs} seek={seek} oflag=direct conv=notrunc "
            f"2>/dev/null || echo CONC-FAILED write {i}) &"
        )
        # read with another writer's block size, so reads split differently
        rbs = CONC_BS[(i + 3) % len(CONC_BS)]
        skip = (CONC_SEEK * BLOCK + i * mib) // rbs
        readers.append(
            f"(dd if={dev} bs={rbs} skip={skip} count={mib // rbs} iflag=direct 2>/dev/null "
            f"| md5sum > /tmp/conc{i}.md5 || echo CONC-FAILED read {i}) &"
        )
    lines = [*writers, "wait", "sync", *readers, "wait"]
    lines += [f'echo "CONC-MD5 {i} $(cut -d" " -f1 /tmp/conc{i}.md5)"' for i in range(len(CONC_BS))]
    return "\n".join(lines) + "\n"


def blk_snippet(dev: str = "/dev/vda") -> str:
    """Guest checks: geometry, pattern write + flush + read-back, concurrent writers and
    readers, timed sequential I/O."""
    return f"""
echo "BLK-SECTORS $(cat /sys/block/vda/size)"
echo "BLK-FEATURES $(cat /sys/bus/virtio/drivers/virtio_blk/virtio*/features)"
echo "BLK-LIMITS max_segments=$(cat /sys/block/vda/queue/max_segments) \
max_hw_sectors_kb=$(cat /sys/block/vda/queue/max_hw_sectors_kb)"
dd if=/pattern.bin of={dev} bs={BLOCK} seek={SEEK} oflag=direct conv=notrunc 2>/dev/null
sync
echo "BLK-READBACK $(dd if={dev} bs={BLOCK} skip={SEEK} count=256 iflag=direct 2>/dev/null \
| md5sum)"
{concurrent_snippet(dev)}
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero of={dev} bs=1M count={BENCH_MIB} oflag=direct 2>/dev/null
t1=$(cut -d' ' -f1 /proc/uptime)
dd if={dev} of=/dev/null bs=1M count={BENCH_MIB} iflag=direct 2>/dev/null
t2=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero of={dev} bs={BLOCK} seek={SMALL_SEEK} count={SMALL_COUNT} oflag=direct \
2>/dev/null
t3=$(cut -d' ' -f1 /proc/uptime)
dd if={dev} of=/dev/null bs={BLOCK} skip={SMALL_SEEK} count={SMALL_COUNT} iflag=direct \
2>/dev/null
t4=$(cut -d' ' -f1 /proc/uptime)
echo "BLK-TIMES $t0 $t1 $t2 $t3 $t4"
echo "BLK-IOERRORS $(dmesg | grep -c 'I/O error' || true)"
"""


#: The guest kit loads modules with busybox ``insmod``, which does not apply
#: ``virtio_pci.force_legacy=1`` from the kernel command line (modprobe would): reload
#: virtio_pci with the parameter so the transitional device is driven as legacy.
#: Linux 7.3 has virtio_pci built in: there the kernel applies the parameter itself.
LEGACY_RELOAD = f"""
if [ -f {GUEST_MODULE_DIR}/virtio_pci.ko ]; then
rmmod virtio_blk
rmmod virtio_pci
legacy=$(sed -n 's/.*force_legacy=\\([01]\\).*/\\1/p' /proc/cmdline)
insmod {GUEST_MODULE_DIR}/virtio_pci.ko force_legacy=$legacy
insmod {GUEST_MODULE_DIR}/virtio_blk.ko
n=0
while [ ! -b /dev/vda ] && [ $n -lt 200 ]; do usleep 50000; n=$((n + 1)); done
fi
"""


def make_image(tmp: Path) -> tuple[Path, bytes]:
    original = random.Random(0xD15C).randbytes(DISK_SIZE)
    image = tmp / "disk.img"
    image.write_bytes(original)
    return image, original


def check_blk(
    console_values: Callable[[str], str], image: Path, original: bytes, *, bench: bool = True
) -> dict[str, float]:
    """Host-side checks shared by the block scenarios; returns throughput figures."""
    assert console_values("BLK-SECTORS") == str(DISK_SIZE // 512)
    assert console_values("BLK-READBACK").split()[0] == hashlib.md5(PATTERN).hexdigest()
    assert console_values("BLK-IOERRORS") == "0"
    expected = bytearray(original)
    expected[SEEK * BLOCK : SEEK * BLOCK + len(PATTERN)] = PATTERN
    for i, data in enumerate(CONC_DATA):
        off = CONC_SEEK * BLOCK + i * len(data)
        expected[off : off + len(data)] = data
    figures: dict[str, float] = {}
    if bench:
        expected[: BENCH_MIB << 20] = bytes(BENCH_MIB << 20)
        small = SMALL_SEEK * BLOCK
        expected[small : small + SMALL_COUNT * BLOCK] = bytes(SMALL_COUNT * BLOCK)
        t0, t1, t2, t3, t4 = (float(x) for x in console_values("BLK-TIMES").split())
        figures = {
            "seq_write_1M_MiB_s": round(BENCH_MIB / max(t1 - t0, 0.01), 1),
            "seq_read_1M_MiB_s": round(BENCH_MIB / max(t2 - t1, 0.01), 1),
            "write_4k_iops": round(SMALL_COUNT / max(t3 - t2, 0.01)),
            "read_4k_iops": round(SMALL_COUNT / max(t4 - t3, 0.01)),
        }
    data = image.read_bytes()
    assert len(data) == DISK_SIZE
    assert data == bytes(expected), "image file differs from what the guest wrote"
    return figures


def check_concurrent(values: list[str]) -> None:
    """The eight concurrent readers each saw what their writer wrote."""
    sums = dict(v.split(maxsplit=1) for v in values)
    assert sums == {str(i): hashlib.md5(data).hexdigest() for i, data in enumerate(CONC_DATA)}, (
        values
    )


def boot(
    peers: PeerGeneration,
    tmp: Path,
    script: str,
    devices: Sequence[tuple[str, str]],
    *,
    modules: Sequence[str] = ("virtio_blk",),
    smp: int = 1,
    append: Sequence[str] = (),
    timeout: float = 240,
) -> GuestVM:
    files = {"pattern.bin": PATTERN}
    files.update({f"conc{i}.bin": data for i, data in enumerate(CONC_DATA)})
    ird = build_initramfs(
        tmp / "initramfs.gz",
        peers.kernel,
        "set -e\n" + script,
        modules=list(modules),
        files=files,
    )
    vm = GuestVM(
        peers.kernel.boot_image,
        ird.path,
        memory_mib=256,
        shared_memory=True,
        smp=smp,
        append=append,
        peer=peers.qemu,
    )
    for chardev, device in devices:
        vm.chardev(chardev).device(device)
    return vm


@dataclass(frozen=True)
class Scenario:
    """One block scenario: QEMU device properties, back-end options, guest set-up."""

    name: str
    device_opts: str = ""
    serve_opts: tuple[str, ...] = ()
    smp: int = 1
    append: tuple[str, ...] = ()
    timeout: float = 300
    marks: tuple[pytest.MarkDecorator, ...] = ()

    @property
    def packed(self) -> bool:
        """The ring is packed."""
        return "packed=on" in self.device_opts

    @property
    def in_order(self) -> bool:
        """VIRTIO_F_IN_ORDER is offered."""
        return "in_order=on" in self.device_opts

    @property
    def indirect(self) -> bool:
        """VIRTIO_F_INDIRECT_DESC is offered (QEMU's default)."""
        return "indirect_desc=off" not in self.device_opts


SCENARIOS = [
    Scenario("split"),
    Scenario("packed", ",packed=on"),
    Scenario("mq", ",num-queues=2", ("--num-queues", "2"), smp=2),
    Scenario("legacy", append=("virtio_pci.force_legacy=1",)),
    # without indirect descriptors every segment takes a ring slot: seg_max must fit
    # the front-end's 128-entry ring (a larger one made Linux hang on a 1 MiB write)
    Scenario("split-noindirect", ",indirect_desc=off", timeout=30),
]
#: ``in_order=on`` needs QEMU 11.1 (7.2 has no such property) and a driver that
#: negotiates VIRTIO_F_IN_ORDER (Linux 7.3 does; 6.1 does not).
IN_ORDER_SCENARIOS = [
    Scenario("split-inorder", ",in_order=on"),
    Scenario("packed-inorder", ",packed=on,in_order=on"),
    Scenario(
        "packed-inorder-noindirect",
        ",packed=on,in_order=on,indirect_desc=off",
        # a hang lasts the whole timeout: keep it short (a good run takes 4-5 s)
        timeout=30,
    ),
]
BLK_CASES = [
    pytest.param(gen, sc, id=f"{gen}-{sc.name}") for gen in GENERATIONS for sc in SCENARIOS
] + [
    pytest.param(TRIXIE_GENERATION, sc, id=f"{TRIXIE_GENERATION}-{sc.name}", marks=sc.marks)
    for sc in IN_ORDER_SCENARIOS
]


@pytest.mark.parametrize(("peers", "scenario"), BLK_CASES, indirect=["peers"])
def test_linux_virtio_blk_against_pyvirtio_backend(
    tmp_path: Path,
    peers: PeerGeneration,
    record_property: Callable[[str, object], None],
    scenario: Scenario,
) -> None:
    """Peer: Linux virtio_blk/virtio-rng drivers under QEMU, both generations (PEERS).

    The guest's virtio_blk driver writes a pattern to the pyvirtio back-end (O_DIRECT,
    then sync), reads it back, has eight writers and then eight readers work at once
    (checksums compared), and runs a timed sequential write and read; the host checks
    the image file. ``split`` also serves a pyvirtio entropy device whose bytes the
    guest reads from /dev/hwrng; ``mq`` writes from both vCPUs so both request queues
    carry requests; ``legacy`` is the transitional device driven through the legacy
    (virtio 0.9.5) interface; the ``*-inorder*`` scenarios negotiate VIRTIO_F_IN_ORDER,
    so the back-end must publish completions in order although its I/O threads finish
    them out of order.
    """
    name, device_opts, serve_opts = scenario.name, scenario.device_opts, scenario.serve_opts
    smp, append = scenario.smp, scenario.append
    image, original = make_image(tmp_path)
    script = blk_snippet()
    if name == "legacy":
        script = LEGACY_RELOAD + script
    modules = ["virtio_blk"]
    pci = "vhost-user-blk-pci-transitional" if name == "legacy" else "vhost-user-blk-pci"
    devices = [("socket,id=blk0,path={blk}", f"{pci},chardev=blk0{device_opts}")]
    if name == "split":
        modules.append("virtio-rng")
        devices.append(("socket,id=rng0,path={rng}", "vhost-user-rng-pci,chardev=rng0"))
        script += """
echo "RNG-CURRENT $(cat /sys/class/misc/hw_random/rng_current)"
echo "RNG-BYTES $(head -c 64 /dev/hwrng | od -An -tx1 -v | tr -d ' \\n')"
"""
    if name == "mq":
        script += f"""
echo "BLK-MQ $(ls /sys/block/vda/mq | wc -l)"
taskset 1 dd if=/pattern.bin of=/dev/vda bs={BLOCK} seek={MQ_SEEKS[0]} oflag=direct conv=notrunc \
2>/dev/null &
taskset 2 dd if=/pattern.bin of=/dev/vda bs={BLOCK} seek={MQ_SEEKS[1]} oflag=direct conv=notrunc \
2>/dev/null
wait
"""
    with ExitStack() as stack:
        blk = stack.enter_context(
            serve(["blk", "--image", str(image), *serve_opts], tmp_path, "blk")
        )
        paths = {"blk": blk.socket_path, "rng": ""}
        if name == "split":
            paths["rng"] = stack.enter_context(serve(["rng"], tmp_path, "rng")).socket_path
        vm = boot(
            peers,
            tmp_path,
            script,
            [(c.format(**paths), d) for c, d in devices],
            modules=modules,
            smp=smp,
            append=append,
        )
        result = vm.run(timeout=scenario.timeout, console_path=tmp_path / "console.log")
        ctx = result.describe() + "\n--- back-end ---\n" + blk.log()
        assert result.guest_rc == 0, ctx

    if name == "mq":
        expected_extra = [(seek, PATTERN) for seek in MQ_SEEKS]
        assert result.marker_value("BLK-MQ") == "2", ctx
    else:
        expected_extra = []
    for seek, data in expected_extra:
        original = original[: seek * BLOCK] + data + original[seek * BLOCK + len(data) :]
    assert not result.marker_lines("CONC-FAILED"), ctx
    check_concurrent(result.marker_values("CONC-MD5"))
    figures = check_blk(result.marker_value, image, original)
    features = result.marker_value("BLK-FEATURES")
    # sysfs prints feature bits as a string of 0/1, bit 0 first: VIRTIO_F_INDIRECT_DESC
    # 28, VIRTIO_F_VERSION_1 32, VIRTIO_F_RING_PACKED 34, VIRTIO_F_IN_ORDER 35
    bit = {n: features[n : n + 1] for n in (28, 32, 34, 35)}
    assert bit[34] == ("1" if scenario.packed else "0"), features
    assert bit[32] == ("0" if name == "legacy" else "1"), features
    assert bit[35] == ("1" if scenario.in_order else "0"), features
    if name != "legacy":
        assert bit[28] == ("1" if scenario.indirect else "0"), features

    log = blk.log()
    served = re.findall(r"q(\d+)=(\d+)/(\d+)", log)
    assert served, log
    per_queue: dict[int, int] = {}
    for q, fetched, completed in served:
        assert fetched == completed, log
        per_queue[int(q)] = per_queue.get(int(q), 0) + int(completed)
    if name == "mq":
        assert per_queue.get(0, 0) > 0 and per_queue.get(1, 0) > 0, log
    if name == "split":
        assert result.marker_value("RNG-CURRENT").startswith("virtio_rng"), ctx
        rnd = bytes.fromhex(result.marker_value("RNG-BYTES"))
        assert len(rnd) == 64 and len(set(rnd)) > 8, ctx
    record_property("peer", PEERS[peers.name])
    for key, value in figures.items():
        record_property(key, value)
    record_property("requests_per_queue", per_queue)
    print(
        f"{peers.name}-{name}: guest {figures}, requests per queue {per_queue}, boot+run "
        f"{result.elapsed:.1f} s"
    )


#: A back-end whose image writes take half a second and announce themselves, so the
#: test can kill it while a request is in flight (fetched, not yet completed).
SLOW_BACKEND = r"""
import sys, time
from pyvirtio.devices.blk import BlkDevice, FileBackend
from pyvirtio.transport.vhost_user.server import VhostUserServer

class SlowImage(FileBackend):
    def writev(self, offset, bufs):
        print(f"SLOW-WRITE {offset}", file=sys.stderr, flush=True)
        time.sleep(0.5)
        return super().writev(offset, bufs)

sock, image = sys.argv[1:3]
VhostUserServer(BlkDevice(SlowImage(image)), socket_path=sock, handle_signals=True).serve()
"""

RECONNECT_WRITES = 48
#: QEMU 11.1 dropped the chardev socket option ``reconnect`` for ``reconnect-ms``.
RECONNECT_OPT = {SYSTEM_GENERATION: "reconnect=1", TRIXIE_GENERATION: "reconnect-ms=1000"}
RECONNECT_SEEK = 10240  # blocks; 16 KiB per write


@each_generation()
def test_backend_killed_mid_io_and_restarted(
    tmp_path: Path, peers: PeerGeneration, record_property: Callable[[str, object], None]
) -> None:
    """Peer: Linux virtio_blk drivers under QEMU, both generations (PEERS).

    QEMU connects with ``-chardev socket,...,reconnect=1``. The guest writes 48
    chunks one after the other. The first back-end is SIGKILLed while it executes one
    of them (a request fetched and recorded in the inflight area, not completed);
    a fresh ``pyvirtio serve blk`` takes over the same socket and image. QEMU
    reconnects and hands back the inflight area; the request in flight is resubmitted
    once; the guest finishes every write without an I/O error, and the image holds
    all of them.
    """
    image, original = make_image(tmp_path)
    chunk = 4 * BLOCK
    script = f"""
i=0
while [ $i -lt {RECONNECT_WRITES} ]; do
  dd if=/pattern.bin of=/dev/vda bs={chunk} skip=$i seek=$((i + {RECONNECT_SEEK // 4})) \
count=1 oflag=direct conv=notrunc 2>/dev/null
  i=$((i + 1))
  echo "WROTE $i"
done
sync
echo "RECONNECT-READBACK $(dd if=/dev/vda bs={chunk} skip={RECONNECT_SEEK // 4} \
count={RECONNECT_WRITES} iflag=direct 2>/dev/null | md5sum)"
echo "BLK-IOERRORS $(dmesg | grep -c 'I/O error' || true)"
"""
    sock = tmp_path / "blk.sock"
    first = Backend(["-c", SLOW_BACKEND, str(sock), str(image)], sock, tmp_path / "first.log")
    vm = boot(
        peers,
        tmp_path,
        script,
        [
            (
                f"socket,id=blk0,path={sock},{RECONNECT_OPT[peers.name]}",
                "vhost-user-blk-pci,chardev=blk0",
            )
        ],
    )
    second: Backend | None = None
    try:
        with vm.start(tmp_path / "console.log") as guest:
            assert guest.wait_for(r"WROTE 3\b", 240), guest.diagnostics()
            # kill the back-end while it executes a write of the loop (it sleeps
            # half a second inside each one, right after announcing it)
            first.wait_count(r"SLOW-WRITE \d+", 6, 60)
            first.kill()
            killed_at = len(re.findall(r"WROTE \d+", guest.console()))
            time.sleep(0.5)  # QEMU notices the hang-up; the guest's write is pending
            if sock.exists():
                sock.unlink()
            second = Backend(
                [
                    "-m",
                    "pyvirtio",
                    "serve",
                    "blk",
                    "--socket",
                    str(sock),
                    "--image",
                    str(image),
                    "-v",
                ],
                sock,
                tmp_path / "second.log",
            )
            result = guest.wait(240)
        ctx = result.describe() + "\n--- first ---\n" + first.log() + "\n--- second ---\n"
        ctx += second.log()
        assert result.guest_rc == 0, ctx
        second.wait_log(r"connection ended: .*", 30)
    finally:
        if second is not None:
            assert second.stop() == 0
        elif first.proc.poll() is None:
            first.kill()

    expected_md5 = hashlib.md5(PATTERN[: RECONNECT_WRITES * chunk]).hexdigest()
    assert result.marker_value("RECONNECT-READBACK").split()[0] == expected_md5, ctx
    assert result.marker_value("BLK-IOERRORS") == "0", ctx
    expected = bytearray(original)
    off = RECONNECT_SEEK * BLOCK
    expected[off : off + RECONNECT_WRITES * chunk] = PATTERN[: RECONNECT_WRITES * chunk]
    assert image.read_bytes() == bytes(expected), ctx
    summary = second.wait_log(r"connection ended: .*?(\d+) resubmitted", 5)
    resubmitted = int(summary.group(1))
    # the killed back-end was inside a write: that request was in flight
    assert resubmitted == 1, ctx
    record_property("peer", PEERS[peers.name])
    record_property("killed_after_writes", killed_at)
    record_property("resubmitted", resubmitted)
    print(
        f"{peers.name} reconnect: killed after {killed_at} writes, resubmitted {resubmitted}, "
        f"run {result.elapsed:.1f} s"
    )


def _qmp(path: Path, command: str, arguments: dict[str, object] | None = None) -> dict[str, Any]:
    """One QMP command on a fresh connection (capabilities negotiated)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting
        f.write(b'{"execute": "qmp_capabilities"}\n')
        f.flush()
        json.loads(f.readline())
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        f.write(json.dumps(msg).encode() + b"\n")
        f.flush()
        while True:
            reply: dict[str, Any] = json.loads(f.readline())
            if "return" in reply or "error" in reply:
                return reply


@each_generation()
def test_live_migration_with_dirty_page_logging(
    tmp_path: Path, peers: PeerGeneration, record_property: Callable[[str, object], None]
) -> None:
    """Peer: Linux virtio_blk drivers under QEMU, both generations (PEERS).

    The guest keeps reading 64 KiB chunks of the disk (O_DIRECT: the back-end writes
    guest pages) and checking them. QEMU migrates the running VM to a file: it sends
    SET_LOG_BASE with a shared log, SET_FEATURES with VHOST_F_LOG_ALL and the rings'
    VHOST_VRING_F_LOG, and the back-end marks the pages it writes. A second QEMU
    restores the file against a pyvirtio back-end; the guest carries on from where it
    was and finds every chunk intact.
    """
    chunk = 64 << 10
    data = random.Random(0x319).randbytes(64 * chunk)
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    sums = [hashlib.md5(data[i * chunk : (i + 1) * chunk]).hexdigest() for i in range(64)]
    script = "".join(f"E{i}={h}\n" for i, h in enumerate(sums))
    script += f"""bad=0
i=0
while [ $i -lt 240 ]; do
  c=$((i % 64))
  s=$(dd if=/dev/vda bs={chunk} skip=$c count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  eval exp=\\$E$c
  [ "$s" = "$exp" ] || bad=$((bad + 1))
  i=$((i + 1))
  echo "READ $i"
done
echo "MIGRATION-BAD $bad"
"""
    state = tmp_path / "vm.state"
    with serve(["blk", "--image", str(image)], tmp_path, "blk") as be:

        def vm(qmp: Path, *extra: str) -> GuestVM:
            v = boot(
                peers,
                tmp_path,
                script,
                [(f"socket,id=blk0,path={be.socket_path}", "vhost-user-blk-pci,chardev=blk0")],
            )
            return v.add_args("-qmp", f"unix:{qmp},server=on,wait=off", *extra)

        src_qmp = tmp_path / "src.qmp"
        with vm(src_qmp).start(tmp_path / "src.log") as src:
            assert src.wait_for(r"READ 20\b", 240), src.diagnostics()
            reply = _qmp(src_qmp, "migrate", {"uri": f"exec:cat > {state}"})
            assert "error" not in reply, reply
            deadline = time.monotonic() + 120
            while True:
                status = _qmp(src_qmp, "query-migrate")["return"].get("status")
                if status in ("completed", "failed") or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert status == "completed", src.diagnostics()
            read_before = len(re.findall(r"READ \d+", src.console()))
        first = be.wait_log(r"connection ended: .*?(\d+) dirty pages logged", 30)
        dirty = int(first.group(1))
        dst_qmp = tmp_path / "dst.qmp"
        dst = vm(dst_qmp, "-incoming", f"exec:cat {state}")
        result = dst.run(timeout=300, console_path=tmp_path / "dst.log")
        ctx = result.describe() + "\n--- back-end ---\n" + be.log()
        assert result.guest_rc == 0, ctx
    assert result.marker_value("MIGRATION-BAD") == "0", ctx
    assert dirty > 0, ctx  # the source's back-end marked pages while QEMU logged
    record_property("peer", PEERS[peers.name])
    record_property("dirty_pages", dirty)
    print(
        f"{peers.name} migration: after {read_before} reads, {dirty} dirty pages logged, "
        "restored guest ok"
    )
