"""Block backends: FileBackend (preadv/pwritev on views, fdatasync, hole punching with
a zero-write fallback), MemoryBackend and NullBackend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvirtio.devices.blk import BlkBackend, FileBackend, MemoryBackend, NullBackend
from pyvirtio.devices.blk import backend as backend_mod
from pyvirtio.errors import ConfigurationError

SIZE = 2 << 20


def views(buf: bytearray, sizes: list[int]) -> list[memoryview]:
    mv = memoryview(buf)
    out, pos = [], 0
    for n in sizes:
        out.append(mv[pos : pos + n])
        pos += n
    return out


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(SIZE))
    return p


def test_backends_implement_the_protocol(image: Path) -> None:
    fb = FileBackend(image)
    try:
        for b in (fb, MemoryBackend(512), NullBackend(512)):
            assert isinstance(b, BlkBackend)
    finally:
        fb.close()


def test_file_readv_writev_straight_into_views(image: Path) -> None:
    fb = FileBackend(image)
    try:
        assert fb.size == SIZE and not fb.readonly
        content = image.read_bytes()
        buf = bytearray(3000)
        assert fb.readv(4096, views(buf, [1, 999, 2000])) == 3000
        assert buf == content[4096:7096]
        src = bytearray(os.urandom(2048))
        assert fb.writev(100, views(src, [48, 2000])) == 2048
        assert image.read_bytes()[100:2148] == src
        fb.flush()
    finally:
        fb.close()


def test_file_more_buffers_than_iov_max(image: Path) -> None:
    """Guest chains may have more segments than IOV_MAX: the backend batches them."""
    fb = FileBackend(image)
    try:
        n = backend_mod._IOV_MAX * 2 + 7
        src = bytearray(os.urandom(n * 8))
        assert fb.writev(0, views(src, [8] * n)) == len(src)
        dst = bytearray(len(src))
        assert fb.readv(0, views(dst, [8] * n)) == len(src)
        assert dst == src
    finally:
        fb.close()


def test_file_short_read_at_end(image: Path) -> None:
    fb = FileBackend(image)
    try:
        buf = bytearray(1024)
        assert fb.readv(SIZE - 512, views(buf, [1024])) == 512
    finally:
        fb.close()


@pytest.mark.parametrize("punch", [True, False], ids=["punch-hole", "zero-write-fallback"])
def test_file_discard_and_write_zeroes_read_back_zeros(image: Path, punch: bool) -> None:
    fb = FileBackend(image)
    try:
        if not punch:
            fb._punch_ok = False
        before = image.read_bytes()
        fb.discard(8192, 8192)
        fb.write_zeroes(65536, 3 * 512, unmap=True)
        fb.write_zeroes(200_000, 1_300_000 - 200_000, unmap=False)
        after = image.read_bytes()
        assert after[8192:16384] == bytes(8192)
        assert after[65536 : 65536 + 1536] == bytes(1536)
        assert after[200_000:1_300_000] == bytes(1_100_000)
        assert after[:8192] == before[:8192]
        assert after[16384:65536] == before[16384:65536]
        assert len(after) == SIZE  # KEEP_SIZE
    finally:
        fb.close()


def test_file_punch_hole_deallocates(tmp_path: Path) -> None:
    p = tmp_path / "full.img"
    p.write_bytes(b"\x01" * SIZE)
    fb = FileBackend(p)
    try:
        fb.flush()
        blocks = os.stat(p).st_blocks
        fb.discard(0, SIZE // 2)
        if not fb._punch_ok:
            pytest.skip("filesystem cannot punch holes")
        assert os.stat(p).st_blocks < blocks
    finally:
        fb.close()


def test_file_readonly(image: Path) -> None:
    fb = FileBackend(image, readonly=True)
    try:
        assert fb.readonly
        with pytest.raises(OSError):
            fb.writev(0, [memoryview(bytearray(512))])
        with pytest.raises(OSError):
            fb.discard(0, 512)
        with pytest.raises(OSError):
            fb.write_zeroes(0, 512, False)
    finally:
        fb.close()


def test_file_missing_is_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        FileBackend(tmp_path / "nope.img")


def test_memory_backend() -> None:
    mb = MemoryBackend(4096, data=b"\x09" * 100)
    buf = bytearray(200)
    assert mb.readv(0, views(buf, [50, 150])) == 200
    assert buf == b"\x09" * 100 + bytes(100)
    assert mb.writev(4000, [memoryview(bytearray(b"\x05" * 200))]) == 96  # short at the end
    mb.write_zeroes(0, 50, True)
    assert mb.data[:50] == bytes(50) and mb.data[50:100] == b"\x09" * 50
    mb.flush()
    assert mb.flushes == 1


def test_null_backend_reads_zeros_and_drops_writes() -> None:
    nb = NullBackend(1 << 30)
    buf = bytearray(b"\xff" * (backend_mod.ZERO_CHUNK + 10))
    assert nb.readv(0, [memoryview(buf)]) == len(buf)
    assert buf == bytes(len(buf))
    assert nb.writev(0, [memoryview(b"abc")]) == 3
    assert nb.size == 1 << 30
