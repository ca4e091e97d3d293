"""A strict streaming reader (and a writer) for the bundle container: uncompressed POSIX ustar.

The reader accepts regular files and directories only, with safe relative paths; it never
seeks, checks every limit before reading the bytes a header announces, and raises one specific
``ArchiveError`` for everything else (compressed input, links, devices, pax/GNU extension
headers, bad checksums, truncation, data after the end marker). It never touches the file
system: callers decide where entry data goes.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from edged.bundle.limits import DEFAULT_LIMITS, BundleLimits
from edged.bundle.manifest import check_relative_path
from edged.errors import (
    CompressedArchiveError,
    LimitExceededError,
    LinkEntryError,
    MalformedArchiveError,
    SpecialEntryError,
    TruncatedArchiveError,
    UnsafePathError,
)

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_OCTAL_RE = re.compile(rb"^[0-7]+$")

# Leading bytes of formats people might hand us instead of a plain tar.
_COMPRESSION_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"\x5d\x00\x00", "lzma"),
    (b"PK\x03\x04", "zip"),
)

_TYPE_NAMES = {
    b"3": "character device",
    b"4": "block device",
    b"6": "FIFO",
    b"7": "contiguous file",
    b"x": "pax extended header",
    b"g": "pax global header",
    b"L": "GNU long-name header",
    b"K": "GNU long-link header",
    b"S": "GNU sparse file",
    b"V": "GNU volume header",
    b"M": "GNU multi-volume entry",
    b"D": "GNU dump directory",
}


@dataclass(frozen=True)
class ArchiveEntry:
    path: str  # relative, '/'-separated, no trailing slash
    kind: Literal["file", "dir"]
    size: int
    offset: int  # of the header block, for error messages


def _cstring(field: bytes) -> bytes:
    return field.split(b"\x00", 1)[0]


def _octal(field: bytes, what: str, offset: int) -> int:
    if field[:1] and field[0] & 0x80:
        raise MalformedArchiveError(
            f"header at offset {offset}: {what} uses base-256 encoding, which ustar bundles "
            "do not allow (a file over 8 GiB?)"
        )
    digits = field.rstrip(b"\x00 ").lstrip(b" ")
    if not _OCTAL_RE.match(digits):
        raise MalformedArchiveError(
            f"header at offset {offset}: {what} field {field!r} is not an octal number"
        )
    return int(digits, 8)


def detect_compression(head: bytes) -> str | None:
    for magic, name in _COMPRESSION_MAGIC:
        if head.startswith(magic):
            return name
    return None


def parse_header(block: bytes, offset: int, limits: BundleLimits) -> ArchiveEntry:
    """One 512-byte ustar header -> an entry, or the specific error."""
    stored = _octal(block[148:156], "checksum", offset)
    computed = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored != computed:
        raise MalformedArchiveError(
            f"header at offset {offset}: checksum {stored} does not match the header's bytes "
            f"({computed}); the archive is corrupt"
        )
    magic, version = block[257:263], block[263:265]
    if magic == b"ustar " and version == b" \x00":
        raise MalformedArchiveError(
            f"header at offset {offset} is in GNU tar format; build bundles as POSIX ustar "
            "(tar --format=ustar, or Python tarfile.USTAR_FORMAT)"
        )
    if magic != b"ustar\x00" or version != b"00":
        raise MalformedArchiveError(
            f"header at offset {offset} is not a POSIX ustar header (magic {magic!r})"
        )
    name, prefix = _cstring(block[0:100]), _cstring(block[345:500])
    raw_path = prefix + b"/" + name if prefix else name
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        raise UnsafePathError(f"entry at offset {offset}: path {raw_path!r} is not ASCII") from None
    flag = block[156:157]
    size = _octal(block[124:136], "size", offset)
    if flag in (b"1", b"2"):
        link = _cstring(block[157:257]).decode("ascii", "backslashreplace")
        kind = "hard link" if flag == b"1" else "symbolic link"
        raise LinkEntryError(
            f"entry {path!r} at offset {offset} is a {kind} to {link!r}; bundles hold regular "
            "files only"
        )
    if flag not in (b"0", b"\x00", b"5"):
        what = _TYPE_NAMES.get(flag, f"entry of type {flag!r}")
        raise SpecialEntryError(
            f"entry {path!r} at offset {offset} is a {what}; bundles hold regular files and "
            "directories only"
        )
    if flag == b"5":
        path = path[:-1] if path.endswith("/") else path
        if size != 0:
            raise MalformedArchiveError(
                f"directory entry {path!r} at offset {offset} declares {size} bytes of data"
            )
    check_relative_path(path, limits, f"archive entry at offset {offset}")
    return ArchiveEntry(path, "dir" if flag == b"5" else "file", size, offset)


class ArchiveReader:
    """Iterate the entries of a ustar stream; read each file's data exactly once, in order."""

    def __init__(self, stream: BinaryIO, limits: BundleLimits = DEFAULT_LIMITS) -> None:
        self._stream = stream
        self._limits = limits
        self._offset = 0
        self._entries = 0
        self._unread = 0  # data + padding bytes of the current entry not consumed yet
        self._finished = False

    @property
    def offset(self) -> int:
        return self._offset

    def _read(self, n: int, where: str) -> bytes:
        """Exactly ``n`` bytes, or ``TruncatedArchiveError`` naming ``where``."""
        if self._offset + n > self._limits.max_archive_bytes:
            raise LimitExceededError(
                f"archive is larger than the limit of {self._limits.max_archive_bytes} bytes "
                f"({where})"
            )
        parts: list[bytes] = []
        got = 0
        while got < n:
            chunk = self._stream.read(n - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
        self._offset += len(data)
        if got < n:
            raise TruncatedArchiveError(
                f"archive ends at offset {self._offset}, {where} ({got} of {n} bytes)"
            )
        return data

    def _skip_unread(self) -> None:
        while self._unread:
            n = min(self._unread, self._limits.read_chunk_bytes)
            self._read(n, "inside skipped entry data")
            self._unread -= n

    def next_entry(self) -> ArchiveEntry | None:
        """The next entry's header, or None after a valid end-of-archive marker."""
        if self._finished:
            return None
        self._skip_unread()
        at = self._offset
        if at == 0:
            head = self._stream.read(BLOCK)
            compression = detect_compression(head)
            if compression is not None:
                raise CompressedArchiveError(
                    f"the bundle is {compression}-compressed; edged accepts only uncompressed "
                    "tar (model weights barely compress, and refusing compression rules out "
                    "decompression bombs)"
                )
            if not head:
                raise TruncatedArchiveError("the bundle is empty")
            self._offset = len(head)
            block = head + (
                self._read(BLOCK - len(head), "in the first header") if len(head) < BLOCK else b""
            )
        else:
            block = self._read(BLOCK, "in a header block")
        if block == _ZERO_BLOCK:
            self._finish()
            return None
        self._entries += 1
        if self._entries > self._limits.max_entries:
            raise LimitExceededError(f"archive has more than {self._limits.max_entries} entries")
        entry = parse_header(block, at, self._limits)
        if entry.size > self._limits.max_file_bytes:
            raise LimitExceededError(
                f"entry {entry.path!r} is {entry.size} bytes, the limit is "
                f"{self._limits.max_file_bytes}"
            )
        padded = entry.size + (-entry.size) % BLOCK
        if self._offset + padded > self._limits.max_archive_bytes:
            raise LimitExceededError(
                f"entry {entry.path!r} would take the archive past the limit of "
                f"{self._limits.max_archive_bytes} bytes"
            )
        self._unread = padded
        return entry

    def read_chunks(self, entry: ArchiveEntry) -> Iterator[bytes]:
        """The data of ``entry`` (the entry ``next_entry`` just returned), chunk by chunk."""
        remaining = entry.size
        while remaining:
            n = min(remaining, self._limits.read_chunk_bytes)
            chunk = self._read(n, f"inside {entry.path!r}")
            remaining -= n
            self._unread -= n
            yield chunk
        padding = self._unread
        if padding:
            self._read(padding, f"in the padding after {entry.path!r}")
            self._unread = 0

    def read_all(self, entry: ArchiveEntry) -> bytes:
        return b"".join(self.read_chunks(entry))

    def _finish(self) -> None:
        """After the first zero block: the second one, then only zero padding until EOF."""
        second = self._read(BLOCK, "in the end-of-archive marker (two zero blocks)")
        if second != _ZERO_BLOCK:
            raise MalformedArchiveError(
                f"a lone zero block at offset {self._offset - 2 * BLOCK} is followed by data; "
                "the archive is corrupt"
            )
        end = self._offset
        while True:
            chunk = self._stream.read(self._limits.read_chunk_bytes)
            if not chunk:
                break
            if self._offset + len(chunk) > self._limits.max_archive_bytes:
                raise LimitExceededError(
                    f"archive is larger than the limit of {self._limits.max_archive_bytes} bytes"
                )
            if self._offset + len(chunk) - end > self._limits.max_trailing_padding_bytes:
                raise LimitExceededError(
                    f"more than {self._limits.max_trailing_padding_bytes} bytes of padding "
                    f"after the end-of-archive marker at offset {end}"
                )
            if chunk.count(0) != len(chunk):
                first = next(i for i, b in enumerate(chunk) if b)
                raise MalformedArchiveError(
                    f"data after the end-of-archive marker at offset {self._offset + first}"
                )
            self._offset += len(chunk)
        self._finished = True


# --- writing -----------------------------------------------------------------------------


def write_archive(
    out: BinaryIO, members: Sequence[tuple[str, bytes | Path]], mtime: int = 0
) -> None:
    """Write ``members`` (path, bytes or a file to copy) as a ustar archive, in that order.

    Deterministic: fixed owner, mode 0644 and ``mtime``, so the same inputs give the same bytes.
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                info.size = content.stat().st_size
                with content.open("rb") as f:
                    tar.addfile(info, f)
