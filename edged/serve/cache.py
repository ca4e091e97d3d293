"""Optional result reuse: an LRU of results keyed by a hash of the inputs, and coalescing of
identical requests that are in flight together. Cleared whenever the model's version changes."""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict

import numpy as np

from edged.runtime.base import Array
from edged.serve.scheduler import InferenceResult


def input_key(inputs: dict[str, Array]) -> bytes:
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(inputs):
        value = inputs[name]
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(np.ascontiguousarray(value).data)
    return digest.digest()


class ResultCache:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._results: OrderedDict[bytes, InferenceResult] = OrderedDict()
        self.inflight: dict[bytes, asyncio.Future[InferenceResult]] = {}
        self.hits = 0
        self.coalesced = 0

    def get(self, key: bytes) -> InferenceResult | None:
        result = self._results.get(key)
        if result is not None:
            self._results.move_to_end(key)
            self.hits += 1
        return result

    def put(self, key: bytes, result: InferenceResult) -> None:
        self._results[key] = result
        self._results.move_to_end(key)
        while len(self._results) > self.max_entries:
            self._results.popitem(last=False)

    def clear(self) -> None:
        self._results.clear()
