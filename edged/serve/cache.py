"""Optional result reuse: an LRU of results keyed by a hash of the inputs, and coalescing of
identical requests that are in flight together. Cleared whenever the model's version changes."""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable

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


# Keys of larger inputs are hashed on a thread (blake2b: about 1 ms per MiB here).
HASH_ON_THREAD_BYTES = 256 * 1024

Submit = Callable[[], "asyncio.Future[InferenceResult]"]
Wait = Callable[["asyncio.Future[InferenceResult]"], Awaitable[InferenceResult]]


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

    async def result(
        self, inputs: dict[str, Array], version: str, submit: Submit, wait: Wait
    ) -> InferenceResult:
        """This version's cached result for ``inputs``, else the run of identical inputs already
        in flight, else a new run (``submit``); ``wait`` awaits a run's future (deadlines)."""
        if sum(v.nbytes for v in inputs.values()) > HASH_ON_THREAD_BYTES:
            key = await asyncio.to_thread(input_key, inputs)
        else:
            key = input_key(inputs)
        hit = self.get(key)
        if hit is not None and hit.model_version == version:
            return hit
        shared = self.inflight.get(key)
        if shared is not None:
            self.coalesced += 1
            return await wait(asyncio.shield(shared))
        future = submit()
        self.inflight[key] = future
        try:
            result = await wait(asyncio.shield(future))
        finally:
            self.inflight.pop(key, None)
        self.put(key, result)
        return result

    def clear(self) -> None:
        self._results.clear()
