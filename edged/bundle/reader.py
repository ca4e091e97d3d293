"""Reading a bundle archive: manifest and signatures first, verified before any model byte is
read; then every file streamed through SHA-256 against its declared size and hash.

Layout (``docs/bundle-format.md``): ``manifest.json`` is the first entry, then
``signatures/<keyid>.sig`` entries, then the model files in any order. Directory entries may
appear anywhere after the manifest and are ignored when they are ancestors of listed files.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from edged.bundle.archive import ArchiveEntry, ArchiveReader
from edged.bundle.keys import SIGNATURE_BYTES, Signature
from edged.bundle.limits import DEFAULT_LIMITS, BundleLimits
from edged.bundle.manifest import MANIFEST_NAME, SIGNATURES_DIR, FileEntry, Manifest
from edged.bundle.verify import VerifiedManifest
from edged.errors import (
    BadSignatureError,
    BundleError,
    DuplicateEntryError,
    FileHashMismatchError,
    FileSizeMismatchError,
    LimitExceededError,
    MalformedArchiveError,
    MissingEntryError,
    NoSignaturesError,
    SignatureError,
    ThresholdNotMetError,
    TruncatedArchiveError,
    UnexpectedEntryError,
    UnknownKeyError,
)

SIGNATURE_ENTRY_RE = re.compile(rf"^{SIGNATURES_DIR}/([0-9a-f]{{64}})\.sig$")
# Verification failures that a signature entry later in the archive could explain.
TOO_FEW_SIGNATURES = (NoSignaturesError, UnknownKeyError, ThresholdNotMetError)


@dataclass(frozen=True)
class BundleHead:
    """What a bundle claims, before verification: manifest bytes and detached signatures."""

    manifest_bytes: bytes
    signatures: tuple[Signature, ...]


class FileSink(Protocol):
    """Where verified file data goes (a staging directory, or nowhere for ``verify``)."""

    def begin(self, entry: FileEntry) -> None: ...

    def write(self, data: bytes) -> None: ...

    def end(self, entry: FileEntry) -> None:
        """The file is complete and its hash matched."""
        ...


class NullSink:
    def begin(self, entry: FileEntry) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def end(self, entry: FileEntry) -> None:
        pass


def read_head(
    reader: ArchiveReader, limits: BundleLimits
) -> tuple[BundleHead, ArchiveEntry | None]:
    """Read ``manifest.json`` and the signatures; returns them and the first entry after."""
    first = reader.next_entry()
    if first is None:
        raise TruncatedArchiveError("the archive has no entries (manifest.json must be first)")
    if first.kind != "file" or first.path != MANIFEST_NAME:
        raise MalformedArchiveError(
            f"the first entry must be {MANIFEST_NAME}, found {first.kind} {first.path!r}"
        )
    if first.size > limits.max_manifest_bytes:
        raise LimitExceededError(
            f"{MANIFEST_NAME} is {first.size} bytes, the limit is {limits.max_manifest_bytes}"
        )
    manifest_bytes = reader.read_all(first)
    signatures: list[Signature] = []
    seen: set[str] = {MANIFEST_NAME}
    entry = reader.next_entry()
    while entry is not None:
        if entry.kind == "dir" and entry.path == SIGNATURES_DIR:
            if entry.path in seen:
                raise DuplicateEntryError(f"archive lists {entry.path!r} twice")
            seen.add(entry.path)
        elif entry.path.startswith(SIGNATURES_DIR + "/"):
            match = SIGNATURE_ENTRY_RE.match(entry.path)
            if match is None or entry.kind != "file":
                raise MalformedArchiveError(
                    f"archive entry {entry.path!r}: signature entries are named "
                    f"{SIGNATURES_DIR}/<64 hex key id>.sig"
                )
            if entry.path in seen:
                raise DuplicateEntryError(f"archive lists {entry.path!r} twice")
            seen.add(entry.path)
            if len(signatures) >= limits.max_signatures:
                raise LimitExceededError(
                    f"bundle carries more than {limits.max_signatures} signatures"
                )
            if entry.size != SIGNATURE_BYTES:
                raise BadSignatureError(
                    f"signature by key {match.group(1)} is {entry.size} bytes, Ed25519 "
                    f"signatures are {SIGNATURE_BYTES}"
                )
            signatures.append(Signature(match.group(1), reader.read_all(entry)))
        else:
            break
        entry = reader.next_entry()
    return BundleHead(manifest_bytes, tuple(signatures)), entry


def refuse_late_signatures(
    reader: ArchiveReader, pending: ArchiveEntry | None, failure: SignatureError
) -> None:
    """After too few signatures verified: if a signature entry comes later in the archive
    (after a model file or a directory entry), the archive is malformed, and saying so is
    more precise than "no signature". Only headers are read; entry data is skipped. Returns
    when there is none (the caller raises ``failure``)."""
    entry = pending
    try:
        while entry is not None and not entry.path.startswith(SIGNATURES_DIR + "/"):
            entry = reader.next_entry()
    except BundleError:
        return  # the archive breaks further on; the signature failure stays the answer
    if entry is not None and pending is not None:
        raise MalformedArchiveError(
            f"signature entry {entry.path!r} at offset {entry.offset} comes after "
            f"{pending.kind} {pending.path!r}; signatures must directly follow "
            f"{MANIFEST_NAME}, so it was not counted ({failure})"
        ) from failure


def _ancestors(manifest: Manifest) -> set[str]:
    dirs: set[str] = set()
    for f in manifest.files:
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
    return dirs


def read_files(
    reader: ArchiveReader, pending: ArchiveEntry | None, manifest: Manifest, sink: FileSink
) -> None:
    """Stream every file of the archive into ``sink``, checking it against ``manifest``."""
    declared = {f.path: f for f in manifest.files}
    allowed_dirs = _ancestors(manifest)
    seen: set[str] = set()
    entry = pending
    while entry is not None:
        if entry.path in seen or entry.path in (MANIFEST_NAME, SIGNATURES_DIR):
            raise DuplicateEntryError(f"archive lists {entry.path!r} twice")
        if entry.path.startswith(SIGNATURES_DIR + "/"):
            raise MalformedArchiveError(
                f"signature entry {entry.path!r} comes after model files; signatures must "
                "directly follow manifest.json"
            )
        seen.add(entry.path)
        if entry.kind == "dir":
            if entry.path not in allowed_dirs:
                raise UnexpectedEntryError(
                    f"archive has directory {entry.path!r}, which holds no file of the manifest"
                )
        else:
            expected = declared.get(entry.path)
            if expected is None:
                raise UnexpectedEntryError(
                    f"archive has {entry.path!r}, which the signed manifest does not list"
                )
            _copy_verified(reader, entry, expected, sink)
        entry = reader.next_entry()
    missing = sorted(set(declared) - seen)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MissingEntryError(
            f"the manifest lists {missing[0]!r}{more}, which the archive does not hold"
        )


def _copy_verified(
    reader: ArchiveReader, entry: ArchiveEntry, expected: FileEntry, sink: FileSink
) -> None:
    if entry.size != expected.size:
        longer = "longer" if entry.size > expected.size else "shorter"
        raise FileSizeMismatchError(
            f"{entry.path}: archive entry is {entry.size} bytes, {longer} than the "
            f"{expected.size} the manifest declares"
        )
    digest = hashlib.sha256()
    sink.begin(expected)
    got = 0
    for chunk in reader.read_chunks(entry):
        got += len(chunk)
        if got > expected.size:  # cannot happen with a sane reader; never write past it
            raise FileSizeMismatchError(f"{entry.path}: more than {expected.size} bytes")
        digest.update(chunk)
        sink.write(chunk)
    actual = digest.hexdigest()
    if actual != expected.sha256:
        raise FileHashMismatchError(
            f"{entry.path}: SHA-256 is {actual}, the manifest says {expected.sha256}"
        )
    sink.end(expected)


def read_bundle(
    stream: BinaryIO,
    verify: Callable[[BundleHead], VerifiedManifest],
    sink: FileSink,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> VerifiedManifest:
    """Read a whole bundle: head, ``verify(head)`` (pure), then the files into ``sink``."""
    reader = ArchiveReader(stream, limits)
    head, pending = read_head(reader, limits)
    verified = verify(head)
    read_files(reader, pending, verified.manifest, sink)
    return verified


def read_unverified(
    stream: BinaryIO, limits: BundleLimits = DEFAULT_LIMITS
) -> tuple[BundleHead, list[ArchiveEntry]]:
    """Head and entry list without any trust decision (for ``edged bundle inspect``)."""
    reader = ArchiveReader(stream, limits)
    head, entry = read_head(reader, limits)
    entries: list[ArchiveEntry] = []
    while entry is not None:
        entries.append(entry)
        for _ in reader.read_chunks(entry):
            pass
        entry = reader.next_entry()
    return head, entries
