"""spec/console.py against Linux's <linux/virtio_console.h> and virtio-v1.2 §5.3."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyvirtio.spec.console import (
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    VIRTIO_CONSOLE_BAD_ID,
    VIRTIO_CONSOLE_CONFIG,
    VIRTIO_CONSOLE_CONTROL,
    VIRTIO_CONSOLE_RESIZE,
    ConsoleEvent,
    ConsoleFeature,
    port_of_queue,
    receiveq,
    transmitq,
    virtqueue_count,
)

HEADER = Path("/usr/include/linux/virtio_console.h")


def _defines() -> dict[str, str]:
    if not HEADER.is_file():
        pytest.fail(f"{HEADER} missing: install linux-libc-dev (scripts/install-deps.sh)")
    text = HEADER.read_text()
    return dict(re.findall(r"^#define\s+(VIRTIO_CONSOLE_\w+)\s+(\S+)", text, re.M))


def test_feature_bits_match_linux() -> None:
    d = _defines()
    for f in ConsoleFeature:
        assert int(d[f"VIRTIO_CONSOLE_F_{f.name}"]) == f.value


def test_events_match_linux() -> None:
    d = _defines()
    linux = {k[len("VIRTIO_CONSOLE_") :]: int(v) for k, v in d.items() if v.isdigit()}
    for name in (
        "DEVICE_READY",
        "PORT_ADD",
        "PORT_REMOVE",
        "PORT_READY",
        "CONSOLE_PORT",
        "RESIZE",
        "PORT_OPEN",
        "PORT_NAME",
    ):
        assert ConsoleEvent[name] == linux[name]
    assert ConsoleEvent.DEVICE_ADD == ConsoleEvent.PORT_ADD  # the spec's name
    assert ConsoleEvent.DEVICE_REMOVE == ConsoleEvent.PORT_REMOVE
    assert d["VIRTIO_CONSOLE_BAD_ID"] == "(~(__u32)0)" and VIRTIO_CONSOLE_BAD_ID == 0xFFFFFFFF


def test_struct_layouts_match_linux() -> None:
    text = HEADER.read_text()
    cfg = re.search(r"struct virtio_console_config \{(.*?)\}", text, re.S)
    ctl = re.search(r"struct virtio_console_control \{(.*?)\}", text, re.S)
    assert cfg and ctl
    assert re.findall(r"__virtio(\d+)\s+(\w+);", cfg.group(1)) == [
        ("16", "cols"),
        ("16", "rows"),
        ("32", "max_nr_ports"),
        ("32", "emerg_wr"),
    ]
    assert VIRTIO_CONSOLE_CONFIG.names == ("cols", "rows", "max_nr_ports", "emerg_wr")
    assert VIRTIO_CONSOLE_CONFIG.size == 12
    assert [VIRTIO_CONSOLE_CONFIG.offset_of(n) for n in VIRTIO_CONSOLE_CONFIG.names] == [0, 2, 4, 8]
    assert re.findall(r"__virtio(\d+)\s+(\w+);", ctl.group(1)) == [
        ("32", "id"),
        ("16", "event"),
        ("16", "value"),
    ]
    assert VIRTIO_CONSOLE_CONTROL.names == ("id", "event", "value")
    assert VIRTIO_CONSOLE_CONTROL.size == 8
    assert VIRTIO_CONSOLE_CONTROL.pack_values(1, 6, 1) == bytes.fromhex("0100000006000100")
    assert VIRTIO_CONSOLE_RESIZE.names == ("cols", "rows") and VIRTIO_CONSOLE_RESIZE.size == 4


def test_queue_numbering() -> None:
    """virtio-v1.2 §5.3.2: 0 receiveq(port0), 1 transmitq(port0), 2 control receiveq,
    3 control transmitq, 4 receiveq(port1), 5 transmitq(port1), ..."""
    assert (receiveq(0), transmitq(0), CONTROL_RECEIVEQ, CONTROL_TRANSMITQ) == (0, 1, 2, 3)
    assert (receiveq(1), transmitq(1), receiveq(2), transmitq(2)) == (4, 5, 6, 7)
    assert [port_of_queue(i) for i in range(8)] == [
        (0, False),
        (0, True),
        None,
        None,
        (1, False),
        (1, True),
        (2, False),
        (2, True),
    ]
    for p in range(40):
        assert port_of_queue(receiveq(p)) == (p, False)
        assert port_of_queue(transmitq(p)) == (p, True)
    assert virtqueue_count(1, False) == 2
    assert virtqueue_count(4, True) == 10
