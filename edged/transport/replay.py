"""Freshness and replay checks for signed commands.

A command is accepted once: its timestamp must lie within ``max_age_s`` before now (and not
more than ``max_future_s`` after, for clock skew), and its nonce must not have been seen within
that window. Older nonces can be forgotten: their commands are stale anyway. ``NonceWindow`` is
the pure rule; ``NonceStore`` keeps it in a file so that a restart does not reopen the window.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from edged._fs import atomic_write
from edged.errors import ReplayedCommandError, StaleCommandError

log = logging.getLogger(__name__)

DEFAULT_MAX_FUTURE_S = 60.0


@dataclass
class NonceWindow:
    max_age_s: float
    max_future_s: float = DEFAULT_MAX_FUTURE_S
    seen: dict[str, int] = field(default_factory=dict)  # nonce -> issued_at

    def check(self, nonce: str, issued_at: int, now: float) -> None:
        age = now - issued_at
        if age > self.max_age_s:
            raise StaleCommandError(
                f"command issued {age:.0f}s ago; commands older than {self.max_age_s:g}s are "
                "refused (mqtt.command_max_age_s; check both clocks)"
            )
        if -age > self.max_future_s:
            raise StaleCommandError(
                f"command issued {-age:.0f}s in the future; more than {self.max_future_s:g}s "
                "of clock skew is refused (check both clocks)"
            )
        if nonce in self.seen:
            raise ReplayedCommandError(f"command nonce {nonce} was used before: replay refused")

    def record(self, nonce: str, issued_at: int) -> None:
        self.seen[nonce] = issued_at

    def prune(self, now: float) -> None:
        horizon = now - self.max_age_s
        self.seen = {n: t for n, t in self.seen.items() if t >= horizon}


class NonceStore:
    """``NonceWindow`` persisted in one JSON file, rewritten atomically on every accept."""

    def __init__(self, path: Path, max_age_s: float, max_future_s: float = DEFAULT_MAX_FUTURE_S):
        self.path = path
        self.window = NonceWindow(max_age_s, max_future_s, self._load())

    def _load(self) -> dict[str, int]:
        try:
            value = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Refusing every command forever would be worse: the window is short, and old
            # commands are refused by their timestamps anyway. Say so loudly.
            log.error("nonce file %s unreadable (%s); starting an empty window", self.path, exc)
            return {}
        if not isinstance(value, dict):
            return {}
        return {str(k): int(v) for k, v in value.items() if isinstance(v, int)}

    def check_and_record(self, nonce: str, issued_at: int, now: float) -> None:
        """Raise ``StaleCommandError`` / ``ReplayedCommandError``, or remember the nonce
        durably before returning (so a crash cannot make it acceptable again)."""
        self.window.prune(now)
        self.window.check(nonce, issued_at, now)
        self.window.record(nonce, issued_at)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.window.seen, sort_keys=True).encode("ascii")
        atomic_write(self.path, data, mode=0o600)
