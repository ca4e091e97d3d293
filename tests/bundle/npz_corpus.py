"""Malformed ``.npz`` test vectors: hand-made attacks and hypothesis strategies that mutate a
valid file. Shared by the unit tests and the fuzz driver (which runs in a subprocess to
measure its peak memory)."""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable

import numpy as np
from hypothesis import strategies as st

END_RECORD = struct.Struct("<4s4H2LH")


def valid_npz() -> bytes:
    buf = io.BytesIO()
    arrays = {"input:input": np.arange(8, dtype=np.float32).reshape(2, 4)}
    outputs = {"output:output": np.ones((2, 3), dtype=np.float32)}
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in {**arrays, **outputs}.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return buf.getvalue()


def npz_of(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def cd_offset(data: bytes) -> int:
    return int(END_RECORD.unpack(data[-END_RECORD.size :])[6])


def bad_crc() -> bytes:
    data = bytearray(valid_npz())
    data[cd_offset(bytes(data)) - 1] ^= 0xFF  # last byte of the last member's array data
    return bytes(data)


def bad_deflate() -> bytes:
    data = npz_of({"input:input.npy": b"x" * 200}, zipfile.ZIP_DEFLATED)
    raw = bytearray(data)
    start = 30 + len("input:input.npy")
    raw[start : start + 8] = b"\xff" * 8  # not a deflate stream
    return bytes(raw)


def deflate_bomb(array_bytes: int) -> bytes:
    """A deflated member that expands to an ``array_bytes`` float32 array of zeros."""
    header = npy_header("<f4", (array_bytes // 4,))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunks = [compressor.compress(header)]
    zeros = bytes(1 << 20)
    for _ in range(array_bytes >> 20):
        chunks.append(compressor.compress(zeros))
    chunks.append(compressor.flush())
    stream = b"".join(chunks)
    size = len(header) + array_bytes
    crc = zlib.crc32(header)
    for _ in range(array_bytes >> 20):
        crc = zlib.crc32(zeros, crc)
    name = b"input:input.npy"
    local = struct.pack(
        "<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0x21, crc, len(stream), size, len(name), 0
    )
    central = struct.pack(
        "<4s6H3L5H2L",
        b"PK\x01\x02",
        20,
        20,
        0,
        8,
        0,
        0x21,
        crc,
        len(stream),
        size,
        len(name),
        0,
        0,
        0,
        0,
        0,
        0,
    )
    body = local + name + stream
    cd = central + name
    end = END_RECORD.pack(b"PK\x05\x06", 0, 0, 1, 1, len(cd), len(body), 0)
    return body + cd + end


def huge_shape() -> bytes:
    """A stored member whose header claims 2**40 float32 (4 TiB) over 16 bytes of data."""
    return npz_of({"input:input.npy": npy_header("<f4", (2**40,)) + bytes(16)})


def object_dtype() -> bytes:
    return npz_of({"input:input.npy": npy_header("|O", (1,)) + b"\x80\x04N."})


def duplicate_member() -> bytes:
    array = io.BytesIO()
    np.save(array, np.zeros(2, np.float32))
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as archive:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it writes
        archive.writestr("input:input.npy", array.getvalue())
        archive.writestr("input:input.npy", array.getvalue())
    return buf.getvalue()


def with_comment() -> bytes:
    buf = io.BytesIO(valid_npz())
    with zipfile.ZipFile(buf, "a") as archive:
        archive.comment = b"hidden"
    return buf.getvalue()


def zip64_locator() -> bytes:
    """An empty-looking zip whose last bytes before the end record are a zip64 locator, which
    would send zipfile to a zip64 record naming another central directory."""
    body = b"PK\x03\x04" + bytes(100)
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 10**6, 10**6, 1 << 40, 0)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(body), 1)
    data = body + record + locator
    return data + END_RECORD.pack(b"PK\x05\x06", 0, 0, 0, 0, 0, len(data), 0)


def many_members(count: int) -> bytes:
    array = io.BytesIO()
    np.save(array, np.zeros(1, np.float32))
    return npz_of({f"input:x{i}.npy": array.getvalue() for i in range(count)})


BOMB_ARRAY_BYTES = 256 << 20

ATTACKS: dict[str, Callable[[], bytes]] = {
    "deflate-bomb": lambda: deflate_bomb(BOMB_ARRAY_BYTES),  # ~260 KB on the wire
    "bad-crc": bad_crc,
    "bad-deflate": bad_deflate,
    "huge-shape": huge_shape,
    "object-dtype": object_dtype,
    "duplicate-member": duplicate_member,
    "archive-comment": with_comment,
    "too-many-members": lambda: many_members(1025),
    "zip64-locator": zip64_locator,
    "not-a-zip": lambda: b"\x93NUMPY\x01\x00" + bytes(100),
    "empty": lambda: b"",
    "truncated": lambda: valid_npz()[:-30],
}


@st.composite
def mutated_npz(draw: st.DrawFn) -> bytes:
    """A valid file with some bytes replaced, cut, or a forged array header spliced in."""
    data = bytearray(valid_npz())
    kind = draw(st.sampled_from(["flip", "truncate", "header", "splice"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.integers(0, 255))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif kind == "header":
        descr = draw(st.sampled_from(["<f4", "<f8", "|u1", "|O", "<U5", "|V8", "<M8[s]", "|b1"]))
        shape = tuple(draw(st.lists(st.integers(0, 2**62), max_size=4)))
        body = draw(st.binary(max_size=64))
        compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
        return npz_of({"input:input.npy": npy_header(descr, shape) + body}, compression)
    else:
        position = draw(st.integers(0, len(data)))
        data[position:position] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)
