"""A model slot: the version currently serving, handed out as reference-counted handles.

``swap`` switches atomically; the old version is closed when its last handle is released,
so batches already running finish on the version they started with.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edged.modelrepo.config import ModelConfig
from edged.runtime.base import LoadedModel

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ServedVersion:
    model_name: str
    version: str
    version_dir: Path
    model: LoadedModel
    config: ModelConfig
    memory_estimate_bytes: int
    _refs: int = 0
    _retired: bool = False
    _closed: threading.Event = field(default_factory=threading.Event)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wait_closed(self, timeout_s: float) -> bool:
        return self._closed.wait(timeout_s)

    def _close(self) -> None:
        self.model.close()
        self._closed.set()
        log.info("released %s version %s", self.model_name, self.version)


class ModelSlot:
    """Holds at most one serving version of one model."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._current: ServedVersion | None = None
        # Called after every swap, from the thread that swapped (the engine tells front ends).
        self.on_swap: Callable[[], None] | None = None

    @property
    def current(self) -> ServedVersion | None:
        return self._current

    def acquire(self) -> ServedVersion | None:
        with self._lock:
            version = self._current
            if version is not None:
                version._refs += 1
            return version

    def hold(self, version: ServedVersion) -> bool:
        """One more handle on ``version`` (current or not), unless it is being closed."""
        with self._lock:
            if version._retired and version._refs == 0:
                return False
            version._refs += 1
            return True

    def hold_beside(self, version: ServedVersion) -> ServedVersion:
        """Take a version loaded beside the current one (never current) with one handle: it
        closes when that handle is released, unless swapped in meanwhile (a probation
        resumed after a restart holds its replaced version this way)."""
        with self._lock:
            version._retired = True
            version._refs += 1
        return version

    def release(self, version: ServedVersion) -> None:
        with self._lock:
            version._refs -= 1
            close = version._retired and version._refs == 0
        if close:
            version._close()

    def swap(self, new: ServedVersion | None) -> ServedVersion | None:
        """Make ``new`` current; retire the old version (closed once its handles are gone)."""
        with self._lock:
            old, self._current = self._current, new
            if new is not None:
                new._retired = False  # a held version swapped back in (probation revert)
            close = False
            if old is not None:
                old._retired = True
                close = old._refs == 0
        if old is not None and close:
            old._close()
        if self.on_swap is not None:
            self.on_swap()
        return old
