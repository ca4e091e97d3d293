"""The install log: one JSON line per install or rollback attempt in
``<state>/install-log.jsonl``, moved aside to ``.1`` once it outgrows ``MAX_LOG_BYTES``, and
read back newest last."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

MAX_LOG_BYTES = 1024 * 1024


class InstallJournal:
    def __init__(self, path: Path, max_bytes: int = MAX_LOG_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes

    def append(self, entry: Mapping[str, object]) -> None:
        """Add one entry. A log that cannot be written is reported, never raised: the install
        it records has happened (or failed) either way."""
        path = self.path
        line = json.dumps(entry, sort_keys=True) + "\n"
        try:
            if path.exists() and path.stat().st_size > self.max_bytes:
                os.replace(path, path.with_name(path.name + ".1"))
            with path.open("a", encoding="utf-8") as f:
                f.write(line)
        except OSError as exc:
            log.error("cannot write the install log %s: %s", path, exc)

    def history(self, limit: int = 50) -> list[dict[str, object]]:
        """The newest ``limit`` entries, oldest first; unreadable lines are skipped."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries: list[dict[str, object]] = []
        for line in lines[-limit:]:
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries
