"""The signer's and operator's commands, end to end through ``edged`` argument parsing."""

from __future__ import annotations

import json
import shlex
import shutil
import stat
from pathlib import Path

import pytest

from edged.bundle.keys import keyid_of, load_public_key
from edged.bundle.offline import install_direct
from edged.bundle.truststore import TrustStore
from edged.cli.app import run_cli
from edged.errors import RevokedKeyError
from tests.bundle.helpers import CONFIG_TOML, MODEL


@pytest.fixture
def workdir(tmp_path: Path, sources: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(sources / MODEL / "2", tmp_path / "src" / MODEL / "2")
    (tmp_path / "src" / MODEL / "config.toml").write_bytes(CONFIG_TOML)
    for name in ("root", "rel1", "rel2"):
        assert run_cli(["keygen", name]) == 0
    return tmp_path


def cli(command: str) -> int:
    return run_cli(shlex.split(command))


def build(counter: int = 2, *keys: str) -> int:
    key_args = " ".join(f"--key {k}.key" for k in keys or ("rel1",))
    return cli(
        f"bundle build --model-dir src/{MODEL}/2 --name {MODEL} --version 2 --counter {counter} "
        f"{key_args} -o mlp-2.bundle"
    )


def test_keygen_writes_a_private_key_only_its_owner_can_read(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stat.S_IMODE((workdir / "root.key").stat().st_mode) == 0o600
    assert "PRIVATE KEY" not in (workdir / "root.pub").read_text()
    assert run_cli(["keygen", "root"]) == 1  # never overwrites
    assert "refusing to overwrite" in capsys.readouterr().err


def test_sign_verify_install_round_trip(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli(
            "trust init --out trust --root-key root.key --signer rel1.pub --signer rel2.pub --threshold 2"
        )
        == 0
    )
    assert build(2, "rel1") == 0
    capsys.readouterr()
    assert run_cli(["bundle", "verify", "mlp-2.bundle", "--trust", "trust"]) == 1
    assert "ThresholdNotMetError" in capsys.readouterr().out
    assert run_cli(["bundle", "sign", "mlp-2.bundle", "--key", "rel2.key"]) == 0
    assert run_cli(["bundle", "verify", "mlp-2.bundle", "--trust", "trust"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "files" in out

    assert run_cli(["bundle", "inspect", "mlp-2.bundle", "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["manifest"]["counter"] == 2
    assert len(inspected["signatures"]) == 2

    state = workdir / "state"
    shutil.copytree(workdir / "trust", state / "trust")
    result = install_direct(state, workdir / "mlp-2.bundle")
    assert result.outcome == "installed"
    assert (
        run_cli(["bundle", "verify", "mlp-2.bundle", "--trust", "trust", "--state", str(state)])
        == 0
    )


def test_trust_update_revokes_a_key_on_the_device(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli("trust init --out trust --root-key root.key --signer rel1.pub --signer rel2.pub") == 0
    )
    device = workdir / "device-trust"
    shutil.copytree(workdir / "trust", device)
    rel1 = keyid_of(load_public_key(workdir / "rel1.pub"))
    assert (
        cli(f"trust update --trust trust --root-key root.key --revoke {rel1} -o signers-v2.json")
        == 0
    )
    assert run_cli(["trust", "apply", "signers-v2.json", "--trust", str(device)]) == 0
    state = TrustStore(device).load()
    assert state.signers.version == 2
    assert rel1 in state.signers.revoked
    assert run_cli(["trust", "show", "--trust", str(device)]) == 0
    assert "revoked" in capsys.readouterr().out
    assert build(2, "rel1") == 0
    assert run_cli(["bundle", "verify", "mlp-2.bundle", "--trust", str(device)]) == 1
    assert RevokedKeyError.__name__ in capsys.readouterr().out
    # An older signers document cannot be applied over the newer one.
    assert run_cli(["trust", "apply", "trust/signers.json", "--trust", str(device)]) == 1


def test_root_threshold_collects_signatures(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["keygen", "root2"]) == 0
    assert (
        cli(
            "trust init --out trust --root-key root.key --root-pub root2.pub --root-threshold 2 --signer rel1.pub"
        )
        == 1
    )
    assert "trust sign" in capsys.readouterr().err
    assert run_cli(["trust", "sign", "trust/root.json", "--key", "root2.key"]) == 0
    assert run_cli(["trust", "sign", "trust/signers.json", "--key", "root2.key"]) == 0
    assert TrustStore(workdir / "trust").load().root.threshold == 2


def test_a_non_json_daemon_answer_is_one_api_error_line() -> None:
    from edged.cli.install import _result_document
    from edged.errors import ApiError

    with pytest.raises(
        ApiError, match=r"daemon answered 500: 500 Internal Server Error \(not JSON\)"
    ):
        _result_document(500, b"500 Internal Server Error\n\nServer got itself in trouble")
    doc = {"outcome": "rejected", "error": "VectorFileError"}
    assert _result_document(409, json.dumps(doc).encode()) == doc


def test_verify_checks_the_test_vectors_like_a_device(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.bundle.npz_corpus import cd_offset

    assert cli("trust init --out trust --root-key root.key --signer rel1.pub") == 0
    assert build() == 0
    capsys.readouterr()
    assert run_cli(["bundle", "verify", "mlp-2.bundle", "--trust", "trust"]) == 0
    assert "test vectors" in capsys.readouterr().out
    vectors = workdir / "src" / MODEL / "2" / "test_vectors.npz"
    raw = bytearray(vectors.read_bytes())
    raw[cd_offset(bytes(raw)) - 1] ^= 0xFF  # a bad CRC, signed like everything else
    vectors.write_bytes(bytes(raw))
    assert build() == 0
    capsys.readouterr()
    assert run_cli(["bundle", "verify", "mlp-2.bundle", "--trust", "trust"]) == 1
    out = capsys.readouterr().out
    assert "VectorFileError" in out
