"""BalloonDevice by hand (DeviceHarness), one rule per test, negatives named after the
MUST or behaviour they check; BalloonDriver against it over every transport; the
memory give-back shown with the memfd's allocated blocks (virtio-v1.2 §5.5)."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtio.devices.balloon import (
    ALL_FEATURES,
    BalloonControl,
    BalloonDevice,
    balloon_command,
)
from pyvirtio.devices.balloon.entry import parse_features
from pyvirtio.drivers.balloon import BalloonDriver
from pyvirtio.errors import DriverError
from pyvirtio.spec.balloon import (
    BALLOON_CONFIG,
    BALLOON_STAT,
    PFN_SIZE,
    BalloonFeature,
    CmdId,
    StatTag,
    VirtioBalloonConfig,
)
from pyvirtio.testing import TRANSPORTS, DeviceHarness, open_driver

F = BalloonFeature
INFLATEQ, DEFLATEQ = 0, 1


def config(dev: BalloonDevice) -> VirtioBalloonConfig:
    return BALLOON_CONFIG.unpack(dev.config_bytes())


def pfn_array(*pfns: int) -> bytes:
    return struct.pack(f"<{len(pfns)}I", *pfns)


def stats_bytes(*entries: tuple[int, int]) -> bytes:
    return b"".join(BALLOON_STAT.pack_values(t, v) for t, v in entries)


@pytest.fixture
def harness() -> Iterator[tuple[BalloonDevice, DeviceHarness]]:
    dev = BalloonDevice(features=ALL_FEATURES)
    with DeviceHarness(dev, features=ALL_FEATURES) as h:
        yield dev, h
    dev.close()


def pages(h: DeviceHarness, n: int, fill: int = 0x5A) -> list[int]:
    """``n`` 4 KiB guest pages written with ``fill``."""
    out = []
    for _ in range(n):
        a = h.alloc.alloc(PFN_SIZE, PFN_SIZE)
        h.mem.fill(a, PFN_SIZE, fill)
        out.append(a)
    return out


# -- inflate / deflate ------------------------------------------------------------------


def test_inflate_gives_pages_back_to_the_host_memfd_blocks_drop() -> None:
    dev = BalloonDevice()
    with DeviceHarness(dev, features=F.MUST_TELL_HOST.mask, mem_size=8 << 20) as h:
        addrs = pages(h, 256)
        fd = h.mem.regions[0].fd
        before = os.fstat(fd).st_blocks
        h.add(INFLATEQ, [pfn_array(*(a // PFN_SIZE for a in addrs))], [], token="inf")
        h.kick(INFLATEQ)
        assert h.used(INFLATEQ) == [("inf", 0)]
        after = os.fstat(fd).st_blocks
        # 256 pages = 1 MiB given back (st_blocks counts 512-byte blocks)
        assert (before - after) * 512 >= 256 * PFN_SIZE
        assert dev.inflated_pages == 256
        assert dev.counters.discarded_bytes == 256 * PFN_SIZE
        assert dev.ram_allocated() == h.mem.allocated_bytes() == after * 512
        assert h.mem.read(addrs[0], 16) == bytes(16)  # a punched page reads zeros
        # deflate: acknowledged, the balloon is empty; the guest may touch the pages
        h.add(DEFLATEQ, [pfn_array(*(a // PFN_SIZE for a in addrs))], [], token="def")
        h.kick(DEFLATEQ)
        assert h.used(DEFLATEQ) == [("def", 0)]
        assert dev.inflated_pages == 0
        assert not h.needs_reset


def test_inflate_without_discard_only_counts() -> None:
    dev = BalloonDevice(discard=False)
    with DeviceHarness(dev) as h:
        (a,) = pages(h, 1)
        h.add(INFLATEQ, [pfn_array(a // PFN_SIZE)], [])
        h.kick(INFLATEQ)
        assert dev.inflated == {a // PFN_SIZE}
        assert h.mem.read(a, 4) == b"\x5a" * 4
        assert dev.counters.discarded_bytes == 0


def test_pfn_outside_guest_ram_is_skipped_and_counted_never_fatal(harness) -> None:
    dev, h = harness
    (a,) = pages(h, 1)
    outside = (h.mem.size // PFN_SIZE) + 10
    h.add(INFLATEQ, [pfn_array(outside, a // PFN_SIZE, 0xFFFF_FFFF)], [], token="t")
    h.kick(INFLATEQ)
    assert h.used(INFLATEQ) == [("t", 0)]
    assert dev.counters.pfn_outside_ram == 2
    assert dev.inflated == {a // PFN_SIZE}
    assert not h.needs_reset


def test_deflate_of_a_page_not_in_the_balloon_is_counted(harness) -> None:
    dev, h = harness
    h.add(DEFLATEQ, [pfn_array(5)], [], token="d")
    h.kick(DEFLATEQ)
    assert h.used(DEFLATEQ) == [("d", 0)]
    assert dev.counters.deflate_not_inflated == 1
    assert not h.needs_reset


def test_pfn_array_split_over_descriptors_and_ragged_tail(harness) -> None:
    dev, h = harness
    data = pfn_array(3, 4, 5) + b"\x01\x02"
    h.add(INFLATEQ, [data[:5], data[5:]], [], token="t")
    h.kick(INFLATEQ)
    assert h.used(INFLATEQ) == [("t", 0)]
    assert dev.inflated == {3, 4, 5}
    assert dev.counters.ragged_bytes == 2


# -- configuration ------------------------------------------------------------------------


def test_set_target_changes_num_pages_with_a_config_change_notification(harness) -> None:
    dev, h = harness
    before = h.host.config
    dev.set_target(1234)
    assert config(dev).num_pages == 1234
    assert h.host.config == before + 1


def test_driver_writes_actual_and_num_pages_is_read_only_for_it(harness) -> None:
    dev, _h = harness
    dev.set_target(10)
    dev.write_config(0, struct.pack("<II", 99, 7))  # num_pages and actual
    assert (config(dev).num_pages, dev.actual) == (10, 7)
    dev.write_config(BALLOON_CONFIG.offset_of("free_page_hint_cmd_id"), b"\x09\0\0\0")
    assert config(dev).free_page_hint_cmd_id == CmdId.STOP


def test_poison_val_is_written_by_the_driver_with_page_poison(harness) -> None:
    dev, _ = harness
    dev.write_config(BALLOON_CONFIG.offset_of("poison_val"), struct.pack("<I", 0xAA55AA55))
    assert config(dev).poison_val == dev.poison_val == 0xAA55AA55


def test_poison_val_ignored_without_page_poison() -> None:
    dev = BalloonDevice()
    with DeviceHarness(dev, features=F.STATS_VQ.mask):
        dev.write_config(BALLOON_CONFIG.offset_of("poison_val"), b"\x11\x11\x11\x11")
        assert dev.poison_val == 0


# -- queue numbering (§5.5.2) --------------------------------------------------------------


def test_reporting_vq_is_queue_2_without_stats_and_hinting() -> None:
    dev = BalloonDevice()
    with DeviceHarness(dev, features=F.PAGE_REPORTING.mask) as h:
        a = h.alloc.alloc(4 * PFN_SIZE, PFN_SIZE)
        h.add(2, [], [(a, 4 * PFN_SIZE)], token="r")
        h.kick(2)
        assert h.used(2) == [("r", 0)]
        assert dev.counters.reported_bytes == 4 * PFN_SIZE
        h.kick(3)  # no queue 3 with these features
        assert dev.metrics.errors.get("bad_queue") == 1


# -- statistics (§5.5.6.3) -------------------------------------------------------------------


def test_stats_buffer_is_held_and_returned_to_ask_for_a_report(harness) -> None:
    dev, h = harness
    h.add(2, [stats_bytes((StatTag.MEMFREE, 1 << 20), (StatTag.MEMTOT, 4 << 20))], [], "s")
    h.kick(2)
    assert h.used(2) == []  # "The device pops the buffer (retaining it ...)"
    assert dev.stats == {StatTag.MEMFREE: 1 << 20, StatTag.MEMTOT: 4 << 20}
    assert dev.request_stats()
    assert h.used(2) == [("s", 0)]
    assert not dev.request_stats()  # nothing held until the driver answers


def test_unknown_stat_tags_are_ignored_and_any_order_accepted(harness) -> None:
    dev, h = harness
    h.add(2, [stats_bytes((StatTag.CACHES, 5), (999, 1), (StatTag.SWAP_IN, 3))], [])
    h.kick(2)
    assert dev.stats == {StatTag.CACHES: 5, StatTag.SWAP_IN: 3}
    assert dev.counters.unknown_stat_tags == 1


def test_stats_timer_asks_again_after_the_interval() -> None:
    dev = BalloonDevice(stats_interval=0.05)
    with DeviceHarness(dev, features=F.STATS_VQ.mask) as h:
        h.add(2, [stats_bytes((StatTag.MEMFREE, 1))], [], "s")
        h.kick(2)
        assert h.used(2) == []
        h.poll(1.0)
        assert h.used(2) == [("s", 0)]


def test_more_than_one_stats_buffer_breaks_the_driver_must_at_most_one(harness) -> None:
    _, h = harness
    h.add(2, [stats_bytes((StatTag.MEMFREE, 1))], [])
    h.add(2, [stats_bytes((StatTag.MEMFREE, 2))], [])
    h.kick(2)
    assert h.needs_reset
    assert "at most one buffer" in str(h.host.resets[0])


def test_stats_buffer_must_be_an_output_buffer(harness) -> None:
    _, h = harness
    h.add(2, [], [60])
    h.kick(2)
    assert h.needs_reset
    assert isinstance(h.host.resets[0], DriverError)


# -- free page hinting (§5.5.6.4) -----------------------------------------------------------


def test_free_page_hinting_round(harness) -> None:
    dev, h = harness
    notified = h.host.config
    cmd = dev.start_hinting()
    assert cmd >= 2 and config(dev).free_page_hint_cmd_id == cmd
    assert h.host.config == notified + 1
    a = h.alloc.alloc(8 * PFN_SIZE, PFN_SIZE)
    h.add(3, [struct.pack("<I", cmd)], [], "cmd")
    h.add(3, [], [(a, 8 * PFN_SIZE)], "hint")
    h.add(3, [struct.pack("<I", CmdId.STOP)], [], "stop")
    h.kick(3)
    assert [t for t, _ in h.used(3)] == ["cmd", "hint", "stop"]
    assert dev.hinted == [(a, 8 * PFN_SIZE)]
    dev.done_hinting()
    assert config(dev).free_page_hint_cmd_id == CmdId.DONE


def test_hints_under_a_stale_command_id_are_ignored(harness) -> None:
    dev, h = harness
    cmd = dev.start_hinting()
    a = h.alloc.alloc(PFN_SIZE, PFN_SIZE)
    h.add(3, [struct.pack("<I", cmd + 7)], [], "cmd")
    h.add(3, [], [(a, PFN_SIZE)], "hint")
    h.kick(3)
    assert len(h.used(3)) == 2
    assert dev.hinted == [] and dev.counters.stale_hints == 1


def test_command_id_not_reused_until_the_driver_sent_stop(harness) -> None:
    dev, h = harness
    first = dev.start_hinting()
    dev.stop_hinting()
    second = dev.start_hinting()  # no STOP from the driver yet
    assert second != first
    h.add(3, [struct.pack("<I", CmdId.STOP)], [])
    h.kick(3)
    assert dev.start_hinting() not in (second,)


def test_free_page_vq_output_buffer_must_be_4_bytes(harness) -> None:
    dev, h = harness
    dev.start_hinting()
    h.add(3, [b"\x02\0\0\0\0\0"], [])
    h.kick(3)
    assert h.needs_reset
    assert "4 bytes" in str(h.host.resets[0])


# -- free page reporting (§5.5.6.6) -----------------------------------------------------------


def test_reported_ranges_are_given_back_memfd_blocks_drop(harness) -> None:
    dev, h = harness
    a = h.alloc.alloc(64 * PFN_SIZE, PFN_SIZE)
    h.mem.fill(a, 64 * PFN_SIZE, 0x77)
    fd = h.mem.regions[0].fd
    before = os.fstat(fd).st_blocks
    h.add(4, [], [(a, 32 * PFN_SIZE), (a + 32 * PFN_SIZE, 32 * PFN_SIZE)], "r")
    h.kick(4)
    assert h.used(4) == [("r", 0)]
    assert (before - os.fstat(fd).st_blocks) * 512 >= 64 * PFN_SIZE
    assert dev.reported == [(a, 32 * PFN_SIZE), (a + 32 * PFN_SIZE, 32 * PFN_SIZE)]


def test_readable_part_of_a_report_is_left_alone(harness) -> None:
    """Reported pages are device-writable buffers (Linux: virtqueue_add_inbuf; QEMU
    reads only the in_sg): a readable part is the driver's, never punched (found by
    the balloon_requests fuzz target)."""
    dev, h = harness
    a = h.alloc.alloc(2 * PFN_SIZE, PFN_SIZE)
    h.mem.fill(a, 2 * PFN_SIZE, 0x77)
    h.add(4, [(a, PFN_SIZE)], [(a + PFN_SIZE, PFN_SIZE)], "r")
    h.kick(4)
    assert h.used(4) == [("r", 0)]
    assert h.mem.read(a, PFN_SIZE) == b"\x77" * PFN_SIZE
    assert h.mem.read(a + PFN_SIZE, 8) == bytes(8)  # the writable page was given back
    assert dev.reported == [(a + PFN_SIZE, PFN_SIZE)]
    assert dev.counters.extra["report_readable"] == 1


def test_reported_pages_keep_a_nonzero_poison_val(harness) -> None:
    dev, h = harness
    dev.write_config(BALLOON_CONFIG.offset_of("poison_val"), struct.pack("<I", 0xAAAAAAAA))
    a = h.alloc.alloc(PFN_SIZE, PFN_SIZE)
    h.mem.fill(a, PFN_SIZE, 0xAA)
    h.add(4, [], [(a, PFN_SIZE)], "r")
    h.kick(4)
    assert h.used(4) == [("r", 0)]
    assert h.mem.read(a, 8) == b"\xaa" * 8  # not punched: it would read zeros
    assert dev.counters.reports_kept_for_poison == 1


# -- host side: control socket, serve arguments -------------------------------------------------


def test_control_socket_sets_target_and_reports(harness) -> None:
    dev, h = harness
    path = os.path.join(tempfile.mkdtemp(prefix="pyvirtio-balloon-"), "ctl")
    ctl = BalloonControl(dev, path)
    try:
        import threading

        def serve_one() -> None:
            h.poll(5.0)

        t = threading.Thread(target=serve_one)
        t.start()
        reply = balloon_command(path, "target 16M")
        t.join()
        assert reply["num_pages"] == 4096 == dev.num_pages
        assert ctl.command("bogus")["error"]
        assert ctl.command("info")["num_pages"] == 4096
    finally:
        dev.close()
    assert not os.path.exists(path)


def test_parse_features_names() -> None:
    assert parse_features("STATS_VQ,VIRTIO_BALLOON_F_REPORTING") == (
        F.STATS_VQ.mask | F.PAGE_REPORTING.mask
    )


# -- the driver against the device over every transport ------------------------------------------

FACTORY = "pyvirtio.devices.balloon:BalloonDevice"


def _stats() -> dict[StatTag, int]:
    return {StatTag.MEMFREE: 12345, StatTag.MEMTOT: 16 << 20}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_driver_inflates_deflates_and_reports_stats(transport: str) -> None:
    kw = {"num_pages": 200, "stats_interval": 0.05}
    with open_driver(transport, FACTORY, BalloonDriver, factory_kwargs=kw, stats=_stats) as o:
        drv: BalloonDriver = o.driver
        assert drv.num_pages == 200
        assert drv.adjust() == 200
        assert drv.actual == 200 and len(drv.pages) == 200
        dev = o.device
        if dev is not None:
            assert isinstance(dev, BalloonDevice)
            assert dev.inflated_pages == 200 and dev.actual == 200
            assert dev.stats == _stats()
            dev.set_target(50)
            drv.serve(0.3)  # follows the config change, answers stats requests
            assert drv.actual == 50 == dev.actual and dev.inflated_pages == 50
            assert dev.counters.stats_reports >= 2
        else:
            assert drv.deflate(150) == 150 and drv.actual == 50
            assert drv.serve(0.3) >= 1
        a = drv.transport.allocator.alloc(4 * PFN_SIZE, PFN_SIZE)
        drv.report_free([(a, 4 * PFN_SIZE)])
        if dev is not None:
            assert dev.counters.reported_bytes == 4 * PFN_SIZE


@pytest.mark.parametrize("transport", ["loopback", "pci"])
def test_driver_hints_free_pages_and_writes_poison(transport: str) -> None:
    with open_driver(transport, FACTORY, BalloonDriver, poison_val=0x5A5A5A5A) as o:
        drv: BalloonDriver = o.driver
        dev = o.device
        assert isinstance(dev, BalloonDevice)
        assert dev.poison_val == 0x5A5A5A5A
        assert not drv.hint_free([])  # no round open
        dev.start_hinting()
        a = drv.transport.allocator.alloc(2 * PFN_SIZE, PFN_SIZE)
        assert drv.hint_free([(a, PFN_SIZE), (a + PFN_SIZE, PFN_SIZE)])
        assert dev.counters.hinted_bytes == 2 * PFN_SIZE
        drv.inflate(3)
        page = drv.pages[-1]
        drv.deflate(3)
        assert drv.transport.mem.read(page, 4) == b"\x5a" * 4


def test_driver_deflates_on_oom_only_when_negotiated() -> None:
    from pyvirtio.errors import ConfigurationError

    kw = {"num_pages": 8}
    with open_driver("loopback", FACTORY, BalloonDriver, factory_kwargs=kw) as o:
        drv: BalloonDriver = o.driver
        drv.adjust()
        assert drv.deflate_on_oom(3) == 3 and drv.actual == 5
    no_oom = ALL_FEATURES & ~F.DEFLATE_ON_OOM.mask
    kw2 = {"num_pages": 8, "features": no_oom}
    with open_driver("loopback", FACTORY, BalloonDriver, factory_kwargs=kw2) as o:
        drv = o.driver
        drv.adjust()
        with pytest.raises(ConfigurationError, match="MUST NOT"):
            drv.deflate_on_oom(1)
        assert drv.actual == 8


# -- hostile requests (hypothesis) ----------------------------------------------------------

_pfn = st.one_of(st.integers(0, 1100), st.integers(0, 0xFFFF_FFFF))
_request = st.tuples(
    st.integers(0, 4),  # queue
    st.lists(_pfn, max_size=40).map(lambda p: pfn_array(*p)),
    st.integers(0, 3),  # ragged tail bytes
    st.lists(st.integers(0, 5000), max_size=3),  # writable sizes
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_request, min_size=1, max_size=8))
def test_hostile_requests_never_raise_and_stay_in_guest_ram(reqs) -> None:
    """Whatever lands on any queue, the device never raises out of a notification,
    keeps only PFNs inside guest RAM and either answers or sets DEVICE_NEEDS_RESET."""
    dev = BalloonDevice(features=ALL_FEATURES)
    with DeviceHarness(dev, features=ALL_FEATURES, queue_size=16) as h:
        dev.start_hinting()
        for q, data, ragged, writable in reqs:
            readable = [data + b"\x01" * ragged] if data or ragged else []
            if not readable and not writable:
                continue
            try:
                h.add(q, readable, writable)
            except Exception:
                continue  # ring full: the driver side's limit, not the device's
            h.kick(q)
        limit = h.mem.size // PFN_SIZE
        assert all(p < limit for p in dev.inflated)
        assert dev.counters.pfn_outside_ram >= 0
        for q in range(5):
            h.used(q)
    dev.close()
