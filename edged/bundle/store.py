"""The crash-safe model store under the state directory.

Layout::

    <state>/models/<model>/<version>/...      a model repository the daemon serves
    <state>/models/<model>/<version>/.verified  the manifest it was verified against; written
                                                and fsynced before the rename that publishes
                                                the directory, so it marks a complete version
    <state>/models/<model>/CURRENT            the serving version, replaced atomically
    <state>/highwater.json                    release-counter high-water marks, kept apart
                                              from the versions so deleting one forgets nothing
    <state>/staging/<random>/                 a version being received
    <state>/trash/<random>/                   a version being deleted
    <state>/install-log.jsonl                 one line per install / rollback
    <state>/trust/                            root.json, signers.json (``truststore``)

Every change is a rename or an ``atomic_write``, each followed by an fsync of the directory,
so a crash between any two steps leaves the old state or the new one. ``recover`` finishes or
undoes whatever a crash interrupted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from edged._fs import (
    Checkpoint,
    atomic_write,
    discard_dir,
    empty_dir,
    fsync_dir,
    fsync_file,
    no_checkpoint,
    remove_temp_files,
    rename_durably,
)
from edged.bundle.canonical import Json, encode_canonical, parse_strict
from edged.bundle.keys import KEYID_RE
from edged.bundle.limits import DEFAULT_LIMITS, BundleLimits
from edged.bundle.manifest import (
    MODEL_NAME_RE,
    FileEntry,
    Manifest,
    manifest_digest,
    parse_manifest,
)
from edged.bundle.verify import MAX_MARKS_PER_MODEL, HighWaterMark
from edged.errors import (
    BundleError,
    InstallBusyError,
    StoreCorruptError,
)
from edged.modelrepo.layout import CURRENT_POINTER, parse_version_name

log = logging.getLogger(__name__)

MODELS_DIR = "models"
STAGING_DIR = "staging"
TRASH_DIR = "trash"
TRUST_DIR = "trust"
HIGH_WATER_FILE = "highwater.json"
INSTALL_LOG_FILE = "install-log.jsonl"
LOCK_FILE = ".lock"
VERIFIED_MARKER = ".verified"
HIGH_WATER_SPEC_VERSION = 1
_MARK_FIELDS = frozenset({"counter", "manifest_sha256", "signed_by"})


@dataclass(frozen=True)
class HeldVersion:
    """A complete, verified version in the store."""

    model: str
    version: int
    path: Path
    manifest: Manifest
    manifest_sha256: str

    @property
    def counter(self) -> int:
        return self.manifest.counter


@dataclass(frozen=True)
class ModelRecovery:
    model: str
    current: int | None
    held: tuple[int, ...]
    removed: tuple[str, ...] = ()
    pointer_repaired: bool = False


@dataclass(frozen=True)
class RecoveryReport:
    models: Mapping[str, ModelRecovery] = field(default_factory=dict)
    removed_staging: tuple[str, ...] = ()


def _parse_mark(value: Json, fields: frozenset[str]) -> HighWaterMark | None:
    """One recorded mark; ``signed_by`` is absent in files written before it was kept."""
    if not isinstance(value, dict) or not set(value) <= fields:
        return None
    counter, digest = value.get("counter"), value.get("manifest_sha256")
    signed_by = value.get("signed_by", [])
    if (
        not isinstance(counter, int)
        or isinstance(counter, bool)
        or not isinstance(digest, str)
        or not isinstance(signed_by, list)
        or not all(isinstance(k, str) and KEYID_RE.match(k) for k in signed_by)
    ):
        return None
    return HighWaterMark(counter, digest, frozenset(str(k) for k in signed_by))


def _mark_json(mark: HighWaterMark) -> dict[str, Json]:
    signed_by: list[Json] = [k for k in sorted(mark.signed_by)]
    return {
        "counter": mark.counter,
        "manifest_sha256": mark.manifest_sha256,
        "signed_by": signed_by,
    }


class StagingSink:
    """Writes verified file data into a staging directory, fsyncing each file as it closes."""

    def __init__(
        self, root: Path, manifest: Manifest, checkpoint: Checkpoint = no_checkpoint
    ) -> None:
        self._root = root
        self._manifest = manifest
        self._checkpoint = checkpoint
        self._file: BinaryIO | None = None

    def begin(self, entry: FileEntry) -> None:
        path = self._root / self._manifest.version_relpath(entry.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        self._file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)

    def end(self, entry: FileEntry) -> None:
        assert self._file is not None
        self._file.flush()
        self._checkpoint(f"write {entry.path}")
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self._checkpoint(f"fsync {entry.path}")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ModelStore:
    """File-level operations on ``<state>``; the ``Installer`` sequences them."""

    def __init__(
        self,
        state_dir: Path,
        limits: BundleLimits = DEFAULT_LIMITS,
        checkpoint: Checkpoint = no_checkpoint,
    ) -> None:
        self.state_dir = state_dir
        self.limits = limits
        self.checkpoint = checkpoint

    # --- paths ----------------------------------------------------------------------------

    @property
    def models_dir(self) -> Path:
        return self.state_dir / MODELS_DIR

    @property
    def staging_dir(self) -> Path:
        return self.state_dir / STAGING_DIR

    @property
    def trash_dir(self) -> Path:
        return self.state_dir / TRASH_DIR

    @property
    def trust_dir(self) -> Path:
        return self.state_dir / TRUST_DIR

    @property
    def high_water_path(self) -> Path:
        return self.state_dir / HIGH_WATER_FILE

    @property
    def log_path(self) -> Path:
        return self.state_dir / INSTALL_LOG_FILE

    def model_dir(self, model: str) -> Path:
        return self.models_dir / model

    def version_dir(self, model: str, version: int) -> Path:
        return self.models_dir / model / str(version)

    def ensure_layout(self) -> None:
        for d in (self.state_dir, self.models_dir, self.staging_dir, self.trash_dir):
            d.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock on the state directory (one installer process at a time)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise InstallBusyError(
                        f"another edged process is installing into {self.state_dir}"
                    ) from None
                raise
            yield
        finally:
            os.close(fd)

    # --- high-water marks -----------------------------------------------------------------

    def read_high_water(self) -> dict[str, HighWaterMark]:
        """The persisted marks; a missing file means none. An unreadable one is an error:
        resetting it would re-open every rollback."""
        try:
            data = self.high_water_path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreCorruptError(f"cannot read {self.high_water_path}: {exc.strerror}") from exc
        what = str(self.high_water_path)
        value = parse_strict(data, what, StoreCorruptError)
        models = value.get("models") if isinstance(value, dict) else None
        if not isinstance(models, dict):
            raise StoreCorruptError(f"{what}: no 'models' object; restore it from a backup")
        marks: dict[str, HighWaterMark] = {}
        for name, mark in models.items():
            earlier = mark.get("earlier", []) if isinstance(mark, dict) else []
            if not isinstance(earlier, list):
                raise StoreCorruptError(f"{what}: entry for model {name!r} is malformed")
            parsed = [_parse_mark(mark, _MARK_FIELDS | {"earlier"})]
            parsed += [_parse_mark(e, _MARK_FIELDS) for e in earlier]
            if any(p is None for p in parsed) or len(parsed) > MAX_MARKS_PER_MODEL:
                raise StoreCorruptError(f"{what}: entry for model {name!r} is malformed")
            first, *rest = [p for p in parsed if p is not None]
            marks[name] = replace(first, earlier=tuple(rest))
        return marks

    def write_high_water(self, marks: Mapping[str, HighWaterMark]) -> None:
        models: dict[str, Json] = {}
        for name, mark in sorted(marks.items()):
            entry = _mark_json(mark)
            if mark.earlier:
                entry["earlier"] = [_mark_json(e) for e in mark.earlier]
            models[name] = entry
        document: dict[str, Json] = {"spec_version": HIGH_WATER_SPEC_VERSION, "models": models}
        atomic_write(
            self.high_water_path, encode_canonical(document) + b"\n", checkpoint=self.checkpoint
        )

    def advance_high_water(
        self, model: str, counter: int, digest: str, signed_by: frozenset[str] = frozenset()
    ) -> None:
        """Record that ``counter`` was installed under ``signed_by`` (never lowers a mark)."""
        marks = self.read_high_water()
        mark = marks.get(model)
        new = (
            mark.advanced(counter, digest, signed_by)
            if mark is not None
            else HighWaterMark(counter, digest, signed_by)
        )
        if new == mark:
            return
        marks[model] = new
        self.write_high_water(marks)

    # --- versions -------------------------------------------------------------------------

    def current_version(self, model: str) -> int | None:
        """The version ``CURRENT`` names; ``None`` when there is no ``CURRENT``. An unreadable
        or malformed one raises ``StoreCorruptError``: it is never silently taken as absent."""
        path = self.model_dir(model) / CURRENT_POINTER
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreCorruptError(f"model {model}: {path} is unreadable: {exc}") from exc
        version = parse_version_name(text)
        if version is None:
            raise StoreCorruptError(
                f"model {model}: {path} holds {text[:40]!r}, not a version number"
            )
        return version

    def set_current(self, model: str, version: int) -> None:
        atomic_write(
            self.model_dir(model) / CURRENT_POINTER,
            f"{version}\n".encode("ascii"),
            checkpoint=self.checkpoint,
        )

    def inspect_version(self, path: Path, *, deep: bool = False) -> HeldVersion | None:
        """The version in ``path`` if it is complete and verified, else None (with a log line
        saying why). ``deep`` re-hashes every file; otherwise sizes are compared."""
        try:
            with (path / VERIFIED_MARKER).open("rb") as f:
                data = f.read(self.limits.max_manifest_bytes + 1)
            manifest = parse_manifest(data, self.limits)
        except FileNotFoundError:
            log.info("%s has no %s marker: not a verified version", path, VERIFIED_MARKER)
            return None
        except (OSError, BundleError) as exc:
            log.warning("%s: unusable %s marker: %s", path, VERIFIED_MARKER, exc)
            return None
        if manifest.model != path.parent.name or str(manifest.version) != path.name:
            log.warning(
                "%s holds %s version %d: not where it belongs",
                path,
                manifest.model,
                manifest.version,
            )
            return None
        expected = {manifest.version_relpath(f.path): f for f in manifest.files}
        present = {
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.name != VERIFIED_MARKER and (p.is_file() or p.is_symlink())
        }
        if present != set(expected):
            log.warning(
                "%s: files differ from its manifest (missing %s, extra %s)",
                path,
                sorted(set(expected) - present)[:3],
                sorted(present - set(expected))[:3],
            )
            return None
        for rel, entry in expected.items():
            if not self._file_matches(path / rel, entry, deep):
                return None
        return HeldVersion(manifest.model, manifest.version, path, manifest, manifest_digest(data))

    def _file_matches(self, path: Path, entry: FileEntry, deep: bool) -> bool:
        try:
            st = path.lstat()
        except OSError as exc:
            log.warning("%s: %s", path, exc)
            return False
        if not path.is_file() or path.is_symlink() or st.st_size != entry.size:
            log.warning("%s: not a regular file of %d bytes", path, entry.size)
            return False
        if deep:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(self.limits.read_chunk_bytes):
                    digest.update(chunk)
            if digest.hexdigest() != entry.sha256:
                log.warning("%s: SHA-256 differs from its manifest", path)
                return False
        return True

    def _version_dirs(self, model: str) -> list[Path]:
        directory = self.model_dir(model)
        if not directory.is_dir():
            return []
        return sorted(
            (
                p
                for p in directory.iterdir()
                if parse_version_name(p.name) is not None and p.is_dir() and not p.is_symlink()
            ),
            key=lambda p: int(p.name),
        )

    def held_versions(self, model: str, *, deep: bool = False) -> list[HeldVersion]:
        """Complete, verified versions of ``model``, by ascending release counter."""
        held = [h for p in self._version_dirs(model) if (h := self.inspect_version(p, deep=deep))]
        return sorted(held, key=lambda h: (h.counter, h.version))

    def model_names(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(
            p.name for p in self.models_dir.iterdir() if p.is_dir() and MODEL_NAME_RE.match(p.name)
        )

    # --- staging and publishing -----------------------------------------------------------

    def new_staging_dir(self) -> Path:
        self.ensure_layout()
        path = self.staging_dir / secrets.token_hex(8)
        path.mkdir(mode=0o755)
        self.checkpoint("mkdir staging")
        return path

    def seal_staged(self, staging: Path, manifest_bytes: bytes) -> None:
        """Make a fully written staging directory durable, then mark it verified.

        Order: fsync every directory (files were fsynced as they were closed), write and fsync
        ``.verified``, fsync the staging directory. Only then may it be published.
        """
        dirs = sorted((p for p in staging.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in dirs:
            fsync_dir(d, self.checkpoint)
        marker = staging / VERIFIED_MARKER
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(manifest_bytes)
        self.checkpoint("write .verified")
        fsync_file(marker, self.checkpoint)
        fsync_dir(staging, self.checkpoint)

    def publish(self, staging: Path, model: str, version: int) -> Path:
        """Rename a sealed staging directory to ``models/<model>/<version>``."""
        model_dir = self.model_dir(model)
        if not model_dir.is_dir():
            model_dir.mkdir(parents=True)
            fsync_dir(self.models_dir, self.checkpoint)
        target = self.version_dir(model, version)
        rename_durably(staging, target, self.checkpoint)
        return target

    def discard(self, path: Path) -> None:
        discard_dir(path, self.trash_dir, self.checkpoint)

    def prune(self, model: str, keep_previous: int, protect: set[int]) -> list[int]:
        """Delete old versions beyond the ``keep_previous`` most recent non-current ones.

        ``protect`` (the current and the previous version) is never deleted.
        """
        current = self.current_version(model)
        protected = set(protect) | ({current} if current is not None else set())
        others = [h for h in reversed(self.held_versions(model)) if h.version not in protected]
        slots = max(0, keep_previous - len(protected - {current}))
        removed: list[int] = []
        for held in others[slots:]:
            self.discard(held.path)
            removed.append(held.version)
        if removed:
            log.info("model %s: pruned version(s) %s", model, ", ".join(map(str, removed)))
        return removed

    # --- recovery -------------------------------------------------------------------------

    def recover(self, *, deep: bool = False) -> RecoveryReport:
        """Bring the store to a consistent state after a crash; see docs/bundle-format.md.

        Per model: the version CURRENT names is kept if complete and verified (else the
        newest installed one is chosen); versions that are unverified, incomplete, or newer
        than the high-water mark (an install interrupted before its switch) are removed; the
        high-water mark is raised to the current version's counter. Staging and trash are
        emptied.
        """
        self.ensure_layout()
        removed_staging = tuple(empty_dir(self.staging_dir))
        empty_dir(self.trash_dir)
        remove_temp_files(self.state_dir)
        remove_temp_files(self.trust_dir)
        marks = self.read_high_water()
        models: dict[str, ModelRecovery] = {}
        for model in self.model_names():
            models[model] = self._recover_model(model, marks, deep)
        if removed_staging:
            log.info("recovery removed %d unfinished staging dir(s)", len(removed_staging))
        return RecoveryReport(models, removed_staging)

    def _recover_model(
        self, model: str, marks: dict[str, HighWaterMark], deep: bool
    ) -> ModelRecovery:
        model_dir = self.model_dir(model)
        removed = [f"{model}/{n}" for n in remove_temp_files(model_dir)]
        held = {
            h.version: h
            for p in self._version_dirs(model)
            if (h := self.inspect_version(p, deep=deep))
        }
        try:
            current = self.current_version(model)
        except StoreCorruptError as exc:
            kept = model_dir / f"{CURRENT_POINTER}.corrupt-{time.time_ns()}"
            rename_durably(model_dir / CURRENT_POINTER, kept, self.checkpoint)
            log.error("%s; kept it as %s and choosing the newest installed version", exc, kept)
            current = None
        mark = marks.get(model)
        repaired = False
        if current not in held:
            installed = [h for h in held.values() if mark is not None and h.counter <= mark.counter]
            best = max(installed, key=lambda h: (h.counter, h.version), default=None)
            log.warning(
                "model %s: CURRENT names %s, which is not a complete verified version; %s",
                model,
                current,
                f"switching to version {best.version}" if best else "no version left to serve",
            )
            if best is not None:
                self.set_current(model, best.version)
                current = best.version
            else:
                (model_dir / CURRENT_POINTER).unlink(missing_ok=True)
                current = None
            repaired = True
        if current is not None:
            cur = held[current]
            if mark is None or cur.counter > mark.counter:
                # The signing keys are not kept with a version: recorded as unknown, such a
                # mark is never set aside by a revocation (the safe side).
                mark = marks[model] = (
                    mark.advanced(cur.counter, cur.manifest_sha256, frozenset())
                    if mark is not None
                    else HighWaterMark(cur.counter, cur.manifest_sha256)
                )
                self.write_high_water(marks)
        for path in self._version_dirs(model):
            version = int(path.name)
            if version == current:
                continue
            h = held.get(version)
            interrupted = h is not None and (
                mark is None
                or h.counter > mark.counter
                or (h.counter == mark.counter and h.manifest_sha256 != mark.manifest_sha256)
            )
            if h is None or interrupted:
                reason = "not a complete verified version" if h is None else "never switched in"
                log.warning("model %s: removing version %s (%s)", model, path.name, reason)
                self.discard(path)
                held.pop(version, None)
                removed.append(f"{model}/{path.name}")
        empty_dir(self.trash_dir)
        return ModelRecovery(model, current, tuple(sorted(held)), tuple(removed), repaired)
