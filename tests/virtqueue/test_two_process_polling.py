"""Both ring formats under real concurrency: our driver queue here and our device
queue in another process over shared memfd RAM, both busy-polling, no notifications.

Every field the other side reads while we write it must change in one store: a used
descriptor whose flags read 0 for a moment looks "used" on a lap whose wrap counter
is 0 (virtio-v1.2 §2.8.1), and the driver then reaps a Buffer ID that is not in flight
(§2.8.22). Each round adds ``batch`` two-segment chains and reaps them, checking
every id and every echoed byte.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pyvirtio.memory import GuestAllocator, GuestMemory
from pyvirtio.spec.features import Feature
from pyvirtio.virtqueue import make_driver_queue

MEM = 1 << 20
STOP = 0x800  # a word of guest RAM the device process watches
SECONDS = 2.0


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("in_order", [False, True], ids=["any-order", "in-order"])
def test_polling_driver_and_device_in_two_processes(
    packed: bool, batch: int, in_order: bool
) -> None:
    features = Feature.VERSION_1.mask | Feature.EVENT_IDX.mask
    if packed:
        features |= Feature.RING_PACKED.mask
    if in_order:
        features |= Feature.IN_ORDER.mask
    mem = GuestMemory.create(MEM)
    alloc = GuestAllocator(0x1000, MEM - 0x1000)
    size = 128
    drv = make_driver_queue(mem, alloc, size, features)
    fd = mem.regions[0].fd
    a = drv.addrs
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.virtqueue.polling_device",
            f"--fd={fd}",
            f"--mem-size={MEM}",
            f"--queue-size={size}",
            f"--addrs={a.desc},{a.driver},{a.device}",
            f"--features={features:#x}",
            f"--stop={STOP:#x}",
        ],
        pass_fds=[fd],
        stderr=subprocess.PIPE,
        text=True,
    )
    bufs = [(alloc.alloc(16), alloc.alloc(16)) for _ in range(batch)]
    rounds = 0
    try:
        end = time.monotonic() + SECONDS
        while time.monotonic() < end and child.poll() is None:
            for i, (out, inb) in enumerate(bufs):
                mem.write(out, (rounds * batch + i).to_bytes(16, "little"))
                mem.fill(inb, 16, 0xEE)
                drv.add([(out, 16)], [(inb, 16)], i)
            drv.kick_prepare()
            got: set[int] = set()
            limit = time.monotonic() + 10
            while len(got) < batch:
                used = drv.get_used()  # raises DeviceError on a torn used entry
                if used is None:
                    assert time.monotonic() < limit, "the device stopped answering"
                    continue
                token, written = used
                assert token not in got and written == 16
                got.add(token)
                out, inb = bufs[token]
                assert mem.read(inb, 16) == mem.read(out, 16)
            rounds += 1
    finally:
        mem.write_le32(STOP, 1)
        _, err = child.communicate(timeout=30)
        mem.close()
    assert child.returncode == 0, err
    assert rounds > 3, f"only {rounds} rounds ran"


class _Recording:
    """Wraps a ``struct.Struct``: records the byte ranges each ``pack_into`` covers."""

    def __init__(self, inner: object, log: list[tuple[int, int]]) -> None:
        self.inner = inner
        self.log = log
        self.size = inner.size  # type: ignore[attr-defined]

    def pack_into(self, buf: object, offset: int, *values: object) -> None:
        self.log.append((offset, offset + self.size))
        self.inner.pack_into(buf, offset, *values)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.mark.parametrize("side", ["device", "driver"])
def test_packed_descriptor_flags_are_only_written_by_one_16_bit_store(
    side: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic twin of the stress above: publishing never runs a whole-descriptor
    ``pack_into`` (which zero-fills the flags first) over a descriptor the peer may be
    polling - the driver's heads (every chain here is one descriptor, so every
    descriptor is a head), the device's used descriptors."""
    from pyvirtio.virtqueue.packed import device as pdev
    from pyvirtio.virtqueue.packed import driver as pdrv

    features = Feature.VERSION_1.mask | Feature.RING_PACKED.mask
    mem = GuestMemory.create(MEM)
    alloc = GuestAllocator(0x1000, MEM - 0x1000)
    drv = make_driver_queue(mem, alloc, 8, features)
    from pyvirtio.virtqueue import make_device_queue

    dev = make_device_queue(mem, 8, drv.addrs, features)
    log: list[tuple[int, int]] = []
    mod = pdev if side == "device" else pdrv
    for name in ("_DESC", "_DESC_BODY"):
        monkeypatch.setattr(mod, name, _Recording(getattr(mod, name), log))
    try:
        for lap in range(3):  # laps with both wrap counter values
            for i in range(8):
                buf = alloc.alloc(16)
                drv.add([], [(buf, 8)], (lap, i))
                drv.kick_prepare()
                chain = dev.pop()
                assert chain is not None
                dev.push(chain, 8)
                dev.flush()
                assert drv.get_used() == ((lap, i), 8)
                alloc.free(buf)
        assert log, "nothing was recorded"
        for start, end in log:  # offsets into the Descriptor Ring
            for d in range(8):
                flags = 16 * d + 14
                assert not start <= flags < end, (
                    f"a {end - start}-byte pack_into at ring offset {start} rewrote "
                    f"descriptor {d}'s flags"
                )
    finally:
        drv.close()
        mem.close()
