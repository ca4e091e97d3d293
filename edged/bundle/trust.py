"""The device trust state: root keys, and the root-signed list of bundle-signing keys.

Two signed JSON documents, each ``{"signed": {...}, "signatures": [{"keyid", "sig"}, ...]}``
with the signatures over the canonical encoding of ``signed``:

- ``root.json``: the root keys and the root threshold. Provisioned with the device (it is the
  trust anchor) and self-signed by a threshold of its own keys, which catches a damaged file.
- ``signers.json``: the bundle-signing keys, the keys revoked so far, the bundle threshold
  (k of n), a version and an expiry. Signed by a threshold of root keys; replaced by a newer
  version to add, rotate or revoke a signing key without reflashing.

Everything here is pure: parse, check and build documents from bytes; ``truststore`` does the
file I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edged._time import utc_text
from edged.bundle.canonical import Json, encode_canonical, parse_strict
from edged.bundle.keys import (
    CONTEXT_COMMAND,
    CONTEXT_ROOT,
    CONTEXT_SIGNERS,
    KEYID_RE,
    SIGNATURE_BYTES,
    Signature,
    keyid_of,
    public_key_from_hex,
    raw_public_bytes,
    sign_payload,
    verify_payload,
)
from edged.bundle.limits import DEFAULT_LIMITS, BundleLimits
from edged.errors import (
    LimitExceededError,
    TrustDocumentError,
    TrustExpiredError,
    TrustVersionError,
)

ROOT_TYPE = "edged/root"
SIGNERS_TYPE = "edged/signers"
TRUST_SPEC_VERSION = 1
MAX_VERSION = 2**53 - 1


@dataclass(frozen=True)
class RootDocument:
    version: int
    threshold: int  # root signatures needed on signers.json (and on root.json itself)
    keys: Mapping[str, Ed25519PublicKey]


@dataclass(frozen=True)
class SignersDocument:
    version: int
    expires: int  # Unix seconds, UTC
    threshold: int  # bundle signatures needed (k of n)
    keys: Mapping[str, Ed25519PublicKey]
    revoked: frozenset[str]


@dataclass(frozen=True)
class TrustState:
    root: RootDocument
    signers: SignersDocument
    root_bytes: bytes = field(repr=False)
    signers_bytes: bytes = field(repr=False)

    def check_fresh(self, now: int) -> None:
        """Refuse to trust a signers list past its expiry (freeze protection)."""
        if now >= self.signers.expires:
            raise TrustExpiredError(
                f"signers.json version {self.signers.version} expired at "
                f"{utc_text(self.signers.expires)} (now {utc_text(now)}); apply a newer "
                "root-signed signers document"
            )

    def verify_command(
        self,
        payload: bytes,
        signatures: Sequence[Signature],
        now: int,
        *,
        context: str = CONTEXT_COMMAND,
        what: str = "command",
    ) -> frozenset[str]:
        """Check a signed fleet command against the bundle-signing keys and threshold.

        Freshness and replay of commands (timestamps, nonces) are the caller's business.
        """
        self.check_fresh(now)
        return verify_payload(
            payload,
            signatures,
            context=context,
            keys=self.signers.keys,
            threshold=self.signers.threshold,
            revoked=self.signers.revoked,
            what=what,
        )


# --- parsing -----------------------------------------------------------------------------


def _split_envelope(
    data: bytes, what: str, limits: BundleLimits
) -> tuple[dict[str, Any], list[Signature]]:
    if len(data) > limits.max_trust_document_bytes:
        raise LimitExceededError(
            f"{what} is {len(data)} bytes, the limit is {limits.max_trust_document_bytes}"
        )
    value = parse_strict(data, what, TrustDocumentError)
    if not isinstance(value, dict) or set(value) != {"signed", "signatures"}:
        raise TrustDocumentError(f"{what}: expected an object with 'signed' and 'signatures'")
    signed, raw_sigs = value["signed"], value["signatures"]
    if not isinstance(signed, dict):
        raise TrustDocumentError(f"{what}: 'signed' must be an object")
    if not isinstance(raw_sigs, list) or len(raw_sigs) > limits.max_signatures:
        raise TrustDocumentError(
            f"{what}: 'signatures' must be a list of at most {limits.max_signatures}"
        )
    signatures: list[Signature] = []
    for i, item in enumerate(raw_sigs):
        if (
            not isinstance(item, dict)
            or set(item) != {"keyid", "sig"}
            or not isinstance(item["keyid"], str)
            or not KEYID_RE.match(item["keyid"])
            or not isinstance(item["sig"], str)
            or len(item["sig"]) != 2 * SIGNATURE_BYTES
        ):
            raise TrustDocumentError(
                f"{what}: signatures[{i}] must be {{keyid: 64 hex, sig: 128 hex}}"
            )
        try:
            sig = bytes.fromhex(item["sig"])
        except ValueError:
            raise TrustDocumentError(f"{what}: signatures[{i}].sig is not hex") from None
        signatures.append(Signature(item["keyid"], sig))
    return signed, signatures


def _field(signed: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in signed:
        raise TrustDocumentError(f"{what}: field signed.{key} is missing")
    return signed[key]


def _int_field(signed: Mapping[str, Any], key: str, what: str, minimum: int) -> int:
    value = _field(signed, key, what)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_VERSION:
        raise TrustDocumentError(f"{what}: signed.{key} must be an integer >= {minimum}")
    return value


def _check_header(signed: Mapping[str, Any], type_: str, allowed: set[str], what: str) -> None:
    if signed.get("_type") != type_:
        raise TrustDocumentError(f"{what}: signed._type must be {type_!r}")
    if signed.get("spec_version") != TRUST_SPEC_VERSION:
        raise TrustDocumentError(
            f"{what}: spec_version {signed.get('spec_version')!r} is not supported "
            f"(this edged reads {TRUST_SPEC_VERSION})"
        )
    unknown = sorted(set(signed) - allowed)
    if unknown:
        raise TrustDocumentError(f"{what}: field signed.{unknown[0]} is not known")


def _parse_keys(value: Any, what: str, limits: BundleLimits) -> dict[str, Ed25519PublicKey]:
    if not isinstance(value, dict) or not value:
        raise TrustDocumentError(f"{what}: signed.keys must be a non-empty object")
    if len(value) > limits.max_trust_keys:
        raise LimitExceededError(f"{what}: more than {limits.max_trust_keys} keys")
    keys: dict[str, Ed25519PublicKey] = {}
    for keyid, spec in value.items():
        if (
            not isinstance(spec, dict)
            or set(spec) != {"keytype", "public"}
            or spec["keytype"] != "ed25519"
            or not isinstance(spec["public"], str)
        ):
            raise TrustDocumentError(
                f"{what}: keys[{keyid}] must be {{keytype: 'ed25519', public: 64 hex}}"
            )
        try:
            public = public_key_from_hex(spec["public"])
        except ValueError as exc:
            raise TrustDocumentError(f"{what}: keys[{keyid}].public: {exc}") from None
        if keyid_of(public) != keyid:
            raise TrustDocumentError(
                f"{what}: key id {keyid} is not the SHA-256 of its public key ({keyid_of(public)})"
            )
        keys[keyid] = public
    return keys


def _threshold(signed: Mapping[str, Any], keys: Mapping[str, Any], what: str) -> int:
    threshold = _int_field(signed, "threshold", what, 1)
    if threshold > len(keys):
        raise TrustDocumentError(
            f"{what}: threshold {threshold} is more than the {len(keys)} key(s) listed"
        )
    return threshold


def parse_root(data: bytes, limits: BundleLimits = DEFAULT_LIMITS) -> RootDocument:
    what = "root.json"
    signed, signatures = _split_envelope(data, what, limits)
    _check_header(
        signed, ROOT_TYPE, {"_type", "spec_version", "version", "keys", "threshold"}, what
    )
    version = _int_field(signed, "version", what, 1)
    what = f"root.json version {version}"
    keys = _parse_keys(_field(signed, "keys", what), what, limits)
    threshold = _threshold(signed, keys, what)
    verify_payload(
        encode_canonical(signed),
        signatures,
        context=CONTEXT_ROOT,
        keys=keys,
        threshold=threshold,
        what=what,
    )
    return RootDocument(version, threshold, keys)


def parse_signers(
    data: bytes, root: RootDocument, limits: BundleLimits = DEFAULT_LIMITS
) -> SignersDocument:
    """Parse ``signers.json`` and check its root signatures; expiry is checked at use."""
    what = "signers.json"
    signed, signatures = _split_envelope(data, what, limits)
    _check_header(
        signed,
        SIGNERS_TYPE,
        {"_type", "spec_version", "version", "expires", "keys", "revoked", "threshold"},
        what,
    )
    version = _int_field(signed, "version", what, 1)
    what = f"signers.json version {version}"
    expires = _int_field(signed, "expires", what, 0)
    keys = _parse_keys(_field(signed, "keys", what), what, limits)
    threshold = _threshold(signed, keys, what)
    revoked_value = _field(signed, "revoked", what)
    if not isinstance(revoked_value, list) or not all(
        isinstance(k, str) and KEYID_RE.match(k) for k in revoked_value
    ):
        raise TrustDocumentError(f"{what}: signed.revoked must be a list of key ids")
    revoked = frozenset(revoked_value)
    both = sorted(revoked & set(keys))
    if both:
        raise TrustDocumentError(f"{what}: key {both[0]} is both trusted and revoked")
    verify_payload(
        encode_canonical(signed),
        signatures,
        context=CONTEXT_SIGNERS,
        keys=root.keys,
        threshold=root.threshold,
        what=f"{what} (root signatures)",
    )
    return SignersDocument(version, expires, threshold, keys, revoked)


def load_trust_state(
    root_bytes: bytes, signers_bytes: bytes, limits: BundleLimits = DEFAULT_LIMITS
) -> TrustState:
    root = parse_root(root_bytes, limits)
    signers = parse_signers(signers_bytes, root, limits)
    return TrustState(root, signers, root_bytes, signers_bytes)


def apply_signers_update(
    state: TrustState, new_bytes: bytes, now: int, limits: BundleLimits = DEFAULT_LIMITS
) -> TrustState:
    """The trust state after a signers update; the version must increase.

    Re-applying the document already held is a no-op (returns ``state``).
    """
    new = parse_signers(new_bytes, state.root, limits)
    if new.version <= state.signers.version:
        if new.version == state.signers.version and _signed_part(new_bytes) == _signed_part(
            state.signers_bytes
        ):
            return state
        raise TrustVersionError(
            f"signers.json version {new.version} does not replace the held version "
            f"{state.signers.version}: the version must increase"
        )
    if now >= new.expires:
        raise TrustExpiredError(
            f"signers.json version {new.version} already expired at {utc_text(new.expires)} "
            f"(now {utc_text(now)})"
        )
    return TrustState(state.root, new, state.root_bytes, new_bytes)


def _signed_part(data: bytes) -> bytes:
    value = json.loads(data)
    return encode_canonical(value["signed"])


# --- building (signer's machine) ---------------------------------------------------------


def _key_entries(keys: Sequence[Ed25519PublicKey]) -> dict[str, Json]:
    return {keyid_of(k): {"keytype": "ed25519", "public": raw_public_bytes(k).hex()} for k in keys}


def _envelope(signed: dict[str, Json], signatures: Sequence[Signature]) -> bytes:
    document = {"signed": signed, "signatures": [s.to_json() for s in signatures]}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("ascii")


def build_root(
    root_keys: Sequence[Ed25519PublicKey],
    threshold: int,
    signing_keys: Sequence[Ed25519PrivateKey],
    version: int = 1,
) -> bytes:
    """A root document listing ``root_keys``, signed by ``signing_keys`` (may be fewer than
    the threshold; more signatures can be added with ``add_document_signature``)."""
    signed: dict[str, Json] = {
        "_type": ROOT_TYPE,
        "spec_version": TRUST_SPEC_VERSION,
        "version": version,
        "keys": _key_entries(root_keys),
        "threshold": threshold,
    }
    payload = encode_canonical(signed)
    sigs = [sign_payload(k, payload, context=CONTEXT_ROOT) for k in signing_keys]
    return _envelope(signed, sigs)


def build_signers(
    signer_keys: Sequence[Ed25519PublicKey],
    threshold: int,
    version: int,
    expires: int,
    root_signing_keys: Sequence[Ed25519PrivateKey],
    revoked: Sequence[str] = (),
) -> bytes:
    signed: dict[str, Json] = {
        "_type": SIGNERS_TYPE,
        "spec_version": TRUST_SPEC_VERSION,
        "version": version,
        "expires": expires,
        "keys": _key_entries(signer_keys),
        "revoked": [k for k in sorted(set(revoked))],
        "threshold": threshold,
    }
    payload = encode_canonical(signed)
    sigs = [sign_payload(k, payload, context=CONTEXT_SIGNERS) for k in root_signing_keys]
    return _envelope(signed, sigs)


def add_document_signature(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """Add (or replace) ``key``'s signature on a root or signers document."""
    value = parse_strict(data, "trust document", TrustDocumentError)
    if not isinstance(value, dict) or not isinstance(value.get("signed"), dict):
        raise TrustDocumentError("trust document: expected an object with 'signed'")
    signed = value["signed"]
    assert isinstance(signed, dict)
    context = {ROOT_TYPE: CONTEXT_ROOT, SIGNERS_TYPE: CONTEXT_SIGNERS}.get(str(signed.get("_type")))
    if context is None:
        raise TrustDocumentError(f"trust document: unknown _type {signed.get('_type')!r}")
    new = sign_payload(key, encode_canonical(signed), context=context)
    raw = value.get("signatures")
    old: list[Signature] = []
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, dict):
            continue
        keyid, sig = item.get("keyid"), item.get("sig")
        if isinstance(keyid, str) and isinstance(sig, str) and keyid != new.keyid:
            try:
                old.append(Signature(keyid, bytes.fromhex(sig)))
            except ValueError:
                raise TrustDocumentError(
                    f"trust document: signature by {keyid} is not hex"
                ) from None
    return _envelope(signed, [*old, new])


def signers_document_json(state: TrustState) -> dict[str, Any]:
    """The signed part of the held signers document, for display."""
    value: dict[str, Any] = json.loads(state.signers_bytes)["signed"]
    return value
