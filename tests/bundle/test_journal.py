"""The install log on its own: entries read back in order, a log past its size limit moved
aside to ``.1``, unreadable lines skipped."""

from __future__ import annotations

import json
from pathlib import Path

from edged.bundle.journal import InstallJournal


def test_history_returns_the_newest_entries_oldest_first(tmp_path: Path) -> None:
    journal = InstallJournal(tmp_path / "install-log.jsonl")
    assert journal.history() == []
    for i in range(5):
        journal.append({"n": i})
    assert journal.history(3) == [{"n": 2}, {"n": 3}, {"n": 4}]


def test_a_log_past_its_limit_is_moved_aside_before_the_next_entry(tmp_path: Path) -> None:
    path = tmp_path / "install-log.jsonl"
    journal = InstallJournal(path, max_bytes=40)
    journal.append({"n": 0, "pad": "x" * 40})
    journal.append({"n": 1})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"n": 1}]
    rotated = path.with_name(path.name + ".1")
    assert json.loads(rotated.read_text()) == {"n": 0, "pad": "x" * 40}


def test_unreadable_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "install-log.jsonl"
    path.write_text('{"n": 0}\nnot json\n{"n": 1}\n')
    assert InstallJournal(path).history() == [{"n": 0}, {"n": 1}]


def test_an_unwritable_log_does_not_raise(tmp_path: Path) -> None:
    journal = InstallJournal(tmp_path / "missing-dir" / "install-log.jsonl")
    journal.append({"n": 0})
    assert journal.history() == []
