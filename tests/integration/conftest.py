"""Fixtures shared by the integration tests that sign and install releases."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli import edged


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A root and a signer key pair made by ``edged keygen`` (``root.key``, ``signer.pub``...)."""
    keydir = tmp_path / "keys"
    keydir.mkdir()
    edged("keygen", str(keydir / "root"))
    edged("keygen", str(keydir / "signer"))
    return keydir
