"""The pyvirtio vhost-user front-end against real back-ends.

Peers:

- "qemu-storage-daemon 7.2 vhost-user-blk export" (QEMU's libvhost-user based block
  export; offers the split ring only), on a raw image file: the blk driver writes,
  flushes and reads back through it, and the test then reads the image file on the
  host; ``pyvirtio probe`` is run against it.
- pyvirtio's own back-end (``python -m pyvirtio serve blk|rng``), split and packed
  rings: the same checks, plus the entropy driver.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.core.driver import RingOptions
from pyvirtio.drivers.blk import BlkDriver
from pyvirtio.drivers.rng import RngDriver
from pyvirtio.spec.features import Feature
from pyvirtio.transport.vhost_user.frontend import VhostUserFrontend, connect

pytestmark = pytest.mark.interop

PEER = "qemu-storage-daemon 7.2 vhost-user-blk export"
QSD = shutil.which("qemu-storage-daemon")
needs_qsd = pytest.mark.skipif(QSD is None, reason=f"{PEER}: qemu-storage-daemon not installed")
needs_backend = pytest.mark.skipif(
    importlib.util.find_spec("pyvirtio.transport.vhost_user.server") is None,
    reason="pyvirtio's vhost-user back-end (pyvirtio.transport.vhost_user.server) not there yet",
)

IMAGE_BYTES = 16 << 20
SECTOR = 512


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed + (i >> 9)) & 0xFF for i in range(n))


class Backend:
    """A back-end process serving a vhost-user socket; stopped on exit."""

    def __init__(self, argv: list[str], sock: Path, log: Path) -> None:
        self.sock = sock
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + 20
        while not sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[:3]} exited early:\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[:3]} never created {sock}:\n{self.output()}")
            time.sleep(0.02)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(IMAGE_BYTES)
    return path


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[tuple[Backend, Path]]:
    """qemu-storage-daemon exporting a raw image file as vhost-user-blk."""
    assert QSD is not None
    img = _image(tmp_path / "disk.img")
    sock = tmp_path / "qsd.sock"
    argv = [
        QSD,
        "--blockdev",
        f"driver=file,node-name=f0,filename={img}",
        "--export",
        f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},writable=on",
    ]
    b = Backend(argv, sock, tmp_path / "qsd.log")
    try:
        yield b, img
    finally:
        b.stop()


def _serve(tmp_path: Path, *args: str) -> Backend:
    sock = tmp_path / f"pyvirtio-{args[0]}.sock"
    argv = [sys.executable, "-m", "pyvirtio", "serve", *args, "--socket", str(sock)]
    return Backend(argv, sock, tmp_path / f"serve-{args[0]}.log")


def _probe(sock: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pyvirtio", "probe", "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _write_flush_read(drv: BlkDriver) -> tuple[int, bytes]:
    """Write 64 KiB + a batch of 4 KiB writes in flight, flush, read back; returns
    (sector, data) of what must now be on the disk."""
    assert drv.size == IMAGE_BYTES
    sector = 2048 + 3  # an odd sector, 1 MiB in
    data = _pattern(64 << 10, 1)
    drv.write(sector, data)
    # submission API: 8 writes in flight at once, right behind
    base = sector + len(data) // SECTOR
    chunks = [_pattern(4096, 10 + i) for i in range(8)]
    reqs = [drv.submit_write(base + i * 8, c, kick=False) for i, c in enumerate(chunks)]
    drv.kick_pending()
    drv.complete(reqs)
    drv.flush()
    expected = data + b"".join(chunks)
    assert drv.read(sector, len(expected)) == expected
    # the last sectors of the device, and reads in flight together
    tail = _pattern(SECTOR * 2, 99)
    drv.write(drv.capacity - 2, tail)
    reads = [drv.submit_read(sector + i * 8, 4096, kick=False) for i in range(8)]
    drv.kick_pending()
    got = drv.complete(reads)
    assert b"".join(d or b"" for d in got) == expected[: 8 * 4096]
    assert drv.read(drv.capacity - 2, len(tail)) == tail
    drv.flush()
    return sector, expected


def _check_image(img: Path, sector: int, expected: bytes) -> None:
    with open(img, "rb") as f:
        f.seek(sector * SECTOR)
        assert f.read(len(expected)) == expected
        f.seek(IMAGE_BYTES - 2 * SECTOR)
        assert f.read(2 * SECTOR) == _pattern(SECTOR * 2, 99)


# ---------------------------------------------------------------------------
# qemu-storage-daemon
# ---------------------------------------------------------------------------


@needs_qsd
def test_blk_write_flush_read_back_through_qemu_storage_daemon(
    qsd: tuple[Backend, Path],
) -> None:
    """Peer: qemu-storage-daemon 7.2 vhost-user-blk export (file backing)."""
    backend, img = qsd
    drv = connect(BlkDriver, backend.sock, connect_timeout=20)
    try:
        # qemu-storage-daemon 7.2 (libvhost-user) offers the split ring only
        assert not drv.has_feature(Feature.RING_PACKED)
        assert drv.has_feature(Feature.VERSION_1)
        assert drv.has_feature(Feature.EVENT_IDX)
        assert drv.has_feature(Feature.INDIRECT_DESC)
        sector, expected = _write_flush_read(drv)
        assert drv.get_id() == b"vhost_user_blk"
    finally:
        drv.close()
        drv.transport.close()
    assert backend.stop() == 0, backend.output()
    _check_image(img, sector, expected)


@needs_qsd
def test_reinitialize_on_one_connection_through_qemu_storage_daemon(
    qsd: tuple[Backend, Path],
) -> None:
    """Peer: qemu-storage-daemon 7.2. Reset (GET_VRING_BASE) then a second driver
    initialization on the same connection, as after a guest reboot."""
    backend, _ = qsd
    t = VhostUserFrontend(backend.sock, device_id=2, connect_timeout=20)
    try:
        for round_ in range(2):
            drv = BlkDriver(t, timeout=10)
            drv.initialize()
            data = _pattern(8192, round_)
            drv.write(round_ * 16, data)
            assert drv.read(round_ * 16, len(data)) == data
            drv.close()
            assert 0 in t.vring_bases  # the ring was stopped with GET_VRING_BASE
    finally:
        t.close()


@needs_qsd
def test_probe_qemu_storage_daemon(qsd: tuple[Backend, Path]) -> None:
    """Peer: qemu-storage-daemon 7.2. ``pyvirtio probe`` names what it offers."""
    backend, _ = qsd
    out = _probe(backend.sock, "--exercise")
    assert "device type: 2 (block), guessed" in out
    for name in (
        "VIRTIO_BLK_F_SEG_MAX",
        "VIRTIO_BLK_F_BLK_SIZE",
        "VIRTIO_BLK_F_FLUSH",
        "VIRTIO_BLK_F_DISCARD",
        "VIRTIO_BLK_F_WRITE_ZEROES",
        "VIRTIO_F_VERSION_1",
        "VIRTIO_F_INDIRECT_DESC",
        "VIRTIO_F_EVENT_IDX",
        "VHOST_USER_F_PROTOCOL_FEATURES",
        "VHOST_USER_PROTOCOL_F_CONFIG",
        "VHOST_USER_PROTOCOL_F_MQ",
        "VHOST_USER_PROTOCOL_F_REPLY_ACK",
    ):
        assert name in out, name
    assert "VIRTIO_F_RING_PACKED" not in out
    assert "queues: 1 (GET_QUEUE_NUM)" in out
    assert f"capacity                 = {IMAGE_BYTES // SECTOR}" in out
    assert "seg_max" in out and "blk_size                 = 512" in out
    assert "exercise (split ring): OK" in out
    info = json.loads(_probe(backend.sock, "--json", "--type", "blk"))
    assert info["config"]["fields"]["capacity"] == IMAGE_BYTES // SECTOR
    assert info["queues"]["count"] == 1


# ---------------------------------------------------------------------------
# pyvirtio's own back-end
# ---------------------------------------------------------------------------


@needs_backend
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_blk_write_flush_read_back_through_pyvirtio_backend(tmp_path: Path, packed: bool) -> None:
    img = _image(tmp_path / "disk.img")
    backend = _serve(tmp_path, "blk", "--image", str(img))
    try:
        drv = connect(BlkDriver, backend.sock, connect_timeout=20, ring=RingOptions(packed=packed))
        try:
            assert drv.has_feature(Feature.RING_PACKED) is packed
            sector, expected = _write_flush_read(drv)
        finally:
            drv.close()
            drv.transport.close()
    finally:
        backend.stop()
    _check_image(img, sector, expected)


@needs_backend
def test_probe_pyvirtio_blk_backend(tmp_path: Path) -> None:
    img = _image(tmp_path / "disk.img")
    backend = _serve(tmp_path, "blk", "--image", str(img))
    try:
        out = _probe(backend.sock, "--exercise")
    finally:
        backend.stop()
    assert "device type: 2 (block), guessed" in out
    for name in ("VIRTIO_BLK_F_FLUSH", "VIRTIO_F_VERSION_1", "VIRTIO_F_RING_PACKED"):
        assert name in out, name
    assert "VHOST_USER_PROTOCOL_F_CONFIG" in out
    assert f"capacity                 = {IMAGE_BYTES // SECTOR}" in out
    assert "exercise (packed ring): OK" in out


@needs_backend
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rng_driver_through_pyvirtio_backend(tmp_path: Path, packed: bool) -> None:
    backend = _serve(tmp_path, "rng")
    try:
        drv = connect(RngDriver, backend.sock, connect_timeout=20, ring=RingOptions(packed=packed))
        try:
            assert drv.has_feature(Feature.RING_PACKED) is packed
            data = drv.read(5000)
            assert len(data) == 5000
            assert len(set(data)) > 200
        finally:
            drv.close()
            drv.transport.close()
    finally:
        backend.stop()


@needs_backend
def test_probe_pyvirtio_rng_backend(tmp_path: Path) -> None:
    backend = _serve(tmp_path, "rng")
    try:
        out = _probe(backend.sock, "--exercise")
        info = json.loads(_probe(backend.sock, "--json"))
    finally:
        backend.stop()
    assert "device type: 4 (entropy), guessed" in out
    assert "VIRTIO_F_VERSION_1" in out
    assert "random bytes" in out
    assert info["device_type"]["name"] == "entropy"
    assert os.path.basename(info["socket"]).startswith("pyvirtio-rng")


def test_probe_pyvirtio_net_backend(tmp_path: Path) -> None:
    """``pyvirtio probe`` understands network back-ends: the type is guessed from
    net-only feature bits, and with no configuration space offered (the front-end
    keeps it, as QEMU does) the exercise still brings the driver up and sends."""
    backend = _serve(tmp_path, "net", "--switch")
    try:
        out = _probe(backend.sock, "--exercise")
        info = json.loads(_probe(backend.sock, "--json"))
    finally:
        backend.stop()
    assert "device type: 1 (net), guessed" in out, out
    for name in (
        "VIRTIO_NET_F_MRG_RXBUF",
        "VHOST_USER_PROTOCOL_F_MTU",
        "VHOST_USER_PROTOCOL_F_RARP",
    ):
        assert name in out, name
    assert "configuration space: not readable" in out
    assert "sent a 60-byte broadcast frame" in out, out
    assert info["device_type"]["name"] == "net"
