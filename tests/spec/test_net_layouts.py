"""spec/net.py against the spec's layouts and against Linux's uapi header (an
independent statement of the same numbers: /usr/include/linux/virtio_net.h)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyvirtio.spec.features import Feature
from pyvirtio.spec.net import (
    VIRTIO_NET_CONFIG,
    VIRTIO_NET_CTRL_HDR,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_HASH,
    VIRTIO_NET_HDR_LEGACY,
    NetCtrlClass,
    NetCtrlMac,
    NetCtrlMq,
    NetCtrlRx,
    NetCtrlVlan,
    NetFeature,
    NetGsoType,
    NetHdrFlags,
    NetStatus,
    VirtioNetConfig,
    VirtioNetHdr,
    net_hdr_size,
    virtqueue_count,
)

HEADER = Path("/usr/include/linux/virtio_net.h")


def _defines() -> dict[str, int]:
    text = HEADER.read_text()
    return {
        name: int(value, 0)
        for name, value in re.findall(r"#define\s+(VIRTIO_NET_\w+)\s+(0x[0-9a-fA-F]+|\d+)", text)
    }


def test_numbers_match_linux_uapi_header() -> None:
    d = _defines()
    checked = 0
    for prefix, enum in (
        ("VIRTIO_NET_F_", NetFeature),
        ("VIRTIO_NET_S_", NetStatus),
        ("VIRTIO_NET_HDR_F_", NetHdrFlags),
        ("VIRTIO_NET_HDR_GSO_", NetGsoType),
    ):
        for member in enum:
            name = prefix + str(member.name)
            if name in d:
                assert d[name] == int(member), name
                checked += 1
    for cls, member in (
        ("RX", NetCtrlClass.RX),
        ("MAC", NetCtrlClass.MAC),
        ("VLAN", NetCtrlClass.VLAN),
        ("ANNOUNCE", NetCtrlClass.ANNOUNCE),
        ("MQ", NetCtrlClass.MQ),
    ):
        assert d[f"VIRTIO_NET_CTRL_{cls}"] == member
    assert d["VIRTIO_NET_CTRL_RX_NOBCAST"] == NetCtrlRx.NOBCAST
    assert d["VIRTIO_NET_CTRL_MAC_ADDR_SET"] == NetCtrlMac.ADDR_SET
    assert d["VIRTIO_NET_CTRL_VLAN_DEL"] == NetCtrlVlan.DEL
    assert d["VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET"] == NetCtrlMq.VQ_PAIRS_SET
    assert checked >= 30


def test_config_layout() -> None:
    # §5.1.4: mac[6], le16 status, le16 max_virtqueue_pairs, le16 mtu, le32 speed,
    # u8 duplex, u8 rss_max_key_size, le16 rss_max_indirection_table_length,
    # le32 supported_hash_types
    assert VIRTIO_NET_CONFIG.size == 24
    offsets = {n: VIRTIO_NET_CONFIG.offset_of(n) for n in VIRTIO_NET_CONFIG.names}
    assert offsets == {
        "mac": 0,
        "status": 6,
        "max_virtqueue_pairs": 8,
        "mtu": 10,
        "speed": 12,
        "duplex": 16,
        "rss_max_key_size": 17,
        "rss_max_indirection_table_length": 18,
        "supported_hash_types": 20,
    }
    cfg = VirtioNetConfig(b"\x52\x54\x00\x12\x34\x56", 1, 4, 1500, 10000, 1, 0, 0, 0)
    raw = VIRTIO_NET_CONFIG.pack(cfg)
    assert raw[:8] == b"\x52\x54\x00\x12\x34\x56\x01\x00"
    assert VIRTIO_NET_CONFIG.unpack(raw) == cfg


def test_header_layouts_and_sizes() -> None:
    assert VIRTIO_NET_HDR.size == 12 and VIRTIO_NET_HDR_LEGACY.size == 10
    assert VIRTIO_NET_HDR_HASH.size == 20
    h = VirtioNetHdr(NetHdrFlags.NEEDS_CSUM, NetGsoType.TCPV4, 54, 1448, 34, 16, 2)
    raw = VIRTIO_NET_HDR.pack(h)
    assert raw == bytes([1, 1]) + (54).to_bytes(2, "little") + (1448).to_bytes(2, "little") + (
        34
    ).to_bytes(2, "little") + (16).to_bytes(2, "little") + (2).to_bytes(2, "little")
    assert VIRTIO_NET_HDR_LEGACY.unpack(raw[:10]) == h._replace(num_buffers=0)
    assert VIRTIO_NET_CTRL_HDR.size == 2


@pytest.mark.parametrize(
    ("features", "size"),
    [
        (0, 10),  # legacy, no MRG_RXBUF: §5.1.6.1
        (1 << NetFeature.MRG_RXBUF, 12),
        (Feature.VERSION_1.mask, 12),  # num_buffers always present with VERSION_1
        (Feature.VERSION_1.mask | 1 << NetFeature.HASH_REPORT, 20),
    ],
)
def test_header_size_follows_the_negotiated_features_only(features: int, size: int) -> None:
    assert net_hdr_size(features) == size


def test_virtqueue_count() -> None:
    # §5.1.2: receiveq1, transmitq1 .. receiveqN, transmitqN, then controlq
    assert virtqueue_count(0, 8) == 2
    assert virtqueue_count(1 << NetFeature.CTRL_VQ, 8) == 3
    assert virtqueue_count(1 << NetFeature.MQ | 1 << NetFeature.CTRL_VQ, 8) == 17
