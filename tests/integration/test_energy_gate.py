"""The probation's energy gate on a real daemon with a power source (a sysfs tree copied from
a Jetson Orin Nano's sensors: the one thing faked) and live traffic. In the process design the
control plane measures energy per inference and feeds it to the engine, whose probation judges;
a release that needs several times the energy per inference is reverted by that gate, naming
both figures."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from edged.api.client import Endpoint, LocalClient
from edged.serve.probation import ProbationPolicy
from tests.integration.test_probation import (
    bundle,
    install,
    policy_file,
    status,
    wait_probation_end,
)
from tests.support.cli import trust_init
from tests.support.daemon import running_daemon
from tests.support.load import InferenceLoad
from tests.support.slowmodel import write_slow_mlp
from tests.telemetry.sysfs_trees import ORIN_NANO, build_tree

pytestmark = pytest.mark.integration

DESIGNS = {"front-ends": "", "one-process": "[server]\nworkers = 0\n"}


def wait_energy_figure(client: LocalClient, version: str, timeout_s: float = 60.0) -> float:
    """Bounded poll of the telemetry until ``mlp`` ``version`` has an energy per inference."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record: dict[str, Any] | None = client.json("GET", "/edged/v1/telemetry")["record"]
        mlp = (record or {}).get("models", {}).get("mlp", {})
        if mlp.get("version") == version and mlp.get("energy_mj_per_inference"):
            return float(mlp["energy_mj_per_inference"])
        time.sleep(0.1)
    raise AssertionError(f"no energy figure for mlp {version} within {timeout_s}s")


@pytest.mark.parametrize("design", list(DESIGNS))
def test_a_release_needing_several_times_the_energy_per_inference_is_reverted_by_the_energy_gate(
    model_repo: Path,
    tmp_path: Path,
    keys: Path,
    design: str,
) -> None:
    work = tmp_path / "d"
    trust_init(keys, work / "state")
    sysfs = build_tree(tmp_path / "sys", ORIN_NANO)
    config = (
        f"[telemetry]\nsysfs_root = {json.dumps(str(sysfs))}\n"
        "interval_s = 0.5\npower_sample_s = 0.1\n" + DESIGNS[design]
    )
    heavy_dir = tmp_path / "build" / "2"
    write_slow_mlp(heavy_dir)  # far more compute per inference: the same power, fewer answers
    # The latency gate is off, so only the energy gate can revert it; min_s leaves the
    # control plane several telemetry intervals to measure and feed the release's figure.
    policy = ProbationPolicy(
        min_s=8, max_s=300, min_requests=20, max_p99_latency_ratio_pct=0,
        max_energy_ratio_pct=150,
    )  # fmt: skip
    heavy = bundle(keys, tmp_path, heavy_dir, 2, policy_file(tmp_path, policy))
    with (
        running_daemon(model_repo, work, config) as daemon,
        InferenceLoad(daemon.port, clients=3) as load,
    ):
        client = LocalClient(Endpoint(socket_path=daemon.socket_path))
        assert wait_energy_figure(client, "1") > 0  # the baseline's figure
        assert json.loads(install(daemon, heavy).stdout)["outcome"] == "installed"
        outcome = wait_probation_end(daemon, "2")
        load.stop()
        assert (outcome["decision"], outcome["gate"], outcome["limit"]) == (
            "reverted",
            "energy_ratio",
            "1.50x",
        ), outcome
        assert float(outcome["measured"].rstrip("x")) > 1.5
        assert "mJ per inference" in outcome["reason"]
        assert status(daemon)["version"] == "1"
        assert load.failures == {}, load.failures
