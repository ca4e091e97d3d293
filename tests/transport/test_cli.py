"""``edged fleet certs`` and ``edged fleet acl``: the offline fleet manager tools."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from edged.cli.app import run_cli
from edged.transport.tls import TlsFiles, certificate_common_name, client_context
from tests.support.daemon import REPO_ROOT


def test_fleet_certs_makes_a_usable_pki(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    assert run_cli(["fleet", "certs", str(out), "--client", "device-1", "--client", "fm"]) == 0
    for name in ("ca", "server", "device-1", "fm"):
        assert stat.S_IMODE((out / f"{name}.key").stat().st_mode) == 0o600
    assert certificate_common_name(out / "device-1.crt") == "device-1"
    client_context(TlsFiles(out / "ca.crt", out / "device-1.crt", out / "device-1.key"))


def test_fleet_acl_prints_the_generated_acl(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = REPO_ROOT / "docs" / "mosquitto"
    assert run_cli(["fleet", "acl", str(folder / "inventory.toml")]) == 0
    assert capsys.readouterr().out == (folder / "edged.acl").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text('[groups]\ndevice-1 = "lab"\n')
    assert run_cli(["fleet", "acl", str(bad)]) == 1
    assert "groups: must map each device id" in capsys.readouterr().err


def test_push_without_certificates_says_what_is_missing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("CA", "CERT", "KEY", "SIGNING_KEY"):
        monkeypatch.delenv(f"EDGED_FLEET_{name}", raising=False)
    assert run_cli(["push", str(tmp_path / "x.bundle"), "--device", "device-1"]) == 1
    assert "--ca-file: is required" in capsys.readouterr().err


def test_config_check_refuses_what_edged_run_refuses(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pki = tmp_path / "pki"
    assert run_cli(["fleet", "certs", str(pki), "--client", "device-1"]) == 0
    config = tmp_path / "edged.toml"
    config.write_text(
        '[mqtt]\nenabled = true\nca_file = "pki/ca.crt"\ncert_file = "pki/device-1.crt"\n'
        'key_file = "pki/device-1.key"\n'
    )
    capsys.readouterr()
    assert run_cli(["config", "check", str(config)]) == 0
    assert "ok (fleet channel as device device-1)" in capsys.readouterr().out
    (pki / "device-1.key").chmod(0o644)
    assert run_cli(["config", "check", str(config)]) == 1
    assert f"chmod 600 {pki / 'device-1.key'}" in capsys.readouterr().err


def test_keygen_makes_the_folder_it_writes_into(tmp_path: Path) -> None:
    assert run_cli(["keygen", str(tmp_path / "keys" / "root")]) == 0
    assert stat.S_IMODE((tmp_path / "keys" / "root.key").stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "root.pub").is_file()


def test_vectors_from_sample_inputs_refuses_wrong_names_and_never_overwrites(
    tmp_path: Path,
) -> None:
    import numpy as np

    from edged.cli.vectors import write_test_vectors
    from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp
    from edged.errors import BundleConfigError

    version = tmp_path / "mlp" / "1"
    write_onnx_mlp(version, SAMPLE_MLP_LAYERS, seed=0)
    (version / "test_vectors.npz").unlink()
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((1, 64), np.float32))
    with pytest.raises(BundleConfigError, match="missing input, unknown image"):
        write_test_vectors(version, wrong)
    good = tmp_path / "inputs.npz"
    np.savez(good, **{"input:input": np.ones((3, 64), np.float64)})  # type: ignore[arg-type]
    out = write_test_vectors(version, good)
    with np.load(out) as npz:
        assert npz["input:input"].dtype == np.float32 and npz["output:output"].shape == (3, 10)
    with pytest.raises(BundleConfigError, match="exists"):
        write_test_vectors(version, good)
