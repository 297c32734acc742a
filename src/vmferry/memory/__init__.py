"""Guest RAM (memfd-backed, shareable by fd), dirty bitmaps and page runs."""

from vmferry.memory.dirty import DirtyBitmap, page_runs
from vmferry.memory.guest_memory import PAGE_SIZE, GuestMemory, RamRegion

__all__ = ["PAGE_SIZE", "DirtyBitmap", "GuestMemory", "RamRegion", "page_runs"]
