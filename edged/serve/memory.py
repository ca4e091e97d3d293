"""The memory policy, as a function of numbers: may a new version load beside the serving one?

``refuse`` (the default) keeps the old version serving and fails the load with the numbers;
``unload-first`` releases the old version first when that makes room (requests get 503 until
the new one is ready).
"""

from __future__ import annotations

from dataclasses import dataclass

from edged.errors import InsufficientMemoryError

MiB = 1 << 20


@dataclass(frozen=True)
class MemoryRequest:
    model: str
    version: str
    estimate_bytes: int  # what the new version is expected to cost
    old_version: str | None  # what serves now, if anything
    old_estimate_bytes: int  # what releasing it frees
    available_bytes: int  # the system's available memory minus the reserve
    in_use_bytes: int  # what every loaded version is estimated to cost
    limit_bytes: int  # models.memory_limit_bytes (0: no budget of its own)
    policy: str  # "refuse" | "unload-first"


def must_unload_first(request: MemoryRequest) -> bool:
    """False: the new version fits beside the old one. True: it fits once the old one is
    released, and the policy allows that. Otherwise ``InsufficientMemoryError``."""
    r = request
    headroom = r.available_bytes
    if r.limit_bytes:
        headroom = min(headroom, r.limit_bytes - r.in_use_bytes)
    if r.estimate_bytes <= headroom:
        return False
    if (
        r.policy == "unload-first"
        and r.old_version is not None
        and r.estimate_bytes <= headroom + r.old_estimate_bytes
    ):
        return True
    need = f"version {r.version} of {r.model} needs about {r.estimate_bytes // MiB} MiB"
    have = f"{max(headroom, 0) // MiB} MiB is free for models"
    keep = f"; version {r.old_version} keeps serving" if r.old_version is not None else ""
    raise InsufficientMemoryError(f"{need} but {have} (policy {r.policy}){keep}")
