"""A shared-memory arena: one memfd mapped by two processes, carved into slots by its owner.

The owner allocates slots in ring order and frees them in any order; the space behind the
oldest live slot comes back as soon as it is freed. The other process only reads or writes the
slots it is told about (by offset, in a frame of ``edged.engine.wire``). Like Triton's
python_backend, tensors are copied once into shared memory and never through a pipe.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections import deque

ALIGN = 64  # a cache line: numpy and the runtimes read aligned rows fastest


class Arena:
    """A mapping of a shared memory file. ``Arena.create`` makes one (the owner's side); the
    peer maps the same file from the descriptor it received."""

    def __init__(self, fd: int, capacity: int) -> None:
        self.fd = fd
        self.capacity = capacity
        self._map = mmap.mmap(fd, capacity)
        self.view = memoryview(self._map)

    @classmethod
    def create(cls, name: str, capacity: int) -> Arena:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, capacity)
            return cls(fd, capacity)
        except BaseException:
            os.close(fd)
            raise

    def write(self, offset: int, data: memoryview | bytes) -> None:
        self.view[offset : offset + len(data)] = data

    def close(self) -> None:
        self.view.release()
        # A numpy view that still refers to the mapping keeps it alive; it goes with the view.
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self.fd)


class RingAllocator:
    """Slots of an arena, handed out in ring order. Thread-safe: several threads of the owner
    may allocate and free."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._head = 0  # where the next slot starts when it fits
        self._live: deque[list[int]] = deque()  # [offset, size, freed] oldest first
        self._by_offset: dict[int, list[int]] = {}

    @property
    def used(self) -> int:
        with self._lock:
            return sum(e[1] for e in self._live if not e[2])

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a free slot of at least ``nbytes``, or None when none is free now."""
        size = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
        with self._lock:
            if not self._live:
                self._head = 0
                tail = None
            else:
                tail = self._live[0][0]
            head = self._head
            if tail is None or head > tail:  # free: [head, capacity) and [0, tail)
                if head + size <= self.capacity:
                    offset = head
                elif size < (tail if tail is not None else self.capacity + 1):
                    offset = 0
                else:
                    return None
            elif head + size < tail:  # wrapped: free is [head, tail)
                offset = head
            else:
                return None
            entry = [offset, size, 0]
            self._live.append(entry)
            self._by_offset[offset] = entry
            self._head = offset + size
            return offset

    def free(self, offset: int) -> None:
        with self._lock:
            entry = self._by_offset.pop(offset, None)
            if entry is None:
                return
            entry[2] = 1
            live = self._live
            while live and live[0][2]:
                live.popleft()
