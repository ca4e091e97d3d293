"""A bounded check of a bundle's ``.npz`` test vectors, run before anything loads them.

An ``.npz`` is a zip of ``.npy`` arrays, so a signed bundle could still carry a zip bomb, a
corrupt member, or an array header that claims terabytes. This reader decides from the end
record, the central directory and each array header, all checked against ``BundleLimits``
before anything is allocated, and it never decompresses: only stored (uncompressed) members
are accepted, so every byte it reads is a byte of the file. The file is then read in chunks
to check every member's CRC. A file that passes loads with ``numpy.load`` (the same zip and
npy parsers) with at most its declared array bytes allocated.
"""

from __future__ import annotations

import ast
import math
import re
import struct
import zipfile
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np

from edged.bundle.limits import BundleLimits
from edged.errors import VectorFileError

ZIP_LOCAL_MAGIC = b"PK\x03\x04"  # what numpy.load looks for to treat a file as .npz
END_RECORD_MAGIC = b"PK\x05\x06"
ZIP64_LOCATOR_MAGIC = b"PK\x06\x07"
# magic, disk, central directory disk, entries on this disk, entries, cd size, cd offset,
# comment length
END_RECORD = struct.Struct("<4s4H2LH")
MAX_CENTRAL_DIRECTORY_BYTES = 1024 * 1024
MAX_NPY_HEADER_BYTES = 10_000  # numpy.load's own default
ALLOWED_KINDS = frozenset("biufcSU")  # no objects (pickles), no void/structured, no datetimes
MEMBER_RE = re.compile(r"^(input|output):[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}\.npy$")

# What the zip and npy parsers raise on malformed input; anything else is a bug, which the
# installer's generic guard still turns into a logged error.
_PARSE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,
    RuntimeError,
    ValueError,
    SyntaxError,
    TypeError,
    KeyError,
    EOFError,
    OverflowError,
    struct.error,
    MemoryError,
    RecursionError,
)


def check_vector_file(path: Path, label: str, limits: BundleLimits, budget: int) -> int:
    """Check one ``.npz`` test-vector file; return the bytes its arrays take in memory.

    ``budget`` is what is left of ``limits.max_vector_bytes`` for this version. Raises
    ``VectorFileError`` naming ``label`` (the path inside the bundle) and what is wrong.
    """
    try:
        with path.open("rb") as f:
            return _check(f, label, limits, budget)
    except VectorFileError:
        raise
    except OSError as exc:
        raise VectorFileError(f"{label}: cannot read: {exc.strerror or exc}") from exc
    except _PARSE_ERRORS as exc:
        raise VectorFileError(
            f"{label}: not a valid .npz of stored arrays ({type(exc).__name__}: {exc})"
        ) from exc


def _check(f: BinaryIO, label: str, limits: BundleLimits, budget: int) -> int:
    size = f.seek(0, 2)
    f.seek(0)
    if f.read(4) != ZIP_LOCAL_MAGIC:
        raise VectorFileError(f"{label}: not an .npz (a zip starting with a local file header)")
    _check_end_record(f, size, label, limits)
    f.seek(0)
    with zipfile.ZipFile(f) as archive:
        infos = archive.infolist()
        _check_members(infos, size, label, limits)
        total = 0
        for info in infos:
            with archive.open(info) as member:
                nbytes = _check_array(member, info, label)
                total += nbytes
                if total > budget:
                    raise VectorFileError(
                        f"{label}: test-vector arrays exceed {limits.max_vector_bytes} bytes "
                        "for this version (limit max_vector_bytes)"
                    )
                # Reading to the end makes zipfile check the member's CRC.
                while member.read(limits.read_chunk_bytes):
                    pass
    return total


def _check_end_record(f: BinaryIO, size: int, label: str, limits: BundleLimits) -> None:
    """The end record must be the file's last 22 bytes (no comment, no zip64), so zipfile
    reads the same one, and the central directory it points at must be small."""
    if size < len(ZIP_LOCAL_MAGIC) + END_RECORD.size:
        raise VectorFileError(f"{label}: {size} bytes is too short for an .npz")
    f.seek(size - END_RECORD.size)
    magic, disk, cd_disk, here, entries, cd_size, cd_offset, comment = END_RECORD.unpack(
        f.read(END_RECORD.size)
    )
    if magic != END_RECORD_MAGIC or comment != 0:
        raise VectorFileError(
            f"{label}: the zip end record must be the last 22 bytes (no archive comment)"
        )
    if disk or cd_disk or here != entries:
        raise VectorFileError(f"{label}: multi-disk zip archives are not accepted")
    if entries > limits.max_vector_arrays:
        raise VectorFileError(
            f"{label}: {entries} arrays, the limit is {limits.max_vector_arrays} "
            "(limit max_vector_arrays)"
        )
    if cd_size > MAX_CENTRAL_DIRECTORY_BYTES or cd_offset + cd_size != size - END_RECORD.size:
        raise VectorFileError(
            f"{label}: the zip central directory must directly precede the end record and "
            f"be at most {MAX_CENTRAL_DIRECTORY_BYTES} bytes"
        )
    # zipfile looks for a zip64 locator in the 20 bytes before the end record, whatever they
    # belong to, and would then read another central directory: there must be none.
    if size >= END_RECORD.size + 20:
        f.seek(size - END_RECORD.size - 20)
        if f.read(4) == ZIP64_LOCATOR_MAGIC:
            raise VectorFileError(f"{label}: zip64 end records are not accepted")


def _check_members(
    infos: list[zipfile.ZipInfo], size: int, label: str, limits: BundleLimits
) -> None:
    if not infos:
        raise VectorFileError(f"{label}: holds no arrays")
    if len(infos) > limits.max_vector_arrays:
        raise VectorFileError(
            f"{label}: {len(infos)} arrays, the limit is {limits.max_vector_arrays} "
            "(limit max_vector_arrays)"
        )
    names: set[str] = set()
    stored = 0
    for info in infos:
        name = info.filename
        if not MEMBER_RE.match(name):
            raise VectorFileError(
                f"{label}: member {name[:80]!r} is not named input:<name>.npy or output:<name>.npy"
            )
        if name in names:
            raise VectorFileError(f"{label}: member {name!r} appears twice")
        names.add(name)
        if info.compress_type != zipfile.ZIP_STORED:
            raise VectorFileError(
                f"{label}: member {name!r} is compressed; test vectors must be stored "
                "uncompressed (np.savez, not np.savez_compressed)"
            )
        if info.flag_bits & 0x1:
            raise VectorFileError(f"{label}: member {name!r} is encrypted")
        if info.file_size != info.compress_size:
            raise VectorFileError(
                f"{label}: member {name!r} declares {info.file_size} bytes stored in "
                f"{info.compress_size}"
            )
        stored += info.file_size
    # Stored members of a real archive cannot add up to more than the file; overlapping
    # members (the way a zip repeats the same bytes many times) can.
    if stored > size:
        raise VectorFileError(
            f"{label}: members declare {stored} bytes, more than the file's {size} "
            "(overlapping members)"
        )


def _check_array(member: IO[bytes], info: zipfile.ZipInfo, label: str) -> int:
    """Read one ``.npy`` header; its array must fill the rest of the member exactly."""
    name = info.filename
    magic = member.read(8)
    if len(magic) != 8 or magic[:6] != b"\x93NUMPY":
        raise VectorFileError(f"{label}: member {name!r} is not a .npy array")
    major, minor = magic[6], magic[7]
    if (major, minor) not in ((1, 0), (2, 0)):
        raise VectorFileError(
            f"{label}: member {name!r} is .npy format {major}.{minor}; 1.0 and 2.0 are read"
        )
    length_format = "<H" if major == 1 else "<I"
    length_bytes = struct.calcsize(length_format)
    raw_length = member.read(length_bytes)
    if len(raw_length) != length_bytes:
        raise VectorFileError(f"{label}: member {name!r}: truncated .npy header")
    (header_length,) = struct.unpack(length_format, raw_length)
    if header_length > MAX_NPY_HEADER_BYTES:
        raise VectorFileError(
            f"{label}: member {name!r}: .npy header of {header_length} bytes, the limit is "
            f"{MAX_NPY_HEADER_BYTES}"
        )
    header = member.read(header_length)
    if len(header) != header_length:
        raise VectorFileError(f"{label}: member {name!r}: truncated .npy header")
    shape, dtype = _parse_header(header.decode("latin1"), name, label)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    data_bytes = info.file_size - len(magic) - length_bytes - header_length
    if nbytes != data_bytes:
        raise VectorFileError(
            f"{label}: member {name!r} claims shape {shape} of {dtype.str} "
            f"({nbytes} bytes), but holds {data_bytes} bytes of data"
        )
    return nbytes


def _parse_header(text: str, name: str, label: str) -> tuple[tuple[int, ...], np.dtype[np.generic]]:
    value = ast.literal_eval(text)
    if not isinstance(value, dict) or set(value) != {"descr", "fortran_order", "shape"}:
        raise VectorFileError(
            f"{label}: member {name!r}: .npy header must be a dict of descr, fortran_order "
            "and shape"
        )
    shape = value["shape"]
    if (
        not isinstance(shape, tuple)
        or len(shape) > 32
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise VectorFileError(f"{label}: member {name!r}: bad shape {str(shape)[:80]}")
    if not isinstance(value["fortran_order"], bool):
        raise VectorFileError(f"{label}: member {name!r}: fortran_order must be True or False")
    descr = value["descr"]
    if not isinstance(descr, str):
        raise VectorFileError(
            f"{label}: member {name!r}: dtype {str(descr)[:80]} is not a plain numeric type"
        )
    dtype = np.dtype(descr)
    if (
        dtype.kind not in ALLOWED_KINDS
        or dtype.hasobject
        or dtype.shape
        or dtype.names
        or dtype.itemsize == 0
    ):
        raise VectorFileError(
            f"{label}: member {name!r}: dtype {descr!r} is not allowed (numbers, booleans "
            "and fixed-width strings only)"
        )
    return shape, dtype
