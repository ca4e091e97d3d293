"""asyncio compatibility: ``TaskGroup`` on Python 3.11+, the ``taskgroup`` backport on 3.10."""

import sys

if sys.version_info >= (3, 11):
    from asyncio import TaskGroup
else:  # pragma: no cover - JetPack 6 ships Python 3.10
    from taskgroup import TaskGroup

__all__ = ["TaskGroup"]
