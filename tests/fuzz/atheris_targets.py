"""Coverage-guided fuzz targets (atheris) for every untrusted boundary.

Each target takes the fuzzer's bytes and drives one boundary with them. What a
target may raise is declared in :data:`DECLARED` (the defined answers: a
``DriverError`` that stops a device queue, a ``DeviceError`` that stops a driver
queue, a ``ProtocolError`` for a malformed message ...); anything else, a hang or a
write outside the buffers the peer gave, is a finding. Run one with
``scripts/fuzz.sh TARGET SECONDS``; the test suite runs each briefly
(``tests/fuzz/test_atheris.py``).
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Callable
from typing import Any

from pyvirtio.errors import (
    DeviceError,
    DriverError,
    GuestMemoryError,
    ProtocolError,
    QueueBrokenError,
    QueueFullError,
)
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature
from pyvirtio.testing.harness import RawPackedRing
from pyvirtio.virtqueue import make_device_queue, make_driver_queue
from pyvirtio.virtqueue.common import QueueAddresses

MEM = 64 << 10
RING_FEATURES = (Feature.INDIRECT_DESC, Feature.EVENT_IDX, Feature.IN_ORDER)

_MEMS: dict[str, GuestMemory] = {}


def _mem(name: str) -> GuestMemory:
    """One guest RAM per target, reused across runs (a memfd per run would be slow)."""
    mem = _MEMS.get(name)
    if mem is None:
        mem = _MEMS[name] = GuestMemory.create(MEM, name=f"fuzz-{name}")
    return mem


class Input:
    """Takes typed values off the front of the fuzzer's bytes (zeros when short)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out.ljust(n, b"\0")

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "little")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _ring_features(inp: Input, packed: bool) -> int:
    bits = inp.u8()
    f = Feature.VERSION_1.mask | (Feature.RING_PACKED.mask if packed else 0)
    for i, feat in enumerate(RING_FEATURES):
        if bits >> i & 1:
            f |= feat.mask
    return f


# -- device rings against a hostile driver --------------------------------------------------


def _ring_layout(size: int, packed: bool) -> QueueAddresses:
    """Where a pyvirtio driver queue of ``size`` puts its areas in a fresh allocator
    from 0x1000 (the fuzzer's memory image starts there too)."""
    from pyvirtio.spec.ring import split_avail_size, split_desc_table_size, split_used_size

    alloc = GuestAllocator(0x1000, MEM - 0x1000)
    if packed:
        return QueueAddresses(alloc.alloc(16 * size, 16), alloc.alloc(4, 4), alloc.alloc(4, 4))
    return QueueAddresses(
        alloc.alloc(split_desc_table_size(size), 16),
        alloc.alloc(split_avail_size(size), 2),
        alloc.alloc(split_used_size(size), 4),
    )


def _device_ring(data: bytes, packed: bool) -> None:
    """Input: features byte, size byte, 8 bytes of decisions, then an image of guest
    RAM from 0x1000 (rings where a pyvirtio driver puts them, buffers, tables)."""
    inp = Input(data)
    mem = _mem("packed-dev" if packed else "split-dev")
    features = _ring_features(inp, packed)
    size = 1 << inp.u8() % 7 if not packed else max(1, inp.u8() % 65)
    decisions = int.from_bytes(inp.take(8), "little")
    addrs = _ring_layout(size, packed)
    mem.fill(0, MEM)
    image = inp.rest()[: MEM - 0x1000]
    mem.write(0x1000, image)
    before = mem.read(0, MEM)
    try:
        q = make_device_queue(mem, size, addrs, features)
    except (DriverError, ValueError):
        return
    written: list[tuple[int, int]] = []
    try:
        for k in range(64):
            chain = q.pop()
            if chain is None:
                break
            if decisions >> k & 1 and chain.writable:
                n = chain.write_all(mem, b"\xaa" * min(chain.writable_len, 256))
                written.extend(chain.writable)
            else:
                n = 0
            q.push(chain, n)
            if decisions >> (k + 1) % 64 & 1:
                q.flush()
        q.flush()
    except (DriverError, QueueBrokenError):
        pass
    _check_writes(mem, before, addrs, size, packed, written)


def _check_writes(
    mem: GuestMemory,
    before: bytes,
    addrs: QueueAddresses,
    size: int,
    packed: bool,
    written: list[tuple[int, int]],
) -> None:
    """The device wrote only where it may: its own ring area and the buffers it was
    given as writable."""
    after = mem.read(0, MEM)
    allowed: list[tuple[int, int]] = list(written)
    if packed:
        allowed += [(addrs.desc, 16 * size), (addrs.device, 4)]
    else:
        allowed += [(addrs.device, 6 + 8 * size)]
    pos = 0
    for a, n in [*sorted(allowed), (MEM, 0)]:
        if a > pos and before[pos:a] != after[pos:a]:
            bad = next(i for i in range(pos, a) if before[i] != after[i])
            raise AssertionError(f"the device wrote {bad:#x}, outside its areas")
        pos = max(pos, a + n)


def fuzz_split_device(data: bytes) -> None:
    """A split device queue over a ring written by a hostile driver."""
    _device_ring(data, packed=False)


def fuzz_packed_device(data: bytes) -> None:
    """A packed device queue over a ring written by a hostile driver."""
    _device_ring(data, packed=True)


# -- driver rings against a hostile device --------------------------------------------------


def _driver_ring(data: bytes, packed: bool) -> None:
    inp = Input(data)
    mem = _mem("packed-drv" if packed else "split-drv")
    mem.fill(0, MEM)
    alloc = GuestAllocator(0x1000, MEM - 0x1000)
    features = _ring_features(inp, packed)
    size = 1 << (inp.u8() % 5 + 2)  # 4..64
    q = make_driver_queue(mem, alloc, size, features)
    try:
        for i in range(inp.u8() % size + 1):
            try:
                q.add([(0x9000 + 64 * i, 16)], [(0xA000 + 64 * i, 16)], i)
            except QueueFullError:
                break
        q.kick_prepare()
        a = q.addrs
        for _ in range(16):
            if not inp.left:
                break
            # the device writes whatever it likes into its area
            where = a.desc if packed else a.device
            span = 16 * size if packed else 6 + 8 * size
            off = inp.u16() % span
            mem.write(where + off, inp.take(inp.u8() % 16 + 1))
            for _ in range(4):
                try:
                    got = q.get_used()
                except (DeviceError, QueueBrokenError):
                    return
                if got is None:
                    break
                _token, n = got
                if not 0 <= n <= 16:
                    raise AssertionError(f"used length {n} accepted for a 16-byte buffer")
    finally:
        q.close()


def fuzz_split_driver(data: bytes) -> None:
    """A split driver queue whose used ring a hostile device writes."""
    _driver_ring(data, packed=False)


def fuzz_packed_driver(data: bytes) -> None:
    """A packed driver queue whose descriptor ring a hostile device writes."""
    _driver_ring(data, packed=True)


# -- vhost-user ---------------------------------------------------------------------------


def fuzz_vhost_user_codec(data: bytes) -> None:
    """The vhost-user message decoder fed arbitrary bytes (no fds)."""
    from pyvirtio.transport.vhost_user.codec import Decoder, MessageRejected

    dec = Decoder(num_queues=4)
    try:
        dec.feed(data)
        for _ in range(64):
            try:
                msg = dec.next_message()
            except MessageRejected:
                continue
            if msg is None:
                break
            msg.close()
    except ProtocolError:
        pass
    finally:
        dec.close()


def fuzz_vhost_user_backend(data: bytes) -> None:
    """The vhost-user back-end state machine fed arbitrary messages; some messages get
    descriptors (eventfds or a small memfd). It must never raise; it answers with
    replies, error replies or a disconnect, and keeps no descriptor after close."""
    from pyvirtio.devices.rng import CallableSource, RngDevice
    from pyvirtio.transport.vhost_user.backend import Disconnect, VhostUserBackend

    inp = Input(data)
    be = VhostUserBackend(RngDevice(CallableSource(lambda n: b"\x11" * n)))
    try:
        for _ in range(32):
            if inp.left < 12:
                break
            hdr = inp.take(12)
            size = min(int.from_bytes(hdr[8:12], "little"), 512)
            body = inp.take(size)
            nfds = inp.u8() % 3
            fds = []
            for _k in range(nfds):
                if inp.u8() & 1:
                    fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
                else:
                    from pyvirtio.memory.guest_memory import create_memfd

                    fds.append(create_memfd(1 << 16, "fuzz"))
            actions = be.receive(hdr + body, fds)
            if any(isinstance(a, Disconnect) for a in actions):
                break
            for i in range(2):
                be.kick(i)
    finally:
        be.close()


def fuzz_vfio_user_server(data: bytes) -> None:
    """The vfio-user framing and server core (a virtio-pci rng function) fed an
    arbitrary stream in arbitrary chunks, some with descriptors (eventfds or a small
    memfd). It must never raise anything but a framing error (the connection would
    close); every message gets a reply or asked for none; no descriptor is kept after
    close."""
    from pyvirtio.devices.rng import CallableSource, RngDevice
    from pyvirtio.memory.guest_memory import create_memfd
    from pyvirtio.transport.pci.device import VirtioPciFunction
    from pyvirtio.transport.vfio_user.backend import VfioUserBackend
    from pyvirtio.transport.vfio_user.codec import (
        MessageReader,
        VfioUserProtocolError,
        encode_command,
        encode_version,
    )

    inp = Input(data)
    mode = ("modern", "transitional", "legacy")[inp.u8() % 3]
    mem = GuestMemory()
    fn = VirtioPciFunction(
        RngDevice(CallableSource(lambda n: b"\x11" * n)),
        mode=mode,  # type: ignore[arg-type]
        mem=mem,
    )
    be = VfioUserBackend(fn, mem)
    reader = MessageReader()
    try:
        if inp.u8() & 1:  # most runs start with a VERSION, as a client must
            (m,) = reader.feed(encode_command(0, 1, encode_version(0, 0, {})))
            be.handle(m)
        for _ in range(64):
            if inp.left < 2:
                break
            chunk = inp.take(1 + inp.u16() % 1024)
            fds = []
            for _k in range(inp.u8() % 3):
                if inp.u8() & 1:
                    fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
                else:
                    fds.append(create_memfd(1 << 16, "fuzz"))
            try:
                msgs = reader.feed(chunk, fds)
            except VfioUserProtocolError:
                break
            for m in msgs:
                reply = be.handle(m)
                assert reply is not None or m.no_reply
            be.take_signals()
    finally:
        reader.close()
        be.close()
        fn.close()
        mem.close()


# -- device request parsers ----------------------------------------------------------------


def fuzz_blk_requests(data: bytes) -> None:
    """The block device fed arbitrary requests laid out any way; every request gets
    a status or the queue stops; nothing is written outside the writable buffers."""
    from pyvirtio.devices.blk import BlkDevice, MemoryBackend
    from pyvirtio.testing import DeviceHarness

    inp = Input(data)
    dev = BlkDevice(MemoryBackend(64 * 512), io_threads=0, max_discard_seg=4)
    with DeviceHarness(dev, packed=bool(inp.u8() & 1), mem_size=1 << 20) as h:
        for i in range(8):
            if inp.left < 4:
                break
            nread = inp.u8() % 4
            readable = [inp.take(inp.u8() % 40) for _ in range(nread)]
            if readable and len(readable[0]) >= 4:
                # steer the type into the interesting range now and then
                readable[0] = bytes([inp.u8() % 16]) + readable[0][1:]
            writable = [inp.u8() % 64 for _ in range(inp.u8() % 3)]
            if not readable and not writable:
                continue
            try:
                segs = h.add(0, readable, writable, token=i)
            except QueueFullError:
                break
            h.kick(0)
            if h.needs_reset:
                return
            for _token, n in h.used(0):
                if n > sum(writable):
                    raise AssertionError(f"used length {n} > writable {sum(writable)}")
            for addr, n in segs:  # the 64 guard bytes after each buffer stay untouched
                if h.mem.read(addr + max(1, n), 64) != b"\xee" * 64:
                    raise AssertionError("the device wrote past a writable buffer")


def fuzz_balloon_requests(data: bytes) -> None:
    """Hostile buffers on every balloon queue (split raw rings, any descriptor: any
    address, length and flags, chained, indirect, readable or writable where the spec
    wants the other) between host actions (targets, stats requests, hinting rounds,
    config writes). Defined answers only: every used buffer has length 0 (the balloon
    never writes a buffer), only a DriverError sets DEVICE_NEEDS_RESET, and guest RAM
    changes only in the used rings, the 4 KiB pages PFNs on inflateq named, and
    device-writable buffers on reporting_vq (discarded: a hole reads zeros)."""
    from pyvirtio.devices.balloon.device import ALL_FEATURES, BalloonDevice
    from pyvirtio.spec.balloon import BALLOON_CONFIG, BalloonFeature, BalloonQueue, queue_indexes
    from pyvirtio.testing import DeviceHarness, RawSplitRing

    inp = Input(data)
    mode = inp.u8()
    pool = (
        BalloonFeature.MUST_TELL_HOST,
        BalloonFeature.STATS_VQ,
        BalloonFeature.DEFLATE_ON_OOM,
        BalloonFeature.FREE_PAGE_HINT,
        BalloonFeature.PAGE_POISON,
        BalloonFeature.PAGE_REPORTING,
    )
    feats = 0
    for i, f in enumerate(pool):
        if mode >> i & 1:
            feats |= f.mask
    dev = BalloonDevice(
        inp.u16(), features=ALL_FEATURES, discard=bool(mode & 0x40), queue_max_size=8
    )
    mem_size = 256 << 10
    h = DeviceHarness(
        dev, features=feats, queue_size=8, mem_size=mem_size, raw=True, event_idx=bool(mode & 0x80)
    )
    try:
        roles = {idx: role for role, idx in queue_indexes(h.features).items()}
        arena = h.alloc.alloc(16 << 10, 4096)
        h.mem.write(arena, inp.take(inp.u16() % ((16 << 10) + 1)))
        tables = h.alloc.alloc(8 * 16 * 8, 16)
        discards: list[tuple[int, int]] = []
        orig_discard = h.mem.discard

        def discard(addr: int, n: int) -> int:
            discards.append((addr, n))
            return orig_discard(addr, n)

        h.mem.discard = discard  # type: ignore[method-assign]
        # device-writable ranges offered on reporting_vq, and PFN pages on inflateq
        report_writable: list[tuple[int, int]] = []
        inflate_named: set[int] = set()
        next_desc = {i: 0 for i in roles}
        for step in range(24):
            if inp.left < 2:
                break
            op = inp.u8()
            # what the device writes is checked around each of its steps (the
            # harness writes descriptors and available rings between them)
            before, mark = h.mem.read(0, mem_size), len(discards)
            if op & 0xC0 == 0xC0:  # a host action or a driver config write
                act = op & 7
                if act == 0:
                    dev.set_target(inp.u32())
                elif act == 1:
                    dev.request_stats()
                elif act == 2:
                    dev.start_hinting()
                elif act == 3:
                    dev.stop_hinting()
                elif act == 4:
                    dev.done_hinting()
                elif act == 5:
                    off = inp.u8() % (BALLOON_CONFIG.size + 4)
                    dev.write_config(off, inp.take(1 + inp.u8() % 8))
                elif act == 6:
                    dev.run_timers(float("inf"))
                else:
                    dev.config_bytes()
                _check_balloon_writes(h, before, discards[mark:], mem_size)
                continue
            qi = sorted(roles)[(op & 7) % len(roles)]
            ring = h.raw[qi]
            assert isinstance(ring, RawSplitRing)
            role = roles[qi]
            n = 1 + (op >> 3 & 3)
            head = next_desc[qi]
            descs: list[tuple[int, int, int]] = []
            for _ in range(n):
                sel = inp.u8()
                if sel & 0x80:  # anywhere at all, outside RAM too
                    addr, length = inp.u32(), inp.u16()
                else:
                    addr = arena + inp.u16() % (16 << 10)
                    length = inp.u16() % ((16 << 10) + 64)
                flags = sel & 2  # VIRTQ_DESC_F_WRITE
                descs.append((addr, length, flags))
            if op & 0x20 and n > 1:  # an indirect table holding the chain
                at = tables + (step % 8) * 16 * 8
                entries = [
                    (a, ln, fl | (1 if j + 1 < n else 0), j + 1)
                    for j, (a, ln, fl) in enumerate(descs)
                ]
                size = ring.table(at, entries)
                ring.desc(head, at, size, 4)  # VIRTQ_DESC_F_INDIRECT
                next_desc[qi] = (head + 1) % ring.size
            else:
                for j, (a, ln, fl) in enumerate(descs):
                    i = (head + j) % ring.size
                    nxt = (i + 1) % ring.size
                    ring.desc(i, a, ln, fl | (1 if j + 1 < n else 0), nxt)
                next_desc[qi] = (head + n) % ring.size
            for a, ln, fl in descs:
                if role is BalloonQueue.REPORTING_VQ and fl:
                    report_writable.append((a, ln))
                if role is BalloonQueue.INFLATEQ and not fl:
                    raw = h.mem.read(a, ln) if h.mem.contains(a, max(1, ln)) else b""
                    for k in range(0, len(raw) - 3, 4):
                        inflate_named.add(int.from_bytes(raw[k : k + 4], "little"))
            ring.offer(head)
            before, mark = h.mem.read(0, mem_size), len(discards)
            dev.queue_notified(qi)
            _check_balloon_writes(h, before, discards[mark:], mem_size)
            for reason in h.host.resets:
                if not isinstance(reason, DriverError):
                    raise AssertionError(f"the balloon model failed: {reason!r}")
            if h.needs_reset:
                break
            for _id, used_len in ring.used():
                if used_len != 0:
                    raise AssertionError(f"used length {used_len} on {role.name}")
        for addr, n in discards:
            page = addr >> 12
            if n == 4096 and addr & 0xFFF == 0 and page in inflate_named:
                continue
            if any(a <= addr and addr + n <= a + ln for a, ln in report_writable):
                continue
            raise AssertionError(f"discarded {addr:#x}+{n:#x}: no inflated page, no report")
    finally:
        h.close()
        dev.close()


def _check_balloon_writes(
    h: Any, before: bytes, discards: list[tuple[int, int]], mem_size: int
) -> None:
    """Guest RAM changed during one device step only in the used rings and where the
    device discarded (those discards are checked against what was inflated or
    reported by the caller)."""
    after = h.mem.read(0, mem_size)
    if after == before:
        return
    allowed = sorted([(r.addrs.device, 6 + 8 * r.size) for r in h.raw] + discards)
    pos = 0
    for a, n in [*allowed, (mem_size, 0)]:
        if a > pos and before[pos:a] != after[pos:a]:
            changed = next(i for i in range(pos, a) if before[i] != after[i])
            raise AssertionError(f"the balloon wrote {changed:#x}, outside its areas")
        pos = max(pos, a + n)


# -- register models -----------------------------------------------------------------------


def fuzz_pci_registers(data: bytes) -> None:
    """A virtio-pci function (modern, transitional or legacy) under arbitrary
    configuration space and BAR accesses from a hostile driver."""
    from pyvirtio.devices.blk import BlkDevice, MemoryBackend
    from pyvirtio.transport.pci.device import VirtioPciFunction

    inp = Input(data)
    mode = ("modern", "transitional", "legacy")[inp.u8() % 3]
    mem = _mem("pci")
    device = BlkDevice(MemoryBackend(64 * 512), num_queues=2, io_threads=0)
    fn = VirtioPciFunction(device, mode=mode)  # type: ignore[arg-type]
    fn.connect(mem, lambda addr, data: None, lambda level: None)
    try:
        for _ in range(64):
            if inp.left < 4:
                break
            op = inp.u8()
            size = (1, 2, 4, 8)[op >> 1 & 3]
            value = int.from_bytes(inp.take(size), "little")
            if op & 0x10:
                off = inp.u16() % 256
                if op & 1:
                    fn.cfg_write(off, min(size, 4), value & 0xFFFFFFFF)
                else:
                    fn.cfg_read(off, min(size, 4))
            else:
                bar = inp.u8() % 6
                off = inp.u16()
                if op & 1:
                    fn.bar_write(bar, off, size, value)
                else:
                    fn.bar_read(bar, off, size)
    finally:
        fn.close()


def fuzz_mmio_registers(data: bytes) -> None:
    """A virtio-mmio device (v2 or v1) under arbitrary register accesses."""
    from pyvirtio.testing import EchoDevice
    from pyvirtio.transport.mmio.device import VirtioMmioDevice

    inp = Input(data)
    mem = _mem("mmio")
    model = VirtioMmioDevice(EchoDevice(num_queues=2), version=1 + inp.u8() % 2)
    model.connect(mem, lambda level: None)
    try:
        for _ in range(64):
            if inp.left < 3:
                break
            op = inp.u8()
            size = (1, 2, 4, 8)[op >> 1 & 3]
            off = inp.u16() % 0x200
            if op & 1:
                model.write(off, size, int.from_bytes(inp.take(size), "little"))
            else:
                model.read(off, size)
    finally:
        model.close()


# -- the network device ------------------------------------------------------------------

_NET_MAC = bytes.fromhex("525400123456")
_GUARD = b"\xee" * 64


def _net_rig(inp: Input, extra: tuple[int, ...], *, vnet: bool | None = None) -> Any:
    """A NetDevice on a fake vnet back-end or a switch port, in a DeviceHarness,
    with a feature set drawn from the input (always a consistent one: the device
    refusing it is not what these targets look at). None if the harness refused."""
    from pyvirtio.devices.net import NetDevice, Switch
    from pyvirtio.devices.net.device import FEATURE_REQUIRES
    from pyvirtio.spec.net import NetFeature as NF
    from pyvirtio.testing import DeviceHarness
    from tests.devices._net_support import FakeVnetBackend

    mode = inp.u8()
    bits = inp.u16()
    use_vnet = bool(mode & 2) if vnet is None else vnet
    backend: Any = FakeVnetBackend(channels=1 + (mode >> 5 & 1)) if use_vnet else None
    if backend is None:
        sw = Switch()
        backend = sw.port("dev", backlog=4)
        sw.port("wire")
    mtu = 68 + inp.u16() % 9000 if mode & 4 else None
    pairs = 1 + (mode >> 3 & 3)
    dev = NetDevice(backend, mac=_NET_MAC, mtu=mtu, queue_pairs=pairs, queue_max_size=64)
    pool = (NF.MAC, NF.STATUS, NF.MRG_RXBUF, NF.MTU, *extra)
    want = 0
    for i, b in enumerate(pool):
        if bits >> i & 1:
            want |= 1 << b
    if mode & 0x40:
        want |= 1 << NF.MQ | 1 << NF.CTRL_VQ
    want &= dev.device_features()
    for _ in range(3):  # close over §5.1.3.1 by dropping what lacks its requirement
        for b, needs in FEATURE_REQUIRES.items():
            if want >> b & 1 and not any(want >> n & 1 for n in needs):
                want &= ~(1 << b)
    try:
        return DeviceHarness(
            dev, packed=bool(mode & 1), features=want, queue_size=16, mem_size=1 << 20
        )
    except ValueError:
        dev.close()
        return None


def _net_check_resets(h: Any) -> None:
    """Only a DriverError may set DEVICE_NEEDS_RESET; anything else was a crash of
    the device model (caught by the framework and turned into a DeviceError)."""
    for reason in h.host.resets:
        if not isinstance(reason, DriverError):
            raise AssertionError(f"the device model failed: {reason}")


def _net_close(h: Any) -> None:
    dev = h.device
    h.close()
    dev.close()
    wire = getattr(dev.backend, "switch", None)
    if wire is not None:
        for p in wire.ports:
            p.close()


def fuzz_net_tx(data: bytes) -> None:
    """Hostile transmit chains: any header (flags, GSO type and sizes, checksum
    offsets, hdr_len), any cut into descriptors, writable parts, runts and oversize
    frames. Every chain is answered with used length 0 (or the queue stops with a
    DriverError), nothing is written into a transmit buffer, and what reaches the
    back-end is a frame of at most MAX_FRAME with a header the features allow."""
    from pyvirtio.devices.net.backend import MAX_FRAME
    from pyvirtio.spec.net import NetFeature as NF

    inp = Input(data)
    h = _net_rig(inp, (NF.CSUM, NF.HOST_TSO4, NF.HOST_TSO6, NF.HOST_ECN, NF.HOST_UFO))
    if h is None:
        return
    try:
        dev = h.device
        f = h.features
        txq = 1 + 2 * (inp.u8() % dev.max_pairs)
        for i in range(8):
            if inp.left < 2:
                break
            shape = inp.u8()
            head = inp.take(12)
            # a frame near MAX_FRAME (either side of it), or a short one
            body = bytes(64000 + inp.u16() % 2000) if shape & 0x80 else inp.take(inp.u8())
            raw = head + body
            cuts = [inp.u8() % 40 for _ in range(shape & 3)]
            parts, pos = [], 0
            for c in cuts:
                parts.append(raw[pos : pos + c])
                pos += c
            parts.append(raw[pos:])
            parts = [p for p in parts if p] or [b""]
            writable = [inp.u8() % 33] if shape & 0x40 else []
            try:
                segs = h.add(txq, parts, writable, token=i)
            except QueueFullError:
                break
            h.kick(txq)
            _net_check_resets(h)
            for _token, n in h.used(txq):
                if n != 0:
                    raise AssertionError(f"transmit used length {n}")
            for addr, n in segs:
                if h.mem.read(addr, max(1, n) + 64) != b"\xee" * (max(1, n) + 64):
                    raise AssertionError("the device wrote into a transmit buffer")
        be = dev.backend
        if be.vnet_hdr:
            for _ch, frame in be.sent:
                if len(frame) - 12 > MAX_FRAME:
                    raise AssertionError(f"a {len(frame)}-byte frame reached the back-end")
                flags, gso = frame[0], frame[1]
                if flags & ~1:
                    raise AssertionError(f"flags {flags:#x} passed to the back-end")
                if flags and not f >> NF.CSUM & 1:
                    raise AssertionError("NEEDS_CSUM passed without VIRTIO_NET_F_CSUM")
                base = gso & 0x7F
                need = {0: None, 1: NF.HOST_TSO4, 4: NF.HOST_TSO6}.get(base, -1)
                if need == -1 or (need is not None and not f >> need & 1):
                    raise AssertionError(f"gso_type {gso:#x} passed, not negotiated")
    finally:
        _net_close(h)


def fuzz_net_ctrl(data: bytes) -> None:
    """Hostile control commands: any class, command and data, cut anyhow, with
    zero, one or several writable parts, between link changes and announcements.
    Every command is answered with one ack byte (VIRTIO_NET_OK or _ERR) written
    into the first writable byte only, and the device state stays sane."""
    from pyvirtio.spec.net import NetFeature as NF

    inp = Input(data)
    h = _net_rig(
        inp,
        (
            NF.CTRL_VQ,
            NF.CTRL_RX,
            NF.CTRL_RX_EXTRA,
            NF.CTRL_VLAN,
            NF.CTRL_MAC_ADDR,
            NF.GUEST_ANNOUNCE,
            NF.CTRL_GUEST_OFFLOADS,
            NF.GUEST_CSUM,
            NF.GUEST_TSO4,
            NF.GUEST_TSO6,
            NF.GUEST_ECN,
        ),
    )
    if h is None:
        return
    try:
        dev = h.device
        if not h.features >> NF.CTRL_VQ & 1:
            return
        cq = dev._ctrl_index
        for i in range(12):
            if inp.left < 3:
                break
            op = inp.u8()
            if op & 0xC0 == 0xC0:
                dev.set_link(bool(op & 1))
                dev.announce()
                continue
            cls, cmd = inp.u8() % 8, inp.u8() % 6
            if op & 0x20:
                cls, cmd = inp.u8(), inp.u8()
            if op & 0x10:  # a MAC table of plausible shape
                n1, n2 = inp.u8() % 4, inp.u8() % 4
                body = (
                    n1.to_bytes(4, "little")
                    + inp.take(6 * n1)
                    + n2.to_bytes(4, "little")
                    + inp.take(6 * n2)
                )[: 8 + 6 * (n1 + n2) - (op & 1)]
            else:
                body = inp.take(inp.u8() % 24)
            raw = bytes([cls, cmd]) + body
            cut = inp.u8() % (len(raw) + 1)
            parts = [p for p in (raw[:cut], raw[cut:]) if p] or [b""]
            writable = [inp.u8() % 4 for _ in range(op >> 2 & 3)]
            try:
                segs = h.add(cq, parts, writable, token=i)
            except QueueFullError:
                break
            h.kick(cq)
            _net_check_resets(h)
            used = h.used(cq)
            if h.needs_reset:
                return
            if len(used) != 1:
                raise AssertionError(f"control command answered {used}")
            n = used[0][1]
            first = next(((a, m) for a, m in segs if m), None)
            if first is None:
                if n != 0:
                    raise AssertionError("an ack with no writable byte")
            else:
                if n != 1 or h.mem.read(first[0], 1)[0] not in (0, 1):
                    raise AssertionError(f"used length {n}, ack {h.mem.read(first[0], 1)!r}")
            for addr, m in segs:
                start = 1 if first is not None and addr == first[0] else 0
                tail = h.mem.read(addr + start, max(1, m) - start + 64)
                if m and tail != b"\xee" * len(tail):
                    raise AssertionError("the device wrote past the ack byte")
            # (any 6 bytes may be set with MAC_ADDR_SET: the spec does not ask the
            # device to refuse a multicast one, and QEMU takes it too)
            if not (1 <= dev.curr_pairs <= dev.max_pairs) or len(dev.mac) != 6:
                raise AssertionError(f"device state: pairs {dev.curr_pairs} mac {dev.mac!r}")
            if len(dev.config_bytes()) != 17:
                raise AssertionError("config space size changed")
    finally:
        _net_close(h)


def fuzz_net_rx(data: bytes) -> None:
    """Hostile receive buffers (sizes, counts, several descriptors, readable parts,
    MRG_RXBUF on and off) against frames (and vnet headers) from the back-end.
    Nothing is written outside the writable buffers or past the used length;
    num_buffers is right; every buffer but the last of a frame is full; the frames
    the driver gets are ones sent, in order; a buffer with a readable part or too
    small for the header is a DriverError and nothing else."""
    from pyvirtio.spec.net import NetFeature as NF
    from tests.devices._net_support import hdr as mkhdr

    inp = Input(data)
    h = _net_rig(inp, (NF.GUEST_CSUM, NF.GUEST_TSO4, NF.GUEST_TSO6, NF.GUEST_ECN))
    if h is None:
        return
    try:
        dev = h.device
        be = dev.backend
        mrg = bool(h.features >> NF.MRG_RXBUF & 1)
        posted: dict[int, list[tuple[int, int]]] = {}
        sent: list[bytes] = []
        rx = _RxFrames(dev.hdr_len, mrg)
        token = 0
        for _round in range(6):
            if inp.left < 2:
                break
            op = inp.u8()
            for _ in range(op & 7):  # post buffers
                nseg = 1 + (inp.u8() % 3 if op & 0x40 else 0)
                sizes = [inp.u16() % 2100 if op & 0x80 else inp.u8() for _ in range(nseg)]
                readable = [b"\x00" * 4] if inp.u8() == 0xFF else []
                try:
                    segs = h.add(0, readable, sizes, token=token)
                except QueueFullError:
                    break
                posted[token] = segs
                token += 1
            h.kick(0)
            for _ in range(op >> 3 & 3):  # frames from the back-end
                n = 14 + inp.u16() % 9000
                frame = (_NET_MAC + inp.take(8) + bytes(n))[:n]
                if be.vnet_hdr:
                    b = inp.take(4)
                    be.push(mkhdr(b[0], b[1], 0, b[2] | b[3] << 8, 0, 0) + frame)
                else:
                    for p in be.switch.ports:
                        if p is not be:
                            p.send(0, [frame])
                sent.append(frame)
            for _ in range(50):  # serve the host event sources as a transport does
                readers = dev.events.readers()
                ready = select.select(list(readers), [], [], 0)[0] if readers else []
                if not ready:
                    break
                for fd in ready:
                    dev.host_event(fd)
            _net_check_resets(h)
            if h.needs_reset:
                return
            for tok, n in h.used(0):
                segs = posted.pop(tok)
                cap = sum(m for _, m in segs)
                if n > cap:
                    raise AssertionError(f"used length {n} > buffer {cap}")
                buf = b"".join(h.mem.read(a, m) for a, m in segs)
                if buf[n:] != b"\xee" * (cap - n):
                    raise AssertionError("bytes written past the used length")
                rx.add(buf[:n], cap)
        for segs in posted.values():
            for addr, m in segs:
                if h.mem.read(addr + max(1, m), 64) != _GUARD:
                    raise AssertionError("the device wrote past a receive buffer")
        it = iter(sent)
        for g in rx.frames:
            if not any(g == s for s in it):
                raise AssertionError("the driver got a frame that was not sent, or out of order")
    finally:
        _net_close(h)


class _RxFrames:
    """Reassembles received frames from used buffers in order, checking
    num_buffers and that every merged buffer but the last is full."""

    def __init__(self, hdr_len: int, mrg: bool) -> None:
        self.hdr_len = hdr_len
        self.mrg = mrg
        self.need = 0
        self.parts: list[bytes] = []
        self.frames: list[bytes] = []

    def add(self, data: bytes, cap: int) -> None:
        hl = self.hdr_len
        if self.need == 0:
            if len(data) < hl:
                raise AssertionError(f"a used buffer of {len(data)} bytes, below the header")
            nb = int.from_bytes(data[10:12], "little") if hl >= 12 else 1
            if nb < 1 or (not self.mrg and nb != 1):
                raise AssertionError(f"num_buffers {nb} (MRG_RXBUF {self.mrg})")
            self.need = nb
            self.parts = [data[hl:]]
        else:
            self.parts.append(data)
        self.need -= 1
        if self.need and len(data) != cap:
            raise AssertionError("a merged buffer but the last was not filled")
        if self.need == 0:
            self.frames.append(b"".join(self.parts))
            self.parts = []


# -- the console device -------------------------------------------------------------------

_CON_MEM = 256 << 10
_CON_BUDGET = 160 << 10  # bytes of clean buffers one run may allocate
#: what a console device may send the driver (virtio-v1.2 §5.3.6.2): DEVICE_ADD,
#: DEVICE_REMOVE, CONSOLE_PORT, RESIZE, PORT_OPEN, PORT_NAME
_CON_DEVICE_EVENTS = (1, 2, 4, 5, 6, 7)


class _FuzzConsoleBackend:
    """A console back-end the input scripts: host input chunks, a write limit
    (0: all), connect and hang-up."""

    def __init__(self, accept: int, connected: bool) -> None:
        self.inbox: list[bytes] = []
        self.out = bytearray()
        self.accept = accept
        self.is_connected = connected
        self.closed = False

    def fileno(self) -> int | None:
        return None

    @property
    def connected(self) -> bool:
        return self.is_connected and not self.closed

    def read(self, n: int) -> bytes | None:
        if not self.inbox or n <= 0:
            return None
        chunk, self.inbox[0] = self.inbox[0][:n], self.inbox[0][n:]
        if not self.inbox[0]:
            self.inbox.pop(0)
        return chunk or None

    def write(self, data: bytes) -> int:
        n = len(data) if self.accept == 0 else min(self.accept, len(data))
        self.out += data[:n]
        return n

    def close(self) -> None:
        self.closed = True


#: chain id -> (writable segments, clean, descriptor count)
_Chains = dict[int, tuple[list[tuple[int, int]], bool, int]]


class _ConsoleRig:
    """A ConsoleDevice in a DeviceHarness with raw rings: the target writes every
    descriptor itself (clean buffers from the allocator, hostile ones anywhere) and
    checks each device step against a snapshot of guest RAM."""

    def __init__(self, inp: Input) -> None:
        from pyvirtio.devices.console import ConsoleDevice, ConsolePort
        from pyvirtio.spec.console import ConsoleFeature as CF
        from pyvirtio.testing import DeviceHarness

        mode = inp.u8()
        self.max_ports = 1 + inp.u8() % 3
        nports = 1 + inp.u8() % self.max_ports
        ports = [
            ConsolePort(
                _FuzzConsoleBackend(inp.u8() % 5, bool(i & 1 or mode & 0x80)),
                name=f"p{i}" if mode >> 5 & 1 else None,
                console=i == 0,
            )
            for i in range(nports)
        ]
        self.dev = ConsoleDevice(ports, max_nr_ports=self.max_ports, queue_max_size=8)
        features = (CF.MULTIPORT.mask if mode & 2 else 0) | (CF.SIZE.mask if mode & 4 else 0)
        self.packed = bool(mode & 1)
        self.in_order = bool(mode & 8)
        self.h = DeviceHarness(
            self.dev,
            packed=self.packed,
            in_order=self.in_order,
            event_idx=bool(mode & 0x10),
            indirect=False,
            features=features,
            queue_size=8,
            mem_size=_CON_MEM,
            raw=True,
        )
        self.multiport = bool(features & CF.MULTIPORT.mask)
        self.budget = _CON_BUDGET
        #: device-writable ranges ever offered (the device may write there only)
        self.writable: list[tuple[int, int]] = []
        self.areas: list[tuple[int, int]] = []
        for ring in self.h.raw:
            if isinstance(ring, RawPackedRing):
                self.areas += [(ring.addrs.desc, 16 * ring.size), (ring.addrs.device, 4)]
            else:
                self.areas.append((ring.addrs.device, 6 + 8 * ring.size))
        self.pos = [0] * len(self.h.raw)  # next split descriptor index per queue
        self.bid = [0] * len(self.h.raw)
        self.chains: list[_Chains] = [{} for _ in self.h.raw]
        #: queues whose used entries are no longer checked: a chain id was reused
        #: while it may be outstanding, or a damaged chain may span others
        self.tainted: set[int] = set()
        self.hostile = self.h.alloc.alloc(4096, 16)  # the scratch area hostile chains name

    def clean(self, n: int, data: bytes = b"") -> int | None:
        """A fresh buffer of ``n`` bytes (``data`` in it), None past the budget."""
        if self.budget < n + 64:
            return None
        self.budget -= n + 64
        addr = self.h.buf(n)
        if data:
            self.h.mem.write(addr, data[:n])
        return addr

    def chain(self, q: int, descs: list[tuple[int, int, bool]], clean: bool, wild: int) -> None:
        """Make ``descs`` (addr, len, writable) one chain on queue ``q``; ``wild``
        bits damage it (a stray NEXT, a bad ``next``, a head never written)."""
        from pyvirtio.spec.ring import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

        ring = self.h.raw[q]
        writes = [(a, n) for a, n, w in descs if w]
        self.writable += writes
        if isinstance(ring, RawPackedRing):
            bid = self.bid[q] = (self.bid[q] + 1) % ring.size
            head: tuple[int, int, int] | None = None
            for k, (a, n, w) in enumerate(descs):
                more = k < len(descs) - 1 or wild & 1
                flags = int(VIRTQ_DESC_F_WRITE if w else 0) | int(VIRTQ_DESC_F_NEXT if more else 0)
                if k == 0:
                    head = (ring.pos, ring.avail_bits(), flags)
                    # the head is made available last (§2.8.21), as a driver does
                    ring.put(a, n, bid, flags)
                    pos, _bits, _ = head
                    self.h.mem.write_le16(ring.desc_addr(pos) + 14, flags)
                else:
                    ring.put(a, n, bid, flags)
            if head is not None and not wild & 0x400:
                pos, bits, flags = head
                self.h.mem.write_le16(ring.desc_addr(pos) + 14, flags | bits)
            self._record(q, bid, writes, clean and not wild, len(descs), wild)
        else:
            first = self.pos[q]
            for k, (a, n, w) in enumerate(descs):
                i = (first + k) % ring.size
                more = k < len(descs) - 1 or wild & 1
                flags = int(VIRTQ_DESC_F_WRITE if w else 0) | int(VIRTQ_DESC_F_NEXT if more else 0)
                nxt = (i + 1) % ring.size if not wild & 2 else wild >> 2 & 0xFF
                ring.desc(i, a, n, flags, nxt)
            self.pos[q] = (first + len(descs)) % ring.size
            ring.offer(first if not wild & 0x400 else wild >> 11 & 0x1F)
            self._record(q, first, writes, clean and not wild, len(descs), wild)

    def _record(
        self, q: int, cid: int, writes: list[tuple[int, int]], clean: bool, n: int, wild: int
    ) -> None:
        if wild or cid in self.chains[q]:
            self.tainted.add(q)
        self.chains[q][cid] = (writes, clean, n)

    def step(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run one device call and check what it did to guest RAM and the queues."""
        mem = self.h.mem
        before = mem.read(0, _CON_MEM)
        fn(*args)
        after = mem.read(0, _CON_MEM)
        if before != after:
            pos = 0
            for a, n in [*sorted(self.writable + self.areas), (_CON_MEM, 0)]:
                if a > pos and before[pos:a] != after[pos:a]:
                    bad = next(i for i in range(pos, a) if before[i] != after[i])
                    raise AssertionError(f"the console device wrote {bad:#x}, no buffer of its")
                pos = max(pos, a + n)
        for reason in self.h.host.resets:
            if not isinstance(reason, DriverError):
                raise AssertionError(f"the console device failed: {reason!r}")
        self.check_used()

    def check_used(self) -> None:
        from pyvirtio.spec.console import CONTROL_RECEIVEQ, port_of_queue

        if self.in_order:
            return  # used elements may be batched: not read one by one here
        for q, ring in enumerate(self.h.raw):
            if q in self.tainted:
                continue
            if isinstance(ring, RawPackedRing):
                used = _packed_used(ring, self.chains[q])
            else:
                used = ring.used()
            for cid, n in used:
                if cid not in self.chains[q]:
                    raise AssertionError(f"queue {q}: used id {cid} is not outstanding")
                segs, clean, _ = self.chains[q].pop(cid)
                room = sum(m for _, m in segs)
                if n > room:
                    raise AssertionError(f"queue {q}: used length {n} > {room} writable")
                where = port_of_queue(q)
                if where is not None and where[1] and n:
                    raise AssertionError(f"transmitq {q}: used length {n}")
                if q == CONTROL_RECEIVEQ and clean and n:
                    msg = b"".join(self.h.mem.read(a, m) for a, m in segs)[:n]
                    if n >= 8:
                        pid, event = struct.unpack_from("<IH", msg)
                        if pid >= self.max_ports or event not in _CON_DEVICE_EVENTS:
                            raise AssertionError(f"control message {msg.hex()} to the driver")
                    elif n < min(8, room):
                        raise AssertionError(f"a {n}-byte control message")

    def close(self) -> None:
        dev = self.dev
        self.h.close()
        dev.close()


def _packed_used(ring: RawPackedRing, chains: _Chains) -> list[tuple[int, int]]:
    """The used descriptors of a raw packed ring, each skipping its chain's length."""
    from pyvirtio.spec.ring import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED

    both = int(VIRTQ_DESC_F_AVAIL) | int(VIRTQ_DESC_F_USED)
    out = []
    for _ in range(ring.size):
        _a, n, bid, flags = ring.read(ring._used_pos)
        if flags & both != (both if ring._used_wrap else 0):
            break
        out.append((bid, n))
        ring._used_pos += chains[bid][2] if bid in chains else 1
        if ring._used_pos >= ring.size:
            ring._used_pos -= ring.size
            ring._used_wrap = not ring._used_wrap
    return out


def fuzz_console_control(data: bytes) -> None:
    """Hostile control-queue messages (any id, event, value and length, cut into
    descriptors, some device-writable), receive and transmit buffers of any shape
    and direction, and hostile chains (stray NEXT, bad ``next``, addresses outside
    RAM, heads never made available) against a ConsoleDevice on raw rings, between
    host-side calls (add_port, remove_port, resize, host input, hang-ups). Only a
    DriverError may stop a queue; the device writes nowhere but the writable buffers
    it was given and its used rings; every used length fits its buffer (0 on the
    transmitqs); every control message to the driver names a port below
    max_nr_ports and an event a device may send. (No indirect descriptors: their
    tables are the ring targets' business.)"""
    from pyvirtio.devices.console import ConsolePort
    from pyvirtio.errors import ConfigurationError
    from pyvirtio.spec.console import CONTROL_RECEIVEQ, CONTROL_TRANSMITQ, receiveq, transmitq

    inp = Input(data)
    try:
        rig = _ConsoleRig(inp)
    except ValueError:
        return
    try:
        h, dev = rig.h, rig.dev
        nq = len(h.raw)
        for _ in range(32):
            if inp.left < 2:
                break
            op = inp.u8()
            kind = op & 7
            port = inp.u8() % (rig.max_ports + 1)
            if kind == 0 and rig.multiport:  # a control message for the device
                if op & 0x80:
                    body = inp.take(inp.u8() % 16)
                else:
                    pid = port if not op & 0x40 else inp.u32()
                    body = struct.pack("<IHH", pid, inp.u8() % 10, inp.u8() % 3)
                cut = inp.u8() % (len(body) + 1)
                parts = [p for p in (body[:cut], body[cut:]) if p] or [b""]
                descs = []
                for part in parts:
                    a = rig.clean(max(1, len(part)), part)
                    if a is None:
                        break
                    descs.append((a, len(part), bool(op & 0x20 and not descs)))
                if descs:
                    rig.chain(CONTROL_TRANSMITQ, descs, True, 0)
                    rig.step(h.kick, CONTROL_TRANSMITQ)
            elif kind in (1, 2):  # buffers for the control receiveq or a receiveq
                q = CONTROL_RECEIVEQ if kind == 1 and rig.multiport else receiveq(port % 2)
                if q >= nq:
                    continue
                descs = []
                for k in range(1 + (op >> 3 & 1)):
                    n = inp.u8() % 40 if k else 1 + inp.u8() % 64
                    a = rig.clean(max(1, n))
                    if a is None:
                        break
                    descs.append((a, n, not (op & 0x40 and k == 0)))
                if descs:
                    rig.chain(q, descs, True, 0)
                    rig.step(h.kick, q)
            elif kind == 3:  # transmit
                q = transmitq(port % 2)
                if q >= nq:
                    continue
                payload = inp.take(inp.u8())
                a = rig.clean(max(1, len(payload)), payload)
                if a is None:
                    break
                descs = [(a, len(payload), False)]
                if op & 0x40:
                    w = rig.clean(8)
                    if w is not None:
                        descs.append((w, 8, True))
                rig.chain(q, descs, True, 0)
                rig.step(h.kick, q)
            elif kind == 4:  # host input, connect and hang-up, then a notification
                cp = dev.ports.get(port)
                if cp is None or not isinstance(cp.backend, _FuzzConsoleBackend):
                    continue
                be = cp.backend
                if op & 0x40:
                    be.is_connected = not be.is_connected
                    rig.step(dev.guarded, "host state", dev._host_state, cp)
                be.inbox.append(inp.take(inp.u8()))
                if receiveq(port) < nq:
                    rig.step(h.kick, receiveq(port))
                rig.step(dev.run_timers, float("inf"))
            elif kind == 5:  # host-side API
                which = op >> 3 & 3
                try:
                    if which == 0:
                        nb = _FuzzConsoleBackend(inp.u8() % 5, bool(op & 0x40))
                        name = inp.take(inp.u8() % 8).decode("latin-1") if op & 0x80 else None
                        at = None if op & 0x20 else port
                        rig.step(dev.add_port, ConsolePort(nb, name=name), at)
                    elif which == 1:
                        rig.step(dev.remove_port, port)
                    else:
                        rig.step(dev.resize, inp.u16(), inp.u16(), port)
                except ConfigurationError:
                    pass
            elif kind == 6:  # a hostile chain on any queue
                q = inp.u8() % nq
                descs = []
                for _k in range(1 + (op >> 3 & 3)):
                    sel = inp.u8()
                    n = inp.u16() % 4200
                    if sel & 0xC0 == 0xC0:
                        a = (0xFFFF_FFF0, _CON_MEM - 8, 0)[sel % 3]
                    else:
                        off = inp.u16() % 4096
                        a, n = rig.hostile + off, min(n, 4096 - off)
                    descs.append((a, n, bool(sel & 1)))
                # their writable parts are allowed targets, never read for content
                rig.chain(q, descs, False, inp.u32() | 1 if op & 0x80 else 0)
                rig.step(h.kick, q)
            elif kind == 7:  # a notification for any queue, with nothing new
                rig.step(h.kick, inp.u8() % nq)
    finally:
        rig.close()


#: Every target, by name.
TARGETS: dict[str, Callable[[bytes], None]] = {
    "split_device": fuzz_split_device,
    "packed_device": fuzz_packed_device,
    "split_driver": fuzz_split_driver,
    "packed_driver": fuzz_packed_driver,
    "vhost_user_codec": fuzz_vhost_user_codec,
    "vhost_user_backend": fuzz_vhost_user_backend,
    "vfio_user_server": fuzz_vfio_user_server,
    "blk_requests": fuzz_blk_requests,
    "pci_registers": fuzz_pci_registers,
    "mmio_registers": fuzz_mmio_registers,
    "net_tx": fuzz_net_tx,
    "net_ctrl": fuzz_net_ctrl,
    "net_rx": fuzz_net_rx,
    "console_control": fuzz_console_control,
    "balloon_requests": fuzz_balloon_requests,
}

#: Exceptions no target may let out (everything else a target lets out is a finding
#: too; these are listed to say what is *not* a defined answer).
UNDECLARED = (GuestMemoryError, struct.error, IndexError, KeyError, TypeError)


def seeds(name: str) -> list[bytes]:
    """Inputs to start each target from: for the device rings, images of rings a
    pyvirtio driver filled (as in the ring unit tests); for vhost-user, a front-end's
    opening sequence; short random inputs for the rest."""
    import random

    rnd = random.Random(name)
    out = [b"", bytes(64), b"\xff" * 64]
    if name in ("split_device", "packed_device"):
        out += [_ring_seed(name == "packed_device", n, rnd) for n in (1, 3, 8)]
    elif name in ("vhost_user_codec", "vhost_user_backend"):
        out.append(_vhost_seed(framed=name == "vhost_user_backend"))
    elif name.startswith("net_"):
        out += _net_seeds(name)
    elif name == "vfio_user_server":
        out.append(_vfio_user_seed())
    elif name == "console_control":
        out += _console_seeds()
    elif name == "balloon_requests":
        out += _balloon_seeds()
    out += [bytes(rnd.randrange(256) for _ in range(rnd.randrange(16, 600))) for _ in range(4)]
    return out


def _ring_seed(packed: bool, chains: int, rnd: object) -> bytes:
    size = 16
    mem = GuestMemory.create(MEM, name="fuzz-seed")
    try:
        alloc = GuestAllocator(0x1000, MEM - 0x1000)
        bits = Feature.INDIRECT_DESC.mask | Feature.EVENT_IDX.mask
        features = Feature.VERSION_1.mask | bits | (Feature.RING_PACKED.mask if packed else 0)
        q = make_driver_queue(mem, alloc, size, features)
        assert q.addrs == _ring_layout(size, packed)
        for i in range(chains):
            out = alloc.alloc(32)
            inb = alloc.alloc(32)
            mem.write(out, b"seed request %d" % i)
            segs_out = [(out, 16), (out + 16, 16)] if i % 2 else [(out, 32)]
            q.add(segs_out, [(inb, 32)], i)
        q.kick_prepare()
        image = mem.read(0x1000, 0x3000).rstrip(b"\0")
    finally:
        mem.close()
    size_byte = 4 if not packed else size  # 1 << 4 == 16
    return bytes([0b011, size_byte]) + b"\xff" * 8 + image


def _vhost_seed(framed: bool) -> bytes:
    from pyvirtio.transport.vhost_user.codec import encode
    from pyvirtio.transport.vhost_user.spec import FrontendRequest as R
    from pyvirtio.transport.vhost_user.spec import VhostVringState

    msgs = [
        encode(R.GET_FEATURES),
        encode(R.GET_PROTOCOL_FEATURES),
        encode(R.SET_PROTOCOL_FEATURES, 0x3F),
        encode(R.SET_OWNER),
        encode(R.SET_FEATURES, 1 << 32 | 1 << 30),
        encode(R.SET_VRING_NUM, VhostVringState(0, 16)),
        encode(R.SET_VRING_BASE, VhostVringState(0, 0)),
        encode(R.GET_VRING_BASE, VhostVringState(0, 0)),
    ]
    if not framed:
        return b"".join(msgs)
    return b"".join(m + b"\0" for m in msgs)  # one fd-count byte after each message


def _vfio_user_seed() -> bytes:
    """A QEMU-like opening: VERSION, DEVICE_GET_INFO, region and IRQ information, a
    configuration read, enabling the device, MSI-X set-up, a common-config read."""
    from pyvirtio.transport.vfio_user import spec
    from pyvirtio.transport.vfio_user.codec import encode_command, encode_version

    C = spec.Command
    msgs = [
        encode_command(1, C.VERSION, encode_version(0, 0, {"max_msg_fds": 16})),
        encode_command(2, C.DEVICE_GET_INFO, spec.DEVICE_INFO.pack(spec.DeviceInfo(16, 0, 0, 0))),
        encode_command(
            3, C.DEVICE_GET_REGION_INFO, spec.REGION_INFO.pack(spec.RegionInfo(32, 0, 4, 0, 0, 0))
        ),
        encode_command(4, C.DEVICE_GET_IRQ_INFO, spec.IRQ_INFO.pack(spec.IrqInfo(16, 0, 2, 0))),
        encode_command(5, C.REGION_READ, spec.REGION_ACCESS.pack(spec.RegionAccess(0, 7, 256))),
        encode_command(
            6, C.REGION_WRITE, spec.REGION_ACCESS.pack(spec.RegionAccess(4, 7, 2)) + b"\x06\x00"
        ),
        encode_command(7, C.DEVICE_SET_IRQS, spec.IRQ_SET.pack(spec.IrqSet(20, 0x24, 2, 0, 1))),
        encode_command(8, C.REGION_READ, spec.REGION_ACCESS.pack(spec.RegionAccess(0x14, 4, 1))),
        encode_command(9, C.DEVICE_RESET),
    ]
    # mode byte, "send VERSION" byte 0, then per message: u16 length-1, fd count 0
    out = bytearray([0, 0])
    for m in msgs:
        out += (len(m) - 1).to_bytes(2, "little") + m + b"\0"
    return bytes(out)


def _balloon_seeds() -> list[bytes]:
    """Well-formed balloon traffic (see the target for the layout): a PFN array,
    statistics and a hinting command id in the arena; inflate, deflate, a stats
    buffer, a hinting round and a report, split direct and indirect."""
    u16 = lambda v: v.to_bytes(2, "little")  # noqa: E731
    pfns = struct.pack("<8I", *range(40, 48))  # pages in the 256 KiB harness RAM
    stats = b"".join(struct.pack("<HQ", t, 1000 * t) for t in (4, 5, 8))
    cmd = struct.pack("<I", 2)
    arena = pfns.ljust(1024, b"\0") + stats.ljust(1024, b"\0") + cmd
    out = []
    # MUST_TELL_HOST, STATS_VQ, FREE_PAGE_HINT, REPORTING, discard; event_idx; all
    for mode in (0x6B, 0xEB, 0x7F):
        ops = b""
        ops += bytes([0]) + bytes([0]) + u16(0) + u16(32)  # inflate 8 PFNs
        ops += bytes([1]) + bytes([0]) + u16(0) + u16(16)  # deflate 4
        ops += bytes([2]) + bytes([0]) + u16(1024) + u16(30)  # stats buffer
        ops += bytes([0xC1])  # request stats
        ops += bytes([0xC2])  # start hinting: cmd id 2
        ops += bytes([3 | 1 << 3]) + bytes([0]) + u16(2048) + u16(4) + bytes([2])
        ops += u16(4096) + u16(4096)  # the id, then a hinted (writable) page
        ops += bytes([4 | 0x20 | 1 << 3]) + bytes([2]) + u16(8192) + u16(4096)
        ops += bytes([2]) + u16(12288) + u16(4096)  # an indirect report of two pages
        ops += bytes([0xC0]) + struct.pack("<I", 0) + bytes([0xC5, 4, 3, 0, 0, 0, 0])
        out.append(bytes([mode]) + u16(8) + u16(len(arena)) + arena + ops)
    return out


def _net_seeds(name: str) -> list[bytes]:
    """Well-formed inputs of the net targets (see the targets for the layout):
    a vnet back-end and a switch port, split and packed, every feature of the pool."""
    u16 = lambda v: v.to_bytes(2, "little")  # noqa: E731
    vhdr = struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 0)
    out = []
    if name == "net_tx":
        for mode in (0x02, 0x03, 0x00, 0x46):
            chain = bytes([1]) + vhdr + bytes([100]) + bytes(100) + bytes([12])
            plain = bytes([0]) + bytes(12) + bytes([60]) + b"\x02" * 60
            big = bytes([0x80]) + bytes(12) + u16(1554)  # MAX_FRAME exactly
            out.append(bytes([mode]) + u16(0xFFFF) + b"\x00" + chain + plain + big)
    elif name == "net_ctrl":
        for mode in (0x00, 0x01, 0x42):
            mac_u, mac_m = bytes.fromhex("52540000aaaa"), bytes.fromhex("01005e000001")
            # op, class, command, data length, data, cut, writable size
            cmds = [
                bytes([0x04, 0, 0, 1, 0, 1, 1]),  # RX PROMISC 0
                bytes([0x14, 1, 0, 1, 1]) + mac_u + mac_m + bytes([0, 1]),  # TABLE_SET
                bytes([0x04, 1, 1, 6]) + bytes.fromhex("525400fedcba") + bytes([2, 1]),
                bytes([0x04, 4, 0, 2, 2, 0, 0, 1]),  # MQ VQ_PAIRS_SET 2
                bytes([0x04, 2, 0, 2, 5, 0, 0, 1]),  # VLAN ADD 5
                bytes([0xC0]),  # link down + announce
                bytes([0x04, 3, 0, 0, 0, 1]),  # ANNOUNCE ACK
                bytes([0x04, 5, 0, 8, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1]),  # GUEST_OFFLOADS
            ]
            out.append(bytes([mode]) + u16(0xFFFF) + b"".join(cmds))
    else:
        for mode in (0x02, 0x00, 0x03):
            for bits in (0xFFFF, 0xFFFB):  # with and without MRG_RXBUF
                post = bytes([0x08 | 0x80 | 4]) + b"".join(
                    u16(s) + b"\x00" for s in (100, 300, 2000, 12)
                )
                frames = u16(1500) + bytes(8) + bytes([1, 1, 0xA8, 5])
                out.append(bytes([mode]) + u16(bits) + post + frames + post + frames)
    return out


def _console_seeds() -> list[bytes]:
    """Well-formed console sessions (layout in :func:`fuzz_console_control`): the
    multiport handshake, data both ways on two ports, a port added, a resize and a
    removal, on split and packed rings; and port 0 alone without MULTIPORT."""

    def ctl(port: int, event: int, value: int) -> bytes:
        return bytes([0x00, port, event, value, 0])

    def session(mode: int) -> bytes:
        rig = bytes([mode, 2, 1, 0, 3])  # max_nr_ports 3, two ports, write limits
        ops = [bytes([0x01, 0, 63]) for _ in range(6)]
        ops += [ctl(0, 0, 1), ctl(0, 3, 1), ctl(1, 3, 1), ctl(0, 6, 1), ctl(1, 6, 1)]
        ops += [bytes([0x02, 0, 63]), bytes([0x0A, 1, 40, 20])]  # receive buffers
        ops += [bytes([0x04, 0, 5]) + b"hello", bytes([0x04, 1, 70]) + bytes(range(70))]
        ops += [bytes([0x03, 0, 6]) + b"guest!", bytes([0x03, 1, 9]) + b"to-port-1"]
        ops += [bytes([0x01, 0, 63]) for _ in range(4)]
        ops += [bytes([0xE5, 0, 0, 3]) + b"hot", ctl(2, 3, 1), ctl(2, 6, 1)]
        ops += [bytes([0x15, 0]) + (100).to_bytes(2, "little") + (30).to_bytes(2, "little")]
        ops += [bytes([0x0D, 2]), bytes([0x07, 2])]
        return rig + b"".join(ops)

    single = bytes([0x84, 0, 0, 0]) + bytes([0x02, 0, 63, 0x04, 0, 3]) + b"abc"
    single += bytes([0x03, 0, 4]) + b"out!"
    return [session(0xA6), session(0xA7), session(0xB6), single]
