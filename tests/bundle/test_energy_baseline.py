"""The energy gate's baseline on the real serving side: a release pushed before the replaced
version's energy figure was known still gets judged once the figure comes (a device that
takes a deployment right after it starts). Real ONNX models, the real installer and manager;
the energy figures stand in for a power sensor."""

from __future__ import annotations

from edged.serve.probation import ProbationPolicy
from tests.bundle.helpers import MODEL, World, run_probation

POLICY = ProbationPolicy(
    min_s=0, max_s=120, min_requests=10, max_p99_latency_ratio_pct=0, max_energy_ratio_pct=150
)


def test_a_baseline_without_an_energy_figure_at_the_swap_is_judged_once_the_figure_comes(
    world: World,
) -> None:
    figures: dict[tuple[str, str], float] = {}  # (model, version) -> J per inference

    def first_interval_ends() -> None:
        # Version 1 served, but the telemetry's first interval ends only after the swap: both
        # figures arrive now, with the release already on probation.
        figures[(MODEL, "1")] = 0.010
        figures[(MODEL, "2")] = 0.030

    outcome, serving = run_probation(
        world,
        world.bundle(2, rollout=POLICY),
        energy=lambda model, version: figures.get((model, version)),
        after_install=first_interval_ends,
    )
    assert (outcome.decision, outcome.gate, outcome.measured, outcome.limit) == (
        "reverted",
        "energy_ratio",
        "3.00x",
        "1.50x",
    ), outcome
    assert "30.000 mJ vs 10.000 mJ per inference" in outcome.reason
    assert serving == "1"
    world.assert_serves(1)
