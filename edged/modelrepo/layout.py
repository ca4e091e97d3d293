"""The on-disk model repository: ``<repo>/<model>/<version>/model.onnx | model.tflite``.

Which version serves: the one named by ``<repo>/<model>/CURRENT`` when that file exists (the
bundle store writes it atomically), else the highest version directory. A version is named by
the decimal spelling of a number from 1 to 2^53 - 1 (the one rule, for manifests, the store,
``CURRENT`` and seed repositories alike); other directories are not versions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edged.errors import ModelNotFoundError
from edged.runtime.base import registered_backends

CURRENT_POINTER = "CURRENT"
MAX_VERSION = 2**53 - 1  # what JSON numbers (and so manifests) carry exactly
VERSION_NAME_RE = re.compile(r"^[1-9][0-9]{0,15}$")  # 2**53 - 1 has 16 digits


def parse_version_name(text: str) -> int | None:
    """A version directory name or ``CURRENT`` value as a version number, else None.

    Exactly the decimal spelling ``str(version)`` of a version the manifest schema allows.
    """
    if not VERSION_NAME_RE.match(text):
        return None
    value = int(text)
    return value if value <= MAX_VERSION else None


@dataclass(frozen=True)
class RepositoryModel:
    name: str
    directory: Path
    versions: tuple[str, ...]  # ascending
    current: str | None  # the version to serve, None when no complete version exists

    def version_dir(self, version: str) -> Path:
        return self.directory / version


def _has_model_file(version_dir: Path) -> bool:
    return any((version_dir / b.model_file).is_file() for b in registered_backends().values())


def read_model(repo: Path, name: str) -> RepositoryModel:
    directory = repo / name
    if not directory.is_dir():
        raise ModelNotFoundError(f"model {name!r} is not in the repository {repo}")
    numbered = (
        (number, p.name)
        for p in directory.iterdir()
        if (number := parse_version_name(p.name)) is not None and p.is_dir()
    )
    versions = [name for _, name in sorted(numbered) if _has_model_file(directory / name)]
    current: str | None = versions[-1] if versions else None
    pointer = directory / CURRENT_POINTER
    if pointer.is_file():
        named = pointer.read_text(encoding="utf-8").strip()
        current = named if named in versions else current
    return RepositoryModel(name, directory, tuple(versions), current)


def scan_layers(repos: list[Path]) -> dict[str, RepositoryModel]:
    """Several repositories, the first one that has a model winning (the bundle store comes
    first, so an installed bundle overrides a seed model of the same name)."""
    merged: dict[str, RepositoryModel] = {}
    for repo in repos:
        for name, model in scan(repo).items():
            if name not in merged and model.current is not None:
                merged[name] = model
    return merged


def read_model_layers(repos: list[Path], name: str) -> RepositoryModel:
    for repo in repos:
        if (repo / name).is_dir():
            model = read_model(repo, name)
            if model.current is not None:
                return model
    raise ModelNotFoundError(
        f"model {name!r} is in none of the repositories {', '.join(map(str, repos))}"
    )


def scan(repo: Path) -> dict[str, RepositoryModel]:
    """Every model directory in ``repo`` (hidden and staging directories are skipped)."""
    if not repo.is_dir():
        return {}
    models: dict[str, RepositoryModel] = {}
    for child in sorted(repo.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            model = read_model(repo, child.name)
            if model.versions:
                models[model.name] = model
    return models
