"""Building and signing bundles (the signer's machine).

``build_bundle_from_dir`` turns a version directory (``model.onnx`` or ``model.tflite``, weight
files, ``test_vectors.npz``) plus a ``config.toml`` into a signed ``.bundle``; ``add_signature``
adds one more signature for k-of-n thresholds. Private keys are used here and never written
into a bundle.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edged import __version__, _toml
from edged.bundle.archive import ArchiveReader, write_archive
from edged.bundle.keys import CONTEXT_MANIFEST, Signature, sign_payload
from edged.bundle.limits import DEFAULT_LIMITS, BundleLimits
from edged.bundle.manifest import (
    CONFIG_NAME,
    MANIFEST_NAME,
    SIGNATURES_DIR,
    FileEntry,
    Manifest,
    Targets,
    check_relative_path,
    manifest_from_json,
)
from edged.bundle.reader import read_head
from edged.bundle.verify import release_tuple
from edged.errors import BundleConfigError, ConfigError, ManifestSchemaError, UnsafePathError
from edged.modelrepo.config import TEST_VECTORS_FILE, parse_model_config
from edged.runtime.base import model_files
from edged.serve.probation import ProbationPolicy

DAY_S = 86_400
DEFAULT_EXPIRES_IN_DAYS = 90
DEFAULT_ARCH = ("aarch64", "x86_64")

Content = bytes | Path


def _default_min_edged_version() -> str:
    major, minor, patch = release_tuple(__version__)
    return f"{major}.{minor}.{patch}"


@dataclass(frozen=True)
class BundleSpec:
    """What the signer states about a bundle besides its files."""

    model: str
    version: int
    counter: int
    created: int  # Unix seconds
    expires: int  # Unix seconds
    arch: tuple[str, ...] = DEFAULT_ARCH
    runtime: str | None = None  # None: from the model file present
    providers: tuple[str, ...] = ()
    min_edged_version: str = ""  # "": the release of the edged that builds it
    rollout: ProbationPolicy | None = None  # None: the manifest states no policy (defaults)

    @classmethod
    def starting_now(
        cls,
        model: str,
        version: int,
        counter: int,
        *,
        expires_in_days: float = DEFAULT_EXPIRES_IN_DAYS,
        now: float | None = None,
        arch: tuple[str, ...] = DEFAULT_ARCH,
        runtime: str | None = None,
        providers: tuple[str, ...] = (),
        min_edged_version: str = "",
    ) -> BundleSpec:
        """A spec created now (or at ``now``) that expires ``expires_in_days`` later."""
        created = int(time.time() if now is None else now)
        expires = created + int(expires_in_days * DAY_S)
        return cls(
            model, version, counter, created, expires, arch, runtime, providers, min_edged_version
        )


def sign_manifest(manifest_bytes: bytes, key: Ed25519PrivateKey) -> Signature:
    return sign_payload(key, manifest_bytes, context=CONTEXT_MANIFEST)


def _sha256(content: Content) -> tuple[int, str]:
    digest = hashlib.sha256()
    if isinstance(content, bytes):
        digest.update(content)
        return len(content), digest.hexdigest()
    size = 0
    with content.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def collect_version_files(
    version_dir: Path, model: str, version: int, config: Path | None = None
) -> dict[str, Content]:
    """Bundle paths -> contents for one version directory and its config.

    Hidden files are skipped; symlinks and other non-regular files are refused. The config is
    ``config`` if given, else ``<version_dir>/config.toml``, else ``<version_dir>/../config.toml``,
    else an empty file (all defaults).
    """
    files: dict[str, Content] = {}
    root = version_dir.resolve()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_symlink():
            raise UnsafePathError(f"{path} is a symbolic link; bundles hold regular files only")
        if path.is_dir():
            continue
        if not path.is_file():
            raise UnsafePathError(f"{path} is not a regular file")
        if rel.parts == (CONFIG_NAME,):
            continue
        files[f"{model}/{version}/{rel.as_posix()}"] = path
    if config is None:
        for candidate in (version_dir / CONFIG_NAME, version_dir.parent / CONFIG_NAME):
            if candidate.is_file():
                config = candidate
                break
    files[f"{model}/{CONFIG_NAME}"] = config if config is not None else b""
    return files


def _test_vector_paths(spec: BundleSpec, files: Mapping[str, Content]) -> tuple[str, ...]:
    """The vector files the bundle's config.toml makes the self-test read, as bundle paths."""
    config_path = f"{spec.model}/{CONFIG_NAME}"
    content = files.get(config_path, b"")
    try:
        text = content.decode("utf-8") if isinstance(content, bytes) else content.read_text("utf-8")
        config = parse_model_config(_toml.loads(text), config_path)
    except (UnicodeDecodeError, _toml.TOMLDecodeError, ConfigError) as exc:
        raise BundleConfigError(f"{config_path}: {exc}") from exc
    prefix = f"{spec.model}/{spec.version}/"
    used = [prefix + v.file for v in config.test_vectors if v.file is not None]
    if not config.test_vectors and prefix + TEST_VECTORS_FILE in files:
        used = [prefix + TEST_VECTORS_FILE]
    return tuple(sorted(set(used)))


def make_manifest(
    spec: BundleSpec, files: Mapping[str, Content], limits: BundleLimits = DEFAULT_LIMITS
) -> Manifest:
    """Hash ``files`` and return the manifest for them (validated like a device would)."""
    prefix = f"{spec.model}/{spec.version}/"
    runtime = spec.runtime
    if runtime is None:
        found = [r for r, name in model_files().items() if prefix + name in files]
        if len(found) != 1:
            raise ManifestSchemaError(
                f"cannot tell the runtime: {prefix} holds "
                f"{'none' if not found else 'more than one'} of "
                f"{', '.join(model_files().values())}"
            )
        runtime = found[0]
    entries = []
    for path in sorted(files):
        check_relative_path(path, limits, "bundle file")
        size, sha256 = _sha256(files[path])
        entries.append(FileEntry(path, size, sha256))
    vectors = _test_vector_paths(spec, files)
    manifest = Manifest(
        model=spec.model,
        version=spec.version,
        counter=spec.counter,
        created=spec.created,
        expires=spec.expires,
        targets=Targets(
            arch=tuple(spec.arch),
            runtime=runtime,
            providers=tuple(spec.providers),
            min_edged_version=spec.min_edged_version or _default_min_edged_version(),
        ),
        files=tuple(entries),
        test_vectors=vectors,
        rollout=spec.rollout,
    )
    # The builder refuses what a device would refuse.
    return manifest_from_json(manifest.to_json(), limits)


def write_bundle(
    out: BinaryIO,
    manifest_bytes: bytes,
    signatures: Sequence[Signature],
    files: Mapping[str, Content],
) -> None:
    """Write the archive: manifest, signatures, then files in path order."""
    members: list[tuple[str, Content]] = [(MANIFEST_NAME, manifest_bytes)]
    members += [(f"{SIGNATURES_DIR}/{s.keyid}.sig", s.sig) for s in signatures]
    members += [(path, files[path]) for path in sorted(files)]
    write_archive(out, members)


def _write_atomically(
    out_path: Path,
    manifest_bytes: bytes,
    signatures: Sequence[Signature],
    files: Mapping[str, Content],
) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_bundle(f, manifest_bytes, signatures, files)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_bundle(
    spec: BundleSpec,
    files: Mapping[str, Content],
    keys: Sequence[Ed25519PrivateKey],
    out: Path | BinaryIO,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> Manifest:
    """Build a bundle of ``files`` (bundle path -> contents) signed by every key in ``keys``."""
    manifest = make_manifest(spec, files, limits)
    manifest_bytes = manifest.encode()
    signatures = [sign_manifest(manifest_bytes, k) for k in keys]
    if isinstance(out, Path):
        _write_atomically(out, manifest_bytes, signatures, files)
    else:
        write_bundle(out, manifest_bytes, signatures, files)
    return manifest


def build_bundle_from_dir(
    version_dir: Path,
    spec: BundleSpec,
    keys: Sequence[Ed25519PrivateKey],
    out: Path | BinaryIO,
    config: Path | None = None,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> Manifest:
    if not version_dir.is_dir():
        raise BundleConfigError(f"model directory {version_dir} does not exist")
    files = collect_version_files(version_dir, spec.model, spec.version, config)
    return build_bundle(spec, files, keys, out, limits)


def add_signature(
    bundle: Path,
    key: Ed25519PrivateKey,
    out: Path | None = None,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> Signature:
    """Add ``key``'s signature to a bundle (replacing an earlier one by the same key).

    The bundle's files are copied unchanged; nothing is verified here (``edged bundle verify``
    does that against a trust store).
    """
    with tempfile.TemporaryDirectory(prefix="edged-sign-") as tmp, bundle.open("rb") as f:
        reader = ArchiveReader(f, limits)
        head, entry = read_head(reader, limits)
        files: dict[str, Content] = {}
        while entry is not None:
            if entry.kind == "file":
                target = Path(tmp) / f"f{len(files)}"
                with target.open("wb") as dst:
                    for chunk in reader.read_chunks(entry):
                        dst.write(chunk)
                files[entry.path] = target
            entry = reader.next_entry()
        new = sign_manifest(head.manifest_bytes, key)
        signatures = [s for s in head.signatures if s.keyid != new.keyid] + [new]
        _write_atomically(out or bundle, head.manifest_bytes, signatures, files)
    return new
