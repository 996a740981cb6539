"""Guest memory: regions, address translation, bounds-checked views, driver allocator."""

from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory, MemoryRegion, create_memfd

__all__ = ["GuestAllocator", "GuestMemory", "MemoryRegion", "create_memfd"]
