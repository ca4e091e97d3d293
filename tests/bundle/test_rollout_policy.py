"""The signed rollout policy: parsed strictly, defaults when absent, and covered by the manifest
signature, so nobody without a signing key can relax a gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edged.bundle.canonical import encode_canonical
from edged.bundle.manifest import parse_manifest
from edged.bundle.rollout_policy import DEFAULT_POLICY, parse_rollout, rollout_json
from edged.bundle.swap_policy import policy_of_version
from edged.errors import BadSignatureError, ManifestSchemaError
from edged.serve.probation import ProbationPolicy, ShadowPolicy
from tests.bundle.helpers import MODEL, World, log_entries, rebuild, split_members

STRICT = ProbationPolicy(
    min_s=5,
    max_s=60,
    min_requests=40,
    max_error_permille=5,
    max_nonfinite_permille=0,
    max_p99_latency_ratio_pct=150,
    max_energy_ratio_pct=0,
    shadow=ShadowPolicy(sample_permille=200, max_per_s=10, top1=True),
)


def test_a_policy_round_trips_through_canonical_json() -> None:
    assert parse_rollout(rollout_json(STRICT)) == STRICT
    assert parse_rollout(rollout_json(DEFAULT_POLICY)) == DEFAULT_POLICY


def test_missing_fields_take_the_defaults() -> None:
    policy = parse_rollout({"gates": {"max_p99_latency_ratio_pct": 300}})
    assert policy.max_p99_latency_ratio_pct == 300
    assert policy.min_s == DEFAULT_POLICY.min_s
    assert policy.max_nonfinite_permille == 0
    assert policy.shadow is None


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"gates": {"max_latency": 3}}, "rollout.gates.max_latency"),
        ({"probation": {"min_s": -1}}, "rollout.probation.min_s"),
        ({"gates": {"max_error_permille": 1001}}, "rollout.gates.max_error_permille"),
        ({"gates": {"max_p99_latency_ratio_pct": 50}}, "rollout.gates.max_p99_latency_ratio_pct"),
        ({"probation": {"min_s": 10, "max_s": 5}}, "rollout.probation.max_s"),
        ({"shadow": {"top1": 1}}, "rollout.shadow.top1"),
        ({"gates": {"max_error_permille": True}}, "rollout.gates.max_error_permille"),
        ({"canary": {}}, "rollout.canary"),
        ([], "rollout"),
    ],
)
def test_a_bad_policy_names_the_field(value: Any, field: str) -> None:
    with pytest.raises(ManifestSchemaError, match=field.replace(".", r"\.")):
        parse_rollout(value)


def test_a_bundle_carries_its_policy_and_an_old_bundle_none(world: World, tmp_path: Path) -> None:
    world.install(world.bundle(2, rollout=STRICT))
    installed = world.state / "models" / MODEL / "2"
    assert policy_of_version(installed) == STRICT
    world.install(world.bundle(3))
    assert (
        parse_manifest((world.state / "models" / MODEL / "3" / ".verified").read_bytes()).rollout
        is None
    )
    # No rollout object: the device applies the defaults; a seed version has no policy at all.
    assert policy_of_version(world.state / "models" / MODEL / "3") == DEFAULT_POLICY
    assert policy_of_version(tmp_path) is None


def test_relaxing_the_gates_in_transit_is_refused(world: World) -> None:
    data = world.bundle(2, rollout=STRICT)
    members = split_members(data)
    manifest = json.loads(members[0][1])
    manifest["rollout"]["gates"]["max_p99_latency_ratio_pct"] = 100_000
    manifest["rollout"]["gates"]["max_nonfinite_permille"] = 1000
    forged = encode_canonical(manifest)
    info = members[0][0]
    info.size = len(forged)
    tampered = rebuild([(info, forged), *members[1:]])
    before = world.snapshot()
    with pytest.raises(BadSignatureError):
        world.install(tampered)
    world.assert_unchanged(before)
    assert log_entries(world.state)[-1]["error"] == "BadSignatureError"


def test_dropping_the_policy_in_transit_is_refused(world: World) -> None:
    data = world.bundle(2, rollout=STRICT)
    members = split_members(data)
    manifest = json.loads(members[0][1])
    del manifest["rollout"]
    forged = encode_canonical(manifest)
    info = members[0][0]
    info.size = len(forged)
    with pytest.raises(BadSignatureError):
        world.install(rebuild([(info, forged), *members[1:]]))


def test_the_crash_and_verdict_fields_are_parsed_strictly() -> None:
    policy = parse_rollout(
        {
            "probation": {"max_crashes": 2, "at_max_s": "revert"},
            "gates": {"require_latency_verdict": True},
        }
    )
    assert (policy.max_crashes, policy.at_max_s, policy.require_latency_verdict) == (
        2, "revert", True,
    )  # fmt: skip
    assert parse_rollout(rollout_json(policy)) == policy
    assert DEFAULT_POLICY.max_crashes == 1
    bad: list[dict[str, Any]] = [
        {"probation": {"max_crashes": 0}},
        {"probation": {"at_max_s": "wait"}},
        {"gates": {"require_latency_verdict": 1}},
        {"gates": {"require_latency_verdict": True, "max_p99_latency_ratio_pct": 0}},
    ]
    for value in bad:
        with pytest.raises(ManifestSchemaError, match="rollout"):
            parse_rollout(value)
