"""The real ``edged`` command line, run as a subprocess, for tests that sign, trust and install
releases the way an operator does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EDGED = [sys.executable, "-m", "edged.cli.main"]


def edged(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*EDGED, *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"edged {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def trust_init(keys: Path, state: Path) -> None:
    edged(
        "trust", "init", "--out", str(state / "trust"),
        "--root-key", str(keys / "root.key"), "--signer", str(keys / "signer.pub"),
    )  # fmt: skip
