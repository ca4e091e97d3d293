"""The crash gate's pure decision, the clean-shutdown marker and the durable record."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import pytest

from edged.errors import ProbationRecordError
from edged.serve.crashgate import CrashInfo, RunMarker, resume_or_revert_at_start
from edged.serve.probation import ProbationPolicy, ShadowPolicy, VersionWindow
from edged.serve.probation_record import ProbationRecord, ProbationRecords

RECORD = ProbationRecord(
    model="mlp",
    version="2",
    version_dir="/s/models/mlp/2",
    previous_version="1",
    previous_dir="/s/models/mlp/1",
    policy=ProbationPolicy(max_crashes=2, shadow=ShadowPolicy(top1=True)),
    started_at=1.0,
    baseline=VersionWindow("1", 40, 0, 0, (0.001,) * 20),
)


def test_a_clean_shutdown_resumes_without_counting() -> None:
    decision = resume_or_revert_at_start(RECORD, None)
    assert (decision.action, decision.record, decision.outcome) == ("resume", RECORD, None)


def test_crashes_count_up_to_max_crashes_then_revert_naming_the_crash() -> None:
    first = resume_or_revert_at_start(RECORD, CrashInfo.from_returncode(-signal.SIGSEGV), now=5.0)
    assert first.action == "resume"
    assert first.record.crashes == 1
    assert first.record.crash_reasons == ("engine killed by signal 11 (SIGSEGV) during probation",)
    second = resume_or_revert_at_start(first.record, CrashInfo(), now=6.0)
    assert second.action == "revert"
    assert second.outcome is not None
    assert (second.outcome.decision, second.outcome.gate, second.outcome.measured) == (
        "reverted", "crashes", "2 crashes",
    )  # fmt: skip
    assert second.outcome.reason == (
        "gate crashes: measured 2 crashes, limit 2 (restarted during probation)"
    )
    exited = resume_or_revert_at_start(
        dataclasses.replace(RECORD, policy=ProbationPolicy()), CrashInfo.from_returncode(3)
    )
    assert exited.outcome is not None
    assert "engine exited with status 3 during probation" in exited.outcome.reason


def test_systemd_exit_variables_say_how_the_daemon_ended() -> None:
    assert CrashInfo.from_systemd({"EXIT_CODE": "exited", "EXIT_STATUS": "0"}) is None
    assert CrashInfo.from_systemd({"EXIT_CODE": "killed", "EXIT_STATUS": "KILL"}) == CrashInfo(
        signal=9, process="edged"
    )
    assert CrashInfo.from_systemd({"EXIT_CODE": "exited", "EXIT_STATUS": "1"}) == CrashInfo(
        exit_status=1, process="edged"
    )
    assert CrashInfo.from_systemd({}) is None
    watchdog = {"EXIT_CODE": "killed", "EXIT_STATUS": "ABRT", "SERVICE_RESULT": "watchdog"}
    assert CrashInfo.from_systemd(watchdog) == CrashInfo(
        signal=6, process="edged", cause="watchdog"
    )
    assert CrashInfo.from_systemd(watchdog).describe() == (  # type: ignore[union-attr]
        "edged killed by signal 6 (SIGABRT) (watchdog) during probation"
    )


def test_edged_record_exit_puts_systemds_exit_into_the_run_marker(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    marker = RunMarker(tmp_path)
    marker.begin()
    env = {**os.environ, "EXIT_CODE": "killed", "EXIT_STATUS": "KILL", "SERVICE_RESULT": "signal"}
    subprocess.run(
        [sys.executable, "-m", "edged.cli.main", "record-exit", "--state-dir", str(tmp_path)],
        env=env, check=True, timeout=60,
    )  # fmt: skip
    assert marker.begin() == CrashInfo(signal=9, process="edged")


def test_the_run_marker_tells_a_clean_shutdown_from_a_crash(tmp_path: Path) -> None:
    marker = RunMarker(tmp_path)
    assert marker.begin() is None  # first start
    marker.end_cleanly()
    assert marker.begin() is None  # after a clean shutdown
    assert marker.begin() == CrashInfo()  # the run before never ended cleanly
    marker.record_exit(CrashInfo(signal=9, process="edged"))
    assert marker.begin() == CrashInfo(signal=9, process="edged")


def test_the_record_round_trips_through_its_durable_file(tmp_path: Path) -> None:
    records = ProbationRecords(tmp_path / "probation")
    assert records.load_all() == []
    records.save(RECORD)
    assert records.load("mlp") == RECORD
    assert records.load_all() == [RECORD]
    (tmp_path / "probation" / "bad.json").write_text("{")
    assert records.load_all() == [RECORD]  # an unreadable record never blocks start-up
    records.remove("mlp")
    assert records.load("mlp") is None


def test_a_record_that_cannot_be_written_is_an_error_not_a_silent_probation(
    tmp_path: Path,
) -> None:
    (tmp_path / "probation").write_text("a file where the folder should be")
    records = ProbationRecords(tmp_path / "probation")
    with pytest.raises(ProbationRecordError, match="cannot write the probation record of mlp"):
        records.save(RECORD)


def test_a_verdict_reached_at_start_up_is_kept_until_the_serving_process_takes_it(
    tmp_path: Path,
) -> None:
    records = ProbationRecords(tmp_path / "probation")
    decision = resume_or_revert_at_start(RECORD, CrashInfo(), now=7.0)
    decided = resume_or_revert_at_start(decision.record, CrashInfo(), now=8.0).outcome
    assert decided is not None
    records.save_decided(decided)
    assert records.load_all() == []  # not a running probation
    assert records.take_decided() == [decided]
    assert records.take_decided() == []
