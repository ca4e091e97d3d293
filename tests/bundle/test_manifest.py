"""The manifest schema and path rules; property tests: any input is either a valid manifest or a
``BundleError``, never another exception."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.bundle.canonical import encode_canonical
from edged.bundle.limits import DEFAULT_LIMITS, BundleLimits
from edged.bundle.manifest import (
    FileEntry,
    Manifest,
    Targets,
    check_relative_path,
    manifest_from_json,
    parse_manifest,
)
from edged.errors import BundleError, LimitExceededError, ManifestSchemaError, UnsafePathError

SHA = "ab" * 32

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,10}", fullmatch=True).filter(
    lambda n: n != "signatures"
)
components = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", fullmatch=True).filter(
    lambda c: c != "config.toml"
)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    model = draw(names)
    version = draw(st.integers(1, 10**6))
    runtime = draw(st.sampled_from(["onnx", "tflite"]))
    model_file = "model.onnx" if runtime == "onnx" else "model.tflite"
    prefix = f"{model}/{version}/"
    extra = draw(st.lists(st.lists(components, min_size=1, max_size=3).map("/".join), max_size=4))
    paths = {prefix + model_file, f"{model}/config.toml"}
    paths |= {
        prefix + e for e in extra if not e.startswith(("model.onnx", "model.tflite")) or "/" in e
    }
    dirs = {p.rsplit("/", 1)[0] for p in paths}
    paths = {p for p in paths if not any(d == p or d.startswith(p + "/") for d in dirs)}
    vectors = tuple(sorted(p for p in paths if p.endswith(".npz")))
    created = draw(st.integers(0, 2**40))
    return Manifest(
        model=model,
        version=version,
        counter=draw(st.integers(1, 2**53 - 1)),
        created=created,
        expires=created + draw(st.integers(1, 2**40)),
        targets=Targets(
            arch=tuple(
                draw(
                    st.lists(
                        st.sampled_from(["x86_64", "aarch64", "armv7l"]),
                        min_size=1,
                        max_size=3,
                        unique=True,
                    )
                )
            ),
            runtime=runtime,
            providers=tuple(
                draw(
                    st.lists(
                        st.sampled_from(["CPUExecutionProvider", "CUDAExecutionProvider"]),
                        max_size=2,
                        unique=True,
                    )
                )
            ),
            min_edged_version=f"{draw(st.integers(0, 99))}.{draw(st.integers(0, 99))}.{draw(st.integers(0, 99))}",
        ),
        files=tuple(FileEntry(p, draw(st.integers(0, 2**20)), SHA) for p in sorted(paths)),
        test_vectors=vectors,
    )


@settings(max_examples=60, deadline=None)
@given(manifests())
def test_valid_manifests_round_trip(manifest: Manifest) -> None:
    assert parse_manifest(manifest.encode()) == manifest


json_leaves = st.one_of(
    st.booleans(),
    st.integers(-(2**60), 2**60),
    st.text(max_size=8),
    st.none(),
    st.floats(allow_nan=True),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@settings(max_examples=120, deadline=2000)
@given(manifests(), st.data())
def test_mutated_manifests_raise_only_bundle_errors(
    manifest: Manifest, data: st.DataObject
) -> None:
    doc: Any = copy.deepcopy(manifest.to_json())
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(doc)))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6))] = data.draw(json_leaves)
        else:
            parent[path[-1]] = data.draw(json_leaves)
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    try:
        parse_manifest(raw)
    except BundleError:
        pass


@settings(max_examples=300, deadline=2000)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_bundle_errors(data: bytes) -> None:
    try:
        parse_manifest(data)
    except BundleError:
        pass


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/abs",
        "a//b",
        "a/../b",
        "..",
        "a/./b",
        "a/.hidden",
        "a/b/",
        "a\\b",
        "a/-x",
        "caf\u00e9",
        "a/b\x00",
    ],
)
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(UnsafePathError):
        check_relative_path(path, DEFAULT_LIMITS)


def test_path_limits() -> None:
    with pytest.raises(LimitExceededError):
        check_relative_path("a" * 256, DEFAULT_LIMITS)
    with pytest.raises(UnsafePathError, match="deeper"):
        check_relative_path("/".join("a" * 9), DEFAULT_LIMITS)
    assert check_relative_path("m/1/sub/model.onnx.data", DEFAULT_LIMITS) == (
        "m",
        "1",
        "sub",
        "model.onnx.data",
    )


def base_manifest() -> dict[str, Any]:
    return {
        "_type": "edged/bundle-manifest",
        "spec_version": 1,
        "model": "m",
        "version": 1,
        "counter": 1,
        "created": 0,
        "expires": 10,
        "targets": {
            "arch": ["x86_64"],
            "runtime": "onnx",
            "providers": [],
            "min_edged_version": "0.1.0",
        },
        "files": {
            "m/1/model.onnx": {"size": 1, "sha256": SHA},
            "m/config.toml": {"size": 0, "sha256": SHA},
        },
        "test_vectors": [],
    }


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(model="signatures"), "reserved"),
        (lambda m: m.update(version=0), "version"),
        (lambda m: m["files"].pop("m/config.toml"), "config.toml"),
        (lambda m: m["files"].pop("m/1/model.onnx"), "model.onnx"),
        (
            lambda m: m["files"].update({"m/1/model.tflite": {"size": 1, "sha256": SHA}}),
            "exactly one",
        ),
        (lambda m: m["files"].update({"m/1/config.toml": {"size": 1, "sha256": SHA}}), "config"),
        (lambda m: m["files"].update({"m/2/x": {"size": 1, "sha256": SHA}}), "one model version"),
        (lambda m: m["files"]["m/1/model.onnx"].update(sha256="AB" * 32), "sha256"),
        (lambda m: m["files"]["m/1/model.onnx"].update(size=-1), "size"),
        (lambda m: m["files"]["m/1/model.onnx"].update(size=True), "size"),
        (lambda m: m["targets"].update(arch=[]), "arch"),
        (
            lambda m: m["files"].update({"m/1/model.onnx/x": {"size": 1, "sha256": SHA}}),
            "directory",
        ),
        (lambda m: m["targets"].update(arch=["x86_64", "x86_64"]), "twice"),
        (lambda m: m.update(test_vectors=["m/1/model.onnx"]), "npz"),
        (lambda m: m.update(test_vectors=["m/1/other.npz"]), "test_vectors"),
    ],
    ids=[
        "reserved-name",
        "version-zero",
        "no-config",
        "no-model-file",
        "two-model-files",
        "config-in-version",
        "other-version",
        "uppercase-hash",
        "negative-size",
        "bool-size",
        "no-arch",
        "file-is-dir",
        "duplicate-arch",
        "vectors-not-npz",
        "vectors-not-listed",
    ],
)
def test_schema_errors_name_the_field(edit: Any, match: str) -> None:
    doc = base_manifest()
    edit(doc)
    with pytest.raises(ManifestSchemaError, match=match):
        manifest_from_json(doc)


def test_declared_sizes_are_limited() -> None:
    doc = base_manifest()
    doc["files"]["m/1/model.onnx"]["size"] = 11
    with pytest.raises(LimitExceededError, match="declares 11 bytes"):
        manifest_from_json(doc, BundleLimits(max_file_bytes=10))
    with pytest.raises(LimitExceededError, match="total"):
        manifest_from_json(doc, BundleLimits(max_total_file_bytes=10))
    with pytest.raises(LimitExceededError, match="manifest is"):
        parse_manifest(encode_canonical(doc), BundleLimits(max_manifest_bytes=10))
