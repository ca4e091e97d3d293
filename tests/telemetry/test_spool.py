"""The on-disk spool: order, acknowledgement, cap with gap markers, crash recovery."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edged.errors import SpoolError, SpoolLockedError, SpoolRecordTooLargeError
from edged.telemetry.spool import Spool, summarise_records

from .helpers import FakeClock


def _record(i: int) -> dict[str, Any]:
    return {"v": 1, "ts": 1000.0 + i, "models": {"det": {"requests": i, "qps": i / 10}}}


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_records_come_back_in_order_with_increasing_seq(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool") as spool:
        seqs = [spool.append(_record(i)) for i in range(10)]
        assert seqs == list(range(1, 11))
        peeked = spool.peek(4)
        assert [r["seq"] for r in peeked] == [1, 2, 3, 4]
        assert peeked[2] == {"seq": 3, **_record(2)}
        assert len(spool.peek(100)) == 10
        assert spool.pending == 10


def test_ack_hides_records_and_survives_reopen(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        for i in range(6):
            spool.append(_record(i))
        spool.ack(4)
        assert [r["seq"] for r in spool.peek(10)] == [5, 6]
        spool.ack(2)  # acknowledging less than before changes nothing
        assert spool.acked_seq == 4
    with Spool(directory) as spool:
        assert spool.acked_seq == 4
        assert [r["seq"] for r in spool.peek(10)] == [5, 6]
        assert spool.append(_record(99)) == 7


def test_seq_continues_after_everything_was_acknowledged_and_deleted(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory, max_bytes=8192, segment_bytes=256) as spool:
        for i in range(30):
            spool.append(_record(i))
        spool.ack(30)
        assert spool.peek(10) == []
        assert len(_segments(directory)) == 1  # only the active segment is kept
    for segment in _segments(directory):
        segment.unlink()  # even with no segment left, the state file remembers the seq
    with Spool(directory) as spool:
        assert spool.append(_record(0)) == 31


def test_acking_beyond_the_last_record_is_refused(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool") as spool:
        spool.append(_record(0))
        with pytest.raises(SpoolError, match="last appended seq is 1"):
            spool.ack(2)


def test_invalid_records_are_refused(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool", max_bytes=4096) as spool:
        with pytest.raises(ValueError, match="seq"):
            spool.append({"seq": 5})
        with pytest.raises(SpoolError, match="NaN"):
            spool.append({"x": math.nan})
        with pytest.raises(SpoolRecordTooLargeError, match="exceeds the limit of 1024 bytes"):
            spool.append({"blob": "x" * 2000})
        assert spool.next_seq == 1  # nothing was written or consumed


def test_a_second_owner_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    first = Spool(directory)
    with pytest.raises(SpoolLockedError, match="in use by another process"):
        Spool(directory)
    first.close()
    with Spool(directory) as second:
        assert second.next_seq == 1


def _covered(records: list[dict[str, Any]]) -> set[int]:
    seqs: set[int] = set()
    for record in records:
        seqs.add(record["seq"])
        if record.get("type") == "gap":
            seqs.update(range(record["from_seq"], record["to_seq"] + 1))
    return seqs


def test_cap_summarises_evicted_records_into_a_gap_marker(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    clock = FakeClock(5000.0)
    with Spool(directory, max_bytes=4096, clock=clock) as spool:
        appended = [spool.append(_record(i)) for i in range(200)]
        assert spool.size_bytes <= 4096
        assert sum(p.stat().st_size for p in _segments(directory)) == spool.size_bytes
        records = spool.peek(1000)

    gaps = [r for r in records if r.get("type") == "gap"]
    data = [r for r in records if r.get("type") != "gap"]
    assert gaps, "the cap was hit, so a gap marker must exist"
    # every appended seq is either still there or inside a gap marker's range
    assert set(appended) <= _covered(records)
    # earlier gap markers are folded into later ones: the counts add up exactly
    assert len(data) + sum(g["dropped"] for g in gaps) == 200
    # the aggregates over all gap markers are exact for the records that were dropped
    kept = {r["seq"] for r in data}
    lost = [seq for seq in appended if seq not in kept]
    lost_i = [i for i, seq in enumerate(appended) if seq not in kept]  # record i's requests
    assert all(g["ts"] == 5000.0 for g in gaps)
    summary = summarise_records(gaps)["summary"]
    assert summary["records"] == len(lost)
    assert summary["ts_min"] == 1000.0
    assert summary["seq_min"] == 1
    assert summary["types"] == {"telemetry": len(lost)}
    requests = summary["fields"]["models.det.requests"]
    assert requests["n"] == len(lost)
    assert requests["min"] == 0
    assert requests["max"] == max(lost_i)
    assert requests["mean"] == pytest.approx(sum(lost_i) / len(lost_i))
    assert "seq" not in summary["fields"]
    # the surviving data records are the newest ones, in order
    assert [r["seq"] for r in data] == sorted(r["seq"] for r in data)
    assert data[-1]["seq"] == appended[-1]


def test_evicting_only_acknowledged_records_needs_no_gap_marker(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool", max_bytes=4096) as spool:
        for i in range(200):
            seq = spool.append(_record(i))
            spool.ack(seq - 1)  # the consumer keeps up, one behind
        records = spool.peek(1000)
    assert [r["seq"] for r in records] == [200]


def test_summaries_merge_earlier_gaps() -> None:
    first = summarise_records([{"seq": s, "ts": float(s), "x": s} for s in (1, 2, 3)])
    gap = {"seq": 10, "type": "gap", **first}
    merged = summarise_records([gap, {"seq": 11, "ts": 11.0, "x": 30}])
    assert (merged["from_seq"], merged["to_seq"], merged["dropped"]) == (1, 11, 4)
    assert merged["summary"]["records"] == 4
    assert merged["summary"]["fields"]["x"] == {"n": 4, "min": 1, "max": 30, "mean": 9.0}
    assert (merged["summary"]["ts_min"], merged["summary"]["ts_max"]) == (1.0, 11.0)


def test_torn_last_record_is_dropped_on_reopen(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        for i in range(5):
            spool.append(_record(i))
    [segment] = _segments(directory)
    size = segment.stat().st_size
    with segment.open("r+b") as f:
        f.truncate(size - 7)  # cut the last record in the middle of its JSON
    with Spool(directory) as spool:
        assert [r["seq"] for r in spool.peek(10)] == [1, 2, 3, 4]
        assert spool.append(_record(5)) == 5
        assert [r["seq"] for r in spool.peek(10)] == [1, 2, 3, 4, 5]
    with Spool(directory) as spool:  # and the repaired file reads cleanly again
        assert spool.peek(10)[-1] == {"seq": 5, **_record(5)}


def test_torn_frame_header_is_dropped_on_reopen(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        spool.append(_record(0))
    [segment] = _segments(directory)
    with segment.open("ab") as f:
        f.write(b"eT\x00")  # a crash after three bytes of the next header
    with Spool(directory) as spool:
        assert [r["seq"] for r in spool.peek(10)] == [1]
        assert spool.append(_record(1)) == 2


def test_corruption_inside_an_older_segment_becomes_a_gap_marker(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory, max_bytes=16384, segment_bytes=300) as spool:
        for i in range(12):
            spool.append(_record(i))
    first = _segments(directory)[0]
    data = bytearray(first.read_bytes())
    second_frame = data.index(b"eT", 2)
    data[second_frame + 20] ^= 0xFF  # flip a byte inside the second record's JSON
    first.write_bytes(bytes(data))
    with Spool(directory) as spool:
        records = spool.peek(100)
    [gap] = [r for r in records if r.get("type") == "gap"]
    assert gap["reason"] == "corrupt"
    assert gap["from_seq"] == 2
    next_segment_first = int(_segments(directory)[1].stem)
    assert gap["to_seq"] == next_segment_first - 1
    assert set(range(1, 13)) <= _covered(records)


_WRITER = """
import sys
from pathlib import Path
from edged.telemetry.spool import Spool

spool = Spool(Path(sys.argv[1]), max_bytes=64 * 1024 * 1024, fsync=sys.argv[2] == "1")
i = 0
while True:
    seq = spool.append({"v": 1, "ts": float(i), "payload": "x" * (i % 50), "i": i})
    sys.stdout.write(f"{seq}\\n")
    sys.stdout.flush()
    i += 1
"""


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_kill_9_loses_nothing_that_append_returned(tmp_path: Path, fsync: bool) -> None:
    directory = tmp_path / "spool"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(directory), "1" if fsync else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    confirmed: list[int] = []
    deadline = time.monotonic() + 60
    try:
        while len(confirmed) < 300 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            confirmed.append(int(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(confirmed) == 300

    with Spool(directory) as spool:
        records = spool.peek(10**6)
        seqs = [r["seq"] for r in records]
        assert set(confirmed) <= set(seqs)
        assert seqs == list(range(1, len(seqs) + 1))  # contiguous, nothing torn kept
        for record in records:
            i = record["i"]
            assert record == {
                "seq": i + 1,
                "v": 1,
                "ts": float(i),
                "payload": "x" * (i % 50),
                "i": i,
            }
        assert spool.append({"after": "restart"}) == len(seqs) + 1


def test_segments_are_valid_json_frames_on_disk(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        spool.append({"hello": "world"})
    raw = _segments(directory)[0].read_bytes()
    assert raw[:2] == b"eT"
    assert json.loads(raw[10:]) == {"seq": 1, "hello": "world"}


def test_a_gap_of_records_without_seq_folds_again_without_a_range() -> None:
    # A paused spool folds records that never got a seq; folding that gap once more (the disk
    # still refuses writes) must not fail on the missing range.
    first = summarise_records([{"type": "telemetry", "ts": 1.0}])
    assert first["from_seq"] is None
    again = summarise_records([{"type": "gap", **first}, {"type": "telemetry", "ts": 2.0}])
    assert again["from_seq"] is None and again["to_seq"] is None
    assert again["dropped"] == 2
