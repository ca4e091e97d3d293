"""The batching decision, exhaustively over small queues: every combination of two priority
queues holding up to three requests (one or two rows, one of two signatures), for batch limits
of one to four rows."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from edged.serve.batching import Batch, fill


@dataclass(frozen=True)
class Req:
    rows: int
    signature: str
    enqueued_at: float


KINDS = [(rows, sig) for rows in (1, 2) for sig in ("a", "b")]


def queue_contents() -> list[tuple[tuple[int, str], ...]]:
    return [combo for n in range(4) for combo in itertools.product(KINDS, repeat=n)]


def scenarios() -> list[tuple[list[list[Req]], int]]:
    out: list[tuple[list[list[Req]], int]] = []
    contents = queue_contents()
    for high, low in itertools.product(contents, contents):
        t = itertools.count()
        queues = [[Req(r, s, float(next(t))) for r, s in q] for q in (high, low)]
        out.extend((queues, max_rows) for max_rows in (1, 2, 3, 4))
    return out


def test_every_small_case_keeps_the_batching_rules() -> None:
    cases = scenarios()
    assert len(cases) == 85 * 85 * 4
    for original, max_rows in cases:
        queues = [deque(q) for q in original]
        batch: Batch[Req] = Batch()
        complete = fill(batch, queues, max_rows)
        taken = batch.items
        # Each queue gave a prefix of itself: nothing overtakes a request of its own queue.
        for before, after in zip(original, queues, strict=True):
            given = len(before) - len(after)
            assert list(after) == before[given:]
        given_counts = [len(b) - len(a) for b, a in zip(original, queues, strict=True)]
        assert taken == [r for q, n in zip(original, given_counts, strict=True) for r in q[:n]]
        # A lower-priority queue gives only once every higher one is empty.
        if given_counts[1]:
            assert not queues[0]
        if not taken:
            assert not any(original) and not complete
            continue
        # One signature, within the limit (the first request always runs, whatever its size).
        assert {r.signature for r in taken} == {taken[0].signature}
        assert batch.rows == sum(r.rows for r in taken)
        assert batch.rows <= max_rows or len(taken) == 1
        assert batch.first_enqueued_at == taken[0].enqueued_at
        # Complete exactly when full or blocked by a request that cannot join; else drained.
        nxt = next((q[0] for q in queues if q), None)
        if nxt is None:
            assert complete == (batch.rows >= max_rows)
        else:
            assert complete
            assert (
                batch.rows >= max_rows
                or nxt.signature != taken[0].signature
                or batch.rows + nxt.rows > max_rows
            )


def test_a_batch_waiting_to_fill_takes_later_arrivals() -> None:
    queues: list[deque[Req]] = [deque([Req(1, "a", 0.0)]), deque()]
    batch: Batch[Req] = Batch()
    assert not fill(batch, queues, 4)
    queues[1].append(Req(2, "a", 1.0))  # arrives while the worker waits
    assert not fill(batch, queues, 4)
    queues[0].append(Req(1, "a", 2.0))
    assert fill(batch, queues, 4)
    assert [r.enqueued_at for r in batch.items] == [0.0, 1.0, 2.0]
    assert batch.rows == 4
