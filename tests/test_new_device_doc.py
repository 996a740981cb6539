"""docs/new-device.md's worked example runs as printed: its code blocks, in order,
form a module; its tests run by hand and over every transport."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from pyvirtio.devices.registry import by_name, unregister

DOC = Path(__file__).resolve().parents[1] / "docs" / "new-device.md"


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 6
    (tmp_path / "msg_example.py").write_text("\n\n".join(blocks))
    monkeypatch.syspath_prepend(str(tmp_path))  # the two-process child imports it too
    sys.modules.pop("msg_example", None)
    module = importlib.import_module("msg_example")
    yield module
    sys.modules.pop("msg_example", None)
    unregister("msg")


def test_by_hand(example) -> None:  # type: ignore[no-untyped-def]
    example.test_msg_device_by_hand()


def test_everywhere(example) -> None:  # type: ignore[no-untyped-def]
    example.test_msg_device_everywhere("msg_example:MsgDevice")


def test_registered_for_serve_and_probe(example) -> None:  # type: ignore[no-untyped-def]
    entry = by_name("msg")
    assert entry.device_id == 63 and entry.driver_class() is example.MsgDriver
    from pyvirtio.cli.main import build_parser

    args = build_parser().parse_args(["serve", "msg", "--socket", "/tmp/x", "--max-message", "9"])
    device = entry.create(args)  # type: ignore[misc]
    assert device.config_bytes() == (9).to_bytes(4, "little")
    device.close()
