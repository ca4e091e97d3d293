"""CPU accounting for the benchmarks: the CPU a server under test uses, and the CPU other
processes on the machine use meanwhile (a shared development machine makes numbers lie).

Linux only: reads /proc/stat and /proc/PID/[task/TID/]stat.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
NOISY_CORES = 0.15  # other processes using more than this during a phase mark it noisy


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (steal counts: the hypervisor took them)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def task_cpu_s(stat_path: str) -> float:
    """utime + stime from a /proc stat file (a process's covers all its threads); 0 if gone."""
    with contextlib.suppress(OSError):
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    return 0.0


def children_cpu_s() -> float:
    """CPU of this process's waited-for children (a load generator, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def own_cpu_s(pids: Sequence[int] = ()) -> float:
    """This process, its waited-for children and the given (server) processes."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    servers = sum(task_cpu_s(f"/proc/{pid}/stat") for pid in pids)
    return me.ru_utime + me.ru_stime + children_cpu_s() + servers


class OtherLoad:
    """Cores used since construction by processes outside the benchmark (other users' jobs).

    ``pids``: server processes that belong to the benchmark. Children the benchmark starts and
    waits for inside the window count as its own; anything else counts as other load.
    """

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self._pids = tuple(pids)
        self._wall0 = time.monotonic()
        self._busy0 = machine_busy_s()
        self._own0 = own_cpu_s(self._pids)

    def cores(self) -> float:
        wall = time.monotonic() - self._wall0
        other = (machine_busy_s() - self._busy0) - (own_cpu_s(self._pids) - self._own0)
        return max(0.0, other) / wall if wall > 0 else 0.0


def wait_for_quiet(max_wait_s: float, pids: Sequence[int] = ()) -> None:
    """Wait up to ``max_wait_s`` for a 1 s window in which other processes use little CPU."""
    deadline = time.monotonic() + max_wait_s
    while max_wait_s > 0:
        window = OtherLoad(pids)
        time.sleep(1.0)
        cores = window.cores()
        if cores < NOISY_CORES:
            return
        if time.monotonic() >= deadline:
            print(f"bench: other processes still use {cores:.2f} cores; measuring anyway")
            return


@dataclass(frozen=True)
class ServerCpu:
    """CPU seconds of a server process: all its threads, and its main (event-loop) thread."""

    total_s: float
    main_thread_s: float

    @classmethod
    def read(cls, pid: int, tree: Sequence[int] = ()) -> ServerCpu:
        """``tree``: every process of the server (``pid`` and its children), summed."""
        total = sum(task_cpu_s(f"/proc/{p}/stat") for p in (tree or [pid]))
        return cls(total, task_cpu_s(f"/proc/{pid}/task/{pid}/stat"))
