"""The README's Python examples run as written (the ones that need no server)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _block(marker: str) -> str:
    for block in BLOCKS:
        if marker in block:
            return block
    raise AssertionError(f"README has no example containing {marker!r}")


def test_ring_pair_example(capsys: pytest.CaptureFixture[str]) -> None:
    exec(_block("SplitDeviceQueue"), {})
    assert "('req-1', 4) b'PING'" in capsys.readouterr().out


def test_loopback_block_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open("disk.img", "wb") as f:
        os.ftruncate(f.fileno(), 1 << 20)
    exec(_block("LoopbackTransport"), {})
    assert (tmp_path / "disk.img").read_bytes()[:4096] == b"x" * 4096


def test_testing_kit_example(capsys: pytest.CaptureFixture[str]) -> None:
    exec(_block("DeviceHarness"), {})
    assert "[('t', 5)]" in capsys.readouterr().out
