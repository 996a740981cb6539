#!/usr/bin/env python3
"""pyvirtio block driver + device over the two-process loopback, against fio.

The pyvirtio block device runs in a device process over a raw image file (a
:class:`~pyvirtio.devices.blk.FileBackend`: ``os.preadv``/``os.pwritev`` straight
between the file and guest memory); the pyvirtio block driver runs in this process and
talks to it through shared memfd guest memory and eventfds. The reference is
``fio --ioengine=psync`` on the very same image file, run in the same script.

Measured, each for ``--seconds`` (default 3):

- 4 KiB random reads, QD1 (pyvirtio: one request at a time; fio: psync, iodepth 1)
- 4 KiB random reads, pyvirtio at QD32 (submission API) against fio with 2 psync jobs
  (psync cannot queue; this is fio's best on 2 cores)
- 1 MiB sequential reads and writes (MB/s)

The page cache is warm for both (the image is read once first), so both sides measure
the software path rather than the disk. Printed: the figures and the ratio
pyvirtio / fio. Run: ``python bench/blk_loopback.py [--seconds 3] [--size-mib 256]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

try:
    import pyvirtio  # noqa: F401
except ImportError:  # pragma: no cover - running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from pyvirtio.core.driver import RingOptions
from pyvirtio.drivers.blk import BlkDriver, BlkRequest
from pyvirtio.transport.loopback_mp.driver_side import connect

KIB4 = 4096
MIB = 1 << 20


def fio(image: str, rw: str, bs: int, seconds: float, jobs: int = 1) -> dict[str, float]:
    """Run fio psync on ``image``; return iops and MB/s."""
    cmd = [
        "fio",
        "--name=ref",
        f"--filename={image}",
        "--ioengine=psync",
        f"--rw={rw}",
        f"--bs={bs}",
        "--direct=0",
        f"--runtime={seconds}",
        "--time_based",
        f"--numjobs={jobs}",
        "--group_reporting",
        "--output-format=json",
        "--randrepeat=0",
        "--norandommap",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    part = job["read"] if "read" in rw else job["write"]
    return {"iops": float(part["iops"]), "mbps": float(part["bw_bytes"]) / 1e6}


def pyvirtio_rand_read(drv: BlkDriver, nblocks: int, depth: int, seconds: float) -> float:
    """4 KiB random reads at queue depth ``depth``; returns IOPS."""
    rnd = random.Random(1)
    spb = KIB4 // 512
    done = 0
    inflight: deque[BlkRequest] = deque()
    end = time.perf_counter() + seconds
    start = time.perf_counter()
    while True:
        now = time.perf_counter()
        if now >= end and not inflight:
            break
        while now < end and len(inflight) < depth:
            inflight.append(drv.submit_read(rnd.randrange(nblocks) * spb, KIB4, kick=False))
        drv.kick_pending()
        drv.complete([inflight.popleft()])
        done += 1
        while inflight and inflight[0].done:
            drv.complete([inflight.popleft()])
            done += 1
    return done / (time.perf_counter() - start)


def pyvirtio_seq(drv: BlkDriver, size: int, write: bool, seconds: float) -> float:
    """1 MiB sequential reads or writes (two in flight); returns MB/s."""
    data = os.urandom(MIB)
    nsect = MIB // 512
    total_chunks = size // MIB
    pos = 0
    moved = 0
    inflight: deque[BlkRequest] = deque()
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end or inflight:
        while time.perf_counter() < end and len(inflight) < 2:
            sector = (pos % total_chunks) * nsect
            pos += 1
            req = drv.submit_write(sector, data) if write else drv.submit_read(sector, MIB)
            inflight.append(req)
        drv.complete([inflight.popleft()])
        moved += MIB
    return moved / (time.perf_counter() - start) / 1e6


def main() -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--packed", action="store_true", help="pyvirtio on the packed ring")
    ap.add_argument(
        "--io-threads",
        type=int,
        default=None,
        help="the device's backend I/O threads (default: the device's own default, 4 for "
        "an image file; 0: backend I/O on the device's event loop)",
    )
    args = ap.parse_args()
    if shutil.which("fio") is None:
        print("fio is not installed (apt-get install fio)", file=sys.stderr)
        return 2
    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="pyvirtio-bench-") as tmp:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        with open(image, "rb") as f:  # warm the page cache for both sides
            while f.read(8 * MIB):
                pass
        drv = connect(
            BlkDriver,
            "pyvirtio.devices.blk.device:BlkDevice.from_file",
            mem_size=64 * MIB,
            factory_kwargs={"path": image}
            if args.io_threads is None
            else {"path": image, "io_threads": args.io_threads},
            ring=RingOptions(packed=args.packed),
        )
        rows: list[tuple[str, str, float, float]] = []
        try:
            nblocks = size // KIB4
            s = args.seconds
            py = pyvirtio_rand_read(drv, nblocks, 1, s)
            ref = fio(image, "randread", KIB4, s)["iops"]
            rows.append(("4 KiB randread QD1", "IOPS", py, ref))
            py = pyvirtio_rand_read(drv, nblocks, 32, s)
            ref = fio(image, "randread", KIB4, s, jobs=2)["iops"]
            rows.append(("4 KiB randread QD32 (fio: 2 jobs)", "IOPS", py, ref))
            py = pyvirtio_seq(drv, size, False, s)
            ref = fio(image, "read", MIB, s)["mbps"]
            rows.append(("1 MiB seq read", "MB/s", py, ref))
            py = pyvirtio_seq(drv, size, True, s)
            ref = fio(image, "write", MIB, s)["mbps"]
            rows.append(("1 MiB seq write", "MB/s", py, ref))
        finally:
            drv.close()
            drv.transport.close()
    ring = "packed" if args.packed else "split"
    threads = "default" if args.io_threads is None else str(args.io_threads)
    print(
        f"pyvirtio blk driver+device, two-process loopback ({ring} ring, io threads: "
        f"{threads}) vs fio psync"
    )
    print(f"{'workload':<36} {'unit':<5} {'pyvirtio':>10} {'fio':>10} {'pyvirtio/fio':>13}")
    for name, unit, py, ref in rows:
        print(f"{name:<36} {unit:<5} {py:>10.0f} {ref:>10.0f} {py / ref:>13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
