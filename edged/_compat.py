"""Python 3.10 shims (JetPack 6 ships 3.10): ``TaskGroup`` and the timeout error.

Before 3.11, ``asyncio.wait_for`` and friends raise ``asyncio.TimeoutError``, which is *not* the
builtin ``TimeoutError``; ``except TimeoutError`` lets it through. Catch ``TIMEOUT_ERRORS`` (or
``asyncio.TimeoutError``, an alias of the builtin from 3.11 on) wherever an asyncio timeout can
surface.
"""

import asyncio
import sys

if sys.version_info >= (3, 11):
    from asyncio import TaskGroup
else:  # pragma: no cover - JetPack 6 ships Python 3.10
    from taskgroup import TaskGroup

TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, asyncio.TimeoutError)

__all__ = ["TIMEOUT_ERRORS", "TaskGroup"]
