"""DeviceState as a state machine under an arbitrary driver (virtio-v1.2 §2.1, §2.2,
§2.6, §3.1.1): any sequence of status writes, feature writes, queue register writes,
configuration accesses and notifications. Invariants after every step:

- nothing raises out of the register model;
- the status holds only bits the driver set (plus DEVICE_NEEDS_RESET), in the order of
  §3.1.1 (FEATURES_OK before DRIVER_OK; nothing after FAILED but a reset);
- FEATURES_OK is set only for offered features with VIRTIO_F_VERSION_1;
- the device is live (activated) exactly while DRIVER_OK is set, activated once per
  life, and forgets everything at a reset;
- the configuration generation never goes back.

The default run takes 60 examples; ``pytest -m long`` runs 1000.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pyvirtio.core.device_state import DeviceState
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature
from pyvirtio.spec.status import DeviceStatus as S
from pyvirtio.testing import EchoDevice
from pyvirtio.virtqueue import make_driver_queue
from pyvirtio.virtqueue.common import QueueAddresses

DRIVER_BITS = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK | S.FAILED


class CountingEcho(EchoDevice):
    """Counts activations and resets."""

    def __init__(self) -> None:
        super().__init__(num_queues=2, ring_reset=True)
        self.activations = 0
        self.resets = 0

    def activate(self, features: int, queues: object) -> None:
        assert not self.active, "activated twice in one life"
        self.activations += 1
        super().activate(features, queues)  # type: ignore[arg-type]

    def reset(self) -> None:
        self.resets += 1
        super().reset()


class DeviceStateMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mem = GuestMemory.create(1 << 20)
        self.alloc = GuestAllocator(0x1000, (1 << 20) - 0x1000)
        self.device = CountingEcho()
        self.state = DeviceState(self.device, self.mem, on_used=lambda i: None)
        self.generation = 0
        self.driver_queues: list[object] = []

    # -- what a driver can do -----------------------------------------------------------

    @rule(value=st.integers(0, 255))
    def write_any_status(self, value: int) -> None:
        self.state.write_status(value)

    @rule(step=st.sampled_from([S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK]))
    def next_status_step(self, step: int) -> None:
        self.state.write_status(self.state.read_status() & DRIVER_BITS | step)

    @rule()
    def reset(self) -> None:
        self.state.write_status(0)
        assert self.state.read_status() == 0
        assert not self.device.active and self.device.features == 0
        assert all(q is None for q in self.device.queues)

    @rule(features=st.integers(0, (1 << 64) - 1), offered_only=st.booleans())
    def write_features(self, features: int, offered_only: bool) -> None:
        if offered_only:
            features &= self.state.device_features
        self.state.write_driver_features(features)

    @rule(index=st.integers(0, 2), size=st.sampled_from([0, 1, 3, 8, 256, 1 << 16]))
    def set_queue_size(self, index: int, size: int) -> None:
        self.state.set_queue_size(index, size)

    @rule(index=st.integers(0, 2), real=st.booleans(), addr=st.integers(0, (1 << 64) - 1))
    def place_queue(self, index: int, real: bool, addr: int) -> None:
        if real:
            q = make_driver_queue(self.mem, self.alloc, 8, Feature.VERSION_1.mask)
            self.driver_queues.append(q)
            self.state.set_queue_size(index, 8)
            self.state.set_queue_addresses(index, q.addrs)  # type: ignore[attr-defined]
        else:
            self.state.set_queue_addresses(index, QueueAddresses(addr, addr, addr))

    @rule(index=st.integers(0, 2))
    def enable_queue(self, index: int) -> None:
        self.state.enable_queue(index)

    @rule(index=st.integers(0, 2))
    def reset_queue(self, index: int) -> None:
        self.state.reset_queue(index)

    @rule(index=st.integers(-1, 3), data=st.integers(0, 0xFFFF))
    def notify(self, index: int, data: int) -> None:
        self.state.notify(index, data & 0x7FFF, data >> 15)

    @rule(offset=st.integers(-4, 40), size=st.integers(0, 16))
    def read_config(self, offset: int, size: int) -> None:
        data = self.state.read_config(offset, size)
        assert len(data) == size

    @rule(offset=st.integers(-4, 40), data=st.binary(max_size=16))
    def write_config(self, offset: int, data: bytes) -> None:
        self.state.write_config(offset, data)

    @rule()
    def device_changes_config(self) -> None:
        self.device.bump()

    # -- what must always hold ----------------------------------------------------------

    @invariant()
    def status_is_sound(self) -> None:
        status = self.state.read_status()
        assert not status & ~(DRIVER_BITS | S.DEVICE_NEEDS_RESET)
        if status & S.DRIVER_OK and not status & S.FAILED:
            assert status & S.FEATURES_OK and status & S.DRIVER and status & S.ACKNOWLEDGE
        if status & S.FEATURES_OK:
            f = self.state.negotiated_features
            assert f & Feature.VERSION_1.mask and not f & ~self.state.device_features

    @invariant()
    def live_exactly_while_driver_ok(self) -> None:
        status = self.state.read_status()
        if not status & S.DRIVER_OK:
            assert not self.device.active
        assert self.device.activations <= self.device.resets + 1

    @invariant()
    def generation_is_monotonic(self) -> None:
        g = self.state.config_generation
        assert g >= self.generation
        self.generation = g

    def teardown(self) -> None:
        self.state.close()
        self.mem.close()


TestDeviceState = DeviceStateMachine.TestCase
TestDeviceState.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.long
def test_device_state_machine_long_run() -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        DeviceStateMachine,
        settings=settings(
            max_examples=1000,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
