"""The pyvirtio network driver against QEMU's own virtio-net device, via qtest.

Peer: "QEMU 7.2 virtio-net-pci / virtio-net-device (microvm) via qtest", each NIC
on a ``-netdev dgram`` backend over unix datagram sockets whose other end is the
test: every Ethernet frame QEMU transmits is one datagram to the test's socket, and
every datagram the test sends QEMU is one received frame.

PCI (``-machine pc``), one QEMU per ring layout (split, ``packed=on``), three NICs:

=====  =====================================================  ====================
slot   device                                                 interfaces
=====  =====================================================  ====================
3      virtio-net-pci ``disable-legacy=on,mq=on``             modern only
4      virtio-net-pci (default)                               transitional
5      virtio-net-pci ``disable-modern=on,ctrl_mac_addr=off`` legacy only
=====  =====================================================  ====================

and MMIO (``-machine microvm``): ``virtio-net-device`` behind virtio-mmio version 2
and version 1 (legacy). QMP (``-qmp unix:...``) drives ``set_link`` and
``announce-self``.

What is shown, through each interface: frames the driver sends arrive byte-exact;
frames the test injects (60 and 1514 bytes, MRG_RXBUF on and off, with 256-byte
buffers so a frame spans several) arrive byte-exact; the header is 10 bytes on a
legacy interface without MRG_RXBUF, 12 otherwise; QEMU applies the receive filters
the control queue set (promiscuous off + MAC table + MAC_ADDR_SET / legacy config
write, allmulti, VLAN filter) - a frame the filter excludes is not delivered, one
it includes is; VQ_PAIRS_SET out of range is answered VIRTIO_NET_ERR; the driver
sees link state changes and announce requests after the configuration interrupt.

QEMU 7.2 limits: ``-netdev dgram`` (like ``stream``/``socket``) has no ``queues``
option, so a NIC has one queue pair; with ``mq=on`` it offers VIRTIO_NET_F_MQ with
``max_virtqueue_pairs`` 1, and more pairs are not testable here. Without a vnet-hdr
backend (tap) QEMU withdraws every checksum/segmentation offload bit, so offloads are
only negotiated in the unit tests; it still offers VIRTIO_NET_F_CTRL_GUEST_OFFLOADS
and then answers every GUEST_OFFLOADS_SET (even 0) with VIRTIO_NET_ERR.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.drivers.net import AsyncNetDriver, NetControlError, NetDriver, NetTimeoutError
from pyvirtio.spec.features import Feature, has
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.net import NetCtrlClass, NetCtrlMq, NetFeature, NetStatus
from pyvirtio.transport.mmio.driver import VirtioMmioTransport, find_mmio_devices, microvm_irq
from pyvirtio.transport.pci.driver import (
    VirtioPciLegacyTransport,
    VirtioPciModernTransport,
    open_virtio_pci,
)
from pyvirtio.transport.pci.enumerate import bdf, enumerate_pci
from pyvirtio.transport.qtest import QtestBus

PEER = "QEMU 7.2 virtio-net-pci / virtio-net-device (microvm) via qtest"

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason=f"{PEER}: QEMU not installed"
    ),
]

NET_MODERN, NET_TRANSITIONAL, NET_LEGACY = 3, 4, 5
MACS = {
    NET_MODERN: "52:54:00:00:00:03",
    NET_TRANSITIONAL: "52:54:00:00:00:04",
    NET_LEGACY: "52:54:00:00:00:05",
}
MMIO_MAC = "52:54:00:00:01:00"
SRC = bytes.fromhex("020000000042")
#: how long a frame that must arrive may take (QEMU is the only party; generous)
TIMEOUT = 10.0


def _mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def _frame(dst: bytes, size: int, seed: int, vlan: int | None = None) -> bytes:
    """An Ethernet frame of ``size`` bytes (header included) to ``dst``."""
    head = dst + SRC
    if vlan is not None:
        head += b"\x81\x00" + vlan.to_bytes(2, "big")
    head += b"\x88\xb5"  # local experimental ethertype
    body = bytes((i * 37 + seed * 11 + (i >> 8)) & 0xFF for i in range(size - len(head)))
    return head + body


class Qmp:
    """The smallest QMP client: one command at a time, events skipped."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP connection closed")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"QMP {command}: {answer['error']}")
        return answer.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@dataclass
class Nic:
    """One NIC's far end: the test's datagram socket and QEMU's address."""

    sock: socket.socket
    qemu_path: str
    mac: bytes

    def inject(self, frame: bytes, timeout: float = TIMEOUT) -> None:
        """Send ``frame`` to QEMU, waiting while its datagram queue is full (a loaded
        machine: QEMU drains it only when the guest posted receive buffers)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.sendto(frame, self.qemu_path)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def sent(self, timeout: float = TIMEOUT) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(65536)

    def drain(self) -> None:
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self.sock.recv(65536)


@dataclass
class Vm:
    bus: QtestBus
    qmp: Qmp
    nics: dict[int, Nic]
    packed: bool = False
    version: int = 0
    devices: dict[int, tuple[int, int]] = field(default_factory=dict)

    def close(self) -> None:
        self.qmp.close()
        self.bus.close()
        for nic in self.nics.values():
            nic.sock.close()


def _netdev(tmp: Path, key: int, mac: bytes) -> tuple[str, Nic]:
    qemu_path = str(tmp / f"q{key}.sock")
    test_path = str(tmp / f"t{key}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(test_path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    arg = (
        f"dgram,id=n{key},local.type=unix,local.path={qemu_path},"
        f"remote.type=unix,remote.path={test_path}"
    )
    return arg, Nic(sock, qemu_path, mac)


def _start(tmp: Path, args: list[str], nics: dict[int, Nic], **bus_kw: Any) -> Vm:
    qmp_path = str(tmp / "qmp.sock")
    bus = QtestBus([*args, "-qmp", f"unix:{qmp_path},server=on,wait=off"], **bus_kw)
    try:
        return Vm(bus, Qmp(qmp_path), nics)
    except BaseException:
        bus.close()
        raise


@pytest.fixture(scope="module", params=["split", "packed"])
def pci(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    packed = request.param == "packed"
    # short socket paths: sun_path holds 108 bytes
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"pvnet-{os.getpid()}-{request.param}"
    tmp.mkdir()
    ring = f"packed={'on' if packed else 'off'}"
    args: list[str] = []
    nics = {}
    extra = {
        NET_MODERN: "disable-legacy=on,mq=on,vectors=4",
        NET_TRANSITIONAL: "disable-legacy=off",
        NET_LEGACY: "disable-modern=on,ctrl_mac_addr=off",
    }
    for slot, opts in extra.items():
        netdev, nic = _netdev(tmp, slot, _mac(MACS[slot]))
        nics[slot] = nic
        args += [
            "-netdev",
            netdev,
            "-device",
            f"virtio-net-pci,netdev=n{slot},id=net{slot},addr={slot},mac={MACS[slot]},"
            f"{opts},{ring}",
        ]
    vm = _start(tmp, args, nics)
    vm.packed = packed
    try:
        enumerate_pci(vm.bus)
        yield vm
    finally:
        vm.close()
        shutil.rmtree(tmp, ignore_errors=True)


#: id -> (slot, force_legacy, expected transport)
PCI_CASES = {
    "modern": (NET_MODERN, False, VirtioPciModernTransport),
    "transitional-picks-modern": (NET_TRANSITIONAL, False, VirtioPciModernTransport),
    "transitional-forced-legacy": (NET_TRANSITIONAL, True, VirtioPciLegacyTransport),
    "legacy-only": (NET_LEGACY, False, VirtioPciLegacyTransport),
}


@contextlib.contextmanager
def _pci_driver(vm: Vm, case: str, **kw: Any) -> Iterator[tuple[NetDriver, Nic]]:
    slot, force_legacy, expected = PCI_CASES[case]
    transport = open_virtio_pci(vm.bus, bdf(0, slot), force_legacy=force_legacy)
    assert type(transport) is expected
    nic = vm.nics[slot]
    nic.drain()
    drv = NetDriver(transport, timeout=TIMEOUT, **kw)
    try:
        drv.initialize()
        yield drv, nic
    finally:
        drv.close()
        transport.close()


def _exchange(drv: NetDriver, nic: Nic, seed: int) -> None:
    """Frames both ways, byte-exact: small, full-size, and a burst."""
    for i, size in enumerate((60, 1514, 342)):
        out = _frame(_mac("02:00:00:00:00:99"), size, seed + i)
        drv.send(out)
        assert nic.sent() == out
    for i, size in enumerate((60, 1514, 1000)):
        inj = _frame(drv.mac, size, seed + 10 + i)
        nic.inject(inj)
        assert drv.recv() == inj
    burst = [_frame(drv.mac, 100 + 70 * i, seed + 20 + i) for i in range(20)]
    for f in burst:
        nic.inject(f)
    assert [drv.recv() for _ in burst] == burst
    outs = [_frame(SRC, 60 + 50 * i, seed + 40 + i) for i in range(20)]
    for f in outs:
        drv.send(f)
    assert [nic.sent() for _ in outs] == outs
    drv.flush_tx()


@pytest.mark.parametrize("mrg", ["mrg-2048", "mrg-256", "no-mrg"])
@pytest.mark.parametrize("case", list(PCI_CASES))
def test_pci_frames_both_ways_byte_exact(pci: Vm, case: str, mrg: str) -> None:
    kw: dict[str, Any] = {"mrg_rxbuf": mrg != "no-mrg"}
    if mrg == "mrg-256":
        kw["rx_buffer_size"] = 256
    with _pci_driver(pci, case, **kw) as (drv, nic):
        legacy = drv.transport.legacy
        assert has(drv.features, Feature.VERSION_1) is not legacy
        assert has(drv.features, Feature.RING_PACKED) is (pci.packed and not legacy)
        assert drv.has_feature(NetFeature.MRG_RXBUF) is (mrg != "no-mrg")
        # virtio-v1.2 §5.1.6 / §5.1.6.1: 10 bytes only for legacy without MRG_RXBUF
        assert drv.hdr_size == (10 if legacy and mrg == "no-mrg" else 12)
        assert drv.mac == nic.mac
        assert drv.link_up
        _exchange(drv, nic, seed=sum(map(ord, case + mrg)))
        if mrg == "mrg-256":
            # a 1514-byte frame took 7 buffers: gathered by num_buffers
            assert drv.stats.rx_buffers > drv.stats.rx_packets
        else:
            assert drv.stats.rx_buffers == drv.stats.rx_packets
        assert drv.stats.device_errors == 0


@pytest.mark.parametrize("case", list(PCI_CASES))
def test_pci_rx_filters_apply(pci: Vm, case: str) -> None:
    """QEMU starts promiscuous; after PROMISC off only our MAC, the MAC table, and
    (with allmulti) multicast pass. Each check injects the frame that must be dropped
    first and one that must pass second: the first frame received is the second."""
    with _pci_driver(pci, case) as (drv, nic):
        ours, other, listed = drv.mac, _mac("02:00:00:00:0a:01"), _mac("02:00:00:00:0a:02")
        group = _mac("01:00:5e:00:00:07")

        def dropped_then_passed(drop: bytes, passes: bytes) -> None:
            nic.inject(drop)
            nic.inject(passes)
            assert drv.recv() == passes

        nic.inject(_frame(other, 80, 1))  # promiscuous by default: delivered
        assert drv.recv() == _frame(other, 80, 1)
        drv.set_rx_mode(promisc=False, allmulti=False)
        drv.set_mac_table(unicast=[listed], multicast=[])
        dropped_then_passed(_frame(other, 80, 2), _frame(ours, 80, 3))
        dropped_then_passed(_frame(other, 81, 4), _frame(listed, 81, 5))
        dropped_then_passed(_frame(group, 82, 6), _frame(ours, 82, 7))
        drv.set_rx_mode(allmulti=True)
        nic.inject(_frame(group, 83, 8))
        assert drv.recv() == _frame(group, 83, 8)
        drv.set_mac_table(unicast=[], multicast=[])
        dropped_then_passed(_frame(listed, 84, 9), _frame(ours, 84, 10))
        # a new address: MAC_ADDR_SET (modern/transitional) or the legacy config write
        new = _mac("02:00:00:00:0b:0" + str(PCI_CASES[case][0]))
        drv.set_mac(new)
        assert drv.mac == new
        if drv.has_feature(NetFeature.CTRL_MAC_ADDR):
            assert drv.stats.ctrl_errors == 0
        else:
            assert drv.transport.legacy  # the legacy-only NIC has ctrl_mac_addr=off
        dropped_then_passed(_frame(ours, 85, 11), _frame(new, 85, 12))
        drv.set_rx_mode(promisc=True)
        nic.inject(_frame(other, 86, 13))
        assert drv.recv() == _frame(other, 86, 13)


@pytest.mark.parametrize("case", list(PCI_CASES))
def test_pci_vlan_filter_and_queue_pairs(pci: Vm, case: str) -> None:
    with _pci_driver(pci, case) as (drv, nic):
        assert drv.has_feature(NetFeature.CTRL_VLAN)
        drv.set_rx_mode(promisc=False)
        ours = drv.mac
        # with VIRTIO_NET_F_CTRL_VLAN QEMU starts with an empty VLAN table
        nic.inject(_frame(ours, 90, 1, vlan=42))
        nic.inject(_frame(ours, 90, 2))
        assert drv.recv() == _frame(ours, 90, 2)
        drv.vlan_add(42)
        nic.inject(_frame(ours, 91, 3, vlan=42))
        assert drv.recv() == _frame(ours, 91, 3, vlan=42)
        drv.vlan_del(42)
        nic.inject(_frame(ours, 92, 4, vlan=42))
        nic.inject(_frame(ours, 92, 5))
        assert drv.recv() == _frame(ours, 92, 5)
        if drv.has_feature(NetFeature.MQ):
            assert drv.max_queue_pairs == 1  # dgram has no queues= option
            drv.set_queue_pairs(1)
            with pytest.raises(ValueError):
                drv.set_queue_pairs(2)  # the driver MUST NOT ask for more
            # QEMU refuses it when asked anyway (the unchecked low-level call)
            for n in (0, 2, 0x8001):
                with pytest.raises(NetControlError) as info:
                    drv.control(NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, n.to_bytes(2, "little"))
                assert info.value.ack == 1
            assert drv.stats.ctrl_errors == 3
        # the control queue still works after VIRTIO_NET_ERR answers
        drv.set_rx_mode(promisc=True)
        _exchange(drv, nic, seed=7)


@pytest.mark.parametrize("case", list(PCI_CASES))
def test_pci_guest_offloads_set(pci: Vm, case: str) -> None:
    """VIRTIO_NET_F_CTRL_GUEST_OFFLOADS is offered even on a backend without a vnet
    header, but QEMU 7.2 answers every GUEST_OFFLOADS_SET there with VIRTIO_NET_ERR
    (``virtio_net_handle_offloads``: no vnet header, no offload control): the driver
    raises NetControlError and the control queue stays usable. An offload that was
    not negotiated is refused by the driver before it is sent."""
    with _pci_driver(pci, case, offloads=[NetFeature.CTRL_GUEST_OFFLOADS]) as (drv, nic):
        assert drv.has_feature(NetFeature.CTRL_GUEST_OFFLOADS)
        assert not drv.has_feature(NetFeature.GUEST_CSUM)  # withdrawn by QEMU
        with pytest.raises(ValueError):
            drv.set_guest_offloads(1 << NetFeature.GUEST_CSUM)
        with pytest.raises(NetControlError):
            drv.set_guest_offloads(0)
        drv.set_rx_mode(promisc=True)
        _exchange(drv, nic, seed=11)


@pytest.mark.parametrize("case", list(PCI_CASES))
def test_pci_link_status_and_announce(pci: Vm, case: str) -> None:
    slot = PCI_CASES[case][0]
    with _pci_driver(pci, case) as (drv, nic):
        assert drv.has_feature(NetFeature.STATUS)
        assert drv.link_up
        try:
            pci.qmp.execute("set_link", name=f"net{slot}", up=False)
            drv.wait_config_change()
            assert not drv.link_up
        finally:
            pci.qmp.execute("set_link", name=f"net{slot}", up=True)
        drv.wait_config_change()
        assert drv.link_up
        assert drv.stats.config_changes >= 2
        if drv.has_feature(NetFeature.GUEST_ANNOUNCE):
            pci.qmp.execute(
                "announce-self", initial=50, max=50, rounds=1, step=10, interfaces=[f"net{slot}"]
            )
            drv.wait_config_change()
            assert drv.announce_pending and drv.status & NetStatus.ANNOUNCE
            drv.announce_ack()
            assert not drv.announce_pending
            assert not drv.status & NetStatus.ANNOUNCE
            # QEMU also sent its own RARP for the NIC (ethertype 0x8035, our source)
            rarp = nic.sent()
            assert rarp[:6] == b"\xff" * 6 and rarp[6:12] == drv.mac
            assert rarp[12:14] == b"\x80\x35"
            nic.drain()
        _exchange(drv, nic, seed=3)


def test_pci_async_driver(pci: Vm) -> None:
    """The asyncio driver is woken by the interrupt fds (MSI-X via the qtest MSI
    window watcher): concurrent receive and send."""
    transport = open_virtio_pci(pci.bus, bdf(0, NET_MODERN))
    nic = pci.nics[NET_MODERN]
    nic.drain()
    adrv = AsyncNetDriver.create(transport, timeout=TIMEOUT)
    inj = [_frame(adrv.mac, 60 + 90 * i, 50 + i) for i in range(16)]
    outs = [_frame(SRC, 1514 - 80 * i, 80 + i) for i in range(16)]

    async def run() -> tuple[list[bytes], list[bytes]]:
        async def receive() -> list[bytes]:
            return [await adrv.recv() for _ in inj]

        task = asyncio.ensure_future(receive())
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        for f in inj:
            nic.inject(f)
        # the far end reads while we send: a unix datagram socket queues only
        # net.unix.max_dgram_qlen (often 10) datagrams before QEMU's sendto blocks
        reader = loop.run_in_executor(None, lambda: [nic.sent() for _ in outs])
        for f in outs:
            await adrv.send(f)
        await adrv.flush_tx()
        sent = await reader
        await adrv.set_rx_mode(promisc=False)
        await adrv.vlan_add(3)
        with pytest.raises(NetControlError):
            await adrv.control(NetCtrlClass.MQ, NetCtrlMq.VQ_PAIRS_SET, b"\x02\x00")
        got = await task
        with pytest.raises(NetTimeoutError):
            await adrv.recv(timeout=0.2)
        return got, sent

    try:
        got, sent = asyncio.run(run())
        assert got == inj and sent == outs
    finally:
        adrv.close()
        transport.close()


# -- MMIO (microvm) -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 1], ids=["mmio-v2", "mmio-v1"])
def mmio(request: pytest.FixtureRequest) -> Iterator[Vm]:
    version = request.param
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"pvnet-{os.getpid()}-mmio{version}"
    tmp.mkdir()
    netdev, nic = _netdev(tmp, 0, _mac(MMIO_MAC))
    args = ["-netdev", netdev, "-device", f"virtio-net-device,netdev=n0,id=net0,mac={MMIO_MAC}"]
    if version == 2:
        args += ["-global", "virtio-mmio.force-legacy=false"]
    vm = _start(tmp, args, {0: nic}, machine="microvm")
    vm.version = version
    try:
        vm.devices = {did: (slot, addr) for slot, addr, did in find_mmio_devices(vm.bus)}
        yield vm
    finally:
        vm.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("mrg", ["mrg-256", "no-mrg"])
def test_mmio_frames_filters_link(mmio: Vm, mrg: str) -> None:
    slot, base = mmio.devices[DeviceId.NET]
    transport = VirtioMmioTransport(mmio.bus, base, irq=microvm_irq(slot))
    assert transport.legacy is (mmio.version == 1)
    nic = mmio.nics[0]
    nic.drain()
    kw: dict[str, Any] = {"mrg_rxbuf": mrg != "no-mrg"}
    if mrg == "mrg-256":
        kw["rx_buffer_size"] = 256
    drv = NetDriver(transport, timeout=TIMEOUT, **kw)
    try:
        drv.initialize()
        legacy = mmio.version == 1
        assert drv.hdr_size == (10 if legacy and mrg == "no-mrg" else 12)
        assert drv.mac == nic.mac
        _exchange(drv, nic, seed=mmio.version * 5 + len(mrg))
        drv.set_rx_mode(promisc=False)
        nic.inject(_frame(_mac("02:00:00:00:0c:01"), 70, 1))
        nic.inject(_frame(drv.mac, 70, 2))
        assert drv.recv() == _frame(drv.mac, 70, 2)
        try:
            mmio.qmp.execute("set_link", name="net0", up=False)
            drv.wait_config_change()
            assert not drv.link_up
        finally:
            mmio.qmp.execute("set_link", name="net0", up=True)
        drv.wait_config_change()
        assert drv.link_up
        assert transport.interrupts > 0
    finally:
        drv.close()
        transport.close()
