"""Which event loop the daemon's processes run: uvloop when installed, unless told otherwise."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Mapping
from typing import Any

from edged.errors import ConfigError

EVENT_LOOP_ENV = "EDGED_EVENT_LOOP"


def event_loop_kind(environ: Mapping[str, str]) -> str:
    """``uvloop`` when it is installed, unless ``EDGED_EVENT_LOOP=asyncio`` asks for the
    standard loop; ``EDGED_EVENT_LOOP=uvloop`` insists on it."""
    wanted = environ.get(EVENT_LOOP_ENV, "").strip().lower() or "auto"
    if wanted not in ("auto", "asyncio", "uvloop"):
        raise ConfigError(EVENT_LOOP_ENV, f"must be auto, asyncio or uvloop; got {wanted!r}")
    if wanted == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError as exc:
        if wanted == "uvloop":
            raise ConfigError(
                EVENT_LOOP_ENV, "uvloop is not installed (pip install 'edged[uvloop]')"
            ) from exc
        return "asyncio"
    return "uvloop"


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` on the event loop ``EDGED_EVENT_LOOP`` chooses."""
    if event_loop_kind(os.environ) == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
