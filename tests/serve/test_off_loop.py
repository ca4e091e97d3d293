"""Disk work of the model manager (repository scans, a version's config.toml, large cache keys)
runs on worker threads, never on the event-loop thread that serves requests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.config import ModelsConfig
from edged.demo.samples import write_onnx_mlp
from edged.modelrepo import config as modelconfig
from edged.modelrepo import layout as repository
from edged.serve import cache, manager
from edged.serve.manager import HASH_ON_THREAD_BYTES, ModelManager


def _recording(calls: list[tuple[str, bool]], name: str, fn: Callable[..., Any]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append((name, threading.current_thread() is threading.main_thread()))
        return fn(*args, **kwargs)

    return wrapper


def test_scans_and_config_parsing_run_off_the_event_loop(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, bool]] = []
    monkeypatch.setattr(
        repository, "scan_layers", _recording(calls, "scan", repository.scan_layers)
    )
    monkeypatch.setattr(
        repository,
        "read_model_layers",
        _recording(calls, "read_model", repository.read_model_layers),
    )
    monkeypatch.setattr(
        manager, "config_for_version", _recording(calls, "config", modelconfig.config_for_version)
    )

    async def main() -> None:
        models = ModelManager(ModelsConfig(repository=model_repo))
        await models.start()
        try:
            await models.index_async()
            await models.load_model("mlp")
        finally:
            await models.close()

    asyncio.run(main())
    assert {name for name, _ in calls} == {"scan", "read_model", "config"}
    assert [c for c in calls if c[1]] == []  # none on the main (event-loop) thread


def test_large_inputs_are_hashed_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    width = HASH_ON_THREAD_BYTES // 4 + 16  # one row of float32 is just over the limit
    repo = tmp_path / "models"
    write_onnx_mlp(repo / "wide" / "1", [width, 4], seed=1)
    (repo / "wide" / "config.toml").write_text("[cache]\nenabled = true\n")
    calls: list[tuple[str, bool]] = []
    monkeypatch.setattr(manager, "input_key", _recording(calls, "hash", cache.input_key))
    rng = np.random.default_rng(0)
    big = {"input": rng.standard_normal((1, width), dtype=np.float32)}

    async def main() -> None:
        models = ModelManager(ModelsConfig(repository=repo))
        await models.start()
        try:
            first = await models.infer("wide", big)
            again = await models.infer("wide", big)
            assert again is first  # the cache answered
        finally:
            await models.close()

    asyncio.run(main())
    assert calls == [("hash", False), ("hash", False)]
