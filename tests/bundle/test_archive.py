"""The ustar reader: limits hold against endless input, and any byte string or mutated bundle
ends in a ``BundleError`` or a verified read, never another exception or a hang."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.bundle.archive import ArchiveReader, write_archive
from edged.bundle.limits import BundleLimits
from edged.bundle.reader import BundleHead, NullSink, read_bundle, read_unverified
from edged.bundle.trust import load_trust_state
from edged.bundle.verify import VerifiedManifest, verify_manifest
from edged.errors import (
    BundleError,
    LimitExceededError,
    MalformedArchiveError,
    TruncatedArchiveError,
)
from tests.bundle.helpers import DEVICE, NOW, bundle_bytes, make_keys, trust_documents

SMALL = BundleLimits(
    max_archive_bytes=64 * 1024, max_file_bytes=32 * 1024, max_entries=20, read_chunk_bytes=4096
)


class EndlessStream(io.RawIOBase):
    """``prefix`` followed by an endless supply of ``fill`` bytes; counts what was read."""

    def __init__(self, prefix: bytes, fill: bytes = b"\x00") -> None:
        self.prefix = prefix
        self.fill = fill
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = len(buffer)
        head = self.prefix[self.consumed : self.consumed + n]
        body = (self.fill * (n - len(head) + 1))[: n - len(head)]
        buffer[:n] = head + body
        self.consumed += n
        return n


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def read_all(data: bytes | io.RawIOBase, limits: BundleLimits = SMALL) -> list[str]:
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    reader = ArchiveReader(stream, limits)  # type: ignore[arg-type]
    names = []
    while (entry := reader.next_entry()) is not None:
        names.append(entry.path)
        for _ in reader.read_chunks(entry):
            pass
    return names


def test_round_trip_with_the_writer() -> None:
    out = io.BytesIO()
    write_archive(out, [("a.txt", b"hello"), ("d/b.bin", bytes(range(256)) * 5)])
    assert read_all(out.getvalue()) == ["a.txt", "d/b.bin"]


def test_long_paths_use_the_ustar_prefix_field() -> None:
    long_path = "/".join(["d" * 60] * 3) + "/model.onnx.data"
    out = io.BytesIO()
    write_archive(out, [(long_path, b"x")])
    assert read_all(out.getvalue()) == [long_path]


def test_endless_zero_padding_stops_at_the_archive_limit() -> None:
    out = io.BytesIO()
    write_archive(out, [("a.txt", b"hello")])
    stream = EndlessStream(out.getvalue())
    with pytest.raises(LimitExceededError):
        read_all(stream)
    assert stream.consumed <= SMALL.max_archive_bytes + SMALL.read_chunk_bytes


def test_trailing_padding_is_bounded_below_the_archive_limit() -> None:
    out = io.BytesIO()
    write_archive(out, [("a.txt", b"hello")])
    limits = BundleLimits(max_trailing_padding_bytes=20 * 1024, read_chunk_bytes=4096)
    stream = EndlessStream(out.getvalue())
    with pytest.raises(LimitExceededError, match="padding"):
        read_all(stream, limits)
    assert stream.consumed < 64 * 1024


def test_endless_file_data_is_refused_from_its_header() -> None:
    stream = EndlessStream(header("big.bin", 10**9), fill=b"\xff")
    with pytest.raises(LimitExceededError, match="big.bin"):
        read_all(stream)
    assert stream.consumed == 512


def test_endless_headers_stop_at_the_entry_limit() -> None:
    stream = EndlessStream(b"", fill=header("d", 0, tarfile.DIRTYPE))
    with pytest.raises(LimitExceededError, match="entries"):
        read_all(stream)


def test_lone_zero_block_followed_by_data_is_malformed() -> None:
    out = io.BytesIO()
    write_archive(out, [("a.txt", b"hello")])
    data = out.getvalue()
    end = 1024
    corrupt = data[:end] + b"\x00" * 512 + header("b.txt", 0) + b"\x00" * 1024
    with pytest.raises(MalformedArchiveError):
        read_all(corrupt)


def test_missing_second_end_block_is_truncation() -> None:
    out = io.BytesIO()
    write_archive(out, [("a.txt", b"hello")])
    with pytest.raises(TruncatedArchiveError, match="end-of-archive"):
        read_all(out.getvalue()[: 1024 + 512])


@pytest.fixture(scope="module")
def good_bundle(sources: Path) -> tuple[bytes, bytes, bytes]:
    keys = make_keys(1, 1)
    root, signers = trust_documents(keys)
    return bundle_bytes(sources, keys.signers, 2), root, signers


def _verify_with(root: bytes, signers: bytes) -> Callable[[BundleHead], VerifiedManifest]:
    trust = load_trust_state(root, signers)

    def verify(head: BundleHead) -> VerifiedManifest:
        return verify_manifest(head.manifest_bytes, head.signatures, trust, {}, DEVICE, NOW)

    return verify


def test_good_bundle_reads_and_verifies(good_bundle: tuple[bytes, bytes, bytes]) -> None:
    data, root, signers = good_bundle
    verified = read_bundle(io.BytesIO(data), _verify_with(root, signers), NullSink())
    assert verified.manifest.version == 2
    _, entries = read_unverified(io.BytesIO(data))
    assert [e.path for e in entries] == [f.path for f in verified.manifest.files]


@settings(max_examples=300, deadline=2000)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_raise_only_bundle_errors(data: bytes) -> None:
    try:
        read_all(data)
    except BundleError:
        pass


@settings(max_examples=300, deadline=2000)
@given(st.data())
def test_mutated_bundles_raise_only_bundle_errors(
    good_bundle: tuple[bytes, bytes, bytes], data: st.DataObject
) -> None:
    raw, root, signers = good_bundle
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        if not mutated:
            break
        at = data.draw(st.integers(0, len(mutated) - 1))
        if action == "flip":
            mutated[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set":
            mutated[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del mutated[at:]
        elif action == "insert":
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=600))
        else:
            del mutated[at : at + data.draw(st.integers(1, 600))]
    try:
        read_bundle(io.BytesIO(bytes(mutated)), _verify_with(root, signers), NullSink())
    except BundleError:
        pass
