"""Shared fixtures for telemetry tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from .helpers import FakeClock
from .sysfs_trees import Tree, build_tree


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sysfs(tmp_path: Path) -> Callable[[Tree], Path]:
    """Build a sysfs fixture tree below a fresh directory and return its root."""
    counter = iter(range(1_000_000))

    def make(tree: Tree) -> Path:
        return build_tree(tmp_path / f"sys{next(counter)}", tree)

    return make
