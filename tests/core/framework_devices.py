"""Test devices for the framework tests (importable by path: the two-process transport
builds them in the device process)."""

from __future__ import annotations

from typing import Any

from pyvirtio.core.device import HOLD
from pyvirtio.testing.echo import HeldEchoDevice
from pyvirtio.virtqueue.common import DescriptorChain


class TimerEchoDevice(HeldEchoDevice):
    """Holds each request and answers it from a timer ``delay`` seconds later."""

    def __init__(self, delay: float = 0.01, **kw: Any) -> None:
        super().__init__(**kw)
        self.delay = delay

    def handle_queue(self, index: int) -> None:
        vq = self.queues[index]
        if vq is None:
            return

        def hold(chain: DescriptorChain) -> int:
            self.events.call_later(self.delay, lambda: self._answer((vq, chain)))
            return HOLD

        self.run_queue(index, hold)


class FaultyDevice(HeldEchoDevice):
    """Raises (a device model bug) in the callback kind named by ``fail_in``:
    ``queue``, ``host_event`` (on the control command ``!``), ``config_write`` or
    ``timer`` (armed at activation)."""

    def __init__(self, fail_in: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.fail_in = fail_in

    def activate(self, features: int, queues: Any) -> None:
        super().activate(features, queues)
        if self.fail_in == "timer":
            self.events.call_later(0.01, self._boom)

    def _boom(self) -> None:
        raise RuntimeError(f"device model bug in {self.fail_in} (test)")

    def handle_queue(self, index: int) -> None:
        if self.fail_in == "queue":
            self._boom()
        super().handle_queue(index)

    def write_config(self, offset: int, data: bytes) -> None:
        if self.fail_in == "config_write":
            self._boom()
