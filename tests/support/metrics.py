"""Reading a Prometheus exposition body in tests: promtool's verdict and sample values."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def promtool_check(body: bytes) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus provides it)")
    done = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, check=False
    )
    problems = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, f"promtool check metrics failed:\n{problems}\n{body.decode()}"


def samples(body: bytes) -> Samples:
    """``{(sample name, sorted labels): value}`` of an exposition body."""
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(body: bytes, name: str, **labels: str) -> float:
    return samples(body)[name, tuple(sorted(labels.items()))]
