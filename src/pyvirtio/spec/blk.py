"""Block device constants and wire layouts. virtio-v1.2 §5.2 "Block Device"."""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from pyvirtio.spec.layout import WireStruct

#: Sector size used by every request: "The sector number ... in 512-byte units"
#: (virtio-v1.2 §5.2.6 "Device Operation").
SECTOR_SIZE = 512
#: GET_ID answers with a 20-byte identifier string (virtio-v1.2 §5.2.6).
VIRTIO_BLK_ID_BYTES = 20


class BlkFeature(IntEnum):
    """Block feature bits (virtio-v1.2 §5.2.3 "Feature bits")."""

    #: legacy
    BARRIER = 0
    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    #: legacy
    SCSI = 7
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16
    ZONED = 17


class BlkReqType(IntEnum):
    """``virtio_blk_req.type`` (virtio-v1.2 §5.2.6)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlkStatus(IntEnum):
    """``virtio_blk_req.status`` (virtio-v1.2 §5.2.6)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


#: Legacy synonym of VIRTIO_BLK_T_FLUSH (virtio-v1.2 §5.2.6.3 "Legacy Interface:
#: Device Operation": "a driver MUST treat it as a VIRTIO_BLK_T_FLUSH command").
VIRTIO_BLK_T_FLUSH_OUT = 5

#: virtio_blk_discard_write_zeroes.flags bit 0 (virtio-v1.2 §5.2.6)
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1


class VirtioBlkConfig(NamedTuple):
    """``struct virtio_blk_config`` up to ``write_zeroes_may_unmap`` (virtio-v1.2 §5.2.4)::

    struct virtio_blk_config {
            le64 capacity;
            le32 size_max;
            le32 seg_max;
            struct virtio_blk_geometry {
                    le16 cylinders;
                    u8 heads;
                    u8 sectors;
            } geometry;
            le32 blk_size;
            struct virtio_blk_topology {
                    u8 physical_block_exp;
                    u8 alignment_offset;
                    le16 min_io_size;
                    le32 opt_io_size;
            } topology;
            u8 writeback;
            u8 unused0;
            u16 num_queues;
            le32 max_discard_sectors;
            le32 max_discard_seg;
            le32 discard_sector_alignment;
            le32 max_write_zeroes_sectors;
            le32 max_write_zeroes_seg;
            u8 write_zeroes_may_unmap;
            u8 unused1[3];
            ...  /* secure erase and zoned fields: not offered */
    };
    """

    capacity: int
    size_max: int
    seg_max: int
    cylinders: int
    heads: int
    sectors: int
    blk_size: int
    physical_block_exp: int
    alignment_offset: int
    min_io_size: int
    opt_io_size: int
    writeback: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int


VIRTIO_BLK_CONFIG = WireStruct(
    VirtioBlkConfig,
    [
        ("capacity", "le64"),
        ("size_max", "le32"),
        ("seg_max", "le32"),
        ("cylinders", "le16"),
        ("heads", "u8"),
        ("sectors", "u8"),
        ("blk_size", "le32"),
        ("physical_block_exp", "u8"),
        ("alignment_offset", "u8"),
        ("min_io_size", "le16"),
        ("opt_io_size", "le32"),
        ("writeback", "u8"),
        ("unused0", "pad1"),
        ("num_queues", "le16"),
        ("max_discard_sectors", "le32"),
        ("max_discard_seg", "le32"),
        ("discard_sector_alignment", "le32"),
        ("max_write_zeroes_sectors", "le32"),
        ("max_write_zeroes_seg", "le32"),
        ("write_zeroes_may_unmap", "u8"),
        ("unused1", "pad3"),
    ],
)


class VirtioBlkOuthdr(NamedTuple):
    """Device-readable head of ``struct virtio_blk_req`` (virtio-v1.2 §5.2.6)::

    struct virtio_blk_req {
            le32 type;
            le32 reserved;
            le64 sector;
            u8 data[];
            u8 status;
    };
    """

    type: int
    reserved: int
    sector: int


VIRTIO_BLK_OUTHDR = WireStruct(
    VirtioBlkOuthdr, [("type", "le32"), ("reserved", "le32"), ("sector", "le64")]
)


class VirtioBlkDiscardWriteZeroes(NamedTuple):
    """``struct virtio_blk_discard_write_zeroes`` (virtio-v1.2 §5.2.6)::

    struct virtio_blk_discard_write_zeroes {
           le64 sector;
           le32 num_sectors;
           struct {
                   le32 unmap:1;
                   le32 reserved:31;
           } flags;
    };
    """

    sector: int
    num_sectors: int
    flags: int


VIRTIO_BLK_DISCARD_WRITE_ZEROES = WireStruct(
    VirtioBlkDiscardWriteZeroes, [("sector", "le64"), ("num_sectors", "le32"), ("flags", "le32")]
)
