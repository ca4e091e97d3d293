"""Ed25519 keys, key ids and context-bound signatures over byte payloads.

A key id is the lowercase hex SHA-256 of the raw 32-byte public key. Every signature covers
``context || 0x00 || payload``: the context string keeps a signature made for one purpose (a
bundle manifest, a signers document, a fleet command) from being accepted for another.

``verify_payload`` is the one threshold check used for manifests, trust documents and signed
fleet commands. Private keys are only ever read on the signer's machine; the device holds
public keys only.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edged._fs import create_new_file
from edged.errors import (
    BadSignatureError,
    DuplicateSignatureError,
    KeyFileError,
    NoSignaturesError,
    RevokedKeyError,
    ThresholdNotMetError,
    UnknownKeyError,
)

CONTEXT_MANIFEST = "edged/bundle-manifest/v1"
CONTEXT_ROOT = "edged/root/v1"
CONTEXT_SIGNERS = "edged/signers/v1"
CONTEXT_COMMAND = "edged/command/v1"

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
KEYID_RE = re.compile(r"^[0-9a-f]{64}$")
_CONTEXT_RE = re.compile(r"^[\x21-\x7e]{1,64}$")


@dataclass(frozen=True)
class Signature:
    """One detached signature: the signing key's id and the 64 signature bytes."""

    keyid: str
    sig: bytes

    def to_json(self) -> dict[str, str]:
        return {"keyid": self.keyid, "sig": self.sig.hex()}


def keyid_of(public_key: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public_bytes(public_key)).hexdigest()


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Parse 64 hex digits of a raw Ed25519 public key; ``ValueError`` when malformed."""
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise ValueError("an Ed25519 public key is 64 lowercase hex digits")
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))


def signed_message(context: str, payload: bytes) -> bytes:
    if not _CONTEXT_RE.match(context):
        raise ValueError(f"signature context {context!r} must be 1-64 printable ASCII characters")
    return context.encode("ascii") + b"\x00" + payload


def sign_payload(key: Ed25519PrivateKey, payload: bytes, *, context: str) -> Signature:
    """Sign ``payload`` for ``context`` (e.g. ``CONTEXT_COMMAND``)."""
    return Signature(keyid_of(key.public_key()), key.sign(signed_message(context, payload)))


def verify_payload(
    payload: bytes,
    signatures: Sequence[Signature],
    *,
    context: str,
    keys: Mapping[str, Ed25519PublicKey],
    threshold: int,
    revoked: frozenset[str] = frozenset(),
    what: str = "payload",
) -> frozenset[str]:
    """Check that at least ``threshold`` distinct trusted keys signed ``payload``.

    Returns the key ids whose signatures verified. Signatures by unknown keys are ignored when
    the threshold is met anyway (a bundle signed during a key rotation stays installable);
    otherwise the error names every signature that did not count and why. A signature by a
    revoked key or a signature that fails to verify always rejects: a trusted signer never
    produces either.
    """
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    if not signatures:
        raise NoSignaturesError(f"{what} carries no signature (needs {threshold})")
    message = signed_message(context, payload)
    seen: set[str] = set()
    valid: set[str] = set()
    unknown: list[str] = []
    for signature in signatures:
        if signature.keyid in seen:
            raise DuplicateSignatureError(
                f"{what}: two signatures name key {signature.keyid}; each key signs once"
            )
        seen.add(signature.keyid)
        if signature.keyid in revoked:
            # A revoked key's public half is no longer held, so the signature cannot be checked:
            # say only what is known, that it names the key.
            raise RevokedKeyError(
                f"{what}: carries a signature naming key {signature.keyid}, which is revoked "
                "(refused without checking it)"
            )
        public = keys.get(signature.keyid)
        if public is None:
            unknown.append(signature.keyid)
            continue
        if len(signature.sig) != SIGNATURE_BYTES:
            raise BadSignatureError(
                f"{what}: signature by key {signature.keyid} is {len(signature.sig)} bytes, "
                f"Ed25519 signatures are {SIGNATURE_BYTES}"
            )
        try:
            public.verify(signature.sig, message)
        except InvalidSignature:
            raise BadSignatureError(
                f"{what}: signature by key {signature.keyid} does not verify (the signed bytes "
                "were changed, or it was made for other content)"
            ) from None
        valid.add(signature.keyid)
    if len(valid) >= threshold:
        return frozenset(valid)
    if unknown and not valid:
        raise UnknownKeyError(
            f"{what}: signed only by key(s) the trust store does not know: {', '.join(unknown)}"
        )
    detail = f"; ignored unknown key(s) {', '.join(unknown)}" if unknown else ""
    raise ThresholdNotMetError(
        f"{what}: {len(valid)} valid signature(s) from trusted keys, {threshold} required{detail}"
    )


# --- key files (signer's machine) ----------------------------------------------------------


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write a PKCS#8 PEM private key with mode 0600; never overwrites an existing file."""
    _write_key_file(path, private_key_pem(key), 0o600)


def write_public_key(path: Path, key: Ed25519PublicKey) -> None:
    _write_key_file(path, public_key_pem(key), 0o644)


def _write_key_file(path: Path, pem: bytes, mode: int) -> None:
    try:
        create_new_file(path, pem, mode)
    except FileExistsError:
        raise KeyFileError(f"{path} exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from exc


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read private key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A PEM public key, a PEM private key (its public half) or 64 hex digits."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror}") from exc
    text = data.strip()
    if re.fullmatch(rb"[0-9a-f]{64}", text):
        return public_key_from_hex(text.decode("ascii"))
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key
