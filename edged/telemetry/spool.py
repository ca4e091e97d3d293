"""A crash-safe, size-capped, append-only spool of telemetry records on disk.

Records are JSON objects stamped with a ``seq`` that increases by one per record and never
repeats, across restarts too. The spool is a directory of segment files named by their first
``seq``; each record is one frame ``magic(2) | length(4, big-endian) | crc32(4) | JSON`` where
the CRC covers the length and the JSON, written with a single ``write()``.

* ``append`` returns once the frame is in the kernel (``fsync=False``: survives ``kill -9``)
  or on the device (``fsync=True``, the default: also survives power loss).
* ``peek(n)`` returns the oldest unacknowledged records in ``seq`` order; ``ack(seq)``
  acknowledges everything up to ``seq`` durably (temp file, fsync, rename, fsync dir) before
  it returns, so acknowledged records are never delivered again. Delivery is at-least-once:
  a consumer that crashes between publishing and ``ack`` sees records again and dedupes by
  ``seq``.
* On open, a torn or corrupt frame (a crash mid-write) and everything after it in that
  segment is truncated away.
* When appending would exceed ``max_bytes``, the oldest segments are evicted: their
  unacknowledged records are first summarised into a gap marker record
  (``{"type": "gap", "from_seq", "to_seq", "dropped", "summary"}``) appended with its own
  ``seq``, and only then deleted, so a crash in between over-reports a gap rather than
  losing records silently.

One process owns a spool directory at a time (``flock``); inside it, methods are serialised by
a lock, but they do blocking file I/O: call them from a thread, not the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from edged._fs import atomic_write, fsync_dir, remove_temp_files
from edged.errors import SpoolError, SpoolLockedError, SpoolRecordTooLargeError

logger = logging.getLogger(__name__)

__all__ = ["Spool", "summarise_records"]

_MAGIC = b"eT"
_HEADER = struct.Struct(">2sII")
_LENGTH = struct.Struct(">I")
_SEGMENT_SUFFIX = ".seg"
_STATE_FILE = "state.json"
_LOCK_FILE = "lock"
_SUMMARY_SKIPPED_FIELDS = frozenset({"seq", "v", "ts"})
MIN_MAX_BYTES = 4096


@dataclass
class _Segment:
    path: Path
    entries: list[tuple[int, int, int]] = field(default_factory=list)
    """(seq, offset, frame length) of every intact frame, in order."""
    size: int = 0

    @property
    def last_seq(self) -> int | None:
        return self.entries[-1][0] if self.entries else None


def _encode(record: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(record, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise SpoolError(
            f"telemetry record is not valid JSON ({exc}); use only str, int, float, bool, None, "
            "lists and dicts, and null instead of NaN or infinity"
        ) from exc


def _frame(payload: bytes) -> bytes:
    length = _LENGTH.pack(len(payload))
    return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(length + payload)) + payload


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{_SEGMENT_SUFFIX}"


class Spool:
    """See the module docstring. ``max_bytes`` caps the segment files' total size."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 16 * 1024 * 1024,
        fsync: bool = True,
        clock: Callable[[], float] = time.time,
        segment_bytes: int | None = None,
    ) -> None:
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"max_bytes must be at least {MIN_MAX_BYTES}, got {max_bytes}")
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_record_bytes = max_bytes // 4
        self._max_gap_bytes = max_bytes // 8
        self._segment_bytes = segment_bytes or max(max_bytes // 8, 1024)
        if not 0 < self._segment_bytes <= max_bytes // 4:
            raise ValueError(f"segment_bytes must be within 1..{max_bytes // 4}")
        self._fsync = fsync
        self._clock = clock
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._active_fd: int | None = None
        self._size = 0
        self._acked = 0
        self._next_seq = 1
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot open telemetry spool {directory}: {exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLockedError(
                f"telemetry spool {directory} is in use by another process; "
                "stop the other edged or give this one its own state directory"
            ) from None
        try:
            self._recover()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # --- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._active_fd is not None:
                os.close(self._active_fd)
                self._active_fd = None
            if self._lock_fd >= 0:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = -1

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- state --------------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def acked_seq(self) -> int:
        return self._acked

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def pending(self) -> int:
        """Records appended but not acknowledged (gap markers included)."""
        with self._lock:
            return sum(1 for s in self._segments for seq, _, _ in s.entries if seq > self._acked)

    # --- the API ------------------------------------------------------------------------

    def append(self, record: Mapping[str, Any]) -> int:
        """Append ``record`` (without a ``seq``: the spool assigns it) and return its seq."""
        if "seq" in record:
            raise ValueError("telemetry records get their seq from the spool; remove 'seq'")
        with self._lock:
            self._check_open()
            provisional = _encode({"seq": self._next_seq + 1, **record})
            frame_bytes = _HEADER.size + len(provisional)
            if frame_bytes > self.max_record_bytes:
                raise SpoolRecordTooLargeError(
                    f"telemetry record of {frame_bytes} bytes exceeds the limit of "
                    f"{self.max_record_bytes} bytes (a quarter of spool_max_bytes); "
                    "raise spool_max_bytes or report fewer fields"
                )
            self._make_room(frame_bytes)
            seq = self._next_seq
            self._write(seq, _encode({"seq": seq, **record}))
            return seq

    def peek(self, n: int) -> list[dict[str, Any]]:
        """Up to ``n`` of the oldest unacknowledged records, in ``seq`` order."""
        with self._lock:
            self._check_open()
            out: list[dict[str, Any]] = []
            for segment in self._segments:
                if len(out) >= n:
                    break
                out.extend(self._records(segment, after_seq=self._acked, limit=n - len(out)))
            return out

    def ack(self, seq_upto: int) -> None:
        """Acknowledge every record with ``seq <= seq_upto``, durably."""
        with self._lock:
            self._check_open()
            if seq_upto >= self._next_seq:
                raise SpoolError(
                    f"cannot acknowledge seq {seq_upto}: the last appended seq is "
                    f"{self._next_seq - 1}"
                )
            if seq_upto <= self._acked:
                return
            self._acked = seq_upto
            self._save_state()
            done = [
                s
                for s in self._segments[:-1]
                if s.last_seq is not None and s.last_seq <= self._acked
            ]
            self._delete(done)

    # --- internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._lock_fd < 0:
            raise SpoolError(f"telemetry spool {self.directory} is closed")

    def _records(
        self, segment: _Segment, *, after_seq: int, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The records of ``segment`` with ``seq > after_seq`` (at most ``limit``)."""
        entries = [(offset, length) for seq, offset, length in segment.entries if seq > after_seq]
        if limit is not None:
            entries = entries[:limit]
        if not entries:
            return []
        try:
            with segment.path.open("rb") as f:
                data = f.read(entries[-1][0] + entries[-1][1])
        except OSError as exc:
            raise SpoolError(f"cannot read telemetry spool segment {segment.path}: {exc}") from exc
        return [
            json.loads(data[offset + _HEADER.size : offset + length]) for offset, length in entries
        ]

    def _write(self, seq: int, payload: bytes) -> None:
        frame = _frame(payload)
        try:
            if (
                self._active_fd is None
                or not self._segments
                or self._segments[-1].size >= self._segment_bytes
            ):
                self._open_segment(seq)
            assert self._active_fd is not None
            segment = self._segments[-1]
            offset = segment.size
            try:
                written = os.write(self._active_fd, frame)
                while written < len(frame):
                    written += os.write(self._active_fd, frame[written:])
                if self._fsync:
                    os.fsync(self._active_fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._active_fd, offset)  # leave no partial frame behind
                raise
        except OSError as exc:
            raise SpoolError(
                f"cannot write to telemetry spool {self.directory}: {exc}; "
                "check free space and permissions"
            ) from exc
        segment.entries.append((seq, offset, len(frame)))
        segment.size += len(frame)
        self._size += len(frame)
        self._next_seq = seq + 1

    def _open_segment(self, first_seq: int) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
        path = self.directory / _segment_name(first_seq)
        self._active_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segments.append(_Segment(path))
        fsync_dir(self.directory)

    def _make_room(self, frame_bytes: int) -> None:
        if self._size + frame_bytes <= self.max_bytes:
            return
        evict: list[_Segment] = []
        freed = 0
        for segment in self._segments:
            if self._size - freed + frame_bytes + self._max_gap_bytes <= self.max_bytes:
                break
            evict.append(segment)
            freed += segment.size
        dropped = [
            record for segment in evict for record in self._records(segment, after_seq=self._acked)
        ]
        if evict and evict[-1] is self._segments[-1] and self._active_fd is not None:
            os.close(self._active_fd)  # the gap marker must go to a fresh segment
            self._active_fd = None
        if dropped:
            gap = self._gap_record(dropped)
            logger.warning(
                "telemetry spool full (%d bytes): dropped %d records, seq %d-%d, "
                "replaced by a summary",
                self.max_bytes,
                gap["dropped"],
                gap["from_seq"],
                gap["to_seq"],
            )
            seq = self._next_seq
            self._write(seq, _encode({"seq": seq, **gap}))
        self._delete(evict)

    def _gap_record(self, dropped: list[dict[str, Any]]) -> dict[str, Any]:
        gap: dict[str, Any] = {"v": 1, "type": "gap", "ts": self._clock()}
        gap.update(summarise_records(dropped))
        fields: dict[str, Any] = gap["summary"]["fields"]
        names = sorted(fields)
        budget = self._max_gap_bytes - _HEADER.size - 32  # room for the seq
        while len(_encode(gap)) > budget and names:
            cut = max(1, len(names) // 4)
            for name in names[-cut:]:
                del fields[name]
            names = names[:-cut]
            gap["summary"]["fields_truncated"] = gap["summary"].get("fields_truncated", 0) + cut
        return gap

    def _delete(self, segments: list[_Segment]) -> None:
        if not segments:
            return
        for segment in segments:
            if self._segments and segment is self._segments[-1] and self._active_fd is not None:
                os.close(self._active_fd)
                self._active_fd = None
            try:
                segment.path.unlink(missing_ok=True)
            except OSError as exc:
                raise SpoolError(f"cannot delete spool segment {segment.path}: {exc}") from exc
            self._segments.remove(segment)
            self._size -= segment.size
        fsync_dir(self.directory)

    def _save_state(self) -> None:
        state = {"acked_seq": self._acked, "high_seq": self._next_seq - 1}
        try:
            atomic_write(self.directory / _STATE_FILE, json.dumps(state).encode(), 0o600)
        except OSError as exc:
            raise SpoolError(
                f"cannot save telemetry spool state in {self.directory}: {exc}"
            ) from exc

    def _load_state(self) -> tuple[int, int]:
        path = self.directory / _STATE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            return int(state["acked_seq"]), int(state["high_seq"])
        except FileNotFoundError:
            return 0, 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Written atomically, so this means outside interference. Starting from 0 only
            # re-delivers records (consumers dedupe by seq); seqs still continue from the log.
            logger.warning("telemetry spool state %s is unreadable (%s); re-delivering", path, exc)
            return 0, 0

    def _recover(self) -> None:
        acked, high = self._load_state()
        remove_temp_files(self.directory)  # an interrupted state write
        paths = sorted(
            (p for p in self.directory.glob(f"*{_SEGMENT_SUFFIX}") if p.stem.isdigit()),
            key=lambda p: int(p.stem),
        )
        last_seq = 0
        lost_ranges: list[tuple[int, int]] = []
        for index, path in enumerate(paths):
            segment, damaged = self._scan(path, last_seq)
            if segment.last_seq is not None:
                last_seq = segment.last_seq
            if damaged and index + 1 < len(paths):
                lost_ranges.append((last_seq + 1, int(paths[index + 1].stem) - 1))
            if segment.entries:
                self._segments.append(segment)
                self._size += segment.size
            else:
                path.unlink()
        self._acked = acked
        self._next_seq = max(last_seq, acked, high) + 1
        if self._segments:
            last = self._segments[-1]
            self._active_fd = os.open(last.path, os.O_WRONLY | os.O_APPEND)
        for from_seq, to_seq in lost_ranges:
            if to_seq >= from_seq:
                gap = {
                    "v": 1,
                    "type": "gap",
                    "ts": self._clock(),
                    "from_seq": from_seq,
                    "to_seq": to_seq,
                    "dropped": to_seq - from_seq + 1,
                    "reason": "corrupt",
                    "summary": {},
                }
                self._make_room(_HEADER.size + len(_encode({"seq": self._next_seq, **gap})))
                self._write(self._next_seq, _encode({"seq": self._next_seq, **gap}))

    def _scan(self, path: Path, previous_seq: int) -> tuple[_Segment, bool]:
        """Index ``path``'s intact frames; truncate it at the first damaged one."""
        data = path.read_bytes()
        segment = _Segment(path)
        offset = 0
        problem = ""
        while offset < len(data):
            if len(data) - offset < _HEADER.size:
                problem = "torn frame header"
                break
            magic, length, crc = _HEADER.unpack_from(data, offset)
            end = offset + _HEADER.size + length
            if magic != _MAGIC:
                problem = "bad frame magic"
                break
            if end > len(data):
                problem = "torn frame"
                break
            payload = data[offset + _HEADER.size : end]
            if zlib.crc32(_LENGTH.pack(length) + payload) != crc:
                problem = "CRC mismatch"
                break
            try:
                seq = json.loads(payload)["seq"]
            except (ValueError, KeyError, TypeError):
                problem = "frame without a seq"
                break
            if not isinstance(seq, int) or seq <= previous_seq:
                problem = f"seq {seq!r} out of order"
                break
            segment.entries.append((seq, offset, end - offset))
            previous_seq = seq
            offset = end
        segment.size = offset
        if problem:
            logger.warning(
                "telemetry spool %s: %s at byte %d; dropped the last %d bytes (expected after "
                "a crash during a write)",
                path,
                problem,
                offset,
                len(data) - offset,
            )
            with path.open("r+b") as f:
                f.truncate(offset)
                f.flush()
                os.fsync(f.fileno())
        return segment, bool(problem)


# --- summaries for gap markers ----------------------------------------------------------


def _numeric_leaves(value: Any, prefix: str = "") -> Iterable[tuple[str, float]]:
    if isinstance(value, dict):
        for key, item in value.items():
            if not prefix and key in _SUMMARY_SKIPPED_FIELDS:
                continue
            yield from _numeric_leaves(item, f"{prefix}{key}.")
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        yield prefix[:-1], float(value)


def _merge_field(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    n = a["n"] + b["n"]
    return {
        "n": n,
        "min": min(a["min"], b["min"]),
        "max": max(a["max"], b["max"]),
        "mean": (a["mean"] * a["n"] + b["mean"] * b["n"]) / n,
    }


def _merge_summaries(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    if not a.get("records"):
        return b
    if not b.get("records"):
        return a
    fields = dict(a.get("fields", {}))
    for name, stats in b.get("fields", {}).items():
        fields[name] = _merge_field(fields[name], stats) if name in fields else stats
    types = dict(a.get("types", {}))
    for name, count in b.get("types", {}).items():
        types[name] = types.get(name, 0) + count
    merged: dict[str, Any] = {"records": a["records"] + b["records"]}
    for key, pick in (("ts_min", min), ("ts_max", max), ("seq_min", min), ("seq_max", max)):
        values = [s[key] for s in (a, b) if s.get(key) is not None]
        merged[key] = pick(values) if values else None
    merged["types"] = types
    merged["fields"] = fields
    truncated = a.get("fields_truncated", 0) + b.get("fields_truncated", 0)
    if truncated:
        merged["fields_truncated"] = truncated
    return merged


def summarise_records(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Fold records (earlier gap markers included) into one gap's range, count and summary.

    The summary holds the number of records, their time and seq ranges, a count per
    ``type``, and ``{n, min, max, mean}`` of every numeric leaf of nested objects by dotted
    path (lists are not summarised).
    """
    summary: dict[str, Any] = {"records": 0}
    from_seq: int | None = None
    to_seq: int | None = None
    dropped = 0
    for record in records:
        seq = record.get("seq")
        if isinstance(seq, int):
            from_seq = seq if from_seq is None else min(from_seq, seq)
            to_seq = seq if to_seq is None else max(to_seq, seq)
        if record.get("type") == "gap":
            # A gap folded before any record had a seq has no range yet.
            from_seq = min(
                (x for x in (from_seq, record.get("from_seq")) if x is not None), default=None
            )
            to_seq = max((x for x in (to_seq, record.get("to_seq")) if x is not None), default=None)
            dropped += int(record.get("dropped", 0))
            summary = _merge_summaries(summary, dict(record.get("summary") or {}))
            continue
        dropped += 1
        ts = record.get("ts")
        fields = {
            name: {"n": 1, "min": value, "max": value, "mean": value}
            for name, value in _numeric_leaves(dict(record))
        }
        one: dict[str, Any] = {
            "records": 1,
            "ts_min": ts,
            "ts_max": ts,
            "seq_min": seq,
            "seq_max": seq,
            "types": {str(record.get("type", "telemetry")): 1},
            "fields": fields,
        }
        summary = _merge_summaries(summary, one)
    return {"from_seq": from_seq, "to_seq": to_seq, "dropped": dropped, "summary": summary}
