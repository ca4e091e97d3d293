"""Partial downloads on disk: chunk checks, resume by re-hashing, limits, the whole-file check."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from edged.errors import ChunkHashMismatchError, InsufficientSpaceError, TooLargeError
from edged.transport.download import PartialDownload, check_size, check_space
from edged.transport.protocol import Deployment

CHUNK = 256


def deployment_of(data: bytes) -> Deployment:
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    return Deployment(
        id="0f" * 16,
        model="mlp",
        version=2,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        chunk_size=CHUNK,
        chunks=tuple(hashlib.sha256(c).hexdigest() for c in chunks),
        manifest="{}",
        manifest_signatures=(),
    )


def chunk(data: bytes, index: int) -> bytes:
    return data[index * CHUNK : (index + 1) * CHUNK]


DATA = os.urandom(10 * CHUNK + 17)


def test_chunks_in_any_order_make_the_bundle(tmp_path: Path) -> None:
    d = deployment_of(DATA)
    download = PartialDownload.open(tmp_path, d)
    assert download.missing == list(range(11)) and not download.resumed
    for i in reversed(range(11)):
        assert download.store_chunk(i, chunk(DATA, i))
    assert not download.store_chunk(3, chunk(DATA, 3))  # a duplicate is ignored
    path = download.finish()
    assert path.read_bytes() == DATA


def test_a_tampered_chunk_is_refused_and_not_written(tmp_path: Path) -> None:
    d = deployment_of(DATA)
    download = PartialDownload.open(tmp_path, d)
    bad = bytearray(chunk(DATA, 4))
    bad[0] ^= 1
    with pytest.raises(ChunkHashMismatchError, match="chunk 4"):
        download.store_chunk(4, bytes(bad))
    with pytest.raises(ChunkHashMismatchError, match="outside"):
        download.store_chunk(11, b"x")
    assert 4 not in download.have
    assert PartialDownload.open(tmp_path, d).have == set()


def test_reopening_finds_exactly_the_chunks_whose_bytes_are_right(tmp_path: Path) -> None:
    d = deployment_of(DATA)
    first = PartialDownload.open(tmp_path, d)
    for i in (0, 2, 5, 10):
        first.store_chunk(i, chunk(DATA, i))
    # A torn write (power cut mid-chunk) is simply a missing chunk.
    with open(first.part_path, "r+b") as f:
        f.seek(5 * CHUNK + 3)
        f.write(b"\0\0\0")
    again = PartialDownload.open(tmp_path, d)
    assert again.resumed
    assert again.have == {0, 2, 10}
    assert again.bytes_present == 2 * CHUNK + 17


def test_a_finished_bundle_reopened_is_complete(tmp_path: Path) -> None:
    d = deployment_of(DATA)
    download = PartialDownload.open(tmp_path, d)
    for i in range(11):
        download.store_chunk(i, chunk(DATA, i))
    download.finish()
    assert PartialDownload.open(tmp_path, d).complete


def test_size_limit_and_free_space_are_checked_before_downloading(
    tmp_path: Path,
) -> None:
    d = deployment_of(DATA)
    with pytest.raises(TooLargeError, match="max_bundle_bytes"):
        check_size(d, len(DATA) - 1)
    check_size(d, len(DATA))
    free = shutil.disk_usage(tmp_path).free  # other processes change it: keep wide margins
    margin = 64 * 1024 * 1024
    with pytest.raises(InsufficientSpaceError, match="download_reserve_bytes"):
        check_space(d, tmp_path, free + margin)
    check_space(d, tmp_path, 0)
    # What is already on disk counts: a resumed download needs only the rest.
    big = Deployment(**{**vars(d), "size": margin, "chunk_size": margin, "chunks": ("00" * 32,)})
    reserve = free - margin - margin // 2
    with pytest.raises(InsufficientSpaceError):
        check_space(big, tmp_path, reserve)
    check_space(big, tmp_path, reserve, already_bytes=margin)
