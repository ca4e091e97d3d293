"""Releases that failed probation on this device, so that nothing re-installs them by itself.

``<state>/probation-reverted.json``: ``{"reverted": {"<manifest sha256>": {"model", "version",
"counter", "reason", "at"}}}``, written atomically. The installer refuses a bundle whose
manifest is listed (``RevertedReleaseError``): a fixed model needs a new signed release.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged._fs import atomic_write
from edged.errors import RevertedReleaseError, StoreCorruptError

log = logging.getLogger(__name__)

REVERTED_FILE = "probation-reverted.json"
MAX_ENTRIES = 256  # the oldest are dropped; their counters are below the mark anyway


@dataclass(frozen=True)
class RevertedRelease:
    manifest_sha256: str
    model: str
    version: int
    counter: int
    reason: str
    at: int


class RevertedList:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / REVERTED_FILE

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            value = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreCorruptError(
                f"{self.path} is unreadable ({exc}); it lists releases that failed probation: "
                "repair or remove it by hand"
            ) from exc
        entries = value.get("reverted") if isinstance(value, dict) else None
        if not isinstance(entries, dict):
            raise StoreCorruptError(f"{self.path} has no 'reverted' object: repair or remove it")
        return entries

    def add(self, release: RevertedRelease) -> None:
        entries = self._read()
        entries[release.manifest_sha256] = {
            "model": release.model,
            "version": release.version,
            "counter": release.counter,
            "reason": release.reason,
            "at": release.at,
        }
        newest = sorted(entries.items(), key=lambda kv: int(kv[1].get("at", 0)))[-MAX_ENTRIES:]
        data = json.dumps({"reverted": dict(newest)}, indent=1, sort_keys=True).encode()
        atomic_write(self.path, data)

    def check(self, manifest_sha256: str) -> None:
        """Raise ``RevertedReleaseError`` if this manifest failed probation here."""
        entry = self._read().get(manifest_sha256)
        if entry is not None:
            raise RevertedReleaseError(
                f"{entry.get('model')} version {entry.get('version')} (counter "
                f"{entry.get('counter')}) failed probation on this device and was reverted "
                f"({entry.get('reason')}); it is not installed again: sign a new release with "
                "a higher counter"
            )
