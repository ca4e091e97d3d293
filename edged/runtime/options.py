"""Per-model runtime options (the ``[runtime]`` table of a model's config.toml)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeOptions:
    intra_op_threads: int = 0  # 0: the runtime's default (one per core)
    inter_op_threads: int = 1
    # Execution providers in order of preference; empty: the best available on this device.
    providers: tuple[str, ...] = ()
    # True: no weight prepacking. Weights stay in the page cache of the mmapped file instead of
    # being copied into private memory; loads are near-instant, large GEMMs run slower.
    memory_lean: bool = False
    # ONNX Runtime's intra-op threads spin while waiting for work: lower latency, but they burn
    # CPU (and battery) between batches. false: they sleep.
    spin_wait: bool = True
