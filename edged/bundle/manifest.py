"""The bundle manifest: what a bundle holds, for which device, and until when.

``parse_manifest`` turns canonical-JSON bytes into a frozen ``Manifest`` or raises the specific
``ManifestError``/``UnsafePathError``/``LimitExceededError``. It does no I/O and checks no
signature; ``edged.bundle.verify`` does that first.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from edged.bundle.canonical import Json, encode_canonical, parse_canonical
from edged.bundle.limits import DEFAULT_LIMITS, BundleLimits
from edged.bundle.rollout_policy import parse_rollout, rollout_json
from edged.errors import (
    LimitExceededError,
    ManifestEncodingError,
    ManifestSchemaError,
    UnsafePathError,
)
from edged.modelrepo.layout import MAX_VERSION
from edged.runtime.base import model_files
from edged.serve.probation import ProbationPolicy

MANIFEST_TYPE = "edged/bundle-manifest"
SPEC_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURES_DIR = "signatures"
CONFIG_NAME = "config.toml"

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
RESERVED_MODEL_NAMES = frozenset({SIGNATURES_DIR})
PATH_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
TOKEN_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
EDGED_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})$")
MAX_COUNTER = 2**53 - 1


def check_relative_path(path: str, limits: BundleLimits, what: str = "path") -> tuple[str, ...]:
    """Split a bundle path into components, refusing anything that could leave its directory.

    Allowed: relative, '/'-separated, each component ``[A-Za-z0-9_][A-Za-z0-9_.-]*`` (so no
    ``.``, ``..``, hidden names, empty components, backslashes or control characters).
    """
    if not path:
        raise UnsafePathError(f"{what} is empty")
    if len(path.encode("utf-8", "surrogateescape")) > limits.max_path_bytes:
        raise LimitExceededError(
            f"{what} {path[:80]!r}... is longer than {limits.max_path_bytes} bytes"
        )
    if path.startswith("/"):
        raise UnsafePathError(f"{what} {path!r} is absolute")
    parts = tuple(path.split("/"))
    # Traversal first: a deep "../../.." path is a traversal attempt, not merely too deep.
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePathError(f"{what} {path[:80]!r} has a {part or 'empty'!r} component")
    if len(parts) > limits.max_path_depth:
        raise UnsafePathError(f"{what} {path!r} is nested deeper than {limits.max_path_depth}")
    for part in parts:
        if not PATH_COMPONENT_RE.match(part):
            raise UnsafePathError(
                f"{what} {path!r}: component {part!r} may only use letters, digits, '_', '.', "
                "'-' and may not start with '.' or '-'"
            )
    return parts


@dataclass(frozen=True)
class FileEntry:
    path: str  # bundle path: "<model>/config.toml" or "<model>/<version>/..."
    size: int
    sha256: str


@dataclass(frozen=True)
class Targets:
    arch: tuple[str, ...]  # any of these CPU architectures (platform.machine() spelling)
    runtime: str  # "onnx" | "tflite"
    providers: tuple[str, ...]  # any of these execution providers / delegates; () = any
    min_edged_version: str  # "MAJOR.MINOR.PATCH"


@dataclass(frozen=True)
class Manifest:
    model: str
    version: int
    counter: int
    created: int  # Unix seconds, UTC
    expires: int  # Unix seconds, UTC
    targets: Targets
    files: tuple[FileEntry, ...]  # sorted by path
    test_vectors: tuple[str, ...]  # bundle paths of .npz files; () when config.toml has inline
    rollout: ProbationPolicy | None = None  # None: the release states no policy (defaults)

    @property
    def config_path(self) -> str:
        return f"{self.model}/{CONFIG_NAME}"

    @property
    def version_prefix(self) -> str:
        return f"{self.model}/{self.version}/"

    @property
    def model_file_path(self) -> str:
        return self.version_prefix + model_files()[self.targets.runtime]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry | None:
        for entry in self.files:
            if entry.path == path:
                return entry
        return None

    def version_relpath(self, path: str) -> str:
        """Where a bundle file lives inside the installed version directory.

        ``<model>/config.toml`` becomes the version's own ``config.toml`` (which the serving
        side prefers over the model-level one); ``<model>/<version>/x`` becomes ``x``.
        """
        if path == self.config_path:
            return CONFIG_NAME
        return path.removeprefix(self.version_prefix)

    def to_json(self) -> dict[str, Json]:
        files: dict[str, Json] = {f.path: {"sha256": f.sha256, "size": f.size} for f in self.files}
        targets: dict[str, Json] = {
            "arch": list(self.targets.arch),
            "min_edged_version": self.targets.min_edged_version,
            "providers": list(self.targets.providers),
            "runtime": self.targets.runtime,
        }
        value: dict[str, Json] = {
            "_type": MANIFEST_TYPE,
            "counter": self.counter,
            "created": self.created,
            "expires": self.expires,
            "files": files,
            "model": self.model,
            "spec_version": SPEC_VERSION,
            "targets": targets,
            "test_vectors": list(self.test_vectors),
            "version": self.version,
        }
        if self.rollout is not None:
            value["rollout"] = rollout_json(self.rollout)
        return value

    def encode(self) -> bytes:
        """The canonical bytes that are signed and stored as ``manifest.json``."""
        return encode_canonical(self.to_json())


def manifest_digest(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()


# --- schema ------------------------------------------------------------------------------


class _Fields:
    """A JSON object read field by field; every error names the field's path."""

    def __init__(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise ManifestSchemaError(f"manifest {where}: expected an object")
        self._data: dict[str, Any] = value
        self._where = where
        self._seen: set[str] = set()

    def _path(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def get(self, key: str) -> Any:
        self._seen.add(key)
        if key not in self._data:
            raise ManifestSchemaError(f"manifest field {self._path(key)} is missing")
        return self._data[key]

    def integer(self, key: str, minimum: int, maximum: int = MAX_COUNTER) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestSchemaError(f"manifest field {self._path(key)} must be an integer")
        if not minimum <= value <= maximum:
            raise ManifestSchemaError(
                f"manifest field {self._path(key)} must be in {minimum}..{maximum}, got {value}"
            )
        return value

    def string(self, key: str, pattern: re.Pattern[str], hint: str) -> str:
        value = self.get(key)
        if not isinstance(value, str) or not pattern.match(value):
            raise ManifestSchemaError(
                f"manifest field {self._path(key)} must be {hint}, got {value!r}"
            )
        return value

    def tokens(self, key: str, *, allow_empty: bool) -> tuple[str, ...]:
        value = self.get(key)
        if not isinstance(value, list):
            raise ManifestSchemaError(f"manifest field {self._path(key)} must be a list")
        if not value and not allow_empty:
            raise ManifestSchemaError(f"manifest field {self._path(key)} must not be empty")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not TOKEN_RE.match(item):
                raise ManifestSchemaError(
                    f"manifest field {self._path(key)}[{i}] must be a name of letters, digits, "
                    f"'_', '.', '-', got {item!r}"
                )
        if len(set(value)) != len(value):
            raise ManifestSchemaError(f"manifest field {self._path(key)} lists a name twice")
        return tuple(value)

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ManifestSchemaError(f"manifest field {self._path(unknown[0])} is not known")


def _parse_files(
    value: Any, model: str, version: int, limits: BundleLimits
) -> tuple[FileEntry, ...]:
    if not isinstance(value, dict) or not value:
        raise ManifestSchemaError("manifest field files must be a non-empty object")
    if len(value) > limits.max_files:
        raise LimitExceededError(
            f"manifest lists {len(value)} files, the limit is {limits.max_files}"
        )
    entries: list[FileEntry] = []
    total = 0
    for path in sorted(value):
        parts = check_relative_path(path, limits, "manifest file path")
        in_version = len(parts) >= 3 and parts[1] == str(version)
        is_config = parts == (model, CONFIG_NAME)
        if parts[0] != model or not (in_version or is_config):
            raise ManifestSchemaError(
                f"manifest file {path!r} is outside {model}/{version}/ and is not "
                f"{model}/{CONFIG_NAME}: a bundle carries exactly one model version"
            )
        if in_version and parts[2:] == (CONFIG_NAME,):
            raise ManifestSchemaError(
                f"manifest file {path!r}: the model config goes to {model}/{CONFIG_NAME}"
            )
        fields = _Fields(value[path], f"files[{path!r}]")
        size = fields.integer("size", 0)
        sha256 = fields.string("sha256", SHA256_RE, "64 lowercase hex digits")
        fields.done()
        if size > limits.max_file_bytes:
            raise LimitExceededError(
                f"manifest file {path!r} declares {size} bytes, the limit is "
                f"{limits.max_file_bytes}"
            )
        total += size
        entries.append(FileEntry(path, size, sha256))
    directories = {
        "/".join(e.path.split("/")[:i]) for e in entries for i in range(1, e.path.count("/") + 1)
    }
    clash = sorted(directories & {e.path for e in entries})
    if clash:
        raise ManifestSchemaError(f"manifest file {clash[0]!r} is also a directory of other files")
    if total > limits.max_total_file_bytes:
        raise LimitExceededError(
            f"manifest files total {total} bytes, the limit is {limits.max_total_file_bytes}"
        )
    return tuple(entries)


def manifest_from_json(value: Json, limits: BundleLimits = DEFAULT_LIMITS) -> Manifest:
    root = _Fields(value, "")
    type_ = root.get("_type")
    if type_ != MANIFEST_TYPE:
        raise ManifestSchemaError(f"manifest field _type must be {MANIFEST_TYPE!r}, got {type_!r}")
    spec = root.get("spec_version")
    if spec != SPEC_VERSION or isinstance(spec, bool):
        raise ManifestSchemaError(
            f"manifest spec_version {spec!r} is not supported (this edged reads {SPEC_VERSION})"
        )
    model = root.string("model", MODEL_NAME_RE, "a model name ([A-Za-z0-9][A-Za-z0-9_-]{0,63})")
    if model in RESERVED_MODEL_NAMES:
        raise ManifestSchemaError(f"manifest field model: {model!r} is a reserved name")
    version = root.integer("version", 1, MAX_VERSION)
    counter = root.integer("counter", 1)
    created = root.integer("created", 0)
    expires = root.integer("expires", 0)
    if expires <= created:
        raise ManifestSchemaError(
            f"manifest expires ({expires}) must be later than created ({created})"
        )
    tf = _Fields(root.get("targets"), "targets")
    runtime = tf.get("runtime")
    if not isinstance(runtime, str) or runtime not in model_files():
        raise ManifestSchemaError(
            f"manifest field targets.runtime must be one of {', '.join(model_files())}, "
            f"got {runtime!r}"
        )
    targets = Targets(
        arch=tf.tokens("arch", allow_empty=False),
        runtime=runtime,
        providers=tf.tokens("providers", allow_empty=True),
        min_edged_version=tf.string("min_edged_version", EDGED_VERSION_RE, "MAJOR.MINOR.PATCH"),
    )
    tf.done()
    files = _parse_files(root.get("files"), model, version, limits)
    paths = {f.path for f in files}
    if f"{model}/{CONFIG_NAME}" not in paths:
        raise ManifestSchemaError(f"manifest files must include {model}/{CONFIG_NAME}")
    prefix = f"{model}/{version}/"
    wanted = prefix + model_files()[runtime]
    if wanted not in paths:
        raise ManifestSchemaError(f"manifest for runtime {runtime!r} must include {wanted}")
    for other_runtime, other_file in model_files().items():
        if other_runtime != runtime and prefix + other_file in paths:
            raise ManifestSchemaError(
                f"manifest for runtime {runtime!r} also includes {prefix + other_file}; "
                "a version holds exactly one model file"
            )
    vectors_value = root.get("test_vectors")
    if not isinstance(vectors_value, list):
        raise ManifestSchemaError("manifest field test_vectors must be a list of file paths")
    for i, item in enumerate(vectors_value):
        if not isinstance(item, str) or item not in paths or not item.startswith(prefix):
            raise ManifestSchemaError(
                f"manifest field test_vectors[{i}] ({item!r}) must name a file of {prefix}"
            )
        if not item.endswith(".npz"):
            raise ManifestSchemaError(f"manifest field test_vectors[{i}] must be an .npz file")
    if len(set(vectors_value)) != len(vectors_value):
        raise ManifestSchemaError("manifest field test_vectors lists a file twice")
    rollout = (
        parse_rollout(root.get("rollout"))
        if isinstance(value, dict) and "rollout" in value
        else None
    )
    root.done()
    return Manifest(
        model=model,
        version=version,
        counter=counter,
        created=created,
        expires=expires,
        targets=targets,
        files=files,
        test_vectors=tuple(vectors_value),
        rollout=rollout,
    )


def parse_manifest(data: bytes, limits: BundleLimits = DEFAULT_LIMITS) -> Manifest:
    """Parse and validate ``manifest.json`` bytes (which must be canonical JSON)."""
    if len(data) > limits.max_manifest_bytes:
        raise LimitExceededError(
            f"manifest is {len(data)} bytes, the limit is {limits.max_manifest_bytes}"
        )
    value = parse_canonical(data, "manifest.json", ManifestEncodingError)
    return manifest_from_json(value, limits)
