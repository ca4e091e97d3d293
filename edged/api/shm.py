"""System shared-memory extension: a local camera process registers a POSIX shared-memory
region (``/dev/shm/<key>``) once, then passes frames by reference instead of through a socket.
Off unless ``server.shared_memory = true``."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edged.errors import InvalidRequestError
from edged.runtime.base import Array

SHM_ROOT = Path("/dev/shm")  # noqa: S108 - POSIX shared memory lives here


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap


class SharedMemoryRegistry:
    def __init__(self, root: Path = SHM_ROOT) -> None:
        self._root = root
        self._regions: dict[str, Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if name in self._regions:
            raise InvalidRequestError(f"shared memory region {name!r} is already registered")
        file_name = key.lstrip("/")
        if not file_name or "/" in file_name:
            raise InvalidRequestError(f"shared memory key {key!r} must be a name like '/frames'")
        try:
            fd = os.open(self._root / file_name, os.O_RDWR)
        except OSError as exc:
            raise InvalidRequestError(f"cannot open shared memory {key!r}: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            if offset < 0 or byte_size <= 0 or offset + byte_size > size:
                raise InvalidRequestError(
                    f"region {name!r}: offset {offset} + byte_size {byte_size} exceeds the "
                    f"{size} bytes of {key!r}"
                )
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._regions[name] = Region(name, key, offset, byte_size, mapping)

    def unregister(self, name: str | None) -> None:
        names = list(self._regions) if name is None else [name]
        for n in names:
            region = self._regions.pop(n, None)
            if region is None:
                raise InvalidRequestError(f"shared memory region {n!r} is not registered")
            region.mapping.close()

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        regions = self._regions.values() if name is None else [self._region(name)]
        return [
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in regions
        ]

    def _region(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise InvalidRequestError(f"shared memory region {name!r} is not registered")
        return region

    def _span(self, name: str, offset: int, byte_size: int) -> tuple[Region, int]:
        region = self._region(name)
        if offset + byte_size > region.byte_size:
            raise InvalidRequestError(
                f"region {name!r}: offset {offset} + {byte_size} bytes exceeds its "
                f"{region.byte_size} bytes"
            )
        return region, region.offset + offset

    def read(self, name: str, offset: int, byte_size: int) -> memoryview:
        region, start = self._span(name, offset, byte_size)
        # A copy: the camera may overwrite the region while the request waits in the queue.
        return memoryview(bytes(region.mapping[start : start + byte_size]))

    def write(self, name: str, offset: int, byte_size: int, value: Array) -> None:
        data = np.ascontiguousarray(value).tobytes()
        if byte_size and len(data) > byte_size:
            raise InvalidRequestError(
                f"output needs {len(data)} bytes but region {name!r} offers {byte_size}"
            )
        region, start = self._span(name, offset, len(data))
        region.mapping[start : start + len(data)] = data

    def close(self) -> None:
        self.unregister(None)
