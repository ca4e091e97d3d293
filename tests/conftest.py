"""Fixtures shared by every test package."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.daemon import SAMPLE_MODELS, SHARED_MODELS


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    """A private copy of the committed sample repository (tests add versions to it)."""
    repo = tmp_path / "models"
    shutil.copytree(SAMPLE_MODELS, repo, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return repo


@pytest.fixture
def shared_models() -> Path:
    if not SHARED_MODELS.is_dir():
        pytest.skip(f"real models folder {SHARED_MODELS} is absent (it ships beside the checkout)")
    return SHARED_MODELS


@pytest.fixture
def loop_repo(tmp_path: Path) -> Path:
    """A repository with the counting-loop model, whose run time its input sets."""
    from edged.demo.samples import write_counting_loop

    repo = tmp_path / "repo"
    write_counting_loop(repo / "loop" / "1")
    return repo
