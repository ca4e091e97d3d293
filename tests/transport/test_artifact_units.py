"""Pure parts of artifact delivery: mirror URLs in the signed deployment, content-addressed
names, chunk-aligned Range runs, the artifact store on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from edged.errors import FleetMessageError, FleetSetupError
from edged.fleet.artifacts import ArtifactStore, artifact_store
from edged.transport.artifacts import _runs
from edged.transport.protocol import Deployment, artifact_name, artifact_urls


def _deployment(**overrides: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "id": "ab" * 16, "model": "mlp", "version": 2, "size": 600, "sha256": "ab" * 32,
        "chunk_size": 256, "chunks": ["cd" * 32] * 3, "manifest": "{}",
        "manifest_signatures": [],
    }  # fmt: skip
    value.update(overrides)
    return value


def test_mirror_urls_round_trip_and_the_chunk_only_form_is_unchanged() -> None:
    plain = Deployment.from_json(_deployment())
    assert plain.urls == () and "urls" not in plain.to_json()
    urls = ["https://a.example/artifacts/x.bundle", "http://10.0.0.2:8080/b/x.bundle"]
    mirrored = Deployment.from_json(_deployment(urls=urls))
    assert mirrored.urls == tuple(urls)
    assert Deployment.from_json(mirrored.to_json()) == mirrored


@pytest.mark.parametrize(
    "urls",
    [["ftp://a/x"], ["https://"], ["https://a/x y"], [3], ["https://a/" + "x" * 3000]],
)
def test_urls_that_are_not_http_are_refused(urls: list[Any]) -> None:
    with pytest.raises(FleetMessageError, match="urls"):
        Deployment.from_json(_deployment(urls=urls))


def test_artifact_urls_are_content_addressed_under_each_base() -> None:
    sha = "0f" * 32
    assert artifact_name(sha) == f"{sha}.bundle"
    assert artifact_urls(["https://cdn.example/a/", "https://m2.example"], sha) == (
        f"https://cdn.example/a/{sha}.bundle",
        f"https://m2.example/{sha}.bundle",
    )


def test_missing_chunks_become_consecutive_runs_of_bounded_length() -> None:
    assert list(_runs([], 4)) == []
    assert list(_runs([0, 1, 2, 5, 6, 9], 4)) == [(0, 2), (5, 6), (9, 9)]
    assert list(_runs(list(range(10)), 4)) == [(0, 3), (4, 7), (8, 9)]
    assert list(_runs([3], 1)) == [(3, 3)]


def test_the_artifact_store_writes_the_bundle_once_under_its_hash(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts", ("https://cdn.example/edged",))
    data = b"signed bundle bytes"
    path = store.publish(data)
    sha = hashlib.sha256(data).hexdigest()
    assert path == tmp_path / "artifacts" / f"{sha}.bundle"
    assert path.read_bytes() == data and path.stat().st_mode & 0o044 == 0o044
    mtime = path.stat().st_mtime_ns
    assert store.publish(data) == path and path.stat().st_mtime_ns == mtime
    assert store.urls(sha) == (f"https://cdn.example/edged/{sha}.bundle",)


def test_artifact_options_go_together() -> None:
    assert artifact_store(None, []) is None
    with pytest.raises(FleetSetupError, match="go together"):
        artifact_store(Path("x"), [])
    with pytest.raises(FleetSetupError, match="go together"):
        artifact_store(None, ["https://a"])
    with pytest.raises(FleetMessageError):
        artifact_store(Path("x"), ["gopher://a"])
