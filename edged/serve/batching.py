"""The batching decision, with no threads, locks or clocks: which queued requests run together.

Queues are ordered by priority (index 0 first) and FIFO inside. ``fill`` moves the requests that
can join ``batch`` into it: the highest-priority ones first, in order, with the same signature
(non-batch shapes and dtypes) and without passing ``max_rows``. It stops at the first request
that cannot join, so nothing overtakes a request of its own queue, and it never looks at a
lower-priority queue while a higher one still holds a request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    @property
    def rows(self) -> int: ...

    @property
    def signature(self) -> Hashable: ...

    @property
    def enqueued_at(self) -> float: ...


Q = TypeVar("Q", bound=Queued)


@dataclass
class Batch(Generic[Q]):
    items: list[Q] = field(default_factory=list)
    rows: int = 0

    @property
    def first_enqueued_at(self) -> float | None:
        return self.items[0].enqueued_at if self.items else None


def fill(batch: Batch[Q], queues: Sequence[deque[Q]], max_rows: int) -> bool:
    """Move what can join ``batch`` from ``queues`` into it; True when the batch is complete
    (``max_rows`` reached, or a queued request can never join it). False means the queues are
    empty: a caller that waits for the batch to fill may call ``fill`` again later. The first
    request always joins, even one with more rows than ``max_rows``."""
    for queue in queues:
        while queue:
            item = queue[0]
            if batch.items and (
                item.signature != batch.items[0].signature or batch.rows + item.rows > max_rows
            ):
                return True
            queue.popleft()
            batch.items.append(item)
            batch.rows += item.rows
            if batch.rows >= max_rows:
                return True
    return False
