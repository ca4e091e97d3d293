"""The manifest's optional ``rollout`` object: how the device must judge the release.

It is part of the signed manifest, so nobody on the path can weaken the gates. Every field is
optional (the defaults of ``ProbationPolicy``); a builder writes them all, so the signed bytes
say exactly what the device enforces. A manifest without ``rollout`` gets the defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edged.bundle.canonical import Json
from edged.errors import ManifestSchemaError
from edged.serve.probation import ProbationPolicy, ShadowPolicy

DEFAULT_POLICY = ProbationPolicy()

_DAY_S = 86_400
_MAX_INT = 2**53 - 1

# section -> field -> (minimum, maximum); a ratio limit is 0 (off) or at least 100 percent.
_PROBATION = {
    "min_s": (0, 30 * _DAY_S),
    "max_s": (0, 30 * _DAY_S),
    "min_requests": (0, 10**9),
    "max_crashes": (1, 1000),
}
_AT_MAX_S = ("promote", "revert")
_GATES = {
    "max_error_permille": (0, 1000),
    "max_nonfinite_permille": (0, 1000),
    "max_p99_latency_ratio_pct": (0, 100_000),
    "max_energy_ratio_pct": (0, 100_000),
}
_SHADOW = {
    "sample_permille": (1, 1000),
    "max_per_s": (1, 10_000),
    "max_abs_diff_micro": (0, 10**12),
    "min_agreement_permille": (0, 1000),
    "min_compared": (1, 10**6),
}


def _object(value: Any, where: str, known: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestSchemaError(f"manifest field {where} must be an object")
    unknown = sorted(set(value) - known)
    if unknown:
        raise ManifestSchemaError(f"manifest field {where}.{unknown[0]} is not known")
    return value


def _integers(value: Any, where: str, fields: dict[str, tuple[int, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, item in _object(value, where, set(fields)).items():
        low, high = fields[key]
        if isinstance(item, bool) or not isinstance(item, int) or not low <= item <= high:
            raise ManifestSchemaError(
                f"manifest field {where}.{key} must be an integer in {low}..{high}, got {item!r}"
            )
        out[key] = item
    return out


def parse_rollout(value: Json) -> ProbationPolicy:
    """The ``rollout`` object of a manifest as a policy; every error names the field."""
    root = _object(value, "rollout", {"probation", "gates", "shadow"})
    raw_probation = _object(
        root.get("probation", {}), "rollout.probation", {*_PROBATION, "at_max_s"}
    )
    at_max_s = raw_probation.get("at_max_s", "promote")
    if at_max_s not in _AT_MAX_S:
        raise ManifestSchemaError(
            f"manifest field rollout.probation.at_max_s must be promote or revert, got {at_max_s!r}"
        )
    probation = _integers(
        {k: v for k, v in raw_probation.items() if k != "at_max_s"}, "rollout.probation", _PROBATION
    )
    raw_gates = _object(
        root.get("gates", {}), "rollout.gates", {*_GATES, "require_latency_verdict"}
    )
    require_latency = raw_gates.get("require_latency_verdict", False)
    if not isinstance(require_latency, bool):
        raise ManifestSchemaError(
            "manifest field rollout.gates.require_latency_verdict must be true or false"
        )
    gates = _integers(
        {k: v for k, v in raw_gates.items() if k != "require_latency_verdict"},
        "rollout.gates",
        _GATES,
    )
    if require_latency and not gates.get(
        "max_p99_latency_ratio_pct", DEFAULT_POLICY.max_p99_latency_ratio_pct
    ):
        raise ManifestSchemaError(
            "manifest field rollout.gates.require_latency_verdict needs the latency gate "
            "(max_p99_latency_ratio_pct is 0: off)"
        )
    for key in ("max_p99_latency_ratio_pct", "max_energy_ratio_pct"):
        if 0 < gates.get(key, 0) < 100:
            raise ManifestSchemaError(
                f"manifest field rollout.gates.{key} must be 0 (off) or at least 100 "
                f"(a ratio in percent), got {gates[key]}"
            )
    shadow = None
    if "shadow" in root:
        raw = _object(root["shadow"], "rollout.shadow", {*_SHADOW, "top1"})
        top1 = raw.get("top1", False)
        if not isinstance(top1, bool):
            raise ManifestSchemaError("manifest field rollout.shadow.top1 must be true or false")
        numbers = _integers(
            {k: v for k, v in raw.items() if k != "top1"}, "rollout.shadow", _SHADOW
        )
        shadow = ShadowPolicy(top1=top1, **numbers)
    policy = ProbationPolicy(
        **probation,
        **gates,
        shadow=shadow,
        require_latency_verdict=require_latency,
        at_max_s=at_max_s,
    )
    if policy.max_s < policy.min_s:
        raise ManifestSchemaError(
            f"manifest field rollout.probation.max_s ({policy.max_s}) must not be below "
            f"min_s ({policy.min_s})"
        )
    return policy


def rollout_json(policy: ProbationPolicy) -> dict[str, Json]:
    """The complete ``rollout`` object for ``policy`` (every field written out)."""
    probation: dict[str, Json] = {key: getattr(policy, key) for key in _PROBATION}
    probation["at_max_s"] = policy.at_max_s
    gates: dict[str, Json] = {key: getattr(policy, key) for key in _GATES}
    gates["require_latency_verdict"] = policy.require_latency_verdict
    out: dict[str, Json] = {"probation": probation, "gates": gates}
    if policy.shadow is not None:
        shadow: dict[str, Json] = {key: getattr(policy.shadow, key) for key in _SHADOW}
        shadow["top1"] = policy.shadow.top1
        out["shadow"] = shadow
    return out


def load_rollout_file(path: Path) -> ProbationPolicy:
    """A policy from a JSON file holding the ``rollout`` object (``edged bundle build
    --rollout FILE``)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestSchemaError(f"cannot read the rollout policy {path}: {exc}") from exc
    return parse_rollout(value)
