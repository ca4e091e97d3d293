"""Fleet messages and their encodings (pure: bytes in, dataclasses out, and back).

Manager -> device messages are *signed commands*: ``{"signed": {...}, "signatures": [...]}``
whose signatures (Ed25519, context ``edged/command/v1``) cover the canonical JSON of
``signed``, made by keys of the device trust store's signers list. A deployment announcement
is the signed command ``deploy``. Device -> manager messages (status, progress, replies) are
plain JSON: the broker's ACL, keyed to the device certificate's CN, vouches for who wrote them.
``docs/protocol.md`` is the reference for every field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edged.bundle.canonical import Json, encode_canonical, parse_strict
from edged.bundle.keys import CONTEXT_COMMAND, KEYID_RE, SIGNATURE_BYTES, Signature, sign_payload
from edged.errors import BundleError, ChunkHashMismatchError, FleetMessageError, WrongTargetError
from edged.transport.topics import DEPLOYMENT_ID_RE, Target, Topics

PROTOCOL_VERSION = 1
COMMAND_TYPES = ("deploy", "rollback", "status", "ping")
NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

MIN_CHUNK_BYTES = 256
MAX_CHUNK_BYTES = 16 * 1024 * 1024
MAX_CHUNKS = 1_000_000
MAX_COMMAND_BYTES = 64 * 1024 * 1024  # an announcement lists one hash per chunk
MAX_SIGNATURES = 16
MAX_MIRRORS = 16
MAX_URL_CHARS = 2048
URL_RE = re.compile(r"^https?://[^\s/?#]+(/[^\s#]*)?$")
ARTIFACT_SUFFIX = ".bundle"

# Deployment progress states, in order; "failed" can follow any of them.
RECEIVED = "received"
VERIFIED = "verified"
INSTALLED = "installed"
SERVING = "serving"
FAILED = "failed"
# After ``serving`` (which may start a probation, docs/serving.md): how the probation ended.
PROMOTED = "promoted"
REVERTED = "reverted"
# The device refused the bundle or the command itself (signatures, trust, expiry, counter,
# targets, a release reverted here before): a trust decision, not a failure to carry it out.
REFUSED = "refused"
PROGRESS_STATES = (RECEIVED, VERIFIED, INSTALLED, SERVING, FAILED, PROMOTED, REVERTED, REFUSED)
TERMINAL_STATES = (SERVING, FAILED, PROMOTED, REVERTED, REFUSED)


def new_nonce() -> str:
    return secrets.token_hex(16)


def _fail(what: str, reason: str) -> FleetMessageError:
    return FleetMessageError(f"{what}: {reason}")


class _Fields:
    """Typed access to one JSON object; every error names the field."""

    def __init__(self, value: Any, what: str) -> None:
        if not isinstance(value, dict):
            raise _fail(what, "expected a JSON object")
        self.value: dict[str, Any] = value
        self.what = what
        self.used: set[str] = set()

    def _get(self, key: str) -> Any:
        self.used.add(key)
        if key not in self.value:
            raise _fail(self.what, f"field {key!r} is missing")
        return self.value[key]

    def has(self, key: str) -> bool:
        return key in self.value

    def integer(self, key: str, minimum: int = 0, maximum: int = 2**53 - 1) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise _fail(self.what, f"field {key!r} must be an integer in [{minimum}, {maximum}]")
        return value

    def string(self, key: str, pattern: re.Pattern[str] | None = None, hint: str = "") -> str:
        value = self._get(key)
        if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
            raise _fail(self.what, f"field {key!r} must be {hint or 'a string'}")
        return value

    def obj(self, key: str) -> _Fields:
        return _Fields(self._get(key), f"{self.what}.{key}")

    def array(self, key: str, maximum: int) -> list[Any]:
        value = self._get(key)
        if not isinstance(value, list) or len(value) > maximum:
            raise _fail(self.what, f"field {key!r} must be a list of at most {maximum} items")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.value) - self.used)
        if unknown:
            raise _fail(self.what, f"field {unknown[0]!r} is not known")


# --- deployments ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """What a deployment announcement promises: the bundle's size, SHA-256 and chunk hashes,
    and the bundle's own signed manifest (so the device can refuse it before downloading)."""

    id: str
    model: str
    version: int
    size: int
    sha256: str
    chunk_size: int
    chunks: tuple[str, ...]  # SHA-256 of each chunk, in order
    manifest: str  # the bundle's manifest.json (canonical ASCII JSON)
    manifest_signatures: tuple[Signature, ...]
    # Mirrors of the content-addressed file ``<sha256>.bundle`` (tried in order); empty: the
    # chunks come as retained MQTT messages. Inside the signed command, so no one can redirect
    # a device; the bytes are checked against ``chunks`` wherever they come from.
    urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        expected = max(1, math.ceil(self.size / self.chunk_size)) if self.size else 0
        if len(self.chunks) != expected:
            raise FleetMessageError(
                f"deployment {self.id}: {self.size} bytes in chunks of {self.chunk_size} make "
                f"{expected} chunks, the announcement lists {len(self.chunks)}"
            )

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    def chunk_span(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``index`` in the bundle."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    @property
    def transfer_key(self) -> str:
        """Names the partial download on disk: the same bytes in the same chunks resume,
        whichever push (deployment id) delivers them."""
        return f"{self.sha256}-{self.chunk_size}"

    def to_json(self) -> dict[str, Json]:
        value: dict[str, Json] = {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "size": self.size,
            "sha256": self.sha256,
            "chunk_size": self.chunk_size,
            "chunks": list(self.chunks),
            "manifest": self.manifest,
            "manifest_signatures": [
                {"keyid": s.keyid, "sig": s.sig.hex()} for s in self.manifest_signatures
            ],
        }
        if self.urls:  # absent when empty: the chunk-only form stays byte-for-byte as before
            value["urls"] = list(self.urls)
        return value

    @classmethod
    def from_json(cls, value: Any, what: str = "deployment") -> Deployment:
        f = _Fields(value, what)
        size = f.integer("size", 1)
        chunk_size = f.integer("chunk_size", MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
        chunks = f.array("chunks", MAX_CHUNKS)
        if not all(isinstance(c, str) and SHA256_RE.match(c) for c in chunks):
            raise _fail(what, "every entry of 'chunks' must be 64 lowercase hex digits")
        deployment = cls(
            id=f.string("id", DEPLOYMENT_ID_RE, "16-64 lowercase hex digits"),
            model=f.string("model", MODEL_RE, "a model name"),
            version=f.integer("version", 1),
            size=size,
            sha256=f.string("sha256", SHA256_RE, "64 lowercase hex digits"),
            chunk_size=chunk_size,
            chunks=tuple(chunks),
            manifest=f.string("manifest"),
            manifest_signatures=_signatures(f.array("manifest_signatures", MAX_SIGNATURES), what),
            urls=_urls(f.array("urls", MAX_MIRRORS), what) if f.has("urls") else (),
        )
        f.done()
        return deployment


def _urls(items: Sequence[Any], what: str) -> tuple[str, ...]:
    for item in items:
        if not isinstance(item, str) or len(item) > MAX_URL_CHARS or not URL_RE.match(item):
            raise _fail(what, f"every entry of 'urls' must be an http(s) URL; got {item!r}")
    return tuple(items)


def artifact_name(sha256: str) -> str:
    """The file name of a bundle in an artifact store: content-addressed."""
    return f"{sha256}{ARTIFACT_SUFFIX}"


def artifact_urls(base_urls: Sequence[str], sha256: str) -> tuple[str, ...]:
    """Each mirror's URL of the bundle with this SHA-256 (``<base>/<sha256>.bundle``)."""
    urls = tuple(f"{base.rstrip('/')}/{artifact_name(sha256)}" for base in base_urls)
    _urls(urls, "artifact URLs")
    return urls


def _signatures(items: Sequence[Any], what: str) -> tuple[Signature, ...]:
    result: list[Signature] = []
    for i, item in enumerate(items):
        f = _Fields(item, f"{what}.signatures[{i}]")
        keyid = f.string("keyid", KEYID_RE, "64 lowercase hex digits")
        sig_hex = f.string("sig", re.compile(rf"^[0-9a-f]{{{2 * SIGNATURE_BYTES}}}$"), "128 hex")
        f.done()
        result.append(Signature(keyid, bytes.fromhex(sig_hex)))
    return tuple(result)


# --- signed commands -----------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    type: str  # one of COMMAND_TYPES
    target: Target
    issued_at: int  # Unix seconds
    nonce: str  # 32 hex digits, never reused
    args: Mapping[str, Json] = field(default_factory=dict)

    def signed_json(self) -> dict[str, Json]:
        return {
            "v": PROTOCOL_VERSION,
            "type": self.type,
            "target": str(self.target),
            "issued_at": self.issued_at,
            "nonce": self.nonce,
            "args": dict(self.args),
        }

    @property
    def deployment(self) -> Deployment:
        if self.type != "deploy":
            raise FleetMessageError(f"a {self.type} command carries no deployment")
        return Deployment.from_json(self.args.get("deployment"), "deploy.args.deployment")


@dataclass(frozen=True)
class SignedCommand:
    command: Command
    payload: bytes  # the canonical bytes the signatures cover
    signatures: tuple[Signature, ...]


def encode_command(command: Command, keys: Sequence[Ed25519PrivateKey]) -> bytes:
    """The wire form of ``command`` signed by every key in ``keys``."""
    payload = encode_canonical(command.signed_json())
    signatures = [sign_payload(k, payload, context=CONTEXT_COMMAND) for k in keys]
    envelope = {
        "signed": command.signed_json(),
        "signatures": [{"keyid": s.keyid, "sig": s.sig.hex()} for s in signatures],
    }
    return encode_canonical(envelope)  # type: ignore[arg-type]


def decode_command(data: bytes) -> SignedCommand:
    """Parse a signed command; signatures are *not* checked here (``TrustState`` does)."""
    what = "command"
    if len(data) > MAX_COMMAND_BYTES:
        raise _fail(what, f"{len(data)} bytes, the limit is {MAX_COMMAND_BYTES}")
    try:
        value = parse_strict(data, what, BundleError)
    except BundleError as exc:
        raise FleetMessageError(str(exc)) from exc
    envelope = _Fields(value, what)
    signed = envelope.obj("signed")
    signatures = _signatures(envelope.array("signatures", MAX_SIGNATURES), what)
    envelope.done()
    version = signed.integer("v", 1)
    if version != PROTOCOL_VERSION:
        raise _fail(what, f"protocol version {version} is not supported (this edged speaks 1)")
    kind = signed.string("type")
    if kind not in COMMAND_TYPES:
        raise _fail(what, f"type {kind!r} is not one of {', '.join(COMMAND_TYPES)}")
    command = Command(
        type=kind,
        target=Target.parse(signed.string("target")),
        issued_at=signed.integer("issued_at", 0),
        nonce=signed.string("nonce", NONCE_RE, "32 lowercase hex digits"),
        args=signed.obj("args").value,
    )
    signed.done()
    return SignedCommand(command, encode_canonical(signed.value), signatures)


# --- device -> manager ---------------------------------------------------------------------


def encode_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(what, f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _fail(what, "expected a JSON object")
    return value


@dataclass(frozen=True)
class Progress:
    """One deployment's state on one device; the latest is retained on its progress topic."""

    device: str
    deployment: str
    model: str
    version: int
    state: str  # PROGRESS_STATES
    chunks_done: int
    chunks_total: int
    chunks_fetched: int = 0  # chunks received over MQTT since this attempt (re)started
    reason: str = ""
    at: int = 0

    @property
    def percent(self) -> int:
        if self.chunks_total == 0:
            return 100
        return self.chunks_done * 100 // self.chunks_total

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "deployment": self.deployment,
            "model": self.model,
            "version": self.version,
            "state": self.state,
            "percent": self.percent,
            "chunks_done": self.chunks_done,
            "chunks_total": self.chunks_total,
            "chunks_fetched": self.chunks_fetched,
            "reason": self.reason,
            "at": self.at,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Progress:
        try:
            progress = cls(
                device=str(value["device"]),
                deployment=str(value["deployment"]),
                model=str(value["model"]),
                version=int(value["version"]),
                state=str(value["state"]),
                chunks_done=int(value["chunks_done"]),
                chunks_total=int(value["chunks_total"]),
                chunks_fetched=int(value.get("chunks_fetched", 0)),
                reason=str(value.get("reason", "")),
                at=int(value.get("at", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail("progress", f"missing or ill-typed field: {exc}") from None
        if progress.state not in PROGRESS_STATES:
            raise _fail("progress", f"state {progress.state!r} is not known")
        return progress


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str | None
    state: str


@dataclass(frozen=True)
class DeviceStatus:
    """The retained message on ``<p>/devices/<id>/status``."""

    device: str
    online: bool
    at: int
    groups: tuple[str, ...] = ()
    models: tuple[ModelVersion, ...] = ()
    edged_version: str = ""
    reason: str = ""  # why offline: "shutdown" or the will's "connection lost"

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "online": self.online,
            "at": self.at,
            "groups": list(self.groups),
            "models": [
                {"name": m.name, "version": m.version, "state": m.state} for m in self.models
            ],
            "edged_version": self.edged_version,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> DeviceStatus:
        try:
            models = tuple(
                ModelVersion(
                    str(m["name"]),
                    None if m.get("version") is None else str(m["version"]),
                    str(m.get("state", "")),
                )
                for m in value.get("models", [])
            )
            return cls(
                device=str(value["device"]),
                online=bool(value["online"]),
                at=int(value.get("at", 0)),
                groups=tuple(str(g) for g in value.get("groups", [])),
                models=models,
                edged_version=str(value.get("edged_version", "")),
                reason=str(value.get("reason", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail("status", f"missing or ill-typed field: {exc}") from None


@dataclass(frozen=True)
class Reply:
    """A device's answer to a command, sent to the command's MQTT v5 response topic with its
    correlation data."""

    device: str
    type: str
    nonce: str
    ok: bool
    result: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""  # "<ErrorClass>: message" when not ok

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "type": self.type,
            "nonce": self.nonce,
            "ok": self.ok,
            "result": dict(self.result),
            "error": self.error,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Reply:
        try:
            result = value.get("result", {})
            return cls(
                device=str(value["device"]),
                type=str(value["type"]),
                nonce=str(value["nonce"]),
                ok=bool(value["ok"]),
                result=result if isinstance(result, dict) else {},
                error=str(value.get("error", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail("reply", f"missing or ill-typed field: {exc}") from None


# --- device-side rules (shared by the daemon's agent and the fleet simulator) ------------------


def device_subscriptions(topics: Topics, device: str, groups: Sequence[str]) -> list[str]:
    """What a device subscribes to on every connection: its own and its groups' ``cmd`` and
    ``deploy`` topics."""
    targets = [Target.device(device)] + [Target.group(g) for g in groups]
    return [t for target in targets for t in (topics.cmd(target), topics.deploy(target))]


def will_status(device: str, groups: Sequence[str], at: int, edged_version: str) -> DeviceStatus:
    """The retained status the broker publishes for a device that vanished (its last will)."""
    return DeviceStatus(
        device,
        online=False,
        at=at,
        groups=tuple(groups),
        reason="connection lost",
        edged_version=edged_version,
    )


def check_command_target(
    topics: Topics, device: str, groups: Sequence[str], target: Target, topic: str
) -> None:
    """A command must be signed for this device or one of its groups, and have arrived on that
    target's own topic (``WrongTargetError``)."""
    mine = target == Target.device(device) or (target.kind == "groups" and target.name in groups)
    if not mine:
        raise WrongTargetError(
            f"command is signed for {target}, this is device {device} in groups "
            f"{', '.join(groups) or 'none'}"
        )
    if not topic.startswith(topics.base(target) + "/"):
        raise WrongTargetError(f"command signed for {target} arrived on {topic}")


def check_chunk(deployment: Deployment, index: int, data: bytes) -> None:
    """Chunk ``index`` must be the signed length and hash (``ChunkHashMismatchError``)."""
    if not 0 <= index < deployment.chunk_count:
        raise ChunkHashMismatchError(
            f"chunk {index} is outside the {deployment.chunk_count} chunks announced"
        )
    length = deployment.chunk_span(index)[1]
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != length or digest != deployment.chunks[index]:
        raise ChunkHashMismatchError(
            f"chunk {index} of deployment {deployment.id} is {len(data)} bytes with SHA-256 "
            f"{digest[:16]}...; the signed announcement says {length} bytes, "
            f"{deployment.chunks[index][:16]}... (tampered or corrupted: discarded)"
        )


def deployment_progress(
    device: str,
    d: Deployment,
    state: str,
    chunks_done: int = 0,
    chunks_fetched: int = 0,
    reason: str = "",
) -> Progress:
    return Progress(
        device=device,
        deployment=d.id,
        model=d.model,
        version=d.version,
        state=state,
        chunks_done=chunks_done,
        chunks_total=d.chunk_count,
        chunks_fetched=chunks_fetched,
        reason=reason,
        at=int(time.time()),
    )


def error_reason(exc: BaseException) -> str:
    """How a failure reads in a progress report or a command reply."""
    return f"{type(exc).__name__}: {exc}"
