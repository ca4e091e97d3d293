"""Verified hot install into the real serving side: the ``ModelManager`` is the swap target, and
inference answers come from the version the store says is current."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.bundle.install import Installer
from edged.config import ModelsConfig
from edged.errors import BundleError, SelfTestFailedError
from edged.serve.manager import ModelManager
from tests.bundle.conftest import FAILING_VERSION
from tests.bundle.helpers import DEVICE, MODEL, NOW, World


def vectors(sources: Path, version: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    with np.load(sources / MODEL / str(version) / "test_vectors.npz") as npz:
        return npz["input:input"], npz["output:output"]


async def answers(manager: ModelManager, sources: Path, version: int) -> bool:
    x, expected = vectors(sources, version)
    result = await manager.infer(MODEL, {"input": x}, timeout_s=10)
    return bool(np.allclose(result.outputs["output"], expected, atol=1e-4, rtol=1e-3))


def test_hot_install_swaps_the_serving_version(world: World) -> None:
    async def scenario() -> None:
        manager = ModelManager(ModelsConfig(repository=world.state / "models"))
        await manager.start()
        try:
            installer = Installer(world.state, manager, DEVICE, clock=lambda: NOW)
            assert manager.serving(MODEL).version == "1"
            assert await answers(manager, world.sources, 1)

            await installer.install_bytes(world.bundle(2))
            assert manager.serving(MODEL).version == "2"
            assert await answers(manager, world.sources, 2)

            with pytest.raises(SelfTestFailedError):
                await installer.install_bytes(world.bundle(FAILING_VERSION))
            assert manager.serving(MODEL).version == "2"
            assert await answers(manager, world.sources, 2)

            with pytest.raises(BundleError):
                await installer.install_bytes(world.bundle(3, keys=[world.keys.outsider]))
            assert manager.serving(MODEL).version == "2"

            await installer.rollback(MODEL)
            assert manager.serving(MODEL).version == "1"
            assert await answers(manager, world.sources, 1)
        finally:
            await manager.close(drain_timeout_s=5)

    asyncio.run(scenario())
    world.assert_serves(1)


def test_a_restarted_manager_serves_what_current_names(world: World) -> None:
    world.install(world.bundle(2))
    world.install(world.bundle(3))
    world.rollback(2)

    async def scenario() -> str:
        manager = ModelManager(ModelsConfig(repository=world.state / "models"))
        await manager.start()
        try:
            return manager.serving(MODEL).version
        finally:
            await manager.close(drain_timeout_s=5)

    assert asyncio.run(scenario()) == "2"
