"""Bundles over HTTPS from artifact mirrors: a real ``edged run`` daemon, a real Mosquitto for
the signed ``deploy``, and a real nginx (TLS, Range) serving ``<sha256>.bundle``. The transfer
is cut (server stopped mid-file, daemon SIGKILLed mid-file), a mirror lies, a mirror is down,
a private mirror wants the device's certificate; serving never fails meanwhile."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged._net import free_port
from edged.bundle.build import BundleSpec, build_bundle_from_dir
from edged.bundle.store import ModelStore
from edged.demo.samples import write_onnx_mlp
from edged.fleet.artifacts import ArtifactStore
from edged.fleet.channel import (
    ManagerSettings,
    PreparedBundle,
    clean_chunks,
    deploy_command,
    prepare_bundle,
    send_command,
    wait_online,
    wait_progress,
)
from edged.transport.protocol import Progress, artifact_name
from edged.transport.topics import Target
from tests.support.broker import Broker
from tests.support.daemon import SAMPLE_MODELS, DaemonProcess
from tests.support.load import InferenceLoad
from tests.support.nginx import Nginx, Site, nginx_missing_reason, running_nginx
from tests.support.pki import FleetPki, SigningKeys
from tests.transport.conftest import Devices
from tests.transport.helpers import cli, connection_args, infer, run

pytestmark = pytest.mark.integration

BIG_LAYERS = (64, 512, 512, 10)  # ~1.2 MB: long enough at the rate limit to be cut mid-file
CHUNK = 16 * 1024
RATE = "192k"  # per connection on the good mirror


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory, signing: SigningKeys) -> tuple[bytes, Path]:
    directory = tmp_path_factory.mktemp("artifact-release")
    source = directory / "src" / "mlp" / "5"
    write_onnx_mlp(source, BIG_LAYERS, seed=1, bias_shift=0.5)
    shutil.copy(SAMPLE_MODELS / "mlp" / "config.toml", source.parent / "config.toml")
    out = directory / "mlp-5.bundle"
    build_bundle_from_dir(source, BundleSpec.starting_now("mlp", 5, 5), [signing.signer], out)
    return out.read_bytes(), source


@pytest.fixture
def nginx(tmp_path: Path, pki: FleetPki) -> Iterator[Nginx]:
    reason = nginx_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    sites = [Site("good", rate=RATE, client_cert=True), Site("liar")]
    with running_nginx(tmp_path / "nginx", pki, sites) as server:
        yield server


def stock(nginx: Nginx, data: bytes) -> tuple[str, str, str]:
    """The release on the good mirror, a copy with every chunk but the first altered on the
    liar; the base URLs of a mirror that is down, the liar and the good one."""
    good = ArtifactStore(nginx.root("good") / "artifacts", (nginx.base_url("good"),))
    path = good.publish(data)
    bad = bytearray(data)
    for offset in range(CHUNK + 7, len(bad), CHUNK):
        bad[offset] ^= 0xFF
    (nginx.root("liar") / "artifacts" / path.name).write_bytes(bytes(bad))
    down = f"https://localhost:{free_port()}/artifacts"
    return down, nginx.base_url("liar"), nginx.base_url("good")


def start_device(devices: Devices, pki: FleetPki, device: str, client_cert: bool) -> DaemonProcess:
    return devices.start(
        device,
        artifact_ca_file=str(pki.ca_file),
        artifact_client_cert=client_cert,
        artifact_request_bytes=256 * 1024,
        download_stall_timeout_s=30.0,
    )


def test_a_release_from_https_mirrors_survives_a_server_stop_and_a_sigkill_mid_file(
    devices: Devices,
    manager: ManagerSettings,
    signing: SigningKeys,
    nginx: Nginx,
    pki: FleetPki,
    release: tuple[bytes, Path],
) -> None:
    data, source = release
    down, liar, good = stock(nginx, data)
    urls = [f"{base}/{artifact_name(hashlib.sha256(data).hexdigest())}"
            for base in (down, liar, good)]  # fmt: skip
    prepared = prepare_bundle(data, CHUNK, urls=urls)
    d = prepared.deployment
    daemon = start_device(devices, pki, "device-1", client_cert=True)
    run(wait_online(manager, ["device-1"], timeout_s=20))

    def on_disk(floor: int) -> Callable[[Progress], bool]:
        return lambda p: p.deployment == d.id and p.state == "received" and p.chunks_done > floor

    with InferenceLoad(daemon.port) as load:
        run(announce_to(manager, signing, prepared, "device-1"))
        quarter = d.chunk_count // 4
        seen = run(wait_progress(manager, "device-1", on_disk(quarter), timeout_s=60))
        nginx.stop()  # every connection cut mid-file
        assert seen.chunks_done < d.chunk_count
        load.wait_for_ok(20)  # serving goes on while the artifact server is down
        nginx.start()
        seen = run(wait_progress(manager, "device-1", on_disk(seen.chunks_done), timeout_s=60))
        load.stop()
        assert seen.chunks_done < d.chunk_count, "the transfer ended before the SIGKILL"
    assert load.failures == {}
    daemon.process.kill()
    daemon.process.wait()
    before = run(wait_progress(manager, "device-1", lambda p: True, timeout_s=10)).chunks_done
    assert 0 < before < d.chunk_count

    restarted = start_device(devices, pki, "device-1", client_cert=True)
    with InferenceLoad(restarted.port) as load:
        final: Progress = run(
            wait_progress(manager, "device-1", lambda p: p.deployment == d.id and p.terminal,
                          timeout_s=120)
        )  # fmt: skip
        load.wait_for_ok(20)
    assert final.state in ("serving", "promoted"), final.reason
    assert load.failures == {}
    assert final.chunks_fetched <= d.chunk_count - before  # resumed from disk, not restarted
    assert "resuming deployment" in restarted.log()
    x, expected = _vectors(source)
    version, out = infer(restarted, x)
    assert version == "5"
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)

    served = nginx.requests()
    liar_port, good_port = str(nginx.ports["liar"]), str(nginx.ports["good"])
    assert any(port == liar_port and status == 206 for port, status, _ in served)
    good_ranges = [r for port, status, r in served if port == good_port and status == 206]
    assert any(not r.startswith(f"bytes={CHUNK}-") and r != "bytes=0-" for r in good_ranges)
    assert len(good_ranges) >= 3, served  # first try, after the server stop, after the SIGKILL
    assert "dropped: served wrong bytes" in daemon.log()


def test_only_lying_or_closed_mirrors_fail_clearly_and_nothing_is_installed(
    devices: Devices,
    manager: ManagerSettings,
    signing: SigningKeys,
    nginx: Nginx,
    pki: FleetPki,
    release: tuple[bytes, Path],
) -> None:
    data, _ = release
    _, liar, good = stock(nginx, data)
    name = artifact_name(hashlib.sha256(data).hexdigest())
    # The good mirror is private: without the device's certificate it answers 400.
    prepared = prepare_bundle(data, CHUNK, urls=[f"{liar}/{name}", f"{good}/{name}"])
    d = prepared.deployment
    daemon = start_device(devices, pki, "device-2", client_cert=False)
    run(wait_online(manager, ["device-2"], timeout_s=20))
    with InferenceLoad(daemon.port) as load:
        run(announce_to(manager, signing, prepared, "device-2"))
        final = run(
            wait_progress(manager, "device-2", lambda p: p.deployment == d.id and p.terminal,
                          timeout_s=60)
        )  # fmt: skip
        load.wait_for_ok(20)
    assert load.failures == {}
    assert final.state == "failed"
    assert final.reason.startswith("ArtifactUnavailableError"), final.reason
    assert "served wrong bytes" in final.reason and "HTTP 400" in final.reason
    version, _ = infer(daemon, np.zeros((1, 64), np.float32))
    assert version == "1"
    state = devices.workdir_of("device-2") / "state"
    assert not ModelStore(state).version_dir("mlp", 5).exists()


async def announce_to(
    manager: ManagerSettings, signing: SigningKeys, prepared: PreparedBundle, device: str
) -> None:
    target = Target.device(device)
    command = deploy_command(target, prepared.deployment)
    result = await send_command(
        manager, [signing.signer], target, "deploy", command=command, expected=[device]
    )
    assert result.ok, result.replies


def _vectors(source: Path) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    from edged.modelrepo.config import TEST_VECTORS_FILE

    with np.load(source / TEST_VECTORS_FILE) as npz:
        return npz["input:input"], npz["output:output"]


def test_edged_push_with_artifacts_writes_the_file_and_publishes_no_chunk(
    tmp_path: Path,
    broker: Broker,
    pki: FleetPki,
    signing: SigningKeys,
    manager: ManagerSettings,
    release: tuple[bytes, Path],
) -> None:
    data, _ = release
    bundle = tmp_path / "mlp-5.bundle"
    bundle.write_bytes(data)
    store = tmp_path / "www" / "artifacts"
    # No device answers (device-9 is not running): the push ends after its timeout.
    pushed = cli(
        "push", str(bundle), "--device", "device-9", "--timeout", "1",
        "--artifacts", str(store), "--base-url", "https://cdn.example/edged",
        "--base-url", "https://mirror.example/edged",
        "--signing-key", str(signing.signer_file), *connection_args(broker, pki),
    )  # fmt: skip
    assert pushed.returncode == 1, pushed.stdout + pushed.stderr
    assert "no answer" in pushed.stdout
    artifact = store / artifact_name(hashlib.sha256(data).hexdigest())
    assert artifact.read_bytes() == data
    assert "retained chunks stay" not in pushed.stdout
    assert run(clean_chunks(manager, settle_s=0.5)).removed == {}  # nothing was retained
    refused = cli("push", str(bundle), "--device", "device-9", "--artifacts", str(store),
                  "--signing-key", str(signing.signer_file), *connection_args(broker, pki))  # fmt: skip
    assert refused.returncode != 0
    assert "--artifacts DIR and --base-url URL go together" in refused.stdout + refused.stderr
