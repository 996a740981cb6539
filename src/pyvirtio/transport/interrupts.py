"""Driver-side interrupt plumbing shared by the PCI and MMIO driver transports.

- :class:`InterruptRouter`: one per :class:`~pyvirtio.transport.bus.Bus`, hands each
  interrupt (an MSI/MSI-X message or an INTx/GSI line raise) to the transport it
  belongs to;
- :func:`wait_notifications`: dispatch a bus's interrupts until something is
  pending or a timeout passes;
- :class:`InterruptBookkeeping`: what a transport keeps of the notifications it
  received (virtio-v1.2 §2.3 "Notifications": used buffer and configuration change
  notifications) until :meth:`~pyvirtio.core.driver.DriverTransport.poll_interrupts`
  reports them: the set-up queues, the pending events, the counters, the waiting.

How a transport learns what an interrupt means (MSI-X vector, ISR status byte,
InterruptStatus register) stays in the transport.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

from pyvirtio.core.driver import CONFIG_CHANGE
from pyvirtio.errors import ConfigurationError
from pyvirtio.transport.bus import Bus, Interrupt
from pyvirtio.transport.pci.spec import MSI_ADDRESS_BASE

__all__ = [
    "MSI_DATA_BASE",
    "InterruptBookkeeping",
    "InterruptRouter",
    "wait_notifications",
]

#: MSI data values handed out start here (x86 vectors below 0x30 are reserved).
MSI_DATA_BASE = 0x30


class InterruptRouter:
    """Hands the interrupts of one :class:`~pyvirtio.transport.bus.Bus` to the
    transports they belong to.

    MSI messages are matched on ``(address, data)`` (each transport allocates its own
    with :meth:`allocate_msi`); an INTx line may be shared, so every handler on the
    line runs (each reads its own ISR). One router exists per bus
    (:meth:`for_bus`).
    """

    _routers: ClassVar[weakref.WeakKeyDictionary[Any, InterruptRouter]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, bus: Bus) -> None:
        # a weak reference: the class-wide registry must not keep buses alive
        try:
            self._bus_ref: Callable[[], Bus | None] = weakref.ref(bus)
        except TypeError:
            self._bus_ref = lambda: bus
        self._msi: dict[tuple[int, int], Callable[[], None]] = {}
        self._intx: dict[int, list[Callable[[], None]]] = {}
        self._next = 0
        #: interrupts that matched no handler
        self.unclaimed = 0

    @property
    def bus(self) -> Bus:
        """The bus whose interrupts are routed."""
        bus = self._bus_ref()
        if bus is None:
            raise ConfigurationError("the bus of this interrupt router is gone")
        return bus

    @classmethod
    def for_bus(cls, bus: Bus) -> InterruptRouter:
        """The router of ``bus`` (created on first use)."""
        try:
            router = cls._routers.get(bus)
        except TypeError:  # not weak-referenceable: one router per call site
            return cls(bus)
        if router is None:
            router = cls(bus)
            cls._routers[bus] = router
        return router

    def allocate_msi(self, handler: Callable[[], None]) -> tuple[int, int]:
        """A fresh ``(address, data)`` MSI message whose arrival calls ``handler``.

        The address is a word of ``bus.msi_window`` when the bus has one (a qtest
        bus watches guest RAM there), else the x86 interrupt window 0xFEE00000.
        """
        window = getattr(self.bus, "msi_window", None)
        while True:
            k = self._next
            self._next += 1
            if window is not None:
                base, size = window
                if 4 * (k + 1) > size:
                    # wrap around, skipping words still in use
                    self._next = 0
                    if len(self._msi) >= size // 4:
                        raise ConfigurationError("the bus's MSI window is full")
                    continue
                key = (base + 4 * k, MSI_DATA_BASE + k)
            else:
                key = (MSI_ADDRESS_BASE, MSI_DATA_BASE + k)
            if key not in self._msi:
                self._msi[key] = handler
                return key

    def release_msi(self, key: tuple[int, int]) -> None:
        """Forget an MSI message from :meth:`allocate_msi`."""
        self._msi.pop(key, None)

    def add_intx(self, line: int, handler: Callable[[], None]) -> None:
        """Call ``handler`` whenever INTx/GSI ``line`` is raised."""
        self._intx.setdefault(line, []).append(handler)

    def remove_intx(self, line: int, handler: Callable[[], None]) -> None:
        """Undo :meth:`add_intx`."""
        handlers = self._intx.get(line, [])
        with contextlib.suppress(ValueError):
            handlers.remove(handler)

    def dispatch(self, timeout: float | None) -> int:
        """Wait up to ``timeout`` for interrupts on the bus; run their handlers.

        Returns how many interrupts arrived."""
        fired: list[Interrupt] = self.bus.wait_interrupts(timeout)
        for irq in fired:
            if irq.kind == "msi":
                handler = self._msi.get((irq.address, irq.data))
                if handler is None:
                    self.unclaimed += 1
                else:
                    handler()
            else:
                handlers = self._intx.get(irq.line)
                if not handlers:
                    self.unclaimed += 1
                for h in list(handlers or ()):
                    h()
        return len(fired)


def wait_notifications(
    router: InterruptRouter | None, pending: Callable[[], bool], timeout: float | None
) -> None:
    """Dispatch the bus's interrupts until ``pending()`` is true or ``timeout``
    seconds passed (None: no limit, 0: look once). Without a router (no interrupt
    source) this just sleeps out the timeout."""
    if pending():
        return
    if router is None:
        if timeout:
            time.sleep(timeout)
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        router.dispatch(remaining)
        if pending() or remaining == 0:
            return
        if deadline is not None and time.monotonic() >= deadline:
            return


class InterruptBookkeeping:
    """Notification bookkeeping of a driver transport (base class).

    ``_enabled`` holds the queues set up; an interrupt whose status says "a queue"
    without saying which (the PCI ISR status byte, MMIO InterruptStatus bit 0)
    concerns every one of them (:meth:`_status_events`). Events are reported
    (:meth:`_report`) into a pending set and counted in :attr:`interrupt_counts`;
    :meth:`_poll` waits for them and hands them out once.
    """

    def __init__(self) -> None:
        self._enabled: set[int] = set()
        self._fired: set[int] = set()
        #: notifications reported, per queue index / CONFIG_CHANGE (for tests, stats)
        self.interrupt_counts: dict[int, int] = {}
        #: interrupts that reached this transport (MSI-X messages, or line raises that
        #: found status bits set)
        self.interrupts = 0
        #: polls that ended because an interrupt came / because the time was up
        self.wakeups = 0
        self.timeouts = 0

    def _status_events(self, status: int, queue_bit: int, config_bit: int) -> set[int]:
        """What an interrupt status value reports: ``queue_bit`` set, every set-up
        queue; ``config_bit`` set, :data:`~pyvirtio.core.driver.CONFIG_CHANGE`."""
        events: set[int] = set()
        if status & queue_bit:
            events |= self._enabled
        if status & config_bit:
            events.add(CONFIG_CHANGE)
        return events

    def _report(self, events: set[int]) -> None:
        """Count ``events`` and keep them until the next poll."""
        for e in events:
            self.interrupt_counts[e] = self.interrupt_counts.get(e, 0) + 1
        self._fired |= events

    def _poll(
        self,
        router: InterruptRouter | None,
        timeout: float | None,
        *,
        last_look: Callable[[], None] | None = None,
    ) -> set[int]:
        """Dispatch ``router``'s interrupts until events are pending or ``timeout``
        passed; if none came and the wait was not just a look (``timeout`` 0), call
        ``last_look`` (if any) once; return and forget the pending events."""
        wait_notifications(router, lambda: bool(self._fired), timeout)
        if last_look is not None and router is not None and not self._fired and timeout != 0:
            last_look()
        fired, self._fired = self._fired, set()
        if fired:
            self.wakeups += 1
        elif timeout:
            self.timeouts += 1
        return fired
