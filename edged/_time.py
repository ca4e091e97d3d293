"""Timestamps for people: one UTC format for every message, log line and CLI table."""

from __future__ import annotations

import datetime as dt


def utc_text(epoch: float) -> str:
    """Unix seconds as ``YYYY-MM-DD HH:MM:SSZ``; out-of-range values are shown as they are."""
    try:
        return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{epoch} (Unix seconds)"
