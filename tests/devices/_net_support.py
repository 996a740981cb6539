"""Shared pieces of the network device tests: frames, a vnet-header fake back-end,
and device factories for :func:`pyvirtio.testing.open_driver` (this module stays
light: the two-process transport imports it in the device process)."""

from __future__ import annotations

import contextlib
import os
import struct
from collections import deque
from collections.abc import Sequence
from typing import Any

from pyvirtio.devices.net import NetDevice, SocketBackend, Switch

MAC = bytes.fromhex("525400123456")
PEER = bytes.fromhex("5254000abcde")
BCAST = b"\xff" * 6
ETH_P_IP = 0x0800

_HDR = struct.Struct("<BBHHHHH")


def eth(dst: bytes, src: bytes = PEER, payload: bytes = b"x" * 46, etype: int = ETH_P_IP) -> bytes:
    """An Ethernet frame ``dst``, ``src``, ``etype``, ``payload``."""
    return dst + src + etype.to_bytes(2, "big") + payload


def vlan_frame(vid: int, dst: bytes = MAC, payload: bytes = b"v" * 46) -> bytes:
    """An 802.1Q tagged frame for VLAN ``vid``."""
    return dst + PEER + b"\x81\x00" + vid.to_bytes(2, "big") + b"\x08\x00" + payload


def hdr(
    flags: int = 0,
    gso: int = 0,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
    num_buffers: int = 0,
) -> bytes:
    """A 12-byte virtio_net_hdr (VERSION_1 layout)."""
    return _HDR.pack(flags, gso, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


def unhdr(raw: bytes) -> tuple[int, ...]:
    """The fields of a 12-byte header."""
    return _HDR.unpack(raw[:12])


class FakeVnetBackend:
    """A :class:`~pyvirtio.devices.net.backend.NetBackend` that carries the 12-byte
    header like a TAP with IFF_VNET_HDR: the test pushes ``header + frame`` with
    :meth:`push` and reads what the device sent in :attr:`sent`."""

    vnet_hdr = True

    def __init__(self, channels: int = 1) -> None:
        self.channels = channels
        self._efd = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(channels)]
        self._rx: list[deque[bytes]] = [deque() for _ in range(channels)]
        self.sent: list[tuple[int, bytes]] = []
        self.offloads: list[int] = []
        self.active: list[int] = []
        self.closed = False

    def push(self, data: bytes, channel: int = 0) -> None:
        self._rx[channel].append(data)
        os.eventfd_write(self._efd[channel], 1)

    def fileno(self, channel: int) -> int:
        return self._efd[channel]

    def recv_into(self, channel: int, buf: memoryview) -> int | None:
        q = self._rx[channel]
        if not q:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._efd[channel])
            return None
        data = q.popleft()
        n = min(len(data), len(buf))
        buf[:n] = data[:n]
        return n

    def send(self, channel: int, parts: Sequence[bytes | bytearray | memoryview]) -> bool:
        self.sent.append((channel, b"".join(bytes(p) for p in parts)))
        return True

    def flush(self) -> bool:
        return True

    def set_offloads(self, tun_flags: int) -> None:
        self.offloads.append(tun_flags)

    def set_active_channels(self, n: int) -> None:
        self.active.append(n)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for fd in self._efd:
                os.close(fd)


#: Switches the in-process factories put their devices on, by name.
SWITCHES: dict[str, Switch] = {}


def switch_device(switch: str, mac: str, vu_config: bool = False, **kw: Any) -> NetDevice:
    """A NetDevice on a new port of ``SWITCHES[switch]`` (made if missing).

    ``vu_config``: serve the configuration space over vhost-user although the device
    has no control queue. QEMU's and DPDK's front-ends keep the configuration space
    of a ``ctrl_vq=False`` device themselves; pyvirtio's front-end has none of its
    own and asks the back-end (VHOST_USER_PROTOCOL_F_CONFIG)."""
    sw = SWITCHES.setdefault(switch, Switch())
    dev = NetDevice(sw.port(f"dev-{mac}"), mac=bytes.fromhex(mac), **kw)
    if vu_config:
        dev.config_over_vhost_user = True
    return dev


def dgram_device(local: str, remote: str, mac: str, **kw: Any) -> NetDevice:
    """A NetDevice on a datagram socket (for the two-process transport, whose device
    lives in another process: the test is the socket's peer)."""
    return NetDevice(SocketBackend.dgram(local, remote), mac=bytes.fromhex(mac), **kw)
