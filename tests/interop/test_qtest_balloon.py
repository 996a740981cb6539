"""Our BalloonDriver against QEMU 7.2's own virtio-balloon, via qtest.

Peer: "QEMU 7.2 virtio-balloon-pci / virtio-balloon-device (microvm) via qtest": the
test process is the guest CPU (our PCI or MMIO driver transport, guest RAM from the
qtest allocator) and QMP drives QEMU's balloon as a management tool would. QEMU
allows one balloon per machine, so one QEMU per case:

=================  ==============================================================
case               device
=================  ==============================================================
``pci-modern``     ``virtio-balloon-pci,disable-legacy=on`` (``-machine pc``)
``pci-legacy``     ``virtio-balloon-pci,disable-modern=on``
``mmio``           ``virtio-balloon-device`` behind virtio-mmio version 2
                   (``-machine microvm``)
=================  ==============================================================

Each case: QMP ``balloon`` (the guest's *memory size* in bytes: QEMU sets
``num_pages`` to what is above it) is followed by our driver through the
configuration change notification; it inflates, writes ``actual`` and QEMU's
``query-balloon`` reports it (``actual``: RAM less the balloon, in bytes). With
``guest-stats-polling-interval`` set through ``qom-set`` QEMU uses our held statsq
buffer every second; our driver answers and ``qom-get guest-stats`` shows the values
it sent. Then the balloon goes back to the whole RAM and the driver deflates.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtio.drivers.balloon import BalloonDriver
from pyvirtio.spec.balloon import BalloonFeature, StatTag
from pyvirtio.spec.ids import DeviceId
from pyvirtio.transport.mmio.driver import VirtioMmioTransport, find_mmio_devices, microvm_irq
from pyvirtio.transport.pci.driver import (
    VirtioPciLegacyTransport,
    VirtioPciModernTransport,
    open_virtio_pci,
)
from pyvirtio.transport.pci.enumerate import bdf, enumerate_pci
from pyvirtio.transport.qtest import QtestBus
from tests.interop.test_qtest_net import Qmp

PEER = "QEMU 7.2 virtio-balloon-pci / virtio-balloon-device (microvm) via qtest"

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason=f"{PEER}: QEMU not installed"
    ),
]

MEM = 64 << 20
TARGET = 2048  # pages: 8 MiB
SLOT = 4
PATH = "/machine/peripheral/balloon0"
TIMEOUT = 10.0

#: case -> (machine, QEMU arguments, expected transport class)
CASES: dict[str, tuple[str, list[str], type]] = {
    "pci-modern": (
        "pc",
        ["-device", f"virtio-balloon-pci,id=balloon0,addr={SLOT},disable-legacy=on"],
        VirtioPciModernTransport,
    ),
    "pci-legacy": (
        "pc",
        ["-device", f"virtio-balloon-pci,id=balloon0,addr={SLOT},disable-modern=on"],
        VirtioPciLegacyTransport,
    ),
    "mmio": (
        "microvm",
        [
            "-device",
            "virtio-balloon-device,id=balloon0",
            "-global",
            "virtio-mmio.force-legacy=false",
        ],
        VirtioMmioTransport,
    ),
}


@dataclass
class Vm:
    bus: QtestBus
    qmp: Qmp
    transport: VirtioPciModernTransport | VirtioPciLegacyTransport | VirtioMmioTransport


@pytest.fixture(params=list(CASES))
def vm(request: pytest.FixtureRequest) -> Iterator[Vm]:
    machine, args, expected = CASES[request.param]
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"pvballoon-{os.getpid()}-{request.param}"
    tmp.mkdir()
    qmp_path = str(tmp / "qmp.sock")
    bus = QtestBus(
        [*args, "-qmp", f"unix:{qmp_path},server=on,wait=off"], machine=machine, mem_size=MEM
    )
    try:
        qmp = Qmp(qmp_path)
        transport: VirtioPciModernTransport | VirtioPciLegacyTransport | VirtioMmioTransport
        if machine == "microvm":
            found = {did: (slot, addr) for slot, addr, did in find_mmio_devices(bus)}
            slot, base = found[DeviceId.BALLOON_TRADITIONAL]
            transport = VirtioMmioTransport(bus, base, irq=microvm_irq(slot))
        else:
            enumerate_pci(bus)
            transport = open_virtio_pci(bus, bdf(0, SLOT))
        assert type(transport) is expected
        try:
            yield Vm(bus, qmp, transport)
        finally:
            transport.close()
            qmp.close()
    finally:
        bus.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _serve_until(drv: BalloonDriver, cond: object, what: str, timeout: float = 20.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: never happened"
        drv.serve(0.2)


def test_our_balloon_driver_against_qemu_virtio_balloon(vm: Vm) -> None:
    """Peer: PEER. Target through QMP ``balloon``, inflate, ``query-balloon``; stats
    through ``guest-stats-polling-interval`` and ``guest-stats``; deflate."""
    reports = {"n": 0}

    def stats() -> dict[StatTag, int]:
        # values that change with every report, to tell which one QEMU shows
        reports["n"] += 1
        n = reports["n"]
        return {
            StatTag.MEMTOT: MEM,
            StatTag.MEMFREE: (40 << 20) + n * 4096,
            StatTag.AVAIL: (44 << 20) + n * 4096,
            StatTag.MINFLT: 1000 + n,
        }

    drv = BalloonDriver(vm.transport, stats=stats, timeout=TIMEOUT)
    try:
        drv.initialize()
        assert drv.has_feature(BalloonFeature.STATS_VQ)
        assert vm.qmp.execute("query-balloon") == {"actual": MEM}
        # QMP's value is the guest's memory size: num_pages = (RAM - value) / 4 KiB
        vm.qmp.execute("balloon", value=MEM - TARGET * 4096)
        _serve_until(drv, lambda: len(drv.pages) == TARGET, "inflate")
        assert drv.num_pages == TARGET
        assert vm.qmp.execute("query-balloon") == {"actual": MEM - TARGET * 4096}
        interrupts = vm.transport.interrupts

        vm.qmp.execute("qom-set", path=PATH, property="guest-stats-polling-interval", value=1)
        sent = drv.serve(2.5)
        assert sent >= 2, sent
        got = vm.qmp.execute("qom-get", path=PATH, property="guest-stats")
        n = reports["n"]
        # the values of the last report we sent
        assert got["stats"]["stat-total-memory"] == MEM, got
        assert got["stats"]["stat-free-memory"] == (40 << 20) + n * 4096, got
        assert got["stats"]["stat-available-memory"] == (44 << 20) + n * 4096, got
        assert got["stats"]["stat-minor-faults"] == 1000 + n, got
        # a tag we never sent: QEMU's "not reported" (-1 as a uint64)
        assert got["stats"]["stat-swap-in"] == (1 << 64) - 1, got
        assert got["last-update"] > 0, got
        vm.qmp.execute("qom-set", path=PATH, property="guest-stats-polling-interval", value=0)

        vm.qmp.execute("balloon", value=MEM)
        _serve_until(drv, lambda: not drv.pages, "deflate")
        assert drv.num_pages == 0
        assert vm.qmp.execute("query-balloon") == {"actual": MEM}
        assert vm.transport.interrupts > interrupts
        print(
            f"\n[{PEER}] {type(vm.transport).__name__}: features {drv.features:#x}, "
            f"{TARGET} pages in and out, {drv.stats_sent} stats reports, "
            f"guest-stats {got['stats']}"
        )
    finally:
        drv.close()
