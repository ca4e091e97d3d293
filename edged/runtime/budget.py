"""The daemon's CPU budget: how many threads the runtimes may use, so that the event loop that
parses requests and writes responses keeps a core of its own under load.

Rule: the inference threads of all models together are ``cores - 1`` (at least 1), split
evenly between the models loaded, each getting at least one. A model whose config sets
``intra_op_threads`` keeps its own number. Outside the daemon (``load_model`` in a script) 0
still means the runtime's default, one thread per core.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from edged.runtime.options import RuntimeOptions


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a systemd ``CPUAffinity=``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def front_ends(cores: int, configured: int = -1) -> int:
    """Front-end processes for ``cores`` usable cores (``configured`` >= 0 wins; 0 means the
    engine serves in the daemon's own process). One per four cores, at least one: a front end
    spends about 4 cores' worth of inference per core of its own at batch-1 traffic."""
    if configured >= 0:
        return configured
    return max(1, cores // 4)


@dataclass(frozen=True)
class CpuBudget:
    cores: int
    # Threads for inference across all models; 0: cores - front ends, at least 1.
    inference_threads: int = 0
    # Cores kept for the processes that parse requests (front ends; one event loop at least).
    front_ends: int = 1

    @property
    def total_threads(self) -> int:
        return self.inference_threads or max(1, self.cores - max(1, self.front_ends))

    def threads_per_model(self, models: int) -> int:
        return max(1, self.total_threads // max(1, models))

    def apply(self, options: RuntimeOptions, models: int) -> RuntimeOptions:
        """``options`` with ``intra_op_threads`` = 0 replaced by this model's share."""
        if options.intra_op_threads:
            return options
        return replace(options, intra_op_threads=self.threads_per_model(models))
