"""Receive filtering of the network device: RX modes, the MAC table, VLANs.

virtio-v1.2 §5.1.6.5.1 "Packet Receive Filtering", §5.1.6.5.2 "Setting MAC Address
Filtering" and §5.1.6.5.3 "VLAN Filtering": the driver sets these over the control
queue; the device applies them to every frame before it takes a receive buffer. The
order of the checks follows the spec's "SHOULD take effect even if" sentences:

1. promiscuous mode accepts everything ("SHOULD take effect even if one of the other
   modes ... is on");
2. with VIRTIO_NET_F_CTRL_VLAN negotiated, a tagged frame passes only if its VLAN id
   was added (an untagged frame is not affected);
3. broadcast passes unless NOBCAST ("SHOULD take effect even if ALLMULTI is on");
   NOMULTI is not applied to it ("This filter SHOULD NOT apply to broadcast packets");
4. other multicast: NOMULTI drops, ALLMULTI accepts, else the multicast table;
5. unicast: NOUNI drops, ALLUNI accepts, else the device's MAC (config ``mac`` or
   the one set with MAC_ADDR_SET) or the unicast table ("SHOULD drop incoming
   packets which have a destination MAC which matches neither").

Reset state ("The device MUST have an empty MAC filtering table on reset"): empty
tables, promiscuous mode *on* as QEMU does - a driver that never negotiates
VIRTIO_NET_F_CTRL_RX has no way to turn it off, and must still receive the frames
sent to it; Linux turns it off at once when it has the control queue. A table
longer than :data:`MAC_TABLE_ENTRIES` switches that class to accept-all (the spec's
footnote: a device "can ... silently switch to allmulti or promiscuous mode if it is
given too many addresses").
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BROADCAST", "MAC_TABLE_ENTRIES", "VLAN_IDS", "RxFilter"]

BROADCAST = b"\xff" * 6
#: Addresses kept per table (unicast, multicast); more turn that class accept-all.
MAC_TABLE_ENTRIES = 64
#: VLAN ids 0..4095.
VLAN_IDS = 4096
_ETH_P_8021Q = 0x8100


@dataclass
class RxFilter:
    """The receive filter state and its test."""

    mac: bytes
    promisc: bool = True
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    unicast: set[bytes] = field(default_factory=set)
    multicast: set[bytes] = field(default_factory=set)
    uni_overflow: bool = False
    multi_overflow: bool = False
    #: VLAN filtering in force (VIRTIO_NET_F_CTRL_VLAN negotiated)
    vlan_filtering: bool = False
    vlans: set[int] = field(default_factory=set)

    def reset(self, mac: bytes) -> None:
        """The state after a device reset."""
        self.mac = bytes(mac)
        self.promisc = True
        self.allmulti = self.alluni = self.nomulti = self.nouni = self.nobcast = False
        self.unicast.clear()
        self.multicast.clear()
        self.uni_overflow = self.multi_overflow = False
        self.vlan_filtering = False
        self.vlans.clear()

    def set_tables(self, unicast: list[bytes], multicast: list[bytes]) -> None:
        """VIRTIO_NET_CTRL_MAC_TABLE_SET: replace both tables."""
        self.uni_overflow = len(unicast) > MAC_TABLE_ENTRIES
        self.multi_overflow = len(multicast) > MAC_TABLE_ENTRIES
        self.unicast = set() if self.uni_overflow else set(unicast)
        self.multicast = set() if self.multi_overflow else set(multicast)

    def accepts(self, frame: bytes | bytearray | memoryview) -> bool:
        """True if ``frame`` (starting at its destination address) passes."""
        if self.promisc:
            return True
        if len(frame) < 14:
            return False
        if self.vlan_filtering and frame[12] << 8 | frame[13] == _ETH_P_8021Q:
            if len(frame) < 16:
                return False
            if (frame[14] << 8 | frame[15]) & 0xFFF not in self.vlans:
                return False
        dst = bytes(frame[0:6])
        if dst[0] & 1:
            if dst == BROADCAST:
                return not self.nobcast
            if self.nomulti:
                return False
            return self.allmulti or self.multi_overflow or dst in self.multicast
        if self.nouni:
            return False
        return self.alluni or self.uni_overflow or dst == self.mac or dst in self.unicast
