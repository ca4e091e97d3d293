"""Pure bundle verification: manifest bytes + signatures + trust + high-water marks + device
facts + the time, in; a ``VerifiedManifest`` or one specific ``BundleError``, out. No I/O.

Order (cheap and unauthenticated first, then nothing is parsed before it is signed):
size limit, signers list fresh, signatures (k of n distinct trusted keys), canonical encoding
and schema, expiry, release counter against the high-water mark, targets.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from edged._time import utc_text
from edged.bundle.keys import CONTEXT_MANIFEST, Signature, verify_payload
from edged.bundle.limits import DEFAULT_LIMITS, BundleLimits
from edged.bundle.manifest import Manifest, manifest_digest, parse_manifest
from edged.bundle.trust import TrustState
from edged.errors import (
    ArchitectureMismatchError,
    BundleError,
    EdgedVersionTooOldError,
    ExpiredBundleError,
    LimitExceededError,
    ProviderMismatchError,
    ReplayError,
    RollbackError,
    RuntimeMismatchError,
)


@dataclass(frozen=True)
class DeviceFacts:
    """What the device offers; ``edged.bundle.device.detect_device_facts`` reads them."""

    arch: str  # platform.machine() spelling, normalised: "x86_64", "aarch64", ...
    runtimes: frozenset[str]  # {"onnx", "tflite"}
    providers: frozenset[str]  # execution providers / delegates usable here
    edged_version: str


MAX_MARKS_PER_MODEL = 64  # one per set of signing keys; as many as a signers list has keys


@dataclass(frozen=True)
class HighWaterMark:
    """The highest release counter ever installed for a model, which bundle set it and which
    keys signed that bundle; ``earlier`` holds, for every other set of signing keys a bundle of
    the model was installed under, the highest counter installed under it (highest first).

    Which of these counts is decided against the trust state (``standing``): a mark set by a
    key that root has since revoked no longer holds, and the highest one signed only by keys
    not revoked takes its place. That is the recovery from a fast-forward attack (a stolen key
    signing a huge counter); only a root-signed signers update can revoke, so nobody without
    root keys can lower a mark.
    """

    counter: int
    manifest_sha256: str
    signed_by: frozenset[str] = frozenset()  # empty: not recorded (older store, recovery)
    earlier: tuple[HighWaterMark, ...] = ()

    def entries(self) -> tuple[HighWaterMark, ...]:
        """Every recorded mark, highest counter first."""
        return (replace(self, earlier=()), *self.earlier)

    def standing(self, revoked: frozenset[str]) -> HighWaterMark | None:
        """The mark that holds while ``revoked`` are revoked: the highest one none of whose
        signing keys is revoked (None: every mark was set by a revoked key)."""
        for entry in self.entries():
            if not entry.signed_by & revoked:
                return entry
        return None

    def advanced(self, counter: int, digest: str, signed_by: frozenset[str]) -> HighWaterMark:
        """Record an install of ``counter`` signed by ``signed_by``; nothing is ever lowered."""
        entries = list(self.entries())
        same = next((e for e in entries if e.signed_by == signed_by), None)
        if same is not None and same.counter >= counter:
            return self
        entries = [e for e in entries if e is not same]
        entries.append(HighWaterMark(counter, digest, signed_by))
        entries.sort(key=lambda e: e.counter, reverse=True)
        del entries[MAX_MARKS_PER_MODEL:]
        return replace(entries[0], earlier=tuple(entries[1:]))


@dataclass(frozen=True)
class VerifiedManifest:
    manifest: Manifest
    manifest_bytes: bytes
    digest: str  # SHA-256 of manifest_bytes
    signed_by: frozenset[str]  # key ids whose signatures verified
    reinstall: bool  # the very bundle that set the high-water mark (see docs: replay)


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool | None  # None: skipped because an earlier check failed
    detail: str


def release_tuple(version: str) -> tuple[int, int, int]:
    """``MAJOR.MINOR.PATCH`` from a version string (``0.3.1+local`` -> (0, 3, 1))."""
    match = re.match(r"^(\d+)\.(\d+)\.(\d+)", version)
    if match is None:
        return (0, 0, 0)
    major, minor, patch = match.groups()
    return (int(major), int(minor), int(patch))


# --- the individual checks ---------------------------------------------------------------


def check_size(manifest_bytes: bytes, limits: BundleLimits) -> None:
    if len(manifest_bytes) > limits.max_manifest_bytes:
        raise LimitExceededError(
            f"manifest.json is {len(manifest_bytes)} bytes, the limit is "
            f"{limits.max_manifest_bytes}"
        )


def check_signatures(
    manifest_bytes: bytes, signatures: Sequence[Signature], trust: TrustState
) -> frozenset[str]:
    return verify_payload(
        manifest_bytes,
        signatures,
        context=CONTEXT_MANIFEST,
        keys=trust.signers.keys,
        threshold=trust.signers.threshold,
        revoked=trust.signers.revoked,
        what=f"manifest.json (sha256 {manifest_digest(manifest_bytes)[:16]}...)",
    )


def check_expiry(manifest: Manifest, now: int) -> None:
    if now >= manifest.expires:
        raise ExpiredBundleError(
            f"bundle {manifest.model} version {manifest.version} (counter {manifest.counter}) "
            f"expired at {utc_text(manifest.expires)}, now is {utc_text(now)}"
        )


def check_counter(
    manifest: Manifest,
    digest: str,
    high_water: Mapping[str, HighWaterMark],
    revoked: frozenset[str] = frozenset(),
) -> bool:
    """True when this is the exact bundle that set the mark (an allowed re-install).

    The mark is the model's standing one under the current revocations (``HighWaterMark``).
    """
    recorded = high_water.get(manifest.model)
    mark = recorded.standing(revoked) if recorded is not None else None
    if mark is None or manifest.counter > mark.counter:
        return False
    if manifest.counter < mark.counter:
        raise RollbackError(
            f"bundle {manifest.model} version {manifest.version} has release counter "
            f"{manifest.counter}, below the device's high-water mark {mark.counter}"
        )
    if digest != mark.manifest_sha256:
        raise ReplayError(
            f"bundle {manifest.model} version {manifest.version} repeats release counter "
            f"{manifest.counter} but is not the bundle installed with it (manifest sha256 "
            f"{digest[:16]}..., installed {mark.manifest_sha256[:16]}...)"
        )
    return True


def check_arch(manifest: Manifest, device: DeviceFacts) -> None:
    if device.arch not in manifest.targets.arch:
        raise ArchitectureMismatchError(
            f"bundle {manifest.model} targets {', '.join(manifest.targets.arch)}; "
            f"this device is {device.arch}"
        )


def check_runtime(manifest: Manifest, device: DeviceFacts) -> None:
    if manifest.targets.runtime not in device.runtimes:
        have = ", ".join(sorted(device.runtimes)) or "none"
        raise RuntimeMismatchError(
            f"bundle {manifest.model} needs runtime {manifest.targets.runtime}; "
            f"this device has {have}"
        )


def check_providers(manifest: Manifest, device: DeviceFacts) -> None:
    wanted = manifest.targets.providers
    if wanted and not set(wanted) & device.providers:
        have = ", ".join(sorted(device.providers)) or "none"
        raise ProviderMismatchError(
            f"bundle {manifest.model} needs one of {', '.join(wanted)}; this device has {have}"
        )


def check_edged_version(manifest: Manifest, device: DeviceFacts) -> None:
    need = manifest.targets.min_edged_version
    if release_tuple(device.edged_version) < release_tuple(need):
        raise EdgedVersionTooOldError(
            f"bundle {manifest.model} needs edged >= {need}; this is edged {device.edged_version}"
        )


# --- the verifier ------------------------------------------------------------------------


def verify_manifest(
    manifest_bytes: bytes,
    signatures: Sequence[Signature],
    trust: TrustState,
    high_water: Mapping[str, HighWaterMark],
    device: DeviceFacts,
    now: int,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> VerifiedManifest:
    """Decide whether a manifest may be installed on this device at time ``now``.

    ``high_water`` maps model names to their persisted marks. Raises the specific
    ``BundleError`` of the first check that fails.
    """
    check_size(manifest_bytes, limits)
    trust.check_fresh(now)
    signed_by = check_signatures(manifest_bytes, signatures, trust)
    manifest = parse_manifest(manifest_bytes, limits)
    digest = manifest_digest(manifest_bytes)
    check_expiry(manifest, now)
    reinstall = check_counter(manifest, digest, high_water, trust.signers.revoked)
    check_arch(manifest, device)
    check_runtime(manifest, device)
    check_providers(manifest, device)
    check_edged_version(manifest, device)
    return VerifiedManifest(manifest, manifest_bytes, digest, signed_by, reinstall)


def explain_manifest(
    manifest_bytes: bytes,
    signatures: Sequence[Signature],
    trust: TrustState | None,
    high_water: Mapping[str, HighWaterMark],
    device: DeviceFacts | None,
    now: int,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> tuple[list[CheckResult], Manifest | None]:
    """Run every check that can run and report each (for ``edged bundle verify``).

    Unlike ``verify_manifest`` it does not stop at the first failure; checks that need
    something missing (no trust store, no device facts, unparseable manifest) are skipped.
    """
    results: list[CheckResult] = []

    def run(name: str, check: Callable[[], object], ok_detail: str) -> bool:
        try:
            check()
        except BundleError as exc:
            results.append(CheckResult(name, False, f"{type(exc).__name__}: {exc}"))
            return False
        results.append(CheckResult(name, True, ok_detail))
        return True

    def skip(name: str, why: str) -> None:
        results.append(CheckResult(name, None, why))

    run("manifest size", lambda: check_size(manifest_bytes, limits), f"{len(manifest_bytes)} bytes")
    if trust is None:
        skip("signers list fresh", "no trust store given")
        skip("signatures", "no trust store given")
    else:
        run(
            "signers list fresh",
            lambda: trust.check_fresh(now),
            f"expires {utc_text(trust.signers.expires)}",
        )
        signed: list[frozenset[str]] = []
        run(
            "signatures",
            lambda: signed.append(check_signatures(manifest_bytes, signatures, trust)),
            f"{len(signatures)} present, threshold {trust.signers.threshold}",
        )
    parsed: list[Manifest] = []
    run(
        "manifest encoding and schema",
        lambda: parsed.append(parse_manifest(manifest_bytes, limits)),
        "ok",
    )
    if not parsed:
        for name in (
            "not expired",
            "release counter",
            "architecture",
            "runtime",
            "providers",
            "edged version",
        ):
            skip(name, "manifest did not parse")
        return results, None
    manifest = parsed[0]
    digest = manifest_digest(manifest_bytes)
    run("not expired", lambda: check_expiry(manifest, now), f"expires {utc_text(manifest.expires)}")
    revoked = trust.signers.revoked if trust is not None else frozenset()
    recorded = high_water.get(manifest.model)
    mark = recorded.standing(revoked) if recorded is not None else None
    run(
        "release counter",
        lambda: check_counter(manifest, digest, high_water, revoked),
        f"{manifest.counter} (high-water mark {mark.counter if mark else 'none'})",
    )
    if device is None:
        for name in ("architecture", "runtime", "providers", "edged version"):
            skip(name, "no device facts")
    else:
        run("architecture", lambda: check_arch(manifest, device), device.arch)
        run("runtime", lambda: check_runtime(manifest, device), manifest.targets.runtime)
        run(
            "providers",
            lambda: check_providers(manifest, device),
            ", ".join(manifest.targets.providers) or "any",
        )
        run(
            "edged version",
            lambda: check_edged_version(manifest, device),
            f">= {manifest.targets.min_edged_version}",
        )
    return results, manifest
