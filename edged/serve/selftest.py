"""The self-test a freshly loaded version must pass before it may serve: its test vectors
(inputs, expected outputs, tolerance) and a warm-up. Shared by the hot swap and by offline
installs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edged.errors import EdgedError, SelfTestFailedError
from edged.modelrepo.config import ModelConfig, load_test_vectors
from edged.runtime.base import Array, LoadedModel

log = logging.getLogger(__name__)


def self_test(
    name: str, version: str, model: LoadedModel, config: ModelConfig, version_dir: Path
) -> str:
    """Run the test vectors and a warm-up on a freshly loaded model (in a worker thread).

    Returns a one-line summary; raises ``SelfTestFailedError`` with the reason.
    """
    label = f"{name} version {version}"
    try:
        vectors = load_test_vectors(config, version_dir)
    except EdgedError as exc:
        raise SelfTestFailedError(f"{label}: cannot read test vectors: {exc}") from exc
    tol = config.self_test
    for vector in vectors:
        try:
            got = model.run(vector.inputs)
        except (EdgedError, KeyError, ValueError) as exc:
            raise SelfTestFailedError(
                f"{label}: test vector {vector.source} failed to run: {exc}"
            ) from exc
        for out_name, want in vector.outputs.items():
            if out_name not in got:
                raise SelfTestFailedError(
                    f"{label}: test vector {vector.source}: no output {out_name!r}"
                )
            value = got[out_name]
            if value.shape != want.shape:
                raise SelfTestFailedError(
                    f"{label}: test vector {vector.source}: output {out_name!r} has shape "
                    f"{list(value.shape)}, expected {list(want.shape)}"
                )
            if not np.allclose(value, want, atol=tol.atol, rtol=tol.rtol):
                err = float(np.max(np.abs(value.astype(np.float64) - want.astype(np.float64))))
                raise SelfTestFailedError(
                    f"{label}: test vector {vector.source}: output {out_name!r} differs from the "
                    f"expected values (max abs error {err:.3g}; atol={tol.atol}, rtol={tol.rtol})"
                )
    warm = vectors[0].inputs if vectors else _zeros(model)
    for _ in range(tol.warmup_runs):
        model.run(warm)
    if model.dynamic_batch and config.batching.max_batch_size > 1:
        model.run(
            {k: np.repeat(v[:1], config.batching.max_batch_size, axis=0) for k, v in warm.items()}
        )
    if not vectors:
        log.warning("%s has no test vectors: only warmed up", label)
    return f"{len(vectors)} test vector(s) passed, {tol.warmup_runs} warm-up run(s)"


def _zeros(model: LoadedModel) -> dict[str, Array]:
    return {
        s.name: np.zeros([d if d > 0 else 1 for d in s.shape], s.numpy_dtype) for s in model.inputs
    }
