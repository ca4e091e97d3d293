"""Per-model runtime options (the ``[runtime]`` table of a model's config.toml)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeOptions:
    # 0: the daemon's share of its CPU budget (edged/runtime/budget.py); in a script, the
    # runtime's default (one per core).
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    # Execution providers in order of preference; empty: the best available on this device.
    providers: tuple[str, ...] = ()
    # True: no weight prepacking. Weights stay in the page cache of the mmapped file instead of
    # being copied into private memory; loads are near-instant, large GEMMs run slower.
    memory_lean: bool = False
    # true: ONNX Runtime's intra-op threads spin while waiting for work, which shaves a little
    # latency but burns CPU (and battery) between batches and takes cycles from the event loop.
    spin_wait: bool = False
