#!/usr/bin/env python3
"""vhost-user-blk back-ends compared through the same pyvirtio front-end and driver.

Two back-ends, each with a backing that does no disk work, started by this script:

- qemu-storage-daemon (the reference peer):
  ``--blockdev driver=null-co,node-name=n0,size=1G
  --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=SOCK,writable=on``
- pyvirtio's back-end: ``python -m pyvirtio serve blk --socket SOCK --null 1G``

Against each, in the same run, the same :class:`~pyvirtio.drivers.blk.BlkDriver` over a
:class:`~pyvirtio.transport.vhost_user.frontend.VhostUserFrontend`, on a split ring
(qemu-storage-daemon 7.2 offers no other), reads 4 KiB blocks at random 4 KiB-aligned
offsets for a fixed time:

- QD1: one request at a time (submit, wait, repeat);
- QD32: 32 requests kept in flight with the submission API (refilled and kicked
  together as completions come back).

Reported per back-end: IOPS, and the back-end's CPU time per I/O (user + system time
of the back-end process from ``/proc/PID/stat``, over the measurement). The last row
is the ratio pyvirtio / qemu-storage-daemon (IOPS: higher is better; CPU per I/O:
lower is better). pyvirtio is measured once more on the packed ring, for information
(``--no-packed`` skips it). The front-end runs in this process for both back-ends, so IOPS are
bounded by it alike. Run with ``python bench/vhost_blk.py [--seconds 5]``; the
whole run takes well under 90 s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import pyvirtio  # noqa: F401
except ImportError:  # pragma: no cover - running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from pyvirtio.core.driver import RingOptions
from pyvirtio.drivers.blk import BlkDriver, BlkRequest
from pyvirtio.spec.features import Feature
from pyvirtio.transport.vhost_user.frontend import connect

BLOCK = 4096
SECTORS_PER_BLOCK = BLOCK // 512
DEVICE_BYTES = 1 << 30
DEPTHS = (1, 32)
WARMUP_SECONDS = 0.3
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    """One measurement: I/Os done, wall time, back-end CPU seconds."""

    ios: int
    seconds: float
    cpu: float

    @property
    def iops(self) -> float:
        """I/Os per second."""
        return self.ios / self.seconds

    @property
    def cpu_us_per_io(self) -> float:
        """Back-end CPU time per I/O in microseconds."""
        return self.cpu / self.ios * 1e6 if self.ios else float("nan")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # the command name is in parentheses and may contain spaces: split after it
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLK_TCK


@contextlib.contextmanager
def backend_process(argv: list[str], sock: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start a back-end, wait for its socket, stop it (SIGTERM, then SIGKILL) after."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited: {log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not create {sock}")
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _sectors(n: int = 1 << 14) -> list[int]:
    rng = random.Random(1)
    blocks = DEVICE_BYTES // BLOCK
    return [rng.randrange(blocks) * SECTORS_PER_BLOCK for _ in range(n)]


def run_qd1(drv: BlkDriver, seconds: float, sectors: list[int]) -> int:
    """Blocking reads, one at a time, for ``seconds``; returns how many."""
    n = 0
    k = len(sectors)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(64):
            drv.read(sectors[n % k], BLOCK)
            n += 1
    return n


def run_qd(drv: BlkDriver, depth: int, seconds: float, sectors: list[int]) -> int:
    """Keep ``depth`` reads in flight for ``seconds``; returns how many completed."""
    pending: deque[BlkRequest] = deque()
    n = issued = 0
    k = len(sectors)
    end = time.perf_counter() + seconds
    while True:
        now_done = time.perf_counter() >= end
        if not now_done:
            while len(pending) < depth:
                pending.append(drv.submit_read(sectors[issued % k], BLOCK, kick=False))
                issued += 1
            drv.kick_pending()
        if not pending:
            return n
        drv.complete([pending.popleft()])
        n += 1
        while pending and pending[0].done:
            pending.popleft().result()
            n += 1


def measure(
    name: str, sock: Path, pid: int, seconds: float, *, packed: bool = False
) -> dict[int, Result]:
    """Both queue depths against the back-end at ``sock`` (process ``pid``)."""
    drv = connect(
        BlkDriver, sock, mem_size=32 << 20, connect_timeout=20, ring=RingOptions(packed=packed)
    )
    try:
        ring = "packed" if drv.has_feature(Feature.RING_PACKED) else "split"
        print(
            f"  {name}: {drv.size >> 20} MiB, {ring} ring, "
            f"queue size {drv.queues[0].size}, "
            f"indirect={drv.has_feature(Feature.INDIRECT_DESC)} "
            f"event_idx={drv.has_feature(Feature.EVENT_IDX)}",
            flush=True,
        )
        sectors = _sectors()
        out: dict[int, Result] = {}
        for depth in DEPTHS:
            run_qd(drv, depth, WARMUP_SECONDS, sectors)
            c0 = cpu_seconds(pid)
            t0 = time.perf_counter()
            if depth == 1:
                ios = run_qd1(drv, seconds, sectors)
            else:
                ios = run_qd(drv, depth, seconds, sectors)
            elapsed = time.perf_counter() - t0
            out[depth] = Result(ios, elapsed, cpu_seconds(pid) - c0)
            r = out[depth]
            print(
                f"    QD{depth:<2}: {r.iops:9.0f} IOPS, back-end CPU {r.cpu_us_per_io:7.1f} us/IO",
                flush=True,
            )
        return out
    finally:
        drv.close()
        drv.transport.close()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=5.0, help="measurement time per run")
    ap.add_argument("--qsd", default="qemu-storage-daemon", help="qemu-storage-daemon binary")
    ap.add_argument(
        "--packed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure pyvirtio with the packed ring (information only: the ratios "
        "compare split rings, the only format qemu-storage-daemon 7.2 offers)",
    )
    args = ap.parse_args(argv)
    qsd = shutil.which(args.qsd)
    if qsd is None:
        print(f"error: {args.qsd} not found (Debian package qemu-system-x86)", file=sys.stderr)
        return 2
    version = subprocess.run(
        [qsd, "--version"], capture_output=True, text=True, check=False
    ).stdout.split("\n")[0]
    print(f"4 KiB random reads, 1 GiB null backing, {args.seconds:g} s per run")
    print(f"reference: {version}")
    results: dict[str, dict[int, Result]] = {}
    with tempfile.TemporaryDirectory(prefix="pyvirtio-bench-") as tmp:
        d = Path(tmp)
        sock = d / "qsd.sock"
        qsd_argv = [
            qsd,
            "--blockdev",
            f"driver=null-co,node-name=n0,size={DEVICE_BYTES}",
            "--export",
            f"type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock},writable=on",
        ]
        with backend_process(qsd_argv, sock, d / "qsd.log") as proc:
            results["qemu-storage-daemon"] = measure(
                "qemu-storage-daemon", sock, proc.pid, args.seconds
            )
        sock = d / "pyvirtio.sock"
        py_argv = [sys.executable, "-m", "pyvirtio", "serve", "blk", "--socket", str(sock)]
        py_argv += ["--null", "1G"]
        with backend_process(py_argv, sock, d / "pyvirtio.log") as proc:
            results["pyvirtio"] = measure("pyvirtio serve blk", sock, proc.pid, args.seconds)
            if args.packed:
                results["pyvirtio (packed ring)"] = measure(
                    "pyvirtio serve blk", sock, proc.pid, args.seconds, packed=True
                )
    q, p = results["qemu-storage-daemon"], results["pyvirtio"]
    width = max(len(k) for k in results) + 2
    print()
    head = f"{'back-end':<{width}}" + "".join(
        f"{'QD' + str(d) + ' IOPS':>12}{'CPU us/IO':>11}" for d in DEPTHS
    )
    print(head)
    print("-" * len(head))
    for name, res in results.items():
        print(
            f"{name:<{width}}"
            + "".join(f"{res[d].iops:>12.0f}{res[d].cpu_us_per_io:>11.1f}" for d in DEPTHS)
        )
    print(
        f"{'pyvirtio / qsd':<{width}}"
        + "".join(
            f"{p[d].iops / q[d].iops:>12.2f}{p[d].cpu_us_per_io / q[d].cpu_us_per_io:>11.2f}"
            for d in DEPTHS
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
