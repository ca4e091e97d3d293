"""The Grafana dashboard (docs/grafana/edged.json) imports as is and charts only metrics that
exist: every metric its queries name is in a real daemon's ``/metrics`` after traffic (with a
Raspberry Pi 5's power source, so power and energy per inference are measured), and it covers
what an operator needs per model and version."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp
from tests.support.daemon import REPO_ROOT, running_daemon
from tests.support.metrics import Samples, samples

from .pi5 import PI5, fake_vcgencmd, path_with
from .sysfs_trees import Tree

DASHBOARD = REPO_ROOT / "docs" / "grafana" / "edged.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
METRIC = re.compile(r"\bedged_[a-z0-9_]+\b")

# What the issue asks the dashboard to chart, as the series that carry it.
REQUIRED = {
    "edged_inference_requests_total",  # request rate
    "edged_inference_queue_seconds_bucket",  # queue p50/p99
    "edged_inference_compute_seconds_bucket",  # compute p50/p99
    "edged_inference_batch_size_bucket",  # batch size
    "edged_queue_depth",
    "edged_inference_rejected_total",  # 429s
    "edged_inference_errors_total",
    "edged_model_swaps_total",
    "edged_probation_verdicts_total",
    "edged_board_power_watts",
    "edged_energy_joules_total",  # energy per inference: joules / attributed requests
    "edged_energy_attributed_requests_total",
    "edged_telemetry_spool_pending_records",  # spool backlog
    "edged_service_restarts_total",
}


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def queries(doc: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(doc) for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in doc["templating"]["list"]]
    return exprs


def metric_names(doc: dict[str, Any]) -> set[str]:
    return {name for expr in queries(doc) for name in METRIC.findall(expr)}


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    doc = dashboard()
    assert doc["title"] and doc["uid"] and doc["schemaVersion"] >= 36
    assert doc["id"] is None  # an import creates it; a fixed id would overwrite another
    assert [i["name"] for i in doc["__inputs"]] == ["DS_PROMETHEUS"]
    assert doc["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids))
    for panel in panels(doc):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["title"] and panel["targets"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE
            assert target["expr"].count("(") == target["expr"].count(")")
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert variables == {"instance", "model", "version"}
    for expr in queries(doc):
        used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval", "__range", "__interval"}
        assert used <= variables, expr


def test_the_dashboard_charts_what_an_operator_needs() -> None:
    missing = REQUIRED - metric_names(dashboard())
    assert not missing, f"no panel on {sorted(missing)}"


def _post(url: str, body: dict[str, Any] | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url, data=data, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return bytes(response.read())


def _scrape(url: str) -> Samples:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        return samples(response.read())


@pytest.mark.integration
def test_every_metric_the_dashboard_queries_is_in_a_real_daemons_metrics(
    tmp_path: Path, model_repo: Path, sysfs: Callable[[Tree], Path]
) -> None:
    vcgencmd = fake_vcgencmd(tmp_path / "bin")
    config = (
        "[telemetry]\n"
        f"sysfs_root = {json.dumps(str(sysfs(PI5)))}\n"
        "interval_s = 0.5\n"
        "power_sample_s = 0.1\n"
    )
    with running_daemon(model_repo, tmp_path / "d", config, env={"PATH": path_with(vcgencmd)}) as d:
        mlp = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                           "data": [0.5] * 64}]}  # fmt: skip
        fc = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                          "data": [0.5] * 16}]}  # fmt: skip
        for _ in range(10):
            _post(f"{d.url}/v2/models/mlp/infer", mlp)
            _post(f"{d.url}/v2/models/fc/infer", fc)
        write_onnx_mlp(model_repo / "mlp" / "2", SAMPLE_MLP_LAYERS, seed=0, bias_shift=1.0)
        _post(f"{d.url}/v2/repository/models/mlp/load")  # a swap to version 2
        _post(f"{d.url}/v2/models/mlp/infer", mlp)
        # Energy is attributed once its time has settled: poll the real state, bounded.
        wanted = metric_names(dashboard())
        deadline = time.monotonic() + 60
        while True:
            found = _scrape(d.url)
            names = {name for name, _ in found}
            if wanted <= names or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert not wanted - names, f"the dashboard queries metrics /metrics lacks: {wanted - names}"
    swaps = {labels: v for (name, labels), v in found.items() if name == "edged_model_swaps_total"}
    assert swaps[("model", "mlp"), ("result", "ok"), ("version", "1")] == 1  # the first load
    assert swaps[("model", "mlp"), ("result", "ok"), ("version", "2")] == 1
    assert swaps[("model", "mlp"), ("result", "failed"), ("version", "2")] == 0
    assert any(
        name == "edged_service_restarts_total" and labels == (("service", "telemetry"),)
        for name, labels in found
    )


# Grafana's variables as a dashboard user picking "All" would have them substituted.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$instance": ".*",
    "$model": ".*",
    "$version": ".*",
}


def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus provides it)")
    rules = []
    for index, expr in enumerate(
        t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])
    ):
        for variable, value in sorted(_GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, value)
        rules.append({"record": f"edged:dashboard_query_{index}", "expr": expr})
    rules_file = tmp_path / "dashboard.rules.json"  # JSON is YAML
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(rules)} rules found" in done.stdout
