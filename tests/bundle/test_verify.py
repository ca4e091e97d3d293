"""The pure verifier: no I/O, an injected clock, one error class per failed check."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edged.bundle.build import make_manifest, sign_manifest
from edged.bundle.manifest import manifest_digest
from edged.bundle.trust import TrustState, load_trust_state
from edged.bundle.verify import (
    DeviceFacts,
    HighWaterMark,
    explain_manifest,
    release_tuple,
    verify_manifest,
)
from edged.errors import (
    ArchitectureMismatchError,
    EdgedVersionTooOldError,
    ExpiredBundleError,
    ProviderMismatchError,
    ReplayError,
    RollbackError,
    RuntimeMismatchError,
    ThresholdNotMetError,
    TrustExpiredError,
)
from tests.bundle.helpers import DEVICE, MODEL, NOW, Keys, make_keys, spec, trust_documents

FILES = {f"{MODEL}/5/model.onnx": b"onnx", f"{MODEL}/config.toml": b""}


@pytest.fixture(scope="module")
def vkeys() -> Keys:
    return make_keys(1, 2)


@pytest.fixture(scope="module")
def trust(vkeys: Keys) -> TrustState:
    return load_trust_state(*trust_documents(vkeys))


def manifest_bytes(**overrides: object) -> bytes:
    return make_manifest(spec(5, 7, **overrides), FILES).encode()


def test_a_good_manifest_verifies(vkeys: Keys, trust: TrustState) -> None:
    data = manifest_bytes()
    verified = verify_manifest(
        data, [sign_manifest(data, vkeys.signers[0])], trust, {}, DEVICE, NOW
    )
    assert verified.manifest.counter == 7
    assert verified.digest == manifest_digest(data)
    assert not verified.reinstall


@pytest.mark.parametrize(
    ("mark", "error"),
    [(HighWaterMark(8, "x"), RollbackError), (HighWaterMark(7, "x"), ReplayError)],
    ids=["lower", "same-other"],
)
def test_counter_against_high_water(
    vkeys: Keys, trust: TrustState, mark: HighWaterMark, error: type[Exception]
) -> None:
    data = manifest_bytes()
    with pytest.raises(error):
        verify_manifest(
            data, [sign_manifest(data, vkeys.signers[0])], trust, {MODEL: mark}, DEVICE, NOW
        )


def test_the_bundle_that_set_the_mark_may_be_reinstalled(vkeys: Keys, trust: TrustState) -> None:
    data = manifest_bytes()
    mark = HighWaterMark(7, manifest_digest(data))
    verified = verify_manifest(
        data, [sign_manifest(data, vkeys.signers[0])], trust, {MODEL: mark}, DEVICE, NOW
    )
    assert verified.reinstall


def test_high_water_marks_are_per_model(vkeys: Keys, trust: TrustState) -> None:
    data = manifest_bytes()
    marks = {"other": HighWaterMark(100, "x")}
    verify_manifest(data, [sign_manifest(data, vkeys.signers[0])], trust, marks, DEVICE, NOW)


@pytest.mark.parametrize(
    ("device", "error"),
    [
        (replace(DEVICE, arch="mips"), ArchitectureMismatchError),
        (replace(DEVICE, runtimes=frozenset({"tflite"})), RuntimeMismatchError),
        (replace(DEVICE, edged_version="0.0.9"), EdgedVersionTooOldError),
    ],
    ids=["arch", "runtime", "edged"],
)
def test_device_targets(
    vkeys: Keys, trust: TrustState, device: DeviceFacts, error: type[Exception]
) -> None:
    data = manifest_bytes()
    with pytest.raises(error):
        verify_manifest(data, [sign_manifest(data, vkeys.signers[0])], trust, {}, device, NOW)


def test_any_listed_provider_is_enough(vkeys: Keys, trust: TrustState) -> None:
    data = manifest_bytes(providers=("TensorrtExecutionProvider", "CPUExecutionProvider"))
    verify_manifest(data, [sign_manifest(data, vkeys.signers[0])], trust, {}, DEVICE, NOW)
    data = manifest_bytes(providers=("TensorrtExecutionProvider",))
    with pytest.raises(ProviderMismatchError, match="TensorrtExecutionProvider"):
        verify_manifest(data, [sign_manifest(data, vkeys.signers[0])], trust, {}, DEVICE, NOW)


def test_the_clock_is_injected(vkeys: Keys, trust: TrustState) -> None:
    data = manifest_bytes()
    sigs = [sign_manifest(data, vkeys.signers[0])]
    expires = NOW + 30 * 86_400
    verify_manifest(data, sigs, trust, {}, DEVICE, expires - 1)
    with pytest.raises(ExpiredBundleError, match=r"expired at 2027-"):
        verify_manifest(data, sigs, trust, {}, DEVICE, expires)
    with pytest.raises(TrustExpiredError):
        verify_manifest(data, sigs, trust, {}, DEVICE, NOW + 366 * 86_400)


def test_threshold_counts_distinct_keys(vkeys: Keys) -> None:
    trust = load_trust_state(*trust_documents(vkeys, threshold=2))
    data = manifest_bytes()
    one, two = (sign_manifest(data, k) for k in vkeys.signers)
    with pytest.raises(ThresholdNotMetError):
        verify_manifest(data, [one], trust, {}, DEVICE, NOW)
    assert verify_manifest(data, [one, two], trust, {}, DEVICE, NOW).signed_by == {
        one.keyid,
        two.keyid,
    }


def test_explain_reports_every_check(vkeys: Keys, trust: TrustState) -> None:
    data = manifest_bytes(arch=("mips",))
    results, manifest = explain_manifest(data, [], trust, {}, DEVICE, NOW)
    assert manifest is not None
    by_name = {r.name: r for r in results}
    assert by_name["signatures"].ok is False
    assert by_name["architecture"].ok is False
    assert by_name["runtime"].ok is True
    assert by_name["not expired"].ok is True
    results, manifest = explain_manifest(b"{", [], None, {}, None, NOW)
    assert manifest is None
    assert {r.ok for r in results if r.name == "architecture"} == {None}


def test_release_tuple() -> None:
    assert release_tuple("0.3.1+local") == (0, 3, 1)
    assert release_tuple("garbage") == (0, 0, 0)
