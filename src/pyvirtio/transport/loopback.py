"""In-process loopback transport: a driver and a device sharing one guest RAM.

:class:`LoopbackTransport` implements
:class:`~pyvirtio.core.driver.DriverTransport` around a
:class:`~pyvirtio.core.device_state.DeviceState`. The driver's register accesses are
direct method calls; an available buffer notification runs the device synchronously
inside :meth:`LoopbackTransport.notify`; used buffer and configuration change
notifications are recorded and handed out by
:meth:`LoopbackTransport.poll_interrupts`. The device's host event sources
(descriptors and timers it declares, e.g. the completion eventfd of a block device's
I/O threads) are served by a :class:`~pyvirtio.transport._events.HostEventThread`;
the device's lock serializes it with the driver's calls.

This is how devices and drivers are tested without a VM::

    drv = connect(RngDriver, RngDevice())
    ...
    drv.close()
    drv.transport.close()
"""

from __future__ import annotations

import mmap
import threading
from typing import Any, TypeVar

from pyvirtio.core.device import VirtioDevice
from pyvirtio.core.device_state import DeviceState
from pyvirtio.core.driver import CONFIG_CHANGE, VirtioDriver
from pyvirtio.errors import ConfigurationError, DriverError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.transport._events import HostEventThread
from pyvirtio.virtqueue.common import QueueAddresses

__all__ = ["DEFAULT_MEM_SIZE", "LoopbackTransport", "connect"]

#: Guest RAM of a loopback transport unless told otherwise (16 MiB).
DEFAULT_MEM_SIZE = 16 << 20

D = TypeVar("D", bound=VirtioDriver)


class LoopbackTransport:
    """A :class:`~pyvirtio.core.driver.DriverTransport` to ``device`` in this process.

    Owns memfd-backed guest RAM of ``mem_size`` bytes at guest-physical 0 and an
    allocator over it that never hands out the first page (so a zero address in a
    ring is always a bug). ``legacy`` drives the device through the legacy interface.

    :meth:`setup_queue` raises :class:`~pyvirtio.errors.DriverError` if the device
    refused the queue (the driver broke a rule); other register misuse is answered
    by the device as the spec says and logged in ``state.violations``.
    """

    def __init__(
        self, device: VirtioDevice, mem_size: int = DEFAULT_MEM_SIZE, *, legacy: bool = False
    ) -> None:
        page = mmap.PAGESIZE
        if mem_size < 2 * page or mem_size % page:
            raise ConfigurationError(
                f"loopback guest RAM must be a multiple of {page} bytes, at least {2 * page}"
            )
        self.legacy = legacy
        self.mem = GuestMemory.create(mem_size, name="pyvirtio-loopback")
        self.allocator = GuestAllocator(page, mem_size - page)
        self._cond = threading.Condition()
        self._pending: set[int] = set()
        #: used buffer notifications delivered so far, per queue (for tests and stats)
        self.interrupt_counts: dict[int, int] = {}
        try:
            self.state = DeviceState(
                device,
                self.mem,
                legacy=legacy,
                on_used=self._interrupt,
                on_config=self._config_interrupt,
            )
        except BaseException:
            self.mem.close()
            raise
        self._events = HostEventThread(device, name="pyvirtio-loopback-events")
        self._closed = False

    # -- interrupts ---------------------------------------------------------------

    def _interrupt(self, index: int) -> None:
        with self._cond:
            self._pending.add(index)
            self.interrupt_counts[index] = self.interrupt_counts.get(index, 0) + 1
            self._cond.notify_all()

    def _config_interrupt(self) -> None:
        self._interrupt(CONFIG_CHANGE)

    def poll_interrupts(self, timeout: float | None) -> set[int]:
        """Return the notifications recorded since the last call (queue indexes and
        :data:`~pyvirtio.core.driver.CONFIG_CHANGE`), waiting up to ``timeout``
        seconds for one if there are none (``None``: until one arrives)."""
        with self._cond:
            if not self._pending and timeout != 0:
                self._cond.wait_for(lambda: bool(self._pending), timeout)
            fired = self._pending
            self._pending = set()
        return fired

    def interrupt_fds(self) -> list[int]:
        """None: notifications are delivered synchronously (see :meth:`poll_interrupts`)."""
        return []

    # -- DriverTransport ------------------------------------------------------------

    def device_id(self) -> int:
        """The device type of the device served."""
        return int(self.state.device.device_id)

    def reset(self) -> None:
        """Reset the device (done when this returns) and drop pending notifications."""
        self.state.write_status(0)
        with self._cond:
            self._pending.clear()

    def get_status(self) -> int:
        """Read the device status field."""
        return self.state.read_status()

    def set_status(self, status: int) -> None:
        """Write the device status field."""
        self.state.write_status(status)

    def get_device_features(self) -> int:
        """Every feature bit the device offers."""
        return self.state.device_features

    def set_driver_features(self, features: int) -> None:
        """Write the feature bits the driver accepts."""
        self.state.write_driver_features(features)

    def config_generation(self) -> int:
        """The configuration generation counter."""
        return self.state.config_generation

    def read_config(self, offset: int, size: int) -> bytes:
        """Read device configuration space (past the end reads as zeros)."""
        return self.state.read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        """Write device configuration space."""
        self.state.write_config(offset, data)

    def num_queues(self) -> int:
        """How many virtqueues the device has."""
        return self.state.num_queues

    def queue_max_size(self, index: int) -> int:
        """The largest size queue ``index`` accepts (0: no such queue)."""
        return self.state.queue_max_size(index)

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        """Set size and addresses of queue ``index`` and enable it.

        Raises :class:`~pyvirtio.errors.DriverError` if the device did not enable it.
        """
        before = self.state.violation_count
        self.state.setup_queue(index, size, addrs)
        if not self.state.queue_enabled(index):
            if self.state.violation_count > before:
                raise self.state.violations[-1]
            raise DriverError(f"the device did not enable queue {index}")

    def reset_queue(self, index: int) -> None:
        """Reset queue ``index`` alone (virtio-v1.2 §2.6.1 "Virtqueue Reset").

        Raises :class:`~pyvirtio.errors.DriverError` if VIRTIO_F_RING_RESET was not
        negotiated (or the queue does not exist). Not part of ``DriverTransport``.
        """
        before = self.state.violation_count
        self.state.reset_queue(index)
        if self.state.violation_count > before:
            raise self.state.violations[-1]

    def notify(self, index: int) -> None:
        """Available buffer notification: the device runs now, in this thread.

        Raises :class:`~pyvirtio.errors.DriverError` for a queue that is not set up.
        """
        if not self.state.queue_enabled(index):
            raise DriverError(f"notification for queue {index}, which is not set up")
        self.state.notify(index)

    def close(self) -> None:
        """Reset and detach the device, unmap guest RAM (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.state.close()
        finally:
            self._events.close()
            self.mem.close()


def connect(
    driver_cls: type[D],
    device: VirtioDevice,
    *,
    mem_size: int = DEFAULT_MEM_SIZE,
    legacy: bool = False,
    **driver_kw: Any,
) -> D:
    """Build a :class:`LoopbackTransport` to ``device``, a ``driver_cls`` over it
    (``driver_cls(transport, **driver_kw)``) and run its initialization.

    The caller closes both: ``drv.close(); drv.transport.close()``.
    """
    transport = LoopbackTransport(device, mem_size, legacy=legacy)
    try:
        driver = driver_cls(transport, **driver_kw)
        driver.initialize()
    except BaseException:
        transport.close()
        raise
    return driver
