"""The on-disk model repository: ``<repo>/<model>/<version>/model.onnx | model.tflite``.

Which version serves: the one named by ``<repo>/<model>/CURRENT`` when that file exists (the
bundle store writes it atomically), else the highest numeric version directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edged.errors import ModelNotFoundError
from edged.runtime.base import registered_backends

CURRENT_POINTER = "CURRENT"


@dataclass(frozen=True)
class RepositoryModel:
    name: str
    directory: Path
    versions: tuple[str, ...]  # ascending
    current: str | None  # the version to serve, None when no complete version exists

    def version_dir(self, version: str) -> Path:
        return self.directory / version


def _version_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _has_model_file(version_dir: Path) -> bool:
    return any((version_dir / b.model_file).is_file() for b in registered_backends().values())


def read_model(repo: Path, name: str) -> RepositoryModel:
    directory = repo / name
    if not directory.is_dir():
        raise ModelNotFoundError(f"model {name!r} is not in the repository {repo}")
    versions = sorted(
        (p.name for p in directory.iterdir() if p.is_dir() and _has_model_file(p)),
        key=_version_key,
    )
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
