"""The vhost-user back-end's network messages: VHOST_USER_NET_SET_MTU and
VHOST_USER_SEND_RARP (vhost-user.rst), ring enable state handed to the device, and
what a network back-end offers (no CONFIG: the front-end keeps the config space).

Driven by the scripted front-end of ``test_backend.py`` (QEMU's message sequences).
"""

from __future__ import annotations

import pytest

from pyvirtio.devices.net import NetDevice, Switch
from pyvirtio.devices.rng import RngDevice
from pyvirtio.spec.net import NetFeature
from pyvirtio.transport.vhost_user.backend import VhostUserBackend
from pyvirtio.transport.vhost_user.spec import (
    FrontendRequest as R,
)
from pyvirtio.transport.vhost_user.spec import (
    ProtocolFeature,
    VhostVringState,
)
from tests.transport.vhost_user.test_backend import Front

MAC = bytes.fromhex("525400aabb01")


@pytest.fixture
def net() -> tuple[Front, Switch, object]:
    sw = Switch()
    wire = sw.port("wire")
    dev = NetDevice(sw.port("dev"), mac=MAC, ctrl_vq=False, queue_pairs=2)
    front = Front(dev)
    front.connect(num_rings=4)
    return front, sw, wire


def _recv(port: object) -> bytes | None:
    buf = bytearray(2048)
    n = port.recv_into(0, memoryview(buf))  # type: ignore[attr-defined]
    return None if n is None else bytes(buf[:n])


def test_network_back_end_offers_mtu_and_rarp_not_config(net: tuple[Front, Switch, object]) -> None:
    front, _, _ = net
    pf = front.be.offered_protocol_features
    assert pf & ProtocolFeature.MTU.mask and pf & ProtocolFeature.RARP.mask
    # QEMU's vhost-user netdev keeps the configuration space itself
    assert not pf & ProtocolFeature.CONFIG.mask
    offered = front.be.offered_features
    assert offered & NetFeature.MQ.mask and offered & NetFeature.GUEST_ANNOUNCE.mask
    assert not offered & NetFeature.CTRL_VQ.mask


def test_other_devices_are_not_offered_the_network_protocol_features() -> None:
    be = VhostUserBackend(RngDevice())
    assert not be.offered_protocol_features & (ProtocolFeature.MTU.mask | ProtocolFeature.RARP.mask)


def test_net_set_mtu_is_acknowledged_and_taken(net: tuple[Front, Switch, object]) -> None:
    front, _, _ = net
    front.send(R.NET_SET_MTU, 4000, need_reply=True)
    assert front.ack(R.NET_SET_MTU) == 0
    assert front.device.mtu == 4000  # type: ignore[attr-defined]


@pytest.mark.parametrize("mtu", [0, 67, 65536, 1 << 40])
def test_net_set_mtu_out_of_range_gets_the_failure_reply(
    net: tuple[Front, Switch, object], mtu: int
) -> None:
    """vhost-user.rst NET_SET_MTU: "the back-end ... returns error" if it cannot use
    the MTU; the device keeps the one it had."""
    front, _, _ = net
    front.send(R.NET_SET_MTU, mtu, need_reply=True)
    assert front.ack(R.NET_SET_MTU) != 0
    assert front.device.mtu is None  # type: ignore[attr-defined]
    assert front.disconnected is None


def test_send_rarp_broadcasts_a_rarp_from_the_guest_mac(
    net: tuple[Front, Switch, object],
) -> None:
    """SEND_RARP: "the first 6 bytes of the payload contain the mac address of the
    guest"; the back-end announces it on its host network."""
    front, _, wire = net
    guest = bytes.fromhex("525400c0ffee")
    front.send(R.SEND_RARP, int.from_bytes(guest + b"\0\0", "little"))
    frame = _recv(wire)
    assert frame is not None
    assert frame[0:6] == b"\xff" * 6 and frame[6:12] == guest
    assert frame[12:14] == b"\x80\x35"  # ETH_P_RARP
    assert frame[20:22] == b"\x00\x03"  # reverse request
    assert frame[22:28] == guest and frame[32:38] == guest


def test_network_messages_refused_without_their_protocol_feature() -> None:
    sw = Switch()
    dev = NetDevice(sw.port(), ctrl_vq=False)
    pf = ProtocolFeature
    front = Front(
        dev,
        protocol_features=pf.MQ.mask
        | pf.REPLY_ACK.mask
        | pf.BACKEND_REQ.mask
        | pf.CONFIGURE_MEM_SLOTS.mask,
    )
    front.connect()
    front.send(R.NET_SET_MTU, 1500, need_reply=True)
    assert front.ack(R.NET_SET_MTU) != 0
    assert dev.mtu is None


def test_disabled_rings_are_handed_to_the_device(net: tuple[Front, Switch, object]) -> None:
    """Rings start disabled (vhost-user.rst "Ring states"); SET_VRING_ENABLE changes
    what the device sees, so it puts no received frame on a disabled ring."""
    front, _, _ = net
    dev = front.device
    assert dev.disabled_queues == {0, 1, 2, 3}
    front.send(R.SET_VRING_ENABLE, VhostVringState(0, 1))
    front.send(R.SET_VRING_ENABLE, VhostVringState(1, 1))
    assert dev.disabled_queues == {2, 3}
    front.send(R.SET_VRING_ENABLE, VhostVringState(0, 0))
    assert dev.disabled_queues == {0, 2, 3}
