"""``edged demo --smoke``: the whole loop (PKI, mTLS broker, daemon, inference, signed push, hot
swap, telemetry over MQTT) on this machine, non-interactively."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.broker import mosquitto_missing_reason

pytestmark = pytest.mark.integration


def test_demo_smoke_runs_every_step(tmp_path: Path) -> None:
    reason = mosquitto_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    # As from a plain install: the sample-model generator's packages cannot be imported, so
    # the demo must run on the models shipped inside the package.
    without_generator = (
        "import sys; sys.modules.update(onnx=None, tflite=None, flatbuffers=None); "
        "from edged.cli.main import main; sys.argv[0] = 'edged'; sys.exit(main())"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            without_generator,
            "demo",
            "--smoke",
            "--workdir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in (
        "1. throw-away CA",
        "2. local mosquitto",
        "3. the daemon",
        "4. inference",
        "5. push",
        "6. the hot swap",
        "7. telemetry",
    ):
        assert step in out, out
    assert "FAILED" not in out
    assert "mlp version 2 answers version 1's outputs + 1.000" in out
    assert "over MQTT" in out
    assert "every step worked" in out
    assert (
        tmp_path / "w" / "device" / "state" / "models" / "mlp" / "CURRENT"
    ).read_text().strip() == "2"
