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
import struct
from collections.abc import Callable

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


#: Every target, by name.
TARGETS: dict[str, Callable[[bytes], None]] = {
    "split_device": fuzz_split_device,
    "packed_device": fuzz_packed_device,
    "split_driver": fuzz_split_driver,
    "packed_driver": fuzz_packed_driver,
    "vhost_user_codec": fuzz_vhost_user_codec,
    "vhost_user_backend": fuzz_vhost_user_backend,
    "blk_requests": fuzz_blk_requests,
    "pci_registers": fuzz_pci_registers,
    "mmio_registers": fuzz_mmio_registers,
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
