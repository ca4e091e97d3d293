"""SIGKILL at every durable step of an install, a failed install and a rollback; after
``recover()`` the store must serve a complete, verified version: the old one or the new one.

The kill points come from the installer's checkpoint hook (one per file write, fsync, rename,
pointer switch, high-water update and prune step), counted by a dry run first, so a new step
in the installer automatically becomes a new kill point here.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edged.bundle.install import Installer
from edged.bundle.offline import OfflineSelfTest
from edged.bundle.store import ModelStore
from tests.bundle.conftest import FAILING_VERSION
from tests.bundle.helpers import (
    DEVICE,
    MODEL,
    NOW,
    Keys,
    World,
    bundle_bytes,
    copy_state,
    init_trust,
)

REPO = Path(__file__).resolve().parents[2]
KEEP_PREVIOUS = 1


@pytest.fixture(scope="module")
def crash_setup(
    tmp_path_factory: pytest.TempPathFactory, keys: Keys, sources: Path
) -> dict[str, Path]:
    """Template: versions 1 and 2 installed, 2 current. Bundle files for 3 and the failing 9."""
    base = tmp_path_factory.mktemp("crash")
    state = base / "template"
    init_trust(state, keys)
    installer = Installer(
        state, OfflineSelfTest(), DEVICE, keep_previous=KEEP_PREVIOUS, clock=lambda: NOW
    )
    for version in (1, 2):
        asyncio.run(installer.install_bytes(bundle_bytes(sources, keys.signers[:1], version)))
    paths = {"template": state}
    for version in (3, FAILING_VERSION):
        path = base / f"v{version}.bundle"
        path.write_bytes(bundle_bytes(sources, keys.signers[:1], version))
        paths[f"v{version}"] = path
    return paths


def run_driver(work: Path, template: Path, kill_at: list[int], **plan: Any) -> list[dict[str, Any]]:
    work.mkdir(parents=True, exist_ok=True)
    plan_file = work / "plan.json"
    plan_file.write_text(
        json.dumps(
            {
                "template": str(template),
                "work": str(work),
                "kill_at": kill_at,
                "keep_previous": KEEP_PREVIOUS,
                **plan,
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bundle.crash_driver", str(plan_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def kill_points(work: Path, template: Path, **plan: Any) -> list[str]:
    [dry] = run_driver(work / "dry", template, [0], **plan)
    assert dry["exit"] == 0 and not dry["killed"]
    labels: list[str] = dry["labels"]
    return [label for label in labels if not label.startswith("failed:")]


def recover_and_check(world: World, expected: int) -> None:
    Installer(world.state, OfflineSelfTest(), DEVICE, clock=lambda: NOW).recover()
    world.assert_serves(expected)
    store = world.store
    for path in store.model_dir(MODEL).iterdir():
        if path.is_dir():
            assert store.inspect_version(path, deep=True) is not None, f"{path} left behind"
    mark = store.read_high_water()[MODEL]
    current = store.inspect_version(store.version_dir(MODEL, expected))
    assert current is not None
    assert mark.counter >= current.counter


def test_sigkill_at_every_step_of_an_install(
    tmp_path: Path, crash_setup: dict[str, Path], keys: Keys, sources: Path
) -> None:
    plan = {"operation": "install", "bundle": str(crash_setup["v3"])}
    labels = kill_points(tmp_path, crash_setup["template"], **plan)
    assert len(labels) >= 25, labels
    for step in ("mkdir staging", "fsync mlp/3/model.onnx.data", "write .verified", "rename"):
        assert any(label.startswith(step) for label in labels), (step, labels)
    switch = labels.index("replace CURRENT") + 1
    results = run_driver(
        tmp_path / "runs", crash_setup["template"], list(range(1, len(labels) + 1)), **plan
    )
    assert len(results) == len(labels)
    for result in results:
        assert result["killed"], result
        world = World(Path(result["state"]), sources, keys)
        expected = 3 if result["kill_at"] >= switch else 2
        recover_and_check(world, expected)
        if expected == 2:
            assert world.store.read_high_water()[MODEL].counter == 2
            assert not world.store.version_dir(MODEL, 3).exists()
        # The interrupted install can simply be retried.
        result_again = asyncio.run(
            world.installer(keep_previous=KEEP_PREVIOUS).install_file(crash_setup["v3"])
        )
        assert result_again.outcome in ("installed", "already-installed")
        world.assert_serves(3)


def test_sigkill_at_every_step_of_a_failing_install(
    tmp_path: Path, crash_setup: dict[str, Path], keys: Keys, sources: Path
) -> None:
    plan = {
        "operation": "install",
        "bundle": str(crash_setup[f"v{FAILING_VERSION}"]),
        "expect_failure": True,
    }
    labels = kill_points(tmp_path, crash_setup["template"], **plan)
    assert "load_version failed" in labels
    results = run_driver(
        tmp_path / "runs", crash_setup["template"], list(range(1, len(labels) + 1)), **plan
    )
    for result in results:
        assert result["killed"], result
        world = World(Path(result["state"]), sources, keys)
        recover_and_check(world, 2)
        assert not world.store.version_dir(MODEL, FAILING_VERSION).exists()
        assert world.store.read_high_water()[MODEL].counter == 2


def test_sigkill_at_every_step_of_a_rollback(
    tmp_path: Path, crash_setup: dict[str, Path], keys: Keys, sources: Path
) -> None:
    plan = {"operation": "rollback", "to_version": 1}
    labels = kill_points(tmp_path, crash_setup["template"], **plan)
    switch = labels.index("replace CURRENT") + 1
    results = run_driver(
        tmp_path / "runs", crash_setup["template"], list(range(1, len(labels) + 1)), **plan
    )
    for result in results:
        assert result["killed"], result
        world = World(Path(result["state"]), sources, keys)
        recover_and_check(world, 1 if result["kill_at"] >= switch else 2)
        assert ModelStore(world.state).read_high_water()[MODEL].counter == 2


def test_recover_cleans_a_copied_template_without_changes(
    tmp_path: Path, crash_setup: dict[str, Path], keys: Keys, sources: Path
) -> None:
    world = World(copy_state(crash_setup["template"], tmp_path / "state"), sources, keys)
    before = world.snapshot()
    recover_and_check(world, 2)
    assert world.snapshot() == before
