"""Crash-injection driver, run as ``python -m tests.bundle.crash_driver PLAN.json``.

For each kill point k in the plan it copies the template state, forks, and in the child runs
one install (or rollback) whose checkpoint hook SIGKILLs the child at the k-th durable step
(file write, fsync, rename, pointer switch, ...). The parent stays single-threaded, so forking
is safe; it prints one JSON line per run. ``kill_at: 0`` runs without killing and reports the
checkpoint labels, which tells the test how many kill points exist.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from edged.bundle.install import Installer
from edged.bundle.offline import OfflineSelfTest
from tests.bundle.helpers import DEVICE, MODEL, NOW


def run_child(plan: dict[str, Any], state: Path, kill_at: int, labels_file: Path) -> None:
    counter = itertools.count(1)
    labels: list[str] = []

    def checkpoint(label: str) -> None:
        n = next(counter)
        labels.append(label)
        if n == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    installer = Installer(
        state,
        OfflineSelfTest(),
        DEVICE,
        keep_previous=plan["keep_previous"],
        clock=lambda: NOW,
        checkpoint=checkpoint,
    )
    if plan["operation"] == "install":
        try:
            asyncio.run(installer.install_file(Path(plan["bundle"])))
        except Exception as exc:
            if not plan.get("expect_failure"):
                raise
            labels.append(f"failed: {type(exc).__name__}")
    else:
        asyncio.run(installer.rollback(MODEL, plan.get("to_version")))
    labels_file.write_text(json.dumps(labels))


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    template = Path(plan["template"])
    work = Path(plan["work"])
    for kill_at in plan["kill_at"]:
        state = work / f"k{kill_at:03d}"
        shutil.copytree(template, state, symlinks=True)
        labels_file = work / f"k{kill_at:03d}.labels.json"
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run_child(plan, state, kill_at, labels_file)
            except BaseException:
                traceback.print_exc()
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        labels = json.loads(labels_file.read_text()) if labels_file.exists() else None
        print(
            json.dumps(
                {
                    "kill_at": kill_at,
                    "state": str(state),
                    "killed": killed,
                    "exit": exit_code,
                    "labels": labels,
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
