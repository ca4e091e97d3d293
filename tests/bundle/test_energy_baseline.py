"""The energy gate's baseline on the real serving side: a release pushed before the replaced
version's energy figure was known still gets judged once the figure comes (a device that
takes a deployment right after it starts). Real ONNX models, the real installer and manager;
the energy figures stand in for a power sensor."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from edged.bundle.install import Installer
from edged.bundle.swap_policy import policy_for_swap
from edged.config import ModelsConfig
from edged.serve.manager import ModelManager
from edged.serve.probation import ProbationPolicy
from edged.serve.watch import ProbationOutcome
from tests.bundle.helpers import DEVICE, MODEL, NOW, World

POLICY = ProbationPolicy(
    min_s=0, max_s=120, min_requests=10, max_p99_latency_ratio_pct=0, max_energy_ratio_pct=150
)


def test_a_baseline_without_an_energy_figure_at_the_swap_is_judged_once_the_figure_comes(
    world: World,
) -> None:
    figures: dict[tuple[str, str], float] = {}  # (model, version) -> J per inference

    async def scenario() -> ProbationOutcome:
        manager = ModelManager(ModelsConfig(repository=world.state / "models"))
        manager.probation_policy = policy_for_swap
        manager.energy_per_inference = lambda model, version: figures.get((model, version))
        installer = Installer(world.state, manager, DEVICE, clock=lambda: NOW)
        ended: asyncio.Queue[ProbationOutcome] = asyncio.Queue()

        async def record(outcome: ProbationOutcome) -> None:
            await installer.record_probation(outcome)
            await ended.put(outcome)

        manager.probation_listeners.append(record)
        await manager.start()
        try:
            x = np.random.default_rng(1).standard_normal((1, 4), dtype=np.float32)
            for _ in range(30):  # version 1 serves; its energy figure is not known yet
                await manager.infer(MODEL, {"input": x})
            await installer.install_bytes(world.bundle(2, rollout=POLICY))
            # The telemetry's first interval ends after the swap: both figures arrive now.
            figures[(MODEL, "1")] = 0.010
            figures[(MODEL, "2")] = 0.030
            deadline = time.monotonic() + 60
            while ended.empty():
                assert time.monotonic() < deadline, manager.status()
                await manager.infer(MODEL, {"input": x})
            return await ended.get()
        finally:
            await manager.close(drain_timeout_s=5)

    outcome = asyncio.run(scenario())
    assert (outcome.decision, outcome.gate, outcome.measured, outcome.limit) == (
        "reverted",
        "energy_ratio",
        "3.00x",
        "1.50x",
    ), outcome
    assert "30.000 mJ vs 10.000 mJ per inference" in outcome.reason
    world.assert_serves(1)
