"""Back-end kill test: ``pyvirtio serve blk`` is SIGKILLed mid-I/O over and over under
our front-end with inflight tracking (vhost-user.rst "Inflight I/O tracking"), and
restarted each time. 32 requests are in flight at each kill - random reads, writes
and a flush, run by the back-end's I/O threads - and the front-end reconnects to the
new back-end, which resubmits what the inflight area says was in flight.

Nothing may be lost (every request completes), nothing completed twice (the driver
refuses a used id that is not in flight), and the data is intact against a shadow
image, split and packed. The default run kills 12 times per ring format;
``pytest -m long`` 1000 times.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvirtio.core.driver import RingOptions
from pyvirtio.drivers.blk import BlkDriver, BlkRequest
from pyvirtio.spec.blk import SECTOR_SIZE
from pyvirtio.spec.ids import DeviceId
from pyvirtio.transport.vhost_user.frontend import VhostUserFrontend

SECTORS = 2048  # 1 MiB image
DEPTH = 32
SRC = str(Path(__file__).resolve().parents[3] / "src")


def _serve(path: Path, image: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pyvirtio", "serve", "blk", "--socket", str(path)]
    # writethrough: every write waits for fdatasync, so a kill finds requests the
    # back-end has taken but not finished (the inflight area's whole point)
    cmd += ["--image", str(image), "--writethrough", "-v"]
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, env=env, stderr=err)
    deadline = time.monotonic() + 20
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the back-end did not start"
        time.sleep(0.005)
    return proc


def run_kills(tmp_path: Path, kills: int, packed: bool, seed: int) -> dict[str, int]:
    rnd = random.Random(seed)
    image = tmp_path / "disk.img"
    shadow = bytearray(rnd.randbytes(SECTORS * SECTOR_SIZE))
    image.write_bytes(shadow)
    sock = tmp_path / "blk.sock"
    log = tmp_path / "backend.log"
    proc = _serve(sock, image, log)
    t = VhostUserFrontend(sock, device_id=DeviceId.BLOCK, inflight=True, reply_timeout=10)
    drv = BlkDriver(t, ring=RingOptions(packed=packed), timeout=30.0)
    counts = {"kills": 0, "requests": 0, "pending_at_kill": 0}
    try:
        drv.initialize()
        assert t.has_protocol_feature(5)  # VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD
        for _ in range(kills):
            # distinct extents: no two requests of a batch touch the same sectors
            starts = rnd.sample(range(0, SECTORS, 8), DEPTH - 1)
            batch: list[tuple[str, int, bytes | int, BlkRequest]] = []
            for s in starts:
                n = rnd.choice((1, 2, 4, 8))
                if rnd.random() < 0.5:
                    data = rnd.randbytes(n * SECTOR_SIZE)
                    batch.append(("w", s, data, drv.submit_write(s, data, kick=False)))
                else:
                    batch.append(("r", s, n, drv.submit_read(s, n * SECTOR_SIZE, kick=False)))
            batch.append(("f", 0, 0, drv.submit_flush(kick=False)))
            drv.kick_pending()
            time.sleep(rnd.random() * 0.004)  # somewhere in the middle of the I/O
            proc.kill()
            proc.wait()
            counts["kills"] += 1
            counts["pending_at_kill"] += sum(not r.done for *_, r in batch)
            proc = _serve(sock, image, log)
            t.reconnect()
            results = drv.complete([r for *_, r in batch], timeout=30)
            for (kind, s, arg, _), got in zip(batch, results, strict=True):
                if kind == "r":
                    assert isinstance(arg, int)
                    want = bytes(shadow[s * SECTOR_SIZE : (s + arg) * SECTOR_SIZE])
                    assert got == want, f"read of sector {s} after kill {counts['kills']}"
            for kind, s, arg, _ in batch:
                if kind == "w":
                    assert isinstance(arg, bytes)
                    shadow[s * SECTOR_SIZE : s * SECTOR_SIZE + len(arg)] = arg
            counts["requests"] += len(batch)
        assert drv.read(0, 64 * SECTOR_SIZE) == bytes(shadow[: 64 * SECTOR_SIZE])
    finally:
        drv.close()
        t.close()
        proc.kill()
        proc.wait()
    assert image.read_bytes() == bytes(shadow), "the image differs from the shadow"
    text = log.read_text()
    counts["resubmitted"] = sum(int(n) for n in re.findall(r"resubmitting (\d+) request", text))
    return counts


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_backend_killed_mid_io_loses_nothing(tmp_path: Path, packed: bool) -> None:
    counts = run_kills(tmp_path, 12, packed, seed=1 + packed)
    # the kills did land mid-I/O: the new back-ends resubmitted requests in flight
    assert counts["kills"] == 12 and counts["resubmitted"] > 0, counts


@pytest.mark.long
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_backend_killed_1000_times(tmp_path: Path, packed: bool, record_property) -> None:  # type: ignore[no-untyped-def]
    counts = run_kills(tmp_path, 1000, packed, seed=100 + packed)
    record_property("counts", counts)
    print(counts)
