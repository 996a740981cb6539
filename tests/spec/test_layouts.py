"""Wire layout sizes and offsets against the spec's struct definitions."""

from __future__ import annotations

import pytest

from pyvirtio.spec import blk, ring
from pyvirtio.spec.features import Feature, feature_names
from pyvirtio.spec.layout import WireStruct


@pytest.mark.parametrize(
    ("layout", "size"),
    [
        (ring.VIRTQ_DESC, 16),
        (ring.VIRTQ_AVAIL_HEADER, 4),
        (ring.VIRTQ_USED_ELEM, 8),
        (ring.VIRTQ_USED_HEADER, 4),
        (ring.PVIRTQ_DESC, 16),
        (ring.PVIRTQ_EVENT_SUPPRESS, 4),
        (blk.VIRTIO_BLK_OUTHDR, 16),
        (blk.VIRTIO_BLK_DISCARD_WRITE_ZEROES, 16),
        (blk.VIRTIO_BLK_CONFIG, 60),
    ],
)
def test_layout_sizes(layout: WireStruct[object], size: int) -> None:
    assert layout.size == size


def test_virtio_blk_config_offsets_match_linux_header() -> None:
    # offsets of struct virtio_blk_config in <linux/virtio_blk.h>
    c = blk.VIRTIO_BLK_CONFIG
    assert c.offset_of("capacity") == 0
    assert c.offset_of("size_max") == 8
    assert c.offset_of("seg_max") == 12
    assert c.offset_of("blk_size") == 20
    assert c.offset_of("physical_block_exp") == 24
    assert c.offset_of("opt_io_size") == 28
    assert c.offset_of("writeback") == 32
    assert c.offset_of("num_queues") == 34
    assert c.offset_of("max_discard_sectors") == 36
    assert c.offset_of("max_write_zeroes_seg") == 52
    assert c.offset_of("write_zeroes_may_unmap") == 56


def test_round_trip_and_padding_is_zero() -> None:
    cfg = blk.VirtioBlkConfig(*range(1, 20))
    raw = blk.VIRTIO_BLK_CONFIG.pack(cfg)
    assert raw[33] == 0 and raw[57:60] == b"\0\0\0"
    assert blk.VIRTIO_BLK_CONFIG.unpack(raw) == cfg
    d = ring.VirtqDesc(addr=0x1122334455667788, len=0x99AABBCC, flags=3, next=7)
    raw = ring.VIRTQ_DESC.pack(d)
    assert raw == bytes.fromhex("8877665544332211ccbbaa9903000700")
    assert ring.VIRTQ_DESC.unpack_from(b"\0" + raw, 1) == d


def test_mixed_byte_order_is_refused() -> None:
    with pytest.raises(ValueError):
        WireStruct(tuple, [("a", "le16"), ("b", "be16")])


def test_vring_need_event_matches_spec_helper() -> None:
    # event at 5: moving from 4 to 6 crosses it, from 6 to 8 does not
    assert ring.vring_need_event(5, 6, 4)
    assert not ring.vring_need_event(5, 8, 6)
    # wrap-around of the 16-bit indexes
    assert ring.vring_need_event(0xFFFF, 1, 0xFFFE)
    assert not ring.vring_need_event(0xFFFF, 0xFFFF, 0xFFFF)


def test_split_area_sizes() -> None:
    assert ring.split_desc_table_size(256) == 4096
    assert ring.split_avail_size(256) == 6 + 512
    assert ring.split_used_size(256) == 6 + 2048


def test_feature_names() -> None:
    f = Feature.VERSION_1.mask | Feature.RING_PACKED.mask | (1 << 5)
    assert feature_names(f, {5: "VIRTIO_BLK_F_RO"}) == [
        "VIRTIO_BLK_F_RO",
        "VIRTIO_F_VERSION_1",
        "VIRTIO_F_RING_PACKED",
    ]
