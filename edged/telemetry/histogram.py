"""HDR-style log-linear histograms with lock-free per-thread recording.

Values are non-negative integers in a fixed unit (edged records latencies in microseconds).
The bucket layout follows HdrHistogram: every power-of-two range is split into
``sub_bucket_half_count`` linear sub-buckets, so any recorded value is known to within
``1 / sub_bucket_half_count`` of itself (1/128 < 1 % for two significant digits), memory is
fixed, and two histograms with the same layout merge by adding counts.

Why recording needs no lock: each writer thread owns a private shard (a plain ``list[int]``)
found through a ``threading.local``. Only that thread ever stores into its shard, so
``counts[i] += 1`` cannot lose an update even though it is a read-modify-write (which *can*
lose updates when two threads share one list, GIL or not). Readers sum the shards without a
lock: every single slot read is atomic, so a snapshot taken while writers run sees each
slot at some moment during the snapshot and never a torn integer. A snapshot may therefore
include a value's count but not yet its contribution to ``total``; over successive
interval snapshots nothing is lost or counted twice, because shards are never reset —
intervals are cumulative snapshots subtracted from each other.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from edged.errors import HistogramMismatchError

__all__ = [
    "LATENCY_LAYOUT",
    "Histogram",
    "HistogramLayout",
    "HistogramSnapshot",
]


@dataclass(frozen=True)
class HistogramLayout:
    """Bucket geometry: values ``0..highest_trackable`` with ``significant_digits`` precision.

    Values above ``highest_trackable`` are clamped into the top bucket (recording never
    raises on the hot path); negative values are clamped to 0.
    """

    lowest_discernible: int = 1
    highest_trackable: int = 3_600_000_000
    significant_digits: int = 2

    unit_magnitude: int = field(init=False, repr=False, compare=False)
    sub_bucket_half_count_magnitude: int = field(init=False, repr=False, compare=False)
    sub_bucket_half_count: int = field(init=False, repr=False, compare=False)
    sub_bucket_mask: int = field(init=False, repr=False, compare=False)
    bucket_count: int = field(init=False, repr=False, compare=False)
    counts_len: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.lowest_discernible < 1:
            raise ValueError(f"lowest_discernible must be >= 1, got {self.lowest_discernible}")
        if self.highest_trackable < 2 * self.lowest_discernible:
            raise ValueError(
                f"highest_trackable ({self.highest_trackable}) must be at least twice "
                f"lowest_discernible ({self.lowest_discernible})"
            )
        if not 1 <= self.significant_digits <= 5:
            raise ValueError(f"significant_digits must be 1..5, got {self.significant_digits}")
        single_unit_resolution = 2 * 10**self.significant_digits
        sub_bucket_count_magnitude = math.ceil(math.log2(single_unit_resolution))
        half_magnitude = max(sub_bucket_count_magnitude, 1) - 1
        sub_bucket_count = 1 << (half_magnitude + 1)
        unit_magnitude = self.lowest_discernible.bit_length() - 1
        smallest_untrackable = sub_bucket_count << unit_magnitude
        buckets = 1
        while smallest_untrackable <= self.highest_trackable:
            smallest_untrackable <<= 1
            buckets += 1
        set_ = object.__setattr__
        set_(self, "unit_magnitude", unit_magnitude)
        set_(self, "sub_bucket_half_count_magnitude", half_magnitude)
        set_(self, "sub_bucket_half_count", sub_bucket_count // 2)
        set_(self, "sub_bucket_mask", (sub_bucket_count - 1) << unit_magnitude)
        set_(self, "bucket_count", buckets)
        set_(self, "counts_len", (buckets + 1) * (sub_bucket_count // 2))

    def index_of(self, value: int) -> int:
        """The counts slot that ``value`` (clamped into range) falls into."""
        if value < 0:
            value = 0
        elif value > self.highest_trackable:
            value = self.highest_trackable
        bucket = (
            (value | self.sub_bucket_mask).bit_length()
            - self.unit_magnitude
            - self.sub_bucket_half_count_magnitude
            - 1
        )
        sub_bucket = value >> (bucket + self.unit_magnitude)
        return ((bucket + 1) << self.sub_bucket_half_count_magnitude) + (
            sub_bucket - self.sub_bucket_half_count
        )

    def lowest_value_at(self, index: int) -> int:
        """Smallest value that maps to slot ``index``."""
        bucket = (index >> self.sub_bucket_half_count_magnitude) - 1
        sub_bucket = (index & (self.sub_bucket_half_count - 1)) + self.sub_bucket_half_count
        if bucket < 0:
            sub_bucket -= self.sub_bucket_half_count
            bucket = 0
        return sub_bucket << (bucket + self.unit_magnitude)

    def highest_value_at(self, index: int) -> int:
        """Largest value that maps to slot ``index``."""
        bucket = max((index >> self.sub_bucket_half_count_magnitude) - 1, 0)
        return self.lowest_value_at(index) + (1 << (bucket + self.unit_magnitude)) - 1


LATENCY_LAYOUT = HistogramLayout()
"""Microseconds from 1 µs to one hour at two significant digits (3,328 slots)."""


@dataclass(frozen=True)
class HistogramSnapshot:
    """Immutable counts of one histogram; mergeable and subtractable with the same layout."""

    layout: HistogramLayout
    counts: tuple[int, ...]
    total: int = 0
    """Sum of recorded (clamped) values, for the mean."""

    @classmethod
    def empty(cls, layout: HistogramLayout = LATENCY_LAYOUT) -> HistogramSnapshot:
        return cls(layout, (0,) * layout.counts_len, 0)

    @classmethod
    def from_values(
        cls, values: Iterable[int], layout: HistogramLayout = LATENCY_LAYOUT
    ) -> HistogramSnapshot:
        counts = [0] * layout.counts_len
        total = 0
        for value in values:
            counts[layout.index_of(value)] += 1
            total += min(max(value, 0), layout.highest_trackable)
        return cls(layout, tuple(counts), total)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def percentile(self, percentile: float) -> int | None:
        """Value at ``percentile`` (0-100), or None when empty.

        The rank is ``ceil(p/100 * count)`` (the inverted-CDF definition); the value returned
        is the upper bound of the bucket holding that rank, so it is never below the true
        order statistic and at most one bucket width (< 1 % at two digits) above it.
        """
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be within 0..100, got {percentile}")
        count = self.count
        if count == 0:
            return None
        rank = max(1, math.ceil(percentile / 100.0 * count - 1e-9))
        running = 0
        for index, slot in enumerate(self.counts):
            running += slot
            if running >= rank:
                return self.layout.highest_value_at(index)
        raise AssertionError("unreachable: rank is at most the total count")

    def percentiles(self, percentiles: Sequence[float]) -> dict[float, int | None]:
        return {p: self.percentile(p) for p in percentiles}

    @property
    def min(self) -> int | None:
        for index, slot in enumerate(self.counts):
            if slot:
                return self.layout.lowest_value_at(index)
        return None

    @property
    def max(self) -> int | None:
        for index in range(len(self.counts) - 1, -1, -1):
            if self.counts[index]:
                return self.layout.highest_value_at(index)
        return None

    @property
    def mean(self) -> float | None:
        count = self.count
        return self.total / count if count else None

    def buckets(self) -> Iterator[tuple[int, int]]:
        """``(highest value in bucket, count)`` for every non-empty bucket, ascending."""
        for index, slot in enumerate(self.counts):
            if slot:
                yield self.layout.highest_value_at(index), slot

    def merge(self, other: HistogramSnapshot) -> HistogramSnapshot:
        self._check_layout(other)
        return HistogramSnapshot(
            self.layout,
            tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            self.total + other.total,
        )

    def since(self, earlier: HistogramSnapshot) -> HistogramSnapshot:
        """The values recorded between ``earlier`` and this cumulative snapshot."""
        self._check_layout(earlier)
        return HistogramSnapshot(
            self.layout,
            tuple(max(a - b, 0) for a, b in zip(self.counts, earlier.counts, strict=True)),
            max(self.total - earlier.total, 0),
        )

    def _check_layout(self, other: HistogramSnapshot) -> None:
        if other.layout != self.layout:
            raise HistogramMismatchError(
                f"cannot combine histograms with layouts {self.layout} and {other.layout}; "
                "record both with the same HistogramLayout"
            )


class _Shard:
    """One writer thread's counts; the last slot holds the running total of values."""

    __slots__ = ("counts", "owner")

    def __init__(self, length: int, owner: threading.Thread) -> None:
        self.counts = [0] * (length + 1)
        self.owner = weakref.ref(owner)

    def alive(self) -> bool:
        owner = self.owner()
        return owner is not None and owner.is_alive()


class Histogram:
    """A concurrently recordable histogram; see the module docstring for why it needs no lock.

    ``record`` is the hot path. ``snapshot`` returns cumulative counts since creation;
    ``interval`` returns what was recorded since the previous ``interval`` call (one consumer
    should own ``interval``; any number may call ``snapshot``).
    """

    def __init__(self, layout: HistogramLayout = LATENCY_LAYOUT) -> None:
        self.layout = layout
        # ``record`` inlines ``HistogramLayout.index_of`` with these locals: it halves its cost.
        self._highest = layout.highest_trackable
        self._mask = layout.sub_bucket_mask
        self._unit = layout.unit_magnitude
        self._half_magnitude = layout.sub_bucket_half_count_magnitude
        self._half_count = layout.sub_bucket_half_count
        self._bucket_shift = layout.unit_magnitude + layout.sub_bucket_half_count_magnitude + 1
        self._local = threading.local()
        self._shards: list[_Shard] = []
        self._retired = [0] * (layout.counts_len + 1)
        self._shards_lock = threading.Lock()
        self._last_interval = HistogramSnapshot.empty(layout)

    def record(self, value: int) -> None:
        try:
            counts: list[int] = self._local.counts
        except AttributeError:
            counts = self._new_shard()
        if value < 0:
            value = 0
        elif value > self._highest:
            value = self._highest
        bucket = (value | self._mask).bit_length() - self._bucket_shift
        sub_bucket = value >> (bucket + self._unit)
        counts[((bucket + 1) << self._half_magnitude) + sub_bucket - self._half_count] += 1
        counts[-1] += value

    def _new_shard(self) -> list[int]:
        shard = _Shard(self.layout.counts_len, threading.current_thread())
        with self._shards_lock:
            self._shards.append(shard)
        self._local.counts = shard.counts
        return shard.counts

    def snapshot(self) -> HistogramSnapshot:
        with self._shards_lock:
            # Shards of finished threads can no longer change: fold them into one list so the
            # shard count stays bounded when writer threads come and go.
            dead = [s for s in self._shards if not s.alive()]
            for shard in dead:
                self._retired = [a + b for a, b in zip(self._retired, shard.counts, strict=True)]
                self._shards.remove(shard)
            columns = [self._retired] + [s.counts for s in self._shards]
        summed = [sum(column) for column in zip(*columns, strict=True)]
        return HistogramSnapshot(self.layout, tuple(summed[:-1]), summed[-1])

    def interval(self) -> HistogramSnapshot:
        current = self.snapshot()
        delta = current.since(self._last_interval)
        self._last_interval = current
        return delta
