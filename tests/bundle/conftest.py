"""Fixtures: generated tiny ONNX models, keys, and a device state with version 1 installed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edged.bundle.install import Installer
from edged.bundle.offline import OfflineSelfTest
from edged.demo.samples import write_failing_version, write_onnx_mlp, write_tflite_fc
from tests.bundle.helpers import (
    DEVICE,
    LAYERS,
    MODEL,
    NOW,
    Keys,
    World,
    bundle_bytes,
    copy_state,
    init_trust,
    make_keys,
)

FAILING_VERSION = 9


@pytest.fixture(scope="session")
def keys() -> Keys:
    return make_keys()


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<sources>/mlp/{1..4}`` good versions (different weights), ``mlp/9`` fails its
    self-test, ``fc/1`` is a TFLite model."""
    root = tmp_path_factory.mktemp("sources")
    for version in (1, 2, 3, 4):
        write_onnx_mlp(root / MODEL / str(version), LAYERS, seed=version)
    write_failing_version(root / MODEL / str(FAILING_VERSION), LAYERS, seed=FAILING_VERSION)
    write_tflite_fc(root / "fc" / "1", 4, 3, seed=1)
    return root


@pytest.fixture(scope="session")
def template_state(tmp_path_factory: pytest.TempPathFactory, keys: Keys, sources: Path) -> Path:
    """A state directory: trust store (threshold 1) and mlp version 1 installed and current."""
    state = tmp_path_factory.mktemp("template") / "state"
    init_trust(state, keys)
    installer = Installer(state, OfflineSelfTest(), DEVICE, clock=lambda: NOW)
    installer.recover()
    asyncio.run(installer.install_bytes(bundle_bytes(sources, keys.signers[:1], 1)))
    return state


@pytest.fixture
def world(tmp_path: Path, template_state: Path, keys: Keys, sources: Path) -> World:
    """A private copy of the template state; mlp version 1 serves."""
    return World(copy_state(template_state, tmp_path / "state"), sources, keys)


@pytest.fixture
def empty_world(tmp_path: Path, keys: Keys, sources: Path) -> World:
    """A state directory with a trust store and no model."""
    state = tmp_path / "state"
    init_trust(state, keys)
    return World(state, sources, keys)
