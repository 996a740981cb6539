"""GuestMemory: translation, bounds checks, cross-region buffers, sharing by fd."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.errors import GuestMemoryError
from pyvirtio.memory import GuestAllocator, GuestMemory, MemoryRegion
from pyvirtio.memory.guest_memory import u16_words


@pytest.fixture
def two_regions() -> Iterator[GuestMemory]:
    # [0, 64K) and [64K, 128K) adjacent; [1M, 1M+64K) after a hole
    mem = GuestMemory.create_layout([(0, 0x10000), (0x10000, 0x10000), (0x100000, 0x10000)])
    yield mem
    mem.close()


def test_read_write_round_trip(two_regions: GuestMemory) -> None:
    two_regions.write(0x1234, b"hello")
    assert two_regions.read(0x1234, 5) == b"hello"
    two_regions.write_le32(0x100004, 0xDEADBEEF)
    assert two_regions.read_le32(0x100004) == 0xDEADBEEF
    assert two_regions.read(0x100004, 4) == bytes.fromhex("efbeadde")


def test_buffer_crossing_two_mapped_regions_works(two_regions: GuestMemory) -> None:
    data = bytes(range(32))
    two_regions.write(0x10000 - 16, data)
    assert two_regions.read(0x10000 - 16, 32) == data
    views = two_regions.views(0x10000 - 16, 32)
    assert [len(v) for v in views] == [16, 16]
    two_regions.write_le64(0x10000 - 4, 0x0102030405060708)
    assert two_regions.read_le64(0x10000 - 4) == 0x0102030405060708


def test_buffer_crossing_into_a_hole_fails_cleanly(two_regions: GuestMemory) -> None:
    before = two_regions.read(0x1FFF0, 16)
    with pytest.raises(GuestMemoryError):
        two_regions.write(0x1FFF0, b"x" * 32)
    # nothing was written: the check happens before the first byte
    assert two_regions.read(0x1FFF0, 16) == before
    with pytest.raises(GuestMemoryError):
        two_regions.read(0x1FFF0, 32)
    assert not two_regions.contains(0x1FFF0, 32)
    assert two_regions.contains(0x1FFF0, 16)


def test_view_must_lie_in_one_region(two_regions: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        two_regions.view(0xFFF0, 32)
    v = two_regions.view(0xFFF0, 16)
    v[:] = b"z" * 16
    assert two_regions.read(0xFFF0, 16) == b"z" * 16


@pytest.mark.parametrize(
    ("addr", "n"),
    [(-1, 4), (0, -1), ((1 << 64) - 2, 4), (0x20000, 1), (1 << 70, 1)],
)
def test_out_of_ram_or_wrapping_access_raises(two_regions: GuestMemory, addr: int, n: int) -> None:
    with pytest.raises(GuestMemoryError):
        two_regions.read(addr, n)
    with pytest.raises(GuestMemoryError):
        two_regions.views(addr, n)


def test_overlapping_regions_refused() -> None:
    mem = GuestMemory.create(0x10000)
    fd = os.memfd_create("t")
    os.ftruncate(fd, 0x10000)
    r = MemoryRegion(guest_phys_addr=0x8000, size=0x10000, fd=fd)
    with pytest.raises(GuestMemoryError):
        mem.add_region(r)
    r.close()
    mem.close()


def test_memory_is_shared_through_the_fd() -> None:
    mem = GuestMemory.create(0x4000, base=0x4000_0000)
    region = mem.regions[0]
    # another mapping of the same fd (what a second process would do) sees writes
    m = mmap.mmap(region.fd, 0x4000, flags=mmap.MAP_SHARED)
    mem.write(0x4000_0010, b"shared")
    assert m[0x10:0x16] == b"shared"
    m[0x20:0x22] = b"ok"
    assert mem.read(0x4000_0020, 2) == b"ok"
    m.close()
    mem.close()


def test_unaligned_mmap_offset_region() -> None:
    fd = os.memfd_create("t")
    os.ftruncate(fd, 0x3000)
    os.pwrite(fd, b"ABCD", 0x1010)
    mem = GuestMemory([MemoryRegion(guest_phys_addr=0, size=0x1000, fd=fd, mmap_offset=0x1010)])
    assert mem.read(0, 4) == b"ABCD"
    mem.close()


def test_allocated_bytes_counts_a_file_mapped_twice_once() -> None:
    """QEMU over vfio-user maps one guest-RAM memfd as several DMA regions (around the
    VGA hole): its blocks are counted once."""
    fd = os.memfd_create("t")
    os.ftruncate(fd, 0x40000)
    os.pwrite(fd, b"x" * 0x10000, 0)
    low = MemoryRegion(guest_phys_addr=0, size=0x20000, fd=fd, owns_fd=False)
    high = MemoryRegion(guest_phys_addr=0x30000, size=0x10000, fd=fd, mmap_offset=0x30000)
    mem = GuestMemory([low, high])
    blocks = os.fstat(fd).st_blocks * 512
    assert blocks >= 0x10000
    assert mem.allocated_bytes() == blocks
    mem.close()


def test_userspace_address_translation() -> None:
    fd = os.memfd_create("t")
    os.ftruncate(fd, 0x1000)
    r = MemoryRegion(guest_phys_addr=0x10_0000, size=0x1000, fd=fd, userspace_addr=0x7F00_0000)
    mem = GuestMemory([r])
    assert mem.gpa_of_userspace(0x7F00_0010) == 0x10_0010
    with pytest.raises(GuestMemoryError):
        mem.gpa_of_userspace(0x7F00_1000)
    mem.close()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "f"]), st.integers(1, 5000), st.integers(0, 6))))
def test_allocator_never_overlaps_and_coalesces(ops: list[tuple[str, int, int]]) -> None:
    alloc = GuestAllocator(0x1000, 0x10000)
    live: dict[int, int] = {}
    for op, size, align_exp in ops:
        if op == "a":
            try:
                addr = alloc.alloc(size, 1 << align_exp)
            except GuestMemoryError:
                continue
            assert addr % (1 << align_exp) == 0
            assert addr >= 0x1000 and addr + size <= 0x11000
            for a, s in live.items():
                assert addr + size <= a or a + s <= addr
            live[addr] = size
        elif live:
            addr = next(iter(live))
            alloc.free(addr)
            del live[addr]
    for addr in list(live):
        alloc.free(addr)
    assert alloc.free_bytes == 0x10000
    assert alloc.alloc(0x10000, 1) == 0x1000


def test_u16_words_are_never_seen_half_written_by_another_process() -> None:
    # Ring indexes cross the 0x..ff -> 0x..00 boundary every 256 buffers; a
    # byte-by-byte store lets the other side read 0x0000 or 0x01ff in between.
    mem = GuestMemory.create(0x1000)
    words = u16_words(mem.view(0, 0x10))
    words[1] = 0x00FF
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        for _ in range(200_000):
            words[1] = 0x0100
            words[1] = 0x00FF
        os._exit(0)
    torn = 0
    for _ in range(200_000):
        if words[1] not in (0x00FF, 0x0100):
            torn += 1
    os.waitpid(pid, 0)
    words.release()
    mem.close()
    assert torn == 0


def test_discard_gives_memfd_pages_back() -> None:
    """GuestMemory.discard punches a hole in the memfd: its allocated blocks drop and
    the pages read back as zeros; partial pages at the ends are kept."""
    page = mmap.PAGESIZE
    with GuestMemory.create(64 * page) as mem:
        fd = mem.regions[0].fd
        mem.fill(0, 64 * page, 0xAB)
        before = os.fstat(fd).st_blocks
        assert before * 512 >= 64 * page
        # from the middle of page 1 to the middle of page 33: pages 2..32 go
        freed = mem.discard(page + 100, 32 * page)
        assert freed == 31 * page
        after = os.fstat(fd).st_blocks
        assert (before - after) * 512 == 31 * page
        assert mem.read(2 * page, page) == bytes(page)
        assert mem.read(page, 100) == b"\xab" * 100
        assert mem.read(page + 100, page - 100) == b"\xab" * (page - 100)
        assert mem.read(33 * page, 200) == b"\xab" * 200
        # touched again, the page comes back (zero-filled)
        mem.write(2 * page, b"x")
        assert os.fstat(fd).st_blocks > after


def test_discard_outside_guest_ram_is_an_error() -> None:
    with GuestMemory.create(1 << 16) as mem, pytest.raises(GuestMemoryError):
        mem.discard(1 << 20, 4096)
