"""The tamper suite: every attack on a bundle is refused with its own error class, version 1
keeps serving intact, and the attempt leaves nothing on disk.

Every case asserts the same three things (``assert_rejected``): the exact error class, that
CURRENT still names version 1 whose files hash to their manifest and which loads and passes its
test vectors, and that no staging directory, new version directory or temp file is left.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import lzma
import tarfile
from collections.abc import Callable
from typing import Any

import pytest

from edged.bundle.build import make_manifest
from edged.bundle.canonical import encode_canonical
from edged.bundle.keys import CONTEXT_COMMAND, Signature, keyid_of, sign_payload
from edged.bundle.trust import build_signers
from edged.bundle.truststore import TrustStore
from edged.errors import (
    ArchitectureMismatchError,
    BadSignatureError,
    BundleConfigError,
    CompressedArchiveError,
    DuplicateEntryError,
    EdgedError,
    EdgedVersionTooOldError,
    ExpiredBundleError,
    FileHashMismatchError,
    FileSizeMismatchError,
    LimitExceededError,
    LinkEntryError,
    MalformedArchiveError,
    ManifestEncodingError,
    ManifestSchemaError,
    MissingEntryError,
    NoSignaturesError,
    ProviderMismatchError,
    ReplayError,
    RevokedKeyError,
    RollbackError,
    RuntimeMismatchError,
    SelfTestFailedError,
    SpecialEntryError,
    ThresholdNotMetError,
    TruncatedArchiveError,
    TrustExpiredError,
    UnexpectedEntryError,
    UnknownKeyError,
    UnsafePathError,
    VersionConflictError,
)
from tests.bundle.conftest import FAILING_VERSION
from tests.bundle.helpers import (
    DAY,
    DEVICE,
    MODEL,
    NOW,
    World,
    log_entries,
    member_offsets,
    pack,
    rebuild,
    source_files,
    spec,
    split_members,
    tar_members,
    trust_documents,
)


def assert_rejected(world: World, data: bytes, error: type[EdgedError], **kwargs: Any) -> str:
    """Install ``data``; it must fail with exactly ``error`` and change nothing."""
    before = world.snapshot()
    with pytest.raises(EdgedError) as info:
        world.install(data, **kwargs)
    assert type(info.value) is error, f"expected {error.__name__}, got {info.value!r}"
    world.assert_unchanged(before)
    assert log_entries(world.state)[-1]["error"] == error.__name__
    return str(info.value)


def good(world: World) -> bytes:
    return world.bundle(2)


def replace_member(data: bytes, name: str, content: bytes) -> bytes:
    members = split_members(data)
    return rebuild([(i, content if i.name == name else c) for i, c in members])


def insert_after_signatures(data: bytes, info: tarfile.TarInfo, content: bytes | None) -> bytes:
    members = split_members(data)
    at = max(i for i, (m, _) in enumerate(members) if not m.name.startswith("mlp/")) + 1
    raw = [(m, c) for m, c in members]
    raw.insert(at, (info, content if content is not None else b""))
    return rebuild(raw)


def entry(name: str, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


# --- unsigned, unknown, revoked, too few signatures ----------------------------------------


def test_arbitrary_bytes_are_rejected(world: World) -> None:
    assert_rejected(world, b"not a bundle\n" * 200, MalformedArchiveError)


def test_empty_input_is_rejected(world: World) -> None:
    assert_rejected(world, b"", TruncatedArchiveError)


def test_plain_tar_of_model_files_without_manifest_is_rejected(world: World) -> None:
    files = source_files(world.sources, 2)
    data = tar_members([(entry(p), c) for p, c in files.items() if isinstance(c, bytes)])
    message = assert_rejected(world, data, MalformedArchiveError)
    assert "manifest.json" in message


def test_unsigned_bundle_is_rejected(world: World) -> None:
    manifest = make_manifest(spec(2), source_files(world.sources, 2)).to_json()
    assert_rejected(world, pack(manifest, source_files(world.sources, 2), []), NoSignaturesError)


def test_bundle_signed_by_unknown_key_is_rejected(world: World) -> None:
    message = assert_rejected(world, world.bundle(2, keys=[world.keys.outsider]), UnknownKeyError)
    assert "does not know" in message


def test_signature_over_another_manifest_is_rejected(world: World) -> None:
    other = split_members(world.bundle(3))
    other_sig = next(c for i, c in other if i.name.startswith("signatures/"))
    data = good(world)
    name = next(i.name for i, _ in split_members(data) if i.name.startswith("signatures/"))
    assert_rejected(world, replace_member(data, name, other_sig), BadSignatureError)


def test_signature_for_another_purpose_is_rejected(world: World) -> None:
    """A command signature by a trusted key over the manifest bytes is not a manifest one."""
    files = source_files(world.sources, 2)
    manifest = make_manifest(spec(2), files).to_json()
    command_sig = sign_payload(
        world.keys.signers[0], encode_canonical(manifest), context=CONTEXT_COMMAND
    )
    data = pack(manifest, files, [], extra_signatures=[command_sig])
    assert_rejected(world, data, BadSignatureError)


def test_short_signature_is_rejected(world: World) -> None:
    data = good(world)
    name = next(i.name for i, _ in split_members(data) if i.name.startswith("signatures/"))
    assert_rejected(world, replace_member(data, name, b"\x00" * 10), BadSignatureError)


def test_bundle_signed_by_revoked_key_is_rejected(world: World) -> None:
    keys = world.keys
    update = build_signers(
        [k.public_key() for k in keys.signers[1:]],
        1,
        2,
        NOW + 365 * DAY,
        keys.root[:1],
        revoked=[keyid_of(keys.signers[0].public_key())],
    )
    TrustStore(world.state / "trust").apply_signers_update(update, NOW)
    message = assert_rejected(world, world.bundle(2, keys=keys.signers[:1]), RevokedKeyError)
    assert "revoked" in message
    world.install(world.bundle(2, keys=keys.signers[1:2]))
    world.assert_serves(2)


def raise_threshold(world: World, threshold: int) -> None:
    keys = world.keys
    update = build_signers(
        [k.public_key() for k in keys.signers], threshold, 2, NOW + 365 * DAY, keys.root[:1]
    )
    TrustStore(world.state / "trust").apply_signers_update(update, NOW)


def test_too_few_signatures_are_rejected(world: World) -> None:
    raise_threshold(world, 2)
    assert_rejected(world, world.bundle(2, keys=world.keys.signers[:1]), ThresholdNotMetError)


def test_unknown_key_does_not_count_toward_the_threshold(world: World) -> None:
    raise_threshold(world, 2)
    data = world.bundle(2, keys=[world.keys.signers[0], world.keys.outsider])
    message = assert_rejected(world, data, ThresholdNotMetError)
    assert "1 valid" in message


def test_the_same_signature_twice_is_rejected(world: World) -> None:
    raise_threshold(world, 2)
    members = split_members(world.bundle(2, keys=world.keys.signers[:1]))
    sig = next(m for m in members if m[0].name.startswith("signatures/"))
    at = members.index(sig)
    data = rebuild([*members[: at + 1], (copy.copy(sig[0]), sig[1]), *members[at + 1 :]])
    assert_rejected(world, data, DuplicateEntryError)


def test_k_of_n_distinct_signatures_install(world: World) -> None:
    raise_threshold(world, 2)
    world.install(world.bundle(2, keys=world.keys.signers[1:3]))
    world.assert_serves(2)


# --- rollback, replay, freeze ------------------------------------------------------------


def test_lower_counter_is_rejected(world: World) -> None:
    world.install(world.bundle(2))
    assert_rejected(world, world.bundle(3, counter=1), RollbackError)


def test_rollback_is_rejected_even_after_the_newer_version_was_removed(world: World) -> None:
    world.install(world.bundle(3))
    world.rollback(1)
    world.store.discard(world.store.version_dir(MODEL, 3))
    message = assert_rejected(world, world.bundle(2), RollbackError)
    assert "high-water mark 3" in message


def test_same_counter_other_bundle_is_a_replay(world: World) -> None:
    assert_rejected(world, world.bundle(2, counter=1), ReplayError)


def test_reinstalling_the_serving_bundle_is_a_no_op(world: World) -> None:
    before = world.snapshot()
    result = world.install(world.bundle(1))
    assert result.outcome == "already-installed"
    world.assert_unchanged(before)


def test_same_version_number_with_new_contents_is_refused(world: World) -> None:
    files = source_files(world.sources, 2)
    relabelled = {p.replace(f"{MODEL}/2/", f"{MODEL}/1/"): c for p, c in files.items()}
    data = world.bundle(1, counter=5, files=relabelled)
    assert_rejected(world, data, VersionConflictError)


def test_expired_bundle_is_rejected(world: World) -> None:
    data = world.bundle(2, created=NOW - 10 * DAY, expires=NOW - 1)
    assert_rejected(world, data, ExpiredBundleError)


def test_expired_signers_list_freezes_installs(world: World) -> None:
    root, signers = trust_documents(world.keys, expires=NOW - 1)
    TrustStore(world.state / "trust").initialise(root, signers, replace=True)
    assert_rejected(world, world.bundle(2), TrustExpiredError)


# --- mix and match, endless data ---------------------------------------------------------


def test_file_from_another_bundle_is_rejected(world: World) -> None:
    other = dict(split_members(world.bundle(3)))
    data = good(world)
    weights = next(c for i, c in other.items() if i.name.endswith("model.onnx.data"))
    message = assert_rejected(
        world, replace_member(data, f"{MODEL}/2/model.onnx.data", weights), FileHashMismatchError
    )
    assert "model.onnx.data" in message


def test_manifest_of_another_bundle_is_rejected(world: World) -> None:
    other = dict((i.name, c) for i, c in split_members(world.bundle(3)))
    data = replace_member(good(world), "manifest.json", other["manifest.json"])
    assert_rejected(world, data, BadSignatureError)


def test_unlisted_file_is_rejected(world: World) -> None:
    data = insert_after_signatures(good(world), entry(f"{MODEL}/2/extra.bin", size=3), b"abc")
    assert_rejected(world, data, UnexpectedEntryError)


def test_missing_file_is_rejected(world: World) -> None:
    members = [m for m in split_members(good(world)) if m[0].name != f"{MODEL}/2/model.onnx.data"]
    assert_rejected(world, rebuild(members), MissingEntryError)


def test_file_longer_than_declared_is_rejected(world: World) -> None:
    name = f"{MODEL}/2/test_vectors.npz"
    content = dict((i.name, c) for i, c in split_members(good(world)))[name]
    data = replace_member(good(world), name, content + b"\x00" * 1000)
    message = assert_rejected(world, data, FileSizeMismatchError)
    assert "longer" in message


def test_huge_declared_entry_is_rejected_before_reading(world: World) -> None:
    members = split_members(good(world))
    head = rebuild(members[:2]).rstrip(b"\x00")  # manifest + signature, no end marker
    big = entry(f"{MODEL}/2/model.onnx.data", size=0)
    header = bytearray(big.tobuf(format=tarfile.USTAR_FORMAT))
    header[124:136] = b"%011o\x00" % (3 * 1024**3)
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\x00" % sum(header)
    data = head + b"\x00" * (-len(head) % 512) + bytes(header) + b"\x00" * 4096
    assert_rejected(world, data, LimitExceededError)


def test_oversized_manifest_is_rejected_before_reading(world: World) -> None:
    data = tar_members([(entry("manifest.json", size=2 * 1024 * 1024), b"{" * (2 * 1024 * 1024))])
    assert_rejected(world, data, LimitExceededError)


# --- wrong hardware or runtime -----------------------------------------------------------


def test_wrong_architecture_is_rejected(world: World) -> None:
    message = assert_rejected(world, world.bundle(2, arch=("riscv64",)), ArchitectureMismatchError)
    assert DEVICE.arch in message


def test_missing_runtime_is_rejected(world: World) -> None:
    files = {
        p.replace("fc/1/", f"{MODEL}/2/"): c
        for p, c in source_files(world.sources, 1, model="fc").items()
        if p.startswith("fc/1/")
    }
    files[f"{MODEL}/config.toml"] = b""
    data = world.bundle(2, files=files)
    device = type(DEVICE)(DEVICE.arch, frozenset({"onnx"}), DEVICE.providers, "0.1.0")
    assert_rejected(world, data, RuntimeMismatchError, device=device)


def test_missing_provider_is_rejected(world: World) -> None:
    data = world.bundle(2, providers=("TensorrtExecutionProvider",))
    assert_rejected(world, data, ProviderMismatchError)


def test_newer_edged_required_is_rejected(world: World) -> None:
    assert_rejected(world, world.bundle(2, min_edged_version="99.0.0"), EdgedVersionTooOldError)


# --- archive entries ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (entry(f"{MODEL}/2/../../../../tmp/evil", size=4), UnsafePathError),
        (entry("/etc/evil", size=4), UnsafePathError),
        (entry(f"{MODEL}/2/.hidden", size=4), UnsafePathError),
        (entry(f"{MODEL}/2/a\\b", size=4), UnsafePathError),
        (entry(f"{MODEL}/2/link", tarfile.SYMTYPE, linkname="/etc/passwd"), LinkEntryError),
        (entry(f"{MODEL}/2/hard", tarfile.LNKTYPE, linkname="manifest.json"), LinkEntryError),
        (entry(f"{MODEL}/2/tty", tarfile.CHRTYPE, devmajor=5, devminor=0), SpecialEntryError),
        (entry(f"{MODEL}/2/disk", tarfile.BLKTYPE, devmajor=8, devminor=0), SpecialEntryError),
        (entry(f"{MODEL}/2/fifo", tarfile.FIFOTYPE), SpecialEntryError),
        (entry("evil", tarfile.DIRTYPE), UnexpectedEntryError),
    ],
    ids=[
        "dotdot",
        "absolute",
        "hidden",
        "backslash",
        "symlink",
        "hardlink",
        "chardev",
        "blockdev",
        "fifo",
        "stray-dir",
    ],
)
def test_unsafe_entries_are_rejected(
    world: World, bad: tarfile.TarInfo, error: type[EdgedError]
) -> None:
    content = b"evil" if bad.size else None
    assert_rejected(world, insert_after_signatures(good(world), bad, content), error)


def test_duplicate_file_entry_is_rejected(world: World) -> None:
    members = split_members(good(world))
    model = next(m for m in members if m[0].name == f"{MODEL}/2/model.onnx")
    assert_rejected(
        world, rebuild([*members, (copy.copy(model[0]), model[1])]), DuplicateEntryError
    )


def test_pax_extension_header_is_rejected(world: World) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, content in split_members(good(world)):
            info.pax_headers = {"comment": "x"}
            tar.addfile(info, io.BytesIO(content))
    assert_rejected(world, out.getvalue(), SpecialEntryError)


def test_gnu_format_is_rejected(world: World) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, content in split_members(good(world)):
            tar.addfile(info, io.BytesIO(content))
    message = assert_rejected(world, out.getvalue(), MalformedArchiveError)
    assert "ustar" in message


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress], ids=["gzip", "xz"])
def test_compressed_bundle_is_rejected(world: World, compress: Callable[[bytes], bytes]) -> None:
    message = assert_rejected(world, compress(good(world)), CompressedArchiveError)
    assert "uncompressed" in message


def test_data_after_the_end_marker_is_rejected(world: World) -> None:
    assert_rejected(world, good(world) + b"\x01" + b"\x00" * 511, MalformedArchiveError)


def test_signatures_after_model_files_are_a_malformed_archive(world: World) -> None:
    """Verification happens before any model byte is read, so late signatures do not count;
    the refusal says they are misplaced rather than absent."""
    members = split_members(good(world))
    sigs = [m for m in members if m[0].name.startswith("signatures/")]
    rest = [m for m in members if not m[0].name.startswith("signatures/")]
    message = assert_rejected(world, rebuild(rest + sigs), MalformedArchiveError)
    assert "comes after file 'mlp/2/" in message and "carries no signature" in message


def test_a_signature_after_a_directory_entry_is_a_malformed_archive(world: World) -> None:
    members = split_members(good(world))
    directory = tarfile.TarInfo("mlp")
    directory.type = tarfile.DIRTYPE
    reordered = [members[0], (directory, b""), *members[1:]]
    message = assert_rejected(world, rebuild(reordered), MalformedArchiveError)
    assert "comes after dir 'mlp'" in message


def test_a_late_second_signature_is_named_in_the_threshold_refusal(world: World) -> None:
    keys = world.keys
    world.installer().apply_signers_update(
        build_signers([k.public_key() for k in keys.signers], 2, 2, NOW + DAY, keys.root[:1])
    )
    members = split_members(world.bundle(2, keys=keys.signers[:2]))
    late = [m for m in members if m[0].name.startswith("signatures/")][1]
    rest = [m for m in members if m is not late]
    message = assert_rejected(world, rebuild([*rest, late]), MalformedArchiveError)
    assert late[0].name in message and "1 valid signature(s) from trusted keys, 2 required" in (
        message
    )


def test_re_pushing_the_serving_bundle_with_altered_files_says_they_differ(world: World) -> None:
    data = world.bundle(2)
    world.install(data)
    name = f"{MODEL}/2/model.onnx"
    members = split_members(data)
    altered = [(i, c[:-1] + bytes([c[-1] ^ 1]) if i.name == name else c) for i, c in members]
    message = assert_rejected(world, rebuild(altered), FileHashMismatchError)
    assert name in message
    world.rollback(1)
    message = assert_rejected(world, rebuild(altered), FileHashMismatchError)  # reinstall path
    world.assert_serves(1)


def test_a_signature_naming_a_revoked_key_is_not_said_to_be_by_it(world: World) -> None:
    keys = world.keys
    revoked = keys.signers[2]
    world.installer().apply_signers_update(
        build_signers(
            [k.public_key() for k in keys.signers[:2]],
            1,
            2,
            NOW + DAY,
            keys.root[:1],
            [keyid_of(revoked.public_key())],
        )
    )
    junk = Signature(keyid_of(revoked.public_key()), bytes(64))
    files = source_files(world.sources, 2)
    data = pack(make_manifest(spec(2), files).to_json(), files, [], extra_signatures=[junk])
    message = assert_rejected(world, data, RevokedKeyError)
    assert "naming key" in message and "signed by" not in message


def test_a_deep_dot_dot_path_is_called_traversal(world: World) -> None:
    deep = entry(f"{MODEL}/2/" + "../" * 12 + "etc/evil", size=4)
    message = assert_rejected(
        world, insert_after_signatures(good(world), deep, b"evil"), UnsafePathError
    )
    assert "'..' component" in message and "deeper" not in message


def test_null_in_a_signed_manifest_is_called_null(world: World) -> None:
    from edged.bundle.build import sign_manifest, write_bundle

    files = source_files(world.sources, 2)
    manifest: dict[str, Any] = make_manifest(spec(2), files).to_json()
    manifest["model"] = None
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    out = io.BytesIO()
    write_bundle(out, raw, [sign_manifest(raw, world.keys.signers[0])], files)
    message = assert_rejected(world, out.getvalue(), ManifestEncodingError)
    assert "NoneType" not in message and "null values" in message


def test_signature_after_model_files_is_rejected(world: World) -> None:
    members = split_members(world.bundle(2, keys=world.keys.signers[:2]))
    late = [m for m in members if m[0].name.startswith("signatures/")][1]
    rest = [m for m in members if m is not late]
    assert_rejected(world, rebuild([*rest, late]), MalformedArchiveError)


# --- config, self-test -------------------------------------------------------------------


def test_invalid_model_config_is_rejected(world: World) -> None:
    """A signer's builder refuses this config; a hand-made bundle still must not get in."""
    files = source_files(world.sources, 2)
    manifest: dict[str, Any] = make_manifest(spec(2), files).to_json()
    bad = b"[batching]\nmax_batch_sise = 4\n"
    files[f"{MODEL}/config.toml"] = bad
    manifest["files"][f"{MODEL}/config.toml"] = {
        "sha256": hashlib.sha256(bad).hexdigest(),
        "size": len(bad),
    }
    data = pack(manifest, files, world.keys.signers[:1])
    message = assert_rejected(world, data, BundleConfigError)
    assert "max_batch_sise" in message


def test_test_vectors_must_match_the_manifest(world: World) -> None:
    def no_vectors(m: dict[str, Any]) -> None:
        m["test_vectors"] = []

    assert_rejected(world, world.bundle(2, edit=no_vectors), BundleConfigError)


def test_version_failing_its_self_test_is_not_switched_in(world: World) -> None:
    message = assert_rejected(world, world.bundle(FAILING_VERSION), SelfTestFailedError)
    assert "test_vectors.npz" in message
    assert log_entries(world.state)[-1]["outcome"] == "load-failed"


# --- a flipped bit anywhere --------------------------------------------------------------


def test_a_flipped_bit_in_every_member_is_rejected(world: World) -> None:
    data = good(world)
    expected = {"manifest.json": BadSignatureError}
    for name, _, data_offset in member_offsets(data):
        error = expected.get(
            name, BadSignatureError if name.startswith("signatures/") else FileHashMismatchError
        )
        flipped = bytearray(data)
        flipped[data_offset + 7] ^= 0x10
        assert_rejected(world, bytes(flipped), error)


def test_a_flipped_bit_in_every_header_is_rejected(world: World) -> None:
    data = good(world)
    for _, header_offset, _ in member_offsets(data):
        for byte in (0, 130, 149, 300):
            flipped = bytearray(data)
            flipped[header_offset + byte] ^= 0x01
            assert_rejected(world, bytes(flipped), MalformedArchiveError)


# --- every manifest field edited ---------------------------------------------------------


def _leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaf_paths(v, (*prefix, k))]
    if isinstance(value, list) and value:
        return [p for i, v in enumerate(value) for p in _leaf_paths(v, (*prefix, i))]
    return [prefix]


def _edited(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1")
    return ["x"]


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def test_every_manifest_field_edited_without_resigning_is_rejected(world: World) -> None:
    data = good(world)
    manifest_bytes = dict((i.name, c) for i, c in split_members(data))["manifest.json"]
    manifest = json.loads(manifest_bytes)
    paths = _leaf_paths(manifest)
    assert len(paths) >= 15
    for path in paths:
        edited = copy.deepcopy(manifest)
        _set(edited, path, _edited(_get(manifest, path)))
        assert_rejected(
            world,
            replace_member(data, "manifest.json", encode_canonical(edited)),
            BadSignatureError,
        )


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _files_key(m: dict[str, Any], suffix: str) -> str:
    return next(str(k) for k in m["files"] if k.endswith(suffix))


# Edits a trusted signer could make (re-signed): each must still be refused, each for its
# own reason.
RESIGNED_EDITS: list[tuple[str, Callable[[dict[str, Any]], None], type[EdgedError]]] = [
    ("_type", lambda m: m.update(_type="edged/other"), ManifestSchemaError),
    ("spec_version", lambda m: m.update(spec_version=2), ManifestSchemaError),
    ("model", lambda m: m.update(model="other"), ManifestSchemaError),
    ("version", lambda m: m.update(version=7), ManifestSchemaError),
    ("counter-zero", lambda m: m.update(counter=0), ManifestSchemaError),
    ("counter-replay", lambda m: m.update(counter=1), ReplayError),
    ("created-after-expires", lambda m: m.update(created=m["expires"] + 1), ManifestSchemaError),
    ("expires", lambda m: m.update(expires=NOW), ExpiredBundleError),
    ("arch", lambda m: m["targets"].update(arch=["mips"]), ArchitectureMismatchError),
    ("runtime", lambda m: m["targets"].update(runtime="tflite"), ManifestSchemaError),
    ("providers", lambda m: m["targets"].update(providers=["X"]), ProviderMismatchError),
    (
        "min_edged_version",
        lambda m: m["targets"].update(min_edged_version="1.0.0"),
        EdgedVersionTooOldError,
    ),
    (
        "min_edged_version-bad",
        lambda m: m["targets"].update(min_edged_version="1.0"),
        ManifestSchemaError,
    ),
    (
        "file-size",
        lambda m: m["files"][_files_key(m, ".data")].update(size=1),
        FileSizeMismatchError,
    ),
    (
        "file-sha256",
        lambda m: m["files"][_files_key(m, ".data")].update(sha256="0" * 64),
        FileHashMismatchError,
    ),
    (
        "file-renamed",
        lambda m: m["files"].update({"mlp/2/renamed": m["files"].pop(_files_key(m, ".npz"))}),
        ManifestSchemaError,
    ),
    (
        "file-other-model",
        lambda m: m["files"].update({"fc/1/model.onnx": m["files"][_files_key(m, ".onnx")]}),
        ManifestSchemaError,
    ),
    (
        "file-traversal",
        lambda m: m["files"].update({"mlp/2/../x": m["files"][_files_key(m, ".onnx")]}),
        UnsafePathError,
    ),
    (
        "file-extra",
        lambda m: m["files"].update({"mlp/2/extra": {"sha256": "0" * 64, "size": 1}}),
        MissingEntryError,
    ),
    ("test_vectors", lambda m: m.update(test_vectors=[]), BundleConfigError),
    ("unknown-field", lambda m: m.update(comment="x"), ManifestSchemaError),
    ("missing-field", lambda m: m.pop("targets"), ManifestSchemaError),
]


@pytest.mark.parametrize(
    ("edit", "error"),
    [(e, err) for _, e, err in RESIGNED_EDITS],
    ids=[n for n, _, _ in RESIGNED_EDITS],
)
def test_every_manifest_field_edited_and_resigned_is_rejected(
    world: World, edit: Callable[[dict[str, Any]], None], error: type[EdgedError]
) -> None:
    assert_rejected(world, world.bundle(2, edit=edit), error)


# --- truncation --------------------------------------------------------------------------


def test_truncation_at_any_point_is_rejected(world: World) -> None:
    data = good(world)
    offsets = member_offsets(data)
    last_data_end = len(data.rstrip(b"\x00"))
    end_marker = last_data_end + (-last_data_end % 512)
    cuts = {1, 100, 511, 512, 700, end_marker, end_marker + 512, end_marker + 1000}
    for _, header, start in offsets:
        cuts |= {header + 1, header + 256, start, start + 1, start + 513}
    for cut in sorted(c for c in cuts if c < end_marker + 1024):
        assert_rejected(world, data[:cut], TruncatedArchiveError)
