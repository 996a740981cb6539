"""spec/balloon.py against the spec (virtio-v1.2 §5.5) and Linux's uapi header
(/usr/include/linux/virtio_balloon.h, an independent statement of the same numbers)."""

from __future__ import annotations

import re
from pathlib import Path

from pyvirtio.spec.balloon import (
    BALLOON_CONFIG,
    BALLOON_STAT,
    PFN_SHIFT,
    PFN_SIZE,
    BalloonFeature,
    BalloonQueue,
    CmdId,
    StatTag,
    VirtioBalloonConfig,
    queue_indexes,
    virtqueue_count,
)

HEADER = Path("/usr/include/linux/virtio_balloon.h")
F = BalloonFeature


def _defines() -> dict[str, int]:
    text = HEADER.read_text()
    return {
        n: int(v, 0)
        for n, v in re.findall(r"#define\s+(VIRTIO_BALLOON_\w+)\s+(0x[0-9a-fA-F]+|\d+)", text)
    }


def test_numbers_match_linux_uapi_header() -> None:
    d = _defines()
    for f in BalloonFeature:
        name = "VIRTIO_BALLOON_F_" + ("REPORTING" if f is F.PAGE_REPORTING else f.name)
        assert d[name] == int(f), name
    for t in StatTag:
        assert d[f"VIRTIO_BALLOON_S_{t.name}"] == int(t)
    assert d["VIRTIO_BALLOON_S_NR"] == len(StatTag)
    assert d["VIRTIO_BALLOON_PFN_SHIFT"] == PFN_SHIFT and PFN_SIZE == 4096
    assert d["VIRTIO_BALLOON_CMD_ID_STOP"] == CmdId.STOP
    assert d["VIRTIO_BALLOON_CMD_ID_DONE"] == CmdId.DONE


def test_config_layout_matches_the_header_struct() -> None:
    text = HEADER.read_text()
    body = re.search(r"struct virtio_balloon_config \{(.*?)\n\};", text, re.S)
    assert body is not None
    fields = re.findall(r"__le32 (\w+);", body.group(1))
    # the union's first name is the spec's; the deprecated alias shares its offset
    assert [f for f in fields if f != "free_page_report_cmd_id"] == list(BALLOON_CONFIG.names)
    assert BALLOON_CONFIG.size == 16
    raw = BALLOON_CONFIG.pack(VirtioBalloonConfig(1, 2, 3, 4))
    assert raw == bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0])


def test_stat_entry_is_10_packed_bytes() -> None:
    assert BALLOON_STAT.size == 10
    assert BALLOON_STAT.pack_values(4, 1 << 40) == b"\x04\x00" + (1 << 40).to_bytes(8, "little")


def test_queue_numbering_shifts_when_queues_are_absent() -> None:
    q = BalloonQueue
    assert queue_indexes(0) == {q.INFLATEQ: 0, q.DEFLATEQ: 1}
    assert queue_indexes(F.STATS_VQ.mask)[q.STATSQ] == 2
    assert queue_indexes(F.FREE_PAGE_HINT.mask)[q.FREE_PAGE_VQ] == 2
    assert queue_indexes(F.PAGE_REPORTING.mask)[q.REPORTING_VQ] == 2
    both = queue_indexes(F.STATS_VQ.mask | F.PAGE_REPORTING.mask)
    assert both == {q.INFLATEQ: 0, q.DEFLATEQ: 1, q.STATSQ: 2, q.REPORTING_VQ: 3}
    every = F.STATS_VQ.mask | F.FREE_PAGE_HINT.mask | F.PAGE_REPORTING.mask
    assert list(queue_indexes(every).values()) == [0, 1, 2, 3, 4]
    assert virtqueue_count(every | F.MUST_TELL_HOST.mask) == 5
