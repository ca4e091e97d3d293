"""Shadow comparison on the real serving side: during probation sampled requests also run on
the replaced version; a release whose answers disagree beyond its signed threshold is not
promoted, one that agrees is. Real ONNX models, the real installer and manager."""

from __future__ import annotations

import numpy as np

from edged.serve.probation import ProbationPolicy, ShadowPolicy
from edged.serve.shadow import outputs_agree
from tests.bundle.helpers import MODEL, World, log_entries, run_probation, source_files

SHADOW = ShadowPolicy(
    sample_permille=1000, max_per_s=10_000, max_abs_diff_micro=100, min_compared=10
)
POLICY = ProbationPolicy(
    min_s=0, max_s=120, min_requests=10, max_p99_latency_ratio_pct=0, shadow=SHADOW
)


def test_outputs_agree_by_max_abs_diff_or_top1() -> None:
    a = {"y": np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)}
    near = {"y": a["y"] + np.float32(5e-5)}
    far = {"y": np.array([[0.3, 0.7], [0.6, 0.4]], np.float32)}
    swapped = {"y": np.array([[0.9, 0.1], [0.8, 0.2]], np.float32)}
    assert outputs_agree(SHADOW, a, near)
    assert not outputs_agree(SHADOW, a, far)
    top1 = ShadowPolicy(top1=True)
    assert outputs_agree(top1, a, far)
    assert not outputs_agree(top1, a, swapped)
    assert not outputs_agree(SHADOW, a, {"y": np.full((2, 2), np.nan, np.float32)})
    assert not outputs_agree(SHADOW, a, {"z": a["y"]})


def test_a_release_disagreeing_on_shadowed_traffic_is_not_promoted(world: World) -> None:
    outcome, serving = run_probation(world, world.bundle(2, rollout=POLICY))
    assert outcome.decision == "reverted"
    assert outcome.gate == "shadow_agreement"
    assert outcome.limit == "at least 990 permille"
    assert "shadowed requests agreed" in outcome.reason
    assert serving == "1"
    assert log_entries(world.state)[-1]["outcome"] == "reverted"
    world.assert_serves(1)


def test_a_release_agreeing_on_shadowed_traffic_is_promoted(world: World) -> None:
    # Version 5 carries version 1's model: the same answers.
    files = {
        path.replace(f"{MODEL}/1/", f"{MODEL}/5/"): content
        for path, content in source_files(world.sources, 1).items()
    }
    outcome, serving = run_probation(world, world.bundle(5, rollout=POLICY, files=files))
    assert outcome.decision == "promoted", outcome
    assert "agreement 1000.0 permille" in outcome.reason
    assert serving == "5"
    assert log_entries(world.state)[-1]["outcome"] == "promoted"
