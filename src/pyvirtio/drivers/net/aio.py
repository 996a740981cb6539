"""An asyncio interface to the network driver.

:class:`AsyncNetDriver` wraps an initialized :class:`~pyvirtio.drivers.net.driver.NetDriver`
and shares its machinery (receive buffers, transmit allocations, control commands,
the device checks). Notifications arrive through ``loop.add_reader`` on the
transport's ``interrupt_fds()``: each one services the queues (frames received,
transmitted frames freed, control commands completed, a configuration change
processed) and wakes the coroutines waiting. A transport that delivers interrupts
synchronously inside the kick (no fds) is serviced on a short timer instead.

Every wait has a deadline (:class:`~pyvirtio.drivers.net.driver.NetTimeoutError`);
while waiting, the queues are serviced and the device status is re-checked every
:data:`~pyvirtio.drivers.net.driver.POLL_SLICE` seconds, so a missed interrupt or a
device that set DEVICE_NEEDS_RESET never hangs a coroutine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from pyvirtio.core.driver import DriverTransport
from pyvirtio.drivers.net.driver import (
    POLL_SLICE,
    NetDriver,
    NetTimeoutError,
    NetUnsupportedError,
)
from pyvirtio.errors import VirtioError
from pyvirtio.spec.net import (
    NetCtrlAnnounce,
    NetCtrlClass,
    NetCtrlMac,
    NetCtrlVlan,
    NetFeature,
    VirtioNetHdr,
)

__all__ = ["AsyncNetDriver"]

#: How often a transport without interrupt fds is serviced while a coroutine waits.
_NO_FD_SLICE = 0.005


class AsyncNetDriver:
    """Awaitable network I/O over a :class:`NetDriver` (bound to one event loop).

    Do not use the wrapped driver's blocking API at the same time.
    """

    def __init__(self, driver: NetDriver) -> None:
        if not driver.queues:
            raise ValueError("initialize() the NetDriver first")
        self.driver = driver
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: list[int] = []
        self._waiters: list[asyncio.Future[None]] = []
        #: an error found while servicing from the event loop, for the next waiter
        self._error: VirtioError | None = None

    @classmethod
    def create(cls, transport: DriverTransport, **kwargs: Any) -> AsyncNetDriver:
        """Make and initialize a :class:`NetDriver` on ``transport`` and wrap it."""
        drv = NetDriver(transport, **kwargs)
        drv.initialize()
        return cls(drv)

    # -- properties -------------------------------------------------------------------

    @property
    def mac(self) -> bytes:
        """The MAC address in use."""
        return self.driver.mac

    @property
    def link_up(self) -> bool:
        """VIRTIO_NET_S_LINK_UP as last read."""
        return self.driver.link_up

    @property
    def mtu(self) -> int | None:
        """The device's ``mtu``, or None."""
        return self.driver.mtu

    # -- event loop plumbing --------------------------------------------------------------

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return loop
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("AsyncNetDriver is bound to another event loop")
        self._loop = loop
        self._waiters = []
        self._fds = list(self.driver.transport.interrupt_fds())
        for fd in self._fds:
            loop.add_reader(fd, self._on_interrupt)
        return loop

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    def _on_interrupt(self) -> None:
        """A notification: take it (configuration change included), service."""
        try:
            self.driver.wait(0)
            self.driver.service()
        except VirtioError as e:
            self._error = e
        self._wake()

    async def _wait_until(self, cond: Callable[[], bool], timeout: float | None, what: str) -> None:
        loop = self._attach()
        drv = self.driver
        t = drv.timeout if timeout is None else timeout
        deadline = None if t is None else time.monotonic() + t
        slice_ = POLL_SLICE if self._fds else _NO_FD_SLICE
        while True:
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            if cond():
                return
            if drv._arm():
                drv.service()
                continue
            wait = slice_
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    drv.check_status()
                    raise NetTimeoutError(f"{what} within {t:g} s")
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, wait)
            except asyncio.TimeoutError:
                # a missed interrupt never hangs us: look for ourselves
                drv.wait(0)
                drv.service()
                drv.check_status()

    # -- frames ------------------------------------------------------------------------------

    async def send(
        self,
        frame: bytes | bytearray | memoryview,
        hdr: VirtioNetHdr | None = None,
        queue: int = 0,
        *,
        timeout: float | None = None,
    ) -> None:
        """Transmit ``frame`` on transmitq(queue + 1) (see :meth:`NetDriver.send`)."""
        await self._wait_until(
            lambda: self.driver.try_send(frame, hdr, queue), timeout, "no room to send"
        )

    async def recv_with_header(self, timeout: float | None = None) -> tuple[VirtioNetHdr, bytes]:
        """Wait for a frame from any receive queue in use; its header and data."""
        got: list[tuple[VirtioNetHdr, bytes]] = []

        def ready() -> bool:
            item = self.driver.try_recv()
            if item is not None:
                got.append(item)
            return bool(got)

        await self._wait_until(ready, timeout, "no frame was received")
        return got[0]

    async def recv(self, timeout: float | None = None) -> bytes:
        """Wait for a frame (Ethernet header onwards)."""
        return (await self.recv_with_header(timeout))[1]

    async def flush_tx(self, timeout: float | None = None) -> None:
        """Wait until the device has returned every transmitted frame."""
        await self._wait_until(lambda: not self.driver.tx_in_flight, timeout, "frames in flight")

    # -- control commands -----------------------------------------------------------------------

    async def control(
        self, class_: int, command: int, *data: bytes, timeout: float | None = None
    ) -> None:
        """Issue any control command and wait for its ``ack`` (see
        :meth:`NetDriver.control`)."""
        drv = self.driver
        self._attach()
        cmd = drv.control_start(class_, command, *data)
        t = drv.ctrl_timeout if timeout is None else timeout
        try:
            await self._wait_until(lambda: cmd.done, t, f"control command {class_}/{command}")
        except NetTimeoutError:
            if drv._ctrl_inflight.pop(cmd.addr, None) is not None:
                drv._orphans.append(cmd.addr)
            raise
        drv.control_result(cmd)

    async def set_rx_mode(self, **modes: bool | None) -> None:
        """VIRTIO_NET_CTRL_RX commands (see :meth:`NetDriver.set_rx_mode`)."""
        for c in self.driver.rx_mode_commands(**modes):
            await self.control(*c)

    async def set_mac_table(
        self, unicast: Sequence[bytes | str] = (), multicast: Sequence[bytes | str] = ()
    ) -> None:
        """VIRTIO_NET_CTRL_MAC_TABLE_SET (see :meth:`NetDriver.set_mac_table`)."""
        self.driver._need(NetFeature.CTRL_RX, "VIRTIO_NET_CTRL_MAC_TABLE_SET")
        uni, multi = self.driver.mac_table_data(unicast, multicast)
        await self.control(NetCtrlClass.MAC, NetCtrlMac.TABLE_SET, uni, multi)

    async def set_mac(self, addr: bytes | str) -> None:
        """Change the MAC address (see :meth:`NetDriver.set_mac`)."""
        drv = self.driver
        if drv.has_feature(NetFeature.CTRL_MAC_ADDR) and drv.has_feature(NetFeature.CTRL_RX):
            mac = drv.check_mac(addr)
            await self.control(NetCtrlClass.MAC, NetCtrlMac.ADDR_SET, mac)
            drv.mac_set_done(mac)
        else:
            drv.set_mac(addr)  # configuration space write (legacy), no waiting

    async def vlan_add(self, vid: int) -> None:
        """VIRTIO_NET_CTRL_VLAN_ADD."""
        await self.control(*self.driver.vlan_command(NetCtrlVlan.ADD, vid))

    async def vlan_del(self, vid: int) -> None:
        """VIRTIO_NET_CTRL_VLAN_DEL."""
        await self.control(*self.driver.vlan_command(NetCtrlVlan.DEL, vid))

    async def announce_ack(self) -> None:
        """VIRTIO_NET_CTRL_ANNOUNCE_ACK (see :meth:`NetDriver.announce_ack`)."""
        if not self.driver.has_feature(NetFeature.GUEST_ANNOUNCE):
            raise NetUnsupportedError("VIRTIO_NET_F_GUEST_ANNOUNCE was not negotiated")
        await self.control(NetCtrlClass.ANNOUNCE, NetCtrlAnnounce.ACK)
        self.driver._read_status()

    async def set_queue_pairs(self, n: int) -> None:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (see :meth:`NetDriver.set_queue_pairs`)."""
        await self.control(*self.driver.queue_pairs_command(n))
        self.driver.queue_pairs = n

    async def set_guest_offloads(self, offloads: int) -> None:
        """VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET."""
        await self.control(*self.driver.guest_offloads_command(offloads))

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop watching interrupts and close the driver (resets the device)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            for fd in self._fds:
                loop.remove_reader(fd)
        self._fds = []
        self.driver.close()
        self._wake()

    async def __aenter__(self) -> AsyncNetDriver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
