"""The daemon's CPU budget: inference threads leave the event loop a core, are split between
models, never spin unless a model asks, and a model's own setting wins."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edged.config import ModelsConfig, parse_config
from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp
from edged.errors import ConfigError
from edged.modelrepo.config import parse_model_config
from edged.runtime.budget import CpuBudget, usable_cores
from edged.runtime.options import RuntimeOptions
from edged.serve.manager import ModelManager


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (4, 3), (8, 7)])
def test_inference_leaves_the_event_loop_a_core(cores: int, threads: int) -> None:
    assert CpuBudget(cores).total_threads == threads
    assert CpuBudget(cores).apply(RuntimeOptions(), models=1).intra_op_threads == threads


@pytest.mark.parametrize(("cores", "models", "each"), [(8, 2, 3), (8, 3, 2), (2, 3, 1), (4, 0, 3)])
def test_models_split_the_budget_at_least_one_thread_each(
    cores: int, models: int, each: int
) -> None:
    assert CpuBudget(cores).threads_per_model(models) == each


def test_a_models_own_thread_count_wins() -> None:
    options = RuntimeOptions(intra_op_threads=4)
    assert CpuBudget(2).apply(options, models=3) is options


def test_configured_inference_threads_replace_cores_minus_one() -> None:
    config = parse_config({"models": {"inference_threads": 6}}, Path("."))
    assert config.models.inference_threads == 6
    assert CpuBudget(2, config.models.inference_threads).threads_per_model(2) == 3
    assert ModelsConfig().inference_threads == 0
    with pytest.raises(ConfigError, match="models.inference_threads"):
        parse_config({"models": {"inference_threads": -1}}, Path("."))


def test_spin_wait_is_off_unless_a_model_asks() -> None:
    assert RuntimeOptions().spin_wait is False
    assert parse_model_config({}).runtime.spin_wait is False
    assert parse_model_config({"runtime": {"spin_wait": True}}).runtime.spin_wait is True


def test_usable_cores_follows_the_affinity_mask() -> None:
    import os

    assert usable_cores() == len(os.sched_getaffinity(0))


def test_the_daemon_gives_each_model_its_share(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    for name in ("a", "b"):
        write_onnx_mlp(repo / name / "1", SAMPLE_MLP_LAYERS, seed=1)
    (repo / "b" / "config.toml").write_text("[runtime]\nintra_op_threads = 5\nspin_wait = true\n")

    async def main() -> dict[str, str]:
        manager = ModelManager(ModelsConfig(repository=repo))
        await manager.start()
        try:
            return {m["name"]: m["runtime"] for m in manager.status()["models"]}
        finally:
            await manager.close()

    runtimes = asyncio.run(main())
    share = max(1, (usable_cores() - 1) // 2)
    assert f"intra_op_threads={share} spin_wait=False" in runtimes["a"]
    assert "intra_op_threads=5 spin_wait=True" in runtimes["b"]


@pytest.mark.parametrize(("spin", "entry"), [(False, "0"), (True, "1")])
def test_the_onnx_session_gets_the_threads_and_spin_setting(
    tmp_path: Path, spin: bool, entry: str
) -> None:
    from edged.runtime import load_model

    version = tmp_path / "m" / "1"
    write_onnx_mlp(version, SAMPLE_MLP_LAYERS, seed=1)
    model = load_model(version, RuntimeOptions(intra_op_threads=1, spin_wait=spin))
    options = model._session.get_session_options()  # type: ignore[attr-defined]
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == entry
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == entry
