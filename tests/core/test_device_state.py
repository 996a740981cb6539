"""DeviceState: status state machine, feature negotiation, configuration space and
generation, queue registers, notifications (virtio-v1.2 §2.1-§2.6, §3.1)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.core.device_state import MAX_CONFIG_ACCESS, DeviceState
from pyvirtio.errors import DriverError, QueueBrokenError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature
from pyvirtio.spec.status import DeviceStatus as S
from pyvirtio.virtqueue import make_driver_queue
from pyvirtio.virtqueue.common import DriverVirtqueue, QueueAddresses
from tests.transport.echo import ECHO_F_UPPER, EchoDevice

V1 = Feature.VERSION_1.mask
INIT = S.ACKNOWLEDGE | S.DRIVER


class Harness:
    """A DeviceState over real guest RAM, recording the notifications it sends."""

    def __init__(self, device: EchoDevice | None = None, *, legacy: bool = False) -> None:
        self.device = device or EchoDevice()
        self.mem = GuestMemory.create(1 << 20)
        self.alloc = GuestAllocator(4096, (1 << 20) - 4096)
        self.used: list[int] = []
        self.configs = 0
        self.state = DeviceState(
            self.device,
            self.mem,
            legacy=legacy,
            on_used=self.used.append,
            on_config=self._on_config,
        )
        self.handled: list[int] = []
        orig = self.device.handle_queue

        def spy(index: int) -> None:
            self.handled.append(index)
            orig(index)

        self.device.handle_queue = spy  # type: ignore[method-assign]

    def _on_config(self) -> None:
        self.configs += 1

    def negotiate(self, features: int = V1) -> None:
        self.state.write_status(S.ACKNOWLEDGE)
        self.state.write_status(INIT)
        self.state.write_driver_features(features)
        self.state.write_status(INIT | S.FEATURES_OK)

    def driver_queue(self, size: int = 8, features: int = V1) -> DriverVirtqueue[Any]:
        return make_driver_queue(self.mem, self.alloc, size, features)

    def live(self, features: int = V1, size: int = 8) -> DriverVirtqueue[Any]:
        self.negotiate(features)
        q = self.driver_queue(size, features)
        self.state.setup_queue(0, size, q.addrs)
        self.state.write_status(INIT | S.FEATURES_OK | S.DRIVER_OK)
        return q

    def close(self) -> None:
        self.state.close()
        self.mem.close()


@pytest.fixture
def h() -> Any:
    harness = Harness()
    yield harness
    harness.close()


def echo_once(h: Harness, q: DriverVirtqueue[Any], data: bytes = b"ping") -> bytes:
    out = h.alloc.alloc(len(data))
    inb = h.alloc.alloc(len(data))
    h.mem.write(out, data)
    q.add([(out, len(data))], [(inb, len(data))], "tok")
    if q.kick_prepare():
        h.state.notify(0)
    got = q.get_used()
    assert got is not None
    return h.mem.read(inb, got[1])


# -- device status --------------------------------------------------------------


def test_status_steps_in_order_reach_driver_ok(h: Harness) -> None:
    assert h.state.status == 0
    q = h.live()
    assert h.state.status == INIT | S.FEATURES_OK | S.DRIVER_OK
    assert echo_once(h, q) == b"ping"
    assert h.used == [0]
    assert h.state.violation_count == 0


def test_driver_must_not_clear_a_status_bit(h: Harness) -> None:
    h.state.write_status(INIT)
    h.state.write_status(S.ACKNOWLEDGE)
    assert h.state.status == INIT
    assert "MUST NOT clear" in str(h.state.violations[-1])
    assert h.state.violations[-1].clause is not None


def test_driver_must_follow_the_initialization_sequence(h: Harness) -> None:
    h.state.write_status(S.ACKNOWLEDGE)
    h.state.write_status(S.ACKNOWLEDGE | S.DRIVER_OK)  # skips DRIVER and FEATURES_OK
    assert h.state.status == S.ACKNOWLEDGE
    h.state.write_status(S.ACKNOWLEDGE | S.FEATURES_OK)  # skips DRIVER
    assert h.state.status == S.ACKNOWLEDGE
    assert h.state.violation_count == 2
    assert "§3.1.1" in str(h.state.violations[-1].clause)


def test_several_steps_in_one_write_are_accepted(h: Harness) -> None:
    h.state.write_driver_features(V1)
    h.state.write_status(INIT | S.FEATURES_OK)
    assert h.state.status == INIT | S.FEATURES_OK


def test_device_refuses_features_ok_when_features_not_a_subset(h: Harness) -> None:
    h.negotiate(V1 | 1 << 45)  # bit 45: reserved for future extensions
    assert not h.state.status & S.FEATURES_OK  # the driver's re-read sees it
    assert h.state.status == INIT
    assert h.state.negotiated_features == 0
    assert "not offered" in str(h.state.violations[-1])


def test_device_refuses_features_ok_for_reserved_bit_30(h: Harness) -> None:
    h.negotiate(V1 | Feature.UNUSED.mask)
    assert not h.state.status & S.FEATURES_OK


def test_device_refuses_features_ok_without_version_1(h: Harness) -> None:
    h.negotiate(Feature.INDIRECT_DESC.mask)
    assert not h.state.status & S.FEATURES_OK
    assert "VERSION_1" in str(h.state.violations[-1])


def test_device_refuses_features_ok_when_validate_features_refuses(h: Harness) -> None:
    h.device.refuse_features = 1 << ECHO_F_UPPER
    h.negotiate(V1 | 1 << ECHO_F_UPPER)
    assert not h.state.status & S.FEATURES_OK
    assert h.state.violation_count == 0  # a refusal, not a driver violation


def test_features_ok_refusal_blocks_driver_ok_in_the_same_write(h: Harness) -> None:
    h.state.write_driver_features(1 << 45)
    h.state.write_status(INIT | S.FEATURES_OK | S.DRIVER_OK)
    assert h.state.status == INIT


def test_driver_must_not_accept_new_features_after_features_ok(h: Harness) -> None:
    h.negotiate(V1)
    h.state.write_driver_features(V1 | 1 << ECHO_F_UPPER)
    h.state.write_driver_features_word(0, 1 << ECHO_F_UPPER)
    assert h.state.driver_features == V1
    assert h.state.negotiated_features == V1
    assert h.state.violation_count == 2


def test_negotiated_features_reach_the_device(h: Harness) -> None:
    q = h.live(V1 | 1 << ECHO_F_UPPER)
    assert h.device.features == V1 | 1 << ECHO_F_UPPER
    assert echo_once(h, q, b"abc") == b"ABC"


def test_failed_is_sticky_until_reset(h: Harness) -> None:
    h.state.write_status(INIT)
    h.state.write_status(INIT | S.FAILED)
    assert h.state.status == INIT | S.FAILED
    h.state.write_driver_features(V1)
    h.state.write_status(INIT | S.FAILED | S.FEATURES_OK)
    assert h.state.status == INIT | S.FAILED
    assert "reset" in str(h.state.violations[-1])
    h.state.write_status(0)
    assert h.state.status == 0


def test_reset_forgets_features_and_queues_keeps_generation(h: Harness) -> None:
    q = h.live(V1 | 1 << ECHO_F_UPPER)
    vq = h.state.device_queue(0)
    assert vq is not None
    h.device.bump()
    gen = h.state.config_generation
    h.state.write_status(0)
    assert h.state.status == 0
    assert h.state.driver_features == 0
    assert h.state.negotiated_features == 0
    assert h.device.features == 0
    assert h.state.device_queue(0) is None
    assert not h.state.queue_enabled(0)
    assert h.state.queue_addresses(0) == QueueAddresses(0, 0, 0)
    assert vq.broken  # a late completion cannot touch the old ring
    assert h.state.config_generation >= gen
    # no notifications after reset (§2.4)
    h.device.bump()
    h.device.host.notify_used(0)  # type: ignore[union-attr]
    assert h.configs == 1 and h.used == []
    # and the device comes back
    q.close()
    q2 = h.live()
    assert echo_once(h, q2) == b"ping"


def test_status_write_with_needs_reset_bit_is_ignored_for_that_bit(h: Harness) -> None:
    h.state.write_status(S.ACKNOWLEDGE | S.DEVICE_NEEDS_RESET)
    assert h.state.status == S.ACKNOWLEDGE


# -- DEVICE_NEEDS_RESET -------------------------------------------------------------


def test_broken_ring_placement_sets_needs_reset_with_config_notification(h: Harness) -> None:
    h.negotiate()
    h.state.setup_queue(0, 8, QueueAddresses(1 << 40, 1 << 40, 1 << 40))  # outside RAM
    gen = h.state.config_generation
    h.state.write_status(INIT | S.FEATURES_OK | S.DRIVER_OK)
    assert h.state.status & S.DEVICE_NEEDS_RESET
    assert h.state.status & S.DRIVER_OK
    assert h.configs == 1
    assert h.state.config_generation == gen + 1
    assert isinstance(h.state.needs_reset_reason, Exception)
    h.state.notify(0)
    assert h.handled == []
    h.state.write_status(0)
    assert h.state.status == 0 and h.state.needs_reset_reason is None


def test_driver_violation_in_ring_sets_needs_reset(h: Harness) -> None:
    q = h.live()
    # publish an available entry naming a head past the queue size
    addrs = q.addrs
    h.mem.write_le16(addrs.driver + 4, 99)  # ring[0] = 99
    h.mem.write_le16(addrs.driver + 2, 1)  # idx = 1
    h.state.notify(0)
    assert h.handled == [0]
    assert h.state.status & S.DEVICE_NEEDS_RESET
    assert h.configs == 1
    h.state.notify(0)
    assert h.handled == [0]  # not dispatched any more


def test_needs_reset_before_driver_ok_sends_no_notification(h: Harness) -> None:
    h.state.write_status(INIT)
    h.state.needs_reset(DriverError("test"))
    assert h.state.status == INIT | S.DEVICE_NEEDS_RESET
    assert h.configs == 0


def test_needs_reset_is_ignored_while_reset(h: Harness) -> None:
    h.state.needs_reset(DriverError("test"))
    assert h.state.status == 0


# -- feature windows, legacy ------------------------------------------------------


def test_feature_select_windows(h: Harness) -> None:
    offered = h.state.device_features
    assert offered & V1
    assert h.state.read_device_features_word(0) == offered & 0xFFFFFFFF
    assert h.state.read_device_features_word(1) == offered >> 32 & 0xFFFFFFFF
    assert h.state.read_device_features_word(2) == 0
    assert h.state.read_device_features_word(99) == 0
    h.state.write_driver_features_word(1, 1)  # bit 32 = VERSION_1
    h.state.write_driver_features_word(0, 1 << ECHO_F_UPPER)
    assert h.state.driver_features == V1 | 1 << ECHO_F_UPPER
    assert h.state.read_driver_features_word(1) == 1
    h.state.write_driver_features_word(7, 1)
    assert h.state.driver_features == V1 | 1 << ECHO_F_UPPER
    h.state.write_status(INIT | S.FEATURES_OK)
    assert h.state.status & S.FEATURES_OK


def test_legacy_interface_has_32_feature_bits_and_no_features_ok() -> None:
    h = Harness(legacy=True)
    try:
        assert h.state.device_features >> 32 == 0
        assert not h.state.device_features & V1
        h.state.write_status(INIT)
        h.state.write_driver_features(V1 | 1 << ECHO_F_UPPER)
        assert h.state.driver_features == 1 << ECHO_F_UPPER
        h.state.write_status(INIT | S.FEATURES_OK)
        assert h.state.status == INIT
        # the legacy device may be used before DRIVER_OK (§3.1.2)
        q = make_driver_queue(h.mem, h.alloc, 8, 0, legacy_align=4096)
        h.state.set_queue_addresses(0, q.addrs)
        h.state.enable_queue(0)
        assert echo_once(h, q, b"old") == b"OLD"
        assert h.state.negotiated_features == 1 << ECHO_F_UPPER
        h.state.write_status(INIT | S.DRIVER_OK)
        assert echo_once(h, q, b"x") == b"X"
        h.state.write_driver_features(0)  # too late: the device is live
        assert h.state.driver_features == 1 << ECHO_F_UPPER
    finally:
        h.close()


# -- configuration space -------------------------------------------------------------


def test_config_read_past_the_end_reads_zeros(h: Harness) -> None:
    size = h.state.config_size()
    assert size == 12
    data = h.state.read_config(8, 8)
    assert data == (1).to_bytes(4, "little") + bytes(4)
    assert h.state.violation_count == 1
    assert h.state.read_config(-4, 4) == bytes(4)
    assert len(h.state.read_config(0, 1 << 30)) == MAX_CONFIG_ACCESS


def test_driver_must_not_write_config_before_features_ok(h: Harness) -> None:
    writes: list[tuple[int, bytes]] = []
    h.device.write_config = lambda off, data: writes.append((off, data))  # type: ignore[method-assign]
    h.state.write_status(INIT)
    h.state.write_config(0, b"\x01")
    assert writes == []
    h.negotiate()
    h.state.write_config(0, b"\x01")
    h.state.write_config(11, b"\x01\x02")  # does not fit
    assert writes == [(0, b"\x01")]


def test_config_generation_changes_once_per_change_between_reads(h: Harness) -> None:
    g0 = h.state.config_generation
    h.device.bump()
    h.device.bump()  # no read in between: one visible change is enough
    g1 = h.state.config_generation
    assert g1 == g0 + 1
    h.state.read_config(0, 8)
    h.device.bump()
    assert h.state.config_generation == g1 + 1
    assert h.configs == 0  # before DRIVER_OK: generation only


def test_config_change_notification_after_driver_ok(h: Harness) -> None:
    h.live()
    g = h.state.config_generation
    h.device.bump()
    assert h.configs == 1
    assert h.state.config_generation == g + 1
    assert h.state.read_config(0, 8) == (1).to_bytes(8, "little")


# -- queue registers ------------------------------------------------------------------


def test_queue_max_size_is_a_power_of_two_for_split() -> None:
    h = Harness(EchoDevice(num_queues=2, queue_max_size=100))
    try:
        assert h.state.num_queues == 2
        assert h.state.queue_max_size(0) == 64
        assert h.state.queue_size(1) == 64
        assert h.state.queue_max_size(2) == 0
        h.negotiate(V1 | Feature.RING_PACKED.mask)
        assert h.state.queue_max_size(0) == 100
    finally:
        h.close()


@pytest.mark.parametrize("size", [0, 3, 512])
def test_driver_must_write_a_valid_queue_size(h: Harness, size: int) -> None:
    h.negotiate()
    h.state.set_queue_size(0, size)
    assert h.state.queue_size(0) == size  # the register reads back
    assert h.state.violation_count == 1
    h.state.enable_queue(0)
    assert not h.state.queue_enabled(0)
    h.state.set_queue_size(0, 16)
    h.state.enable_queue(0)
    assert h.state.queue_enabled(0) and h.state.queue_size(0) == 16


def test_packed_queue_size_need_not_be_a_power_of_two(h: Harness) -> None:
    h.negotiate(V1 | Feature.RING_PACKED.mask)
    h.state.set_queue_size(0, 3)
    h.state.enable_queue(0)
    assert h.state.queue_enabled(0)
    assert h.state.violation_count == 0


def test_driver_must_configure_the_queue_before_enabling_it(h: Harness) -> None:
    h.negotiate()
    q = h.driver_queue(8)
    h.state.setup_queue(0, 8, q.addrs)
    h.state.set_queue_addresses(0, QueueAddresses(0, 0, 0))
    h.state.set_queue_size(0, 4)
    assert h.state.queue_addresses(0) == q.addrs
    assert h.state.queue_size(0) == 8
    assert h.state.violation_count == 2


def test_queue_enable_before_features_ok_is_refused(h: Harness) -> None:
    h.state.write_status(INIT)
    h.state.enable_queue(0)
    assert not h.state.queue_enabled(0)
    h.state.enable_queue(5)
    assert h.state.violation_count == 2


def test_notification_before_driver_ok_is_ignored(h: Harness) -> None:
    h.negotiate()
    h.state.notify(0)
    h.state.notify(7)
    assert h.handled == []
    assert h.state.violation_count == 2


def test_notification_before_driver_ok_is_served_at_driver_ok(h: Harness) -> None:
    """Linux's virtio_balloon kicks its statsq in probe, before DRIVER_OK: logged as a
    violation, the queue is served when the device goes live (not lost)."""
    h.negotiate()
    q = h.driver_queue()
    h.state.setup_queue(0, 8, q.addrs)
    h.state.notify(0)
    h.state.notify(0)
    assert h.handled == [] and h.state.violation_count == 2
    h.state.write_status(INIT | S.FEATURES_OK | S.DRIVER_OK)
    assert h.handled == [0]
    h.state.reset()
    h.negotiate()
    h.state.write_status(INIT | S.FEATURES_OK | S.DRIVER_OK)
    assert h.handled == [0]  # forgotten by the reset


def test_queue_reset_requires_ring_reset(h: Harness) -> None:
    h.live()
    h.state.reset_queue(0)
    assert h.state.queue_enabled(0)
    assert "RING_RESET" in str(h.state.violations[-1])


def test_queue_reset_and_re_enable() -> None:
    h = Harness(EchoDevice(ring_reset=True))
    try:
        f = V1 | Feature.RING_RESET.mask
        q = h.live(f)
        assert echo_once(h, q) == b"ping"
        old = h.state.device_queue(0)
        h.state.reset_queue(0)
        assert not h.state.queue_enabled(0)
        assert h.state.device_queue(0) is None
        assert old is not None and old.broken
        assert h.state.queue_addresses(0) == QueueAddresses(0, 0, 0)
        h.state.notify(0)  # nothing to run
        q.detach_unused()
        q.close()
        q2 = h.driver_queue(16, f)
        h.state.setup_queue(0, 16, q2.addrs)
        assert h.state.queue_enabled(0)
        vq = h.state.device_queue(0)
        assert vq is not None and vq.size == 16
        assert echo_once(h, q2, b"again") == b"again"
    finally:
        h.close()


def test_disable_queue_stops_access(h: Harness) -> None:
    q = h.live()
    h.state.disable_queue(0)
    assert not h.state.queue_enabled(0)
    data = h.alloc.alloc(4)
    q.add([(data, 4)], [], "t")
    q.kick_prepare()
    h.state.notify(0)
    assert q.get_used() is None


def test_used_notifications_only_when_live(h: Harness) -> None:
    h.negotiate()
    h.device.host.notify_used(0)  # type: ignore[union-attr]
    assert h.used == []


def test_device_cannot_be_attached_twice(h: Harness) -> None:
    from pyvirtio.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        DeviceState(h.device)


def test_reset_marks_in_flight_queue_broken(h: Harness) -> None:
    h.live()
    vq = h.state.device_queue(0)
    h.state.write_status(0)
    assert vq is not None
    with pytest.raises(QueueBrokenError):
        vq._check_not_broken()


# -- status state machine, property-based ----------------------------------------------

_BITS = [0, S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK, S.FAILED, 16, 32]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["status", "features", "needs_reset"]),
            st.lists(st.sampled_from(_BITS), max_size=4),
            st.sampled_from([0, V1, V1 | 1 << 45, 1]),
        ),
        max_size=25,
    ),
    st.booleans(),
)
def test_status_invariants_hold_for_any_driver(ops: list[Any], legacy: bool) -> None:
    h = Harness(legacy=legacy)
    try:
        for kind, bits, feats in ops:
            before = h.state.status
            if kind == "status":
                value = 0
                for b in bits:
                    value |= int(b)
                if value and bits and bits[0] != 0:
                    value |= before & 0xFF  # a driver that keeps what it read
                h.state.write_status(value)
            elif kind == "features":
                h.state.write_driver_features(feats)
            else:
                h.state.needs_reset(DriverError("x"))
            st_ = h.state.status
            if st_ == 0:
                continue
            # bits are only added (except by a reset, which leaves 0)
            assert before & ~st_ == 0
            # prefix order
            order = (
                [S.ACKNOWLEDGE, S.DRIVER, S.DRIVER_OK]
                if legacy
                else [S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK]
            )
            seen_clear = False
            for bit in order:
                assert not (st_ & bit and seen_clear)
                seen_clear = seen_clear or not st_ & bit
            if legacy:
                assert not st_ & S.FEATURES_OK
            if st_ & S.FEATURES_OK:
                assert h.state.negotiated_features & ~h.state.device_features == 0
                assert h.state.negotiated_features & V1
            assert not st_ & 48  # undefined bits never appear
    finally:
        h.close()
