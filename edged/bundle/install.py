"""Verified hot install: bundle -> staged, verified, durable version -> self-tested and swapped
in by the serving side -> CURRENT pointer and high-water mark -> old versions pruned.

Any failure leaves the serving version and the high-water mark untouched, removes what the
attempt created, and is recorded in the install log (``journal``) and ``Installer.last_result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO, NoReturn, Protocol, TypeVar

from edged._fs import Checkpoint, no_checkpoint
from edged.bundle.archive import ArchiveReader
from edged.bundle.journal import InstallJournal
from edged.bundle.limits import DEFAULT_LIMITS, BundleLimits
from edged.bundle.manifest import CONFIG_NAME, Manifest
from edged.bundle.reader import (
    TOO_FEW_SIGNATURES,
    NullSink,
    read_files,
    read_head,
    refuse_late_signatures,
)
from edged.bundle.reverted import RevertedList, RevertedRelease
from edged.bundle.store import HeldVersion, ModelStore, RecoveryReport, StagingSink
from edged.bundle.trust import TrustState
from edged.bundle.truststore import TrustStore
from edged.bundle.vectors import check_vector_file
from edged.bundle.verify import DeviceFacts, VerifiedManifest, verify_manifest
from edged.errors import (
    BundleConfigError,
    BundleFileError,
    ConfigError,
    EdgedError,
    InstallFailedError,
    LimitExceededError,
    ShuttingDownError,
    StoreError,
    TruncatedArchiveError,
    VersionConflictError,
    VersionNotHeldError,
)
from edged.modelrepo.config import TEST_VECTORS_FILE, load_model_config, load_test_vectors
from edged.modelrepo.layout import parse_version_name
from edged.serve.watch import ProbationOutcome

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_KEEP_PREVIOUS = 2


class SwapTarget(Protocol):
    async def load_version(self, model: str, version_dir: Path) -> None:
        """Load ``version_dir`` beside the serving version, run its test vectors and a
        warm-up, then switch to it atomically. Raise an ``EdgedError`` (e.g.
        ``SelfTestFailedError``, ``ModelLoadError``) on failure; the old version keeps serving.
        """
        ...


@dataclass(frozen=True)
class InstallResult:
    action: str  # "install" | "rollback" | "probation"
    # installed | reinstalled | already-installed | rolled-back | rejected | load-failed
    # | record-failed (serving switched, but CURRENT could not be written)
    # | failed (an unexpected error: a bug) | interrupted (cancelled, KeyboardInterrupt)
    outcome: str
    model: str | None
    version: int | None
    counter: int | None
    previous_version: int | None  # what served before (None: nothing)
    manifest_sha256: str | None
    source: str  # file name, "<bytes>", or "operator"
    at: int  # Unix seconds
    error: str | None = None  # the error class name on failure
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class _Attempt:
    """What every result of one install or rollback attempt shares; a call site adds only its
    outcome and error or message."""

    action: str  # "install" | "rollback" | "probation"
    source: str
    at: int  # Unix seconds
    manifest: Manifest | None = None
    digest: str | None = None
    previous: int | None = None
    model: str | None = None  # named when there is no manifest to take it from

    def knowing(self, verified: VerifiedManifest | None, previous: int | None) -> _Attempt:
        """This attempt once it has verified a manifest (if it has) and knows what served."""
        if verified is None:
            return replace(self, previous=previous)
        return replace(self, manifest=verified.manifest, digest=verified.digest, previous=previous)


class _AlreadyInstalled(Exception):
    """Internal: the bundle is the one serving now; stop reading it."""

    def __init__(self, verified: VerifiedManifest) -> None:
        self.verified = verified


class _Progress:
    """How far an install got, for the generic guard: what to remove, what to log."""

    def __init__(self) -> None:
        self.verified: VerifiedManifest | None = None
        self.created: Path | None = None  # a staged or published directory of this attempt
        self.previous: int | None = None
        self.loading = False  # handed to the serving side
        self.switched = False  # the serving side switched: the new version is no leftover


@dataclass(frozen=True)
class _Staged:
    verified: VerifiedManifest
    staging: Path | None  # None: an identical version is already held, nothing staged


class Installer:
    """Installs bundles into ``<state>`` and hands new versions to a ``SwapTarget``.

    One operation at a time per process (an asyncio lock) and per state directory (a file
    lock). Blocking work (reading, hashing, fsync) runs in worker threads.
    """

    def __init__(
        self,
        state_dir: Path,
        target: SwapTarget,
        device: DeviceFacts | Callable[[], DeviceFacts],
        *,
        keep_previous: int = DEFAULT_KEEP_PREVIOUS,
        limits: BundleLimits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
        checkpoint: Checkpoint = no_checkpoint,
    ) -> None:
        if keep_previous < 1:
            raise ValueError("keep_previous must be at least 1 (the previous version is kept)")
        self.store = ModelStore(state_dir, limits, checkpoint)
        self.journal = InstallJournal(self.store.log_path)
        self.trust = TrustStore(self.store.trust_dir, limits)
        self.target = target
        # A callable is asked on first use: detecting the runtimes imports ONNX Runtime, which
        # a daemon with no bundle to check should not pay for at start-up.
        self._device = device
        self.keep_previous = keep_previous
        self.limits = limits
        self.clock = clock
        self._checkpoint = checkpoint
        self._lock = asyncio.Lock()
        self.upload_lock = asyncio.Lock()  # one bundle upload at a time (edged.bundle.upload)
        self.last_result: InstallResult | None = None
        self._recorded: tuple[EdgedError, InstallResult] | None = None  # what _fail logged last
        self.reverted = RevertedList(state_dir)

    @property
    def device(self) -> DeviceFacts:
        if callable(self._device):
            self._device = self._device()
        return self._device

    # --- public API -----------------------------------------------------------------------

    def recover(self, *, deep: bool = False) -> RecoveryReport:
        """Call once at start, before serving: repairs whatever a crash interrupted."""
        with self.store.locked():
            report = self.store.recover(deep=deep)
        for model, rec in report.models.items():
            log.info("model %s: current version %s, held %s", model, rec.current, list(rec.held))
        return report

    async def install_file(self, path: Path, source: str | None = None) -> InstallResult:
        """Install a bundle file (USB stick, finished download). Raises on rejection.

        ``source`` names the bundle in the install log (default: the file name).
        """
        label = source or path.name

        def opener() -> BinaryIO:
            try:
                size = path.stat().st_size
                if size > self.limits.max_archive_bytes:
                    raise LimitExceededError(
                        f"{label} is {size} bytes, the limit is {self.limits.max_archive_bytes}"
                    )
                return path.open("rb")
            except OSError as exc:
                raise BundleFileError(f"cannot read bundle {label}: {exc.strerror}") from exc

        return await self._install(opener, label)

    def check_upload_head(self, prefix: bytes, source: str, *, complete: bool) -> bool:
        """Check the first bytes of a bundle being received (worker thread): container,
        manifest size, signatures and every manifest check of ``verify_manifest``.

        False: ``prefix`` does not hold the whole head yet (and ``complete`` is False). True:
        the head verified, or too few of its signatures did, which only the whole archive can
        tell apart from a misplaced signature. A refusal is recorded like any install and
        raised.
        """
        now = int(self.clock())
        attempt = _Attempt("install", source, now)
        try:
            reader = ArchiveReader(io.BytesIO(prefix), self.limits)
            try:
                head, _ = read_head(reader, self.limits)
            except TruncatedArchiveError:
                if not complete:
                    return False
                raise
            verify_manifest(
                head.manifest_bytes,
                head.signatures,
                self.trust.load(),
                self.store.read_high_water(),
                self.device,
                now,
                self.limits,
            )
        except TOO_FEW_SIGNATURES:
            # A signature entry further on would make this a misplaced-signature archive;
            # the install of the whole upload tells which.
            return True
        except EdgedError as exc:
            self._fail(attempt, "rejected", exc)
        except Exception as exc:
            error = InstallFailedError(
                f"checking the upload of {source} failed unexpectedly "
                f"({type(exc).__name__}: {exc}); nothing was installed"
            )
            error.__cause__ = exc
            self._fail(attempt, "failed", error)
        return True

    async def install_bytes(self, data: bytes, source: str = "<bytes>") -> InstallResult:
        if len(data) > self.limits.max_archive_bytes:
            raise LimitExceededError(
                f"bundle is {len(data)} bytes, the limit is {self.limits.max_archive_bytes}"
            )
        return await self._install(lambda: io.BytesIO(data), source)

    async def rollback(self, model: str, to_version: int | None = None) -> InstallResult:
        """Operator action: serve an older version still held in the store.

        Default target: the held version with the highest release counter below the current
        one. The high-water mark is not lowered, so the fleet can still only push newer
        bundles (or re-push the newest one).
        """
        async with self._lock:
            with self.store.locked():
                return await self._rollback(model, to_version)

    async def record_probation(self, outcome: ProbationOutcome) -> InstallResult | None:
        """The serving side ended a probation: log it; after a revert, point ``CURRENT`` back
        at the version serving again, list the release as reverted and remove it."""
        version = parse_version_name(outcome.version)
        if version is None:
            return None  # not a store version (a seed repository's); nothing to record
        async with self._lock:
            with self.store.locked():
                return await _in_thread(self._record_probation, outcome, version)

    def _record_probation(self, outcome: ProbationOutcome, version: int) -> InstallResult | None:
        now = int(self.clock())
        model = outcome.model
        held = self.store.inspect_version(self.store.version_dir(model, version))
        previous = parse_version_name(outcome.previous_version)
        attempt = _Attempt(
            "probation",
            "probation",
            now,
            manifest=held.manifest if held is not None else None,
            digest=held.manifest_sha256 if held is not None else None,
            previous=previous,
            model=model,
        )
        if outcome.decision == "promoted":
            return self._record(
                attempt, "promoted", message=f"{model} version {version}: {outcome.reason}"
            )
        if outcome.decision != "reverted":
            return None  # superseded or stopped: no verdict to record
        if held is not None:
            self.reverted.add(
                RevertedRelease(
                    held.manifest_sha256, model, version, held.manifest.counter, outcome.reason, now
                )
            )
        if self.store.current_version(model) == version and previous is not None:
            self.store.set_current(model, previous)
        if self.store.current_version(model) != version and held is not None:
            self.store.discard(held.path)
        return self._record(
            attempt,
            "reverted",
            error_name="ProbationFailedError",
            message=f"{model} version {version} reverted to {outcome.previous_version}: "
            f"{outcome.reason}",
        )

    def result_for(self, exc: BaseException) -> InstallResult | None:
        """The install-log entry recorded for ``exc``, if this installer raised it after
        recording it (so a caller can answer with it), else None."""
        if self._recorded is not None and self._recorded[0] is exc:
            return self._recorded[1]
        return None

    def held_versions(self, model: str) -> list[HeldVersion]:
        return self.store.held_versions(model)

    def current_version(self, model: str) -> int | None:
        return self.store.current_version(model)

    def load_trust(self) -> TrustState:
        return self.trust.load()

    def apply_signers_update(self, data: bytes) -> TrustState:
        """A root-signed signers document from the fleet channel or a USB stick."""
        return self.trust.apply_signers_update(data, int(self.clock()))

    def history(self, limit: int = 50) -> list[dict[str, object]]:
        """The newest ``limit`` install-log entries, oldest first."""
        return self.journal.history(limit)

    # --- install --------------------------------------------------------------------------

    async def _install(self, opener: Callable[[], BinaryIO], source: str) -> InstallResult:
        async with self._lock:
            with self.store.locked():
                return await self._install_locked(opener, source)

    async def _install_locked(self, opener: Callable[[], BinaryIO], source: str) -> InstallResult:
        attempt = _Attempt("install", source, int(self.clock()))
        progress = _Progress()
        try:
            return await self._install_steps(opener, attempt, progress)
        except EdgedError as exc:
            if self.result_for(exc) is not None:
                raise
            self._fail(attempt.knowing(progress.verified, progress.previous), "rejected", exc)
        except BaseException as exc:
            # The generic guard: whatever escaped (a bug, a cancellation) leaves no new
            # version behind and an install-log entry saying what happened.
            # A cancellation while the serving side loads may land after it switched: leave the
            # directory to recovery then, which keeps it only if CURRENT names it.
            unsure = progress.loading and not isinstance(exc, Exception)
            if progress.created is not None and not progress.switched and not unsure:
                with contextlib.suppress(BaseException):
                    await _in_thread(self.store.discard, progress.created)
            known = attempt.knowing(progress.verified, progress.previous)
            if not isinstance(exc, Exception):
                self._record(
                    known,
                    "interrupted",
                    error_name=type(exc).__name__,
                    message=f"install of {source} interrupted ({type(exc).__name__}); "
                    "nothing was installed",
                )
                raise
            outcome = (
                "the new version serves, but recording it failed"
                if progress.switched
                else "nothing was installed"
            )
            error = InstallFailedError(
                f"install of {source} failed unexpectedly ({type(exc).__name__}: {exc}); " + outcome
            )
            error.__cause__ = exc
            self._fail(known, "failed", error)

    async def _install_steps(
        self, opener: Callable[[], BinaryIO], attempt: _Attempt, progress: _Progress
    ) -> InstallResult:
        source = attempt.source
        try:
            staged = await _in_thread(self._stage, opener, attempt.at)
        except _AlreadyInstalled as done:
            m = done.verified.manifest
            if not done.verified.reinstall:
                # Serving, but its mark was never recorded (a crash before the mark update, or
                # a mark set aside by a revocation): record it now.
                v = done.verified
                await _in_thread(
                    self.store.advance_high_water, m.model, m.counter, v.digest, v.signed_by
                )
            return self._record(
                attempt.knowing(done.verified, m.version),
                "already-installed",
                message=f"{m.model} version {m.version} (counter {m.counter}) is already serving",
            )
        except EdgedError as exc:
            self._fail(attempt, "rejected", exc)
        except OSError as exc:
            where = f" ({Path(exc.filename).name})" if exc.filename else ""
            error = StoreError(f"disk error while staging {source}: {exc.strerror or exc}{where}")
            error.__cause__ = exc
            self._fail(attempt, "rejected", error)
        verified = staged.verified
        manifest = verified.manifest
        progress.verified = verified
        progress.created = staged.staging
        previous = progress.previous = self.store.current_version(manifest.model)
        attempt = attempt.knowing(verified, previous)
        version_dir = self.store.version_dir(manifest.model, manifest.version)
        if staged.staging is not None:
            try:
                await _in_thread(
                    self.store.publish, staged.staging, manifest.model, manifest.version
                )
            except OSError as exc:
                await _in_thread(self.store.discard, staged.staging)
                progress.created = None
                error = StoreError(
                    f"cannot publish {manifest.model} version {manifest.version}: {exc}"
                )
                error.__cause__ = exc
                self._fail(attempt, "rejected", error)
            progress.created = version_dir
        self._checkpoint("load_version")
        progress.loading = True
        try:
            await self.target.load_version(manifest.model, version_dir)
        except EdgedError as exc:
            self._checkpoint("load_version failed")
            if staged.staging is not None:
                await _in_thread(self.store.discard, version_dir)
                progress.created = None
            # Not the bundle's fault when the daemon is stopping: whoever asked (the fleet
            # channel) installs it again at the next start.
            outcome = "interrupted" if isinstance(exc, ShuttingDownError) else "load-failed"
            self._fail(attempt, outcome, exc)
        self._checkpoint("load_version done")
        progress.switched = True
        try:
            await _in_thread(self._switch, manifest, verified, previous)
        except (OSError, EdgedError) as exc:
            error = StoreError(
                f"{manifest.model} version {manifest.version} is serving, but recording it as "
                f"current failed ({exc}); after a restart version {previous} serves again"
            )
            error.__cause__ = exc
            self._fail(attempt, "record-failed", error)
        outcome = "installed" if staged.staging is not None else "reinstalled"
        return self._record(
            attempt,
            outcome,
            message=f"{manifest.model} now serves version {manifest.version} "
            f"(counter {manifest.counter}, was {previous})",
        )

    def _stage(self, opener: Callable[[], BinaryIO], now: int) -> _Staged:
        """Read, verify and durably stage a bundle (worker thread)."""
        trust = self.trust.load()
        marks = self.store.read_high_water()
        with opener() as stream:
            reader = ArchiveReader(stream, self.limits)
            head, pending = read_head(reader, self.limits)
            try:
                verified = verify_manifest(
                    head.manifest_bytes,
                    head.signatures,
                    trust,
                    marks,
                    self.device,
                    now,
                    self.limits,
                )
            except TOO_FEW_SIGNATURES as exc:
                refuse_late_signatures(reader, pending, exc)
                raise
            manifest = verified.manifest
            self.reverted.check(verified.digest)
            self._checkpoint("manifest verified")
            try:
                existing = self._existing(manifest, verified)
            except _AlreadyInstalled:
                # Nothing is staged, but the answer must not vouch for bytes nobody read.
                read_files(reader, pending, manifest, NullSink())
                raise
            if existing is not None:
                read_files(reader, pending, manifest, NullSink())
                return _Staged(verified, None)
            staging = self.store.new_staging_dir()
            sink = StagingSink(staging, manifest, self._checkpoint)
            try:
                read_files(reader, pending, manifest, sink)
                sink.close()
                _check_config(staging, manifest, self.limits)
                self.store.seal_staged(staging, verified.manifest_bytes)
            except BaseException:
                sink.close()
                self.store.discard(staging)
                raise
        return _Staged(verified, staging)

    def _existing(self, manifest: Manifest, verified: VerifiedManifest) -> HeldVersion | None:
        """An identical version already held (re-install), or None to stage a new one."""
        path = self.store.version_dir(manifest.model, manifest.version)
        if not path.exists():
            return None
        held = self.store.inspect_version(path)
        current = self.store.current_version(manifest.model)
        if held is not None and held.manifest_sha256 == verified.digest:
            if current == manifest.version:
                raise _AlreadyInstalled(verified)
            return held
        if current == manifest.version or held is not None:
            raise VersionConflictError(
                f"the store already holds {manifest.model} version {manifest.version} with "
                "other contents; sign the new build with a new version number"
            )
        log.warning("removing unverified leftover %s before installing over it", path)
        self.store.discard(path)
        return None

    def _switch(self, manifest: Manifest, verified: VerifiedManifest, previous: int | None) -> None:
        """After a successful swap: pointer, then high-water mark, then pruning."""
        self.store.set_current(manifest.model, manifest.version)
        self.store.advance_high_water(
            manifest.model, manifest.counter, verified.digest, verified.signed_by
        )
        protect = {manifest.version} | ({previous} if previous is not None else set())
        self.store.prune(manifest.model, self.keep_previous, protect)

    # --- rollback -------------------------------------------------------------------------

    async def _rollback(self, model: str, to_version: int | None) -> InstallResult:
        now = int(self.clock())
        current = self.store.current_version(model)
        attempt = _Attempt("rollback", "operator", now, previous=current, model=model)
        try:
            held = await _in_thread(self.store.held_versions, model)
            target = _rollback_target(model, current, held, to_version)
        except EdgedError as exc:
            self._fail(attempt, "rejected", exc)
        attempt = replace(attempt, manifest=target.manifest, digest=target.manifest_sha256)
        self._checkpoint("load_version")
        try:
            await self.target.load_version(model, target.path)
        except EdgedError as exc:
            self._fail(attempt, "load-failed", exc)
        self._checkpoint("load_version done")
        try:
            await _in_thread(self.store.set_current, model, target.version)
        except OSError as exc:
            error = StoreError(
                f"{model} version {target.version} is serving, but recording it as current "
                f"failed ({exc}); after a restart version {current} serves again"
            )
            error.__cause__ = exc
            self._fail(attempt, "record-failed", error)
        return self._record(
            attempt,
            "rolled-back",
            message=f"{model} rolled back from version {current} to {target.version}",
        )

    # --- results --------------------------------------------------------------------------

    def _record(
        self,
        attempt: _Attempt,
        outcome: str,
        *,
        error: EdgedError | None = None,
        error_name: str | None = None,
        message: str = "",
    ) -> InstallResult:
        manifest = attempt.manifest
        result = InstallResult(
            action=attempt.action,
            outcome=outcome,
            model=manifest.model if manifest else attempt.model,
            version=manifest.version if manifest else None,
            counter=manifest.counter if manifest else None,
            previous_version=attempt.previous,
            manifest_sha256=attempt.digest,
            source=attempt.source,
            at=attempt.at,
            error=type(error).__name__ if error else error_name,
            message=message or (str(error) if error else ""),
        )
        self.last_result = result
        self.journal.append(result.to_json())
        level = logging.INFO if result.error is None else logging.WARNING
        log.log(level, "%s %s: %s", attempt.action, outcome, result.message)
        return result

    def _fail(self, attempt: _Attempt, outcome: str, exc: EdgedError) -> NoReturn:
        result = self._record(attempt, outcome, error=exc)
        self._recorded = (exc, result)
        raise exc


def _check_config(staging: Path, manifest: Manifest, limits: BundleLimits) -> None:
    """The bundle's config.toml must parse, and its self-test must read exactly the vector
    files the manifest lists (so the signed manifest says what the self-test checks)."""
    try:
        config = load_model_config(staging / CONFIG_NAME)
    except ConfigError as exc:
        raise BundleConfigError(
            f"{manifest.config_path}: {_in_bundle(str(exc), staging, manifest)}"
        ) from exc
    specs = config.test_vectors
    if specs:
        used = {s.file for s in specs if s.file is not None}
    else:
        used = {TEST_VECTORS_FILE} if (staging / TEST_VECTORS_FILE).is_file() else set()
    listed = {manifest.version_relpath(p) for p in manifest.test_vectors}
    if used != listed:
        raise BundleConfigError(
            f"{manifest.model} version {manifest.version}: config.toml's self-test reads "
            f"{sorted(used) or 'no files'}, the manifest's test_vectors lists "
            f"{sorted(listed) or 'none'}"
        )
    budget = limits.max_vector_bytes
    for path in manifest.test_vectors:
        budget -= check_vector_file(staging / manifest.version_relpath(path), path, limits, budget)
    try:
        vectors = load_test_vectors(config, staging)
    except ConfigError as exc:
        raise BundleConfigError(
            f"{manifest.model} version {manifest.version}: "
            f"{_in_bundle(str(exc), staging, manifest)}"
        ) from exc
    if not vectors:
        raise BundleConfigError(
            f"{manifest.model} version {manifest.version} has no test vectors: add "
            f"{TEST_VECTORS_FILE} or [[test_vectors]] to config.toml"
        )


def _in_bundle(text: str, staging: Path, manifest: Manifest) -> str:
    """A message with the staging directory (gone once the install is refused) replaced by
    where the file is in the bundle."""
    return text.replace(str(staging.resolve()) + "/", manifest.version_prefix).replace(
        str(staging) + "/", manifest.version_prefix
    )


def _rollback_target(
    model: str, current: int | None, held: list[HeldVersion], to_version: int | None
) -> HeldVersion:
    if current is None:
        raise VersionNotHeldError(f"model {model} has no current version to roll back from")
    by_version = {h.version: h for h in held}
    others = sorted(v for v in by_version if v != current)
    if to_version is not None:
        if to_version == current:
            raise VersionNotHeldError(f"model {model} already serves version {to_version}")
        if to_version not in by_version:
            raise VersionNotHeldError(
                f"model {model} version {to_version} is not held in the store "
                f"(held: {', '.join(map(str, others)) or 'none besides the current one'})"
            )
        return by_version[to_version]
    cur = by_version.get(current)
    older = [h for h in held if h.version != current and (cur is None or h.counter < cur.counter)]
    if not older:
        raise VersionNotHeldError(
            f"model {model} holds no version older than the current {current} to roll back to"
        )
    return older[-1]


async def _in_thread(fn: Callable[..., T], *args: object) -> T:
    """Run blocking disk work in a thread. A cancelled caller still waits for the step to end
    (a half-done fsync or rename cannot be interrupted), then the cancellation propagates."""
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise
