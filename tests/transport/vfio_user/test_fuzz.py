"""Random and mutated vfio-user commands at the server core: every message gets a
reply (possibly an error) or closes the connection, the core never raises anything
else, and every descriptor sent is either kept by the core or closed."""

from __future__ import annotations

import os
import random

import pytest

from pyvirtio.devices.blk import BlkDevice, MemoryBackend
from pyvirtio.memory.guest_memory import GuestMemory, create_memfd
from pyvirtio.transport.pci.device import VirtioPciFunction
from pyvirtio.transport.vfio_user import spec
from pyvirtio.transport.vfio_user.backend import VfioUserBackend
from pyvirtio.transport.vfio_user.codec import (
    MessageReader,
    VfioUserProtocolError,
    encode_command,
    encode_version,
)
from pyvirtio.transport.vfio_user.spec import HEADER, Command, HeaderFlags

_VALID = {
    Command.DMA_MAP: spec.DMA_MAP.pack(spec.DmaMap(32, 3, 0, 0x100000, 1 << 16)),
    Command.DMA_UNMAP: spec.DMA_UNMAP.pack(spec.DmaUnmap(24, 0, 0x100000, 1 << 16)),
    Command.DEVICE_GET_INFO: spec.DEVICE_INFO.pack(spec.DeviceInfo(16, 0, 0, 0)),
    Command.DEVICE_GET_REGION_INFO: spec.REGION_INFO.pack(spec.RegionInfo(32, 0, 4, 0, 0, 0)),
    Command.DEVICE_GET_IRQ_INFO: spec.IRQ_INFO.pack(spec.IrqInfo(16, 0, 2, 0)),
    Command.DEVICE_SET_IRQS: spec.IRQ_SET.pack(spec.IrqSet(20, 0x24, 2, 0, 1)),
    Command.REGION_READ: spec.REGION_ACCESS.pack(spec.RegionAccess(0x14, 4, 1)),
    Command.REGION_WRITE: spec.REGION_ACCESS.pack(spec.RegionAccess(0x14, 4, 1)) + b"\x01",
    Command.DEVICE_RESET: b"",
}


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(0, 4)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1:
            b += rng.randbytes(rng.randint(1, 8))
        elif op == 2 and b:
            del b[rng.randrange(len(b)) :]
        elif b:
            i = rng.randrange(len(b) - 3) if len(b) > 4 else 0
            b[i : i + 4] = rng.choice([0, 0xFFFFFFFF, 0x80000000, 1, 256]).to_bytes(4, "little")
    return bytes(b)


@pytest.mark.parametrize("seed", range(4))
def test_mutated_commands_get_a_reply_and_leak_no_descriptor(seed: int) -> None:
    rng = random.Random(seed)
    mem = GuestMemory()
    fn = VirtioPciFunction(BlkDevice(MemoryBackend(1 << 20)), mem=mem)
    be = VfioUserBackend(fn, mem)
    reader = MessageReader()
    sent: list[int] = []
    try:
        (m,) = reader.feed(encode_command(0, Command.VERSION, encode_version(0, 0, {})))
        assert be.handle(m) is not None
        for i in range(1, 600):
            cmd = rng.choice([*_VALID, 99, Command.VERSION])
            payload = _mutate(rng, _VALID.get(cmd, b""))
            fds: list[int] = []
            if rng.random() < 0.3:
                fds = [create_memfd(1 << 16) if cmd == Command.DMA_MAP else os.eventfd(0)]
                sent += fds
            raw = encode_command(i, cmd, payload, no_reply=rng.random() < 0.1)
            try:
                msgs = reader.feed(raw, fds)
            except VfioUserProtocolError:
                reader = MessageReader()  # the connection would close here
                continue
            for msg in msgs:
                reply = be.handle(msg)
                if reply is not None:
                    h = HEADER.unpack(reply[:16])
                    assert h.msg_id == i and h.flags & HeaderFlags.REPLY and h.size == len(reply)
            be.take_signals()
    finally:
        be.close()
        fn.close()
        mem.close()
        reader.close()
    leaked = []
    for fd in sent:
        try:
            os.fstat(fd)
        except OSError:
            continue
        leaked.append(fd)
    assert leaked == [], f"{len(leaked)} descriptors neither kept nor closed"
