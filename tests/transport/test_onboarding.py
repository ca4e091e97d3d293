"""The README's fleet walkthrough, command for command: a fleet directory, a device, the broker
it configures, the device daemon from the copied folder, and the first push."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edged._net import free_ports
from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp
from edged.modelrepo.config import TEST_VECTORS_FILE
from tests.support.broker import Broker, mosquitto_missing_reason
from tests.support.daemon import SAMPLE_MODELS, running_daemon
from tests.support.pki import FleetPki
from tests.transport.helpers import cli, infer

pytestmark = pytest.mark.integration


def test_a_new_device_joins_with_the_documented_commands_and_gets_its_first_push(
    tmp_path: Path, model_repo: Path, pki: FleetPki
) -> None:
    reason = mosquitto_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    fleet = tmp_path / "fleet"
    device_port, manager_port = free_ports(2)

    # 1. the fleet (test ports on loopback; the README uses the defaults)
    made = cli("fleet", "init", str(fleet), "--broker-host", "127.0.0.1",
               "--device-port", str(device_port), "--manager-port", str(manager_port),
               "--bind-address", "127.0.0.1")  # fmt: skip
    assert made.returncode == 0, made.stderr
    # 2. a device
    added = cli("fleet", "add-device", "device-1", "--group", "lab", "--fleet", str(fleet))
    assert added.returncode == 0, added.stderr

    # The broker runs the generated config; the device runs from its copied folder.
    broker = Broker(
        tmp_path / "broker-run", pki, {}, port=device_port, wrong_host_port=0,
        manager_port=manager_port, config_text=(fleet / "broker" / "mosquitto.conf").read_text(),
    )  # fmt: skip
    device_home = tmp_path / "device-1-host" / "device-1"
    shutil.copytree(fleet / "devices" / "device-1", device_home)
    config = (device_home / "edged.toml").read_text()
    try:
        broker.start()
        with running_daemon(model_repo, device_home, config) as daemon:
            source = tmp_path / "src" / "mlp" / "2"
            write_onnx_mlp(source, SAMPLE_MLP_LAYERS, seed=0, bias_shift=0.5)
            shutil.copy(SAMPLE_MODELS / "mlp" / "config.toml", source.parent / "config.toml")
            # Only sample inputs: the bundle's test vectors come from the tool. (The expected
            # outputs, computed by numpy when the model was written, check them below.)
            with np.load(source / TEST_VECTORS_FILE) as npz:
                x, expected = npz["input:input"], npz["output:output"]
            (source / TEST_VECTORS_FILE).unlink()
            inputs = tmp_path / "inputs.npz"
            np.savez(inputs, input=x)
            bundle = tmp_path / "mlp-2.bundle"
            built = cli("bundle", "build", "--model-dir", str(source), "--name", "mlp",
                        "--version", "2", "--counter", "2", "--vectors-from", str(inputs),
                        "--key", str(fleet / "keys" / "signer.key"), "-o", str(bundle))  # fmt: skip
            assert built.returncode == 0, built.stderr
            with np.load(source / TEST_VECTORS_FILE) as npz:
                np.testing.assert_allclose(npz["output:output"], expected, rtol=1e-3, atol=1e-4)

            # 3. the first push, with nothing but the fleet directory
            pushed = cli("push", str(bundle), "--device", "device-1", "--fleet", str(fleet),
                         "--timeout", "60")  # fmt: skip
            assert pushed.returncode == 0, pushed.stdout + pushed.stderr + daemon.log()
            assert "serving" in pushed.stdout

            version, got = infer(daemon, x)
            assert version == "2"
            np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    finally:
        broker.stop()
    assert "as device-1 (" in broker.log()
