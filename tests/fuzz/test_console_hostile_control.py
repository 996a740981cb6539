"""The console device fed random control messages and transmit/receive chains.

Property: whatever a driver puts on the control transmitq (any length, any id,
event and value, any order, cut into any descriptors), the device never raises and
never sets DEVICE_NEEDS_RESET for device-readable buffers there; every control
message it sends the driver is a well-formed ``virtio_console_control`` for a port
it has (DEVICE_ADD never for a port already added nor for one >= max_nr_ports,
DEVICE_REMOVE never for one not added); and a buffer in the wrong direction on a
data queue ends in DEVICE_NEEDS_RESET, never in an exception.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtio.devices.console import ConsoleDevice, ConsolePort
from pyvirtio.spec.console import (
    CONTROL_TRANSMITQ,
    VIRTIO_CONSOLE_CONTROL,
    ConsoleEvent,
    ConsoleFeature,
    receiveq,
    transmitq,
)
from pyvirtio.testing import DeviceHarness
from tests.devices._console_support import Control, FakeBackend

E = ConsoleEvent
MAX = 3

message = st.one_of(
    st.binary(max_size=20),
    st.tuples(
        st.sampled_from([0, 1, 2, 5, MAX, 0xFFFFFFFF]),
        st.one_of(st.sampled_from(list(E)), st.integers(0, 0xFFFF)),
        st.sampled_from([0, 1, 2, 0xFFFF]),
    ).map(lambda t: VIRTIO_CONSOLE_CONTROL.pack_values(*t)),
)
cuts = st.integers(0, 3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(st.tuples(message, cuts), max_size=25), packed=st.booleans())
def test_random_control_messages_never_crash(msgs: list[tuple[bytes, int]], packed: bool) -> None:
    dev = ConsoleDevice(
        [ConsolePort(FakeBackend(), console=True), ConsolePort(FakeBackend(), name="n")],
        max_nr_ports=MAX,
    )
    with DeviceHarness(dev, packed=packed, features=ConsoleFeature.MULTIPORT.mask) as h:
        ctl = Control(h, buffers=12)
        added: set[int] = set()
        for data, cut in msgs:
            parts = [data[:cut], data[cut:]] if 0 < cut < len(data) else [data or b"\0"]
            h.add(CONTROL_TRANSMITQ, parts, [])
            h.kick(CONTROL_TRANSMITQ)
            h.used(CONTROL_TRANSMITQ)
            for pid, event, _value, _extra in ctl.received():
                assert pid < MAX
                if event == E.DEVICE_ADD:
                    assert pid not in added
                    added.add(pid)
                elif event == E.DEVICE_REMOVE:
                    assert pid in added
                    added.discard(pid)
                else:
                    assert pid in added
        assert not h.needs_reset


@settings(max_examples=60, deadline=None)
@given(
    queue=st.sampled_from([receiveq(0), transmitq(0), receiveq(1), transmitq(1)]),
    readable=st.lists(st.binary(min_size=1, max_size=8), max_size=2),
    writable=st.lists(st.integers(1, 16), max_size=2),
)
def test_wrong_direction_buffers_end_in_needs_reset(
    queue: int, readable: list[bytes], writable: list[int]
) -> None:
    dev = ConsoleDevice([ConsolePort(FakeBackend()), ConsolePort(FakeBackend())], max_nr_ports=2)
    with DeviceHarness(dev, features=ConsoleFeature.MULTIPORT.mask) as h:
        if not readable and not writable:
            return
        h.add(queue, readable, writable)
        h.kick(queue)
        wrong = bool(writable) if queue & 1 else bool(readable)
        assert h.needs_reset == wrong
