"""The crash gate's start-up step on the store: before a release serves again, revert those
whose probation saw ``max_crashes`` crashes, exactly as a tripped gate reverts them.

Run it wherever the process that serves models is (re)started, before that process loads
anything: the daemon at start-up today, the control plane before it starts or restarts the
engine process. ``last_exit``: None after a clean shutdown, else how the serving process
ended (``CrashInfo.from_returncode`` for a supervised child, ``RunMarker.begin`` for a whole
daemon), ``CrashInfo()`` when nothing says how.
"""

from __future__ import annotations

import logging

from edged.bundle.install import Installer
from edged.errors import EdgedError
from edged.serve.crashgate import CrashInfo, resume_or_revert_at_start
from edged.serve.probation_record import ProbationRecords
from edged.serve.watch import ProbationOutcome

log = logging.getLogger(__name__)


async def apply_crash_gate(
    records: ProbationRecords, installer: Installer, last_exit: CrashInfo | None
) -> list[ProbationOutcome]:
    """Count the crash in every running probation; revert those at their limit (``CURRENT``
    back to the held version, the release on the reverted list and removed, the install log's
    ``probation``/``reverted`` entry). Returns the reverts, to report like any other."""
    reverted: list[ProbationOutcome] = []
    for record in records.load_all():
        decision = resume_or_revert_at_start(record, last_exit)
        try:
            if decision.outcome is None:
                if decision.record != record:
                    records.save(decision.record)
                continue
            log.warning(
                "model %s: version %s reverted to %s before it serves again: %s",
                record.model,
                record.version,
                record.previous_version,
                decision.outcome.reason,
            )
            await installer.record_probation(decision.outcome)
            records.save_decided(decision.outcome)  # shown by the serving process at start
            records.remove(record.model)
        except EdgedError as exc:
            log.error("model %s: crash gate not applied: %s", record.model, exc)
            continue
        reverted.append(decision.outcome)
    return reverted
