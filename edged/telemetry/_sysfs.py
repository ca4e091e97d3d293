"""Tolerant readers for sysfs attribute files: a missing or unreadable attribute is None."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def read_text(path: Path) -> str | None:
    """The stripped contents of ``path``, or None if it is missing or unreadable."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as exc:
        # I2C sensors can fail a read with EIO while the bus is busy: skip this sample.
        logger.debug("cannot read %s: %s", path, exc)
        return None


def read_int(path: Path) -> int | None:
    """The leading integer of ``path`` (sysfs sometimes appends a unit), or None."""
    text = read_text(path)
    if not text:
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        logger.debug("%s does not hold an integer: %r", path, text)
        return None


def is_readable(path: Path) -> bool:
    """True if ``path`` can be opened and read now (RAPL counters are often root-only)."""
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError:
        return False
    return True
