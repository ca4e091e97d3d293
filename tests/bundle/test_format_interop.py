"""A bundle made the way docs/bundle-format.md tells an outsider to make one — json.dumps,
OpenSSL and GNU tar, no edged code — installs on a device."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from edged.bundle.keys import load_public_key
from edged.bundle.trust import build_signers
from edged.bundle.truststore import TrustStore
from tests.bundle.helpers import CONFIG_TOML, DAY, MODEL, NOW, World

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("tar") is None,
    reason="needs the openssl and tar programs",
)


def run(*args: str, cwd: Path, stdin: bytes | None = None) -> bytes:
    return subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, check=True).stdout


def test_bundle_made_with_openssl_and_gnu_tar_installs(world: World, tmp_path: Path) -> None:
    work = tmp_path / "signer"
    shutil.copytree(world.sources / MODEL / "2", work / MODEL / "2")
    (work / MODEL / "config.toml").write_bytes(CONFIG_TOML)
    files = {}
    for path in sorted(p for p in work.rglob("*") if p.is_file()):
        data = path.read_bytes()
        files[path.relative_to(work).as_posix()] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
    manifest = {
        "_type": "edged/bundle-manifest",
        "spec_version": 1,
        "model": MODEL,
        "version": 2,
        "counter": 2,
        "created": NOW - DAY,
        "expires": NOW + DAY,
        "targets": {
            "arch": ["aarch64", "x86_64"],
            "runtime": "onnx",
            "providers": [],
            "min_edged_version": "0.1.0",
        },
        "files": files,
        "test_vectors": [f"{MODEL}/2/test_vectors.npz"],
    }
    manifest_bytes = json.dumps(
        manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode()
    (work / "manifest.json").write_bytes(manifest_bytes)

    run("openssl", "genpkey", "-algorithm", "ed25519", "-out", "key.pem", cwd=tmp_path)
    raw_public = run(
        "openssl", "pkey", "-in", "key.pem", "-pubout", "-outform", "DER", cwd=tmp_path
    )[-32:]
    keyid = hashlib.sha256(raw_public).hexdigest()
    (tmp_path / "msg").write_bytes(b"edged/bundle-manifest/v1\x00" + manifest_bytes)
    (work / "signatures").mkdir()
    run(
        "openssl", "pkeyutl", "-sign", "-inkey", "key.pem", "-rawin", "-in", "msg",
        "-out", str(work / "signatures" / f"{keyid}.sig"), cwd=tmp_path,
    )  # fmt: skip
    run(
        "tar",
        "--format=ustar",
        "-cf",
        "../hand.bundle",
        "manifest.json",
        "signatures",
        MODEL,
        cwd=work,
    )

    keys = world.keys
    signer = load_public_key(tmp_path / "key.pem")
    update = build_signers([signer], 1, 2, NOW + DAY, keys.root[:1])
    TrustStore(world.state / "trust").apply_signers_update(update, NOW)
    result = world.install((tmp_path / "hand.bundle").read_bytes())
    assert result.outcome == "installed"
    world.assert_serves(2)
