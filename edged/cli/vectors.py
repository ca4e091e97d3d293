"""Test vectors from sample inputs: run a version directory's model on ``inputs.npz`` with the
real runtime and write ``test_vectors.npz`` (``input:NAME`` / ``output:NAME``) beside it, the
file every install's self-test checks. Used by ``edged bundle build --vectors-from``."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from edged.errors import BundleConfigError
from edged.modelrepo.config import TEST_VECTORS_FILE
from edged.runtime import load_model
from edged.runtime.options import RuntimeOptions


def write_test_vectors(version_dir: Path, inputs_file: Path) -> Path:
    """``<version_dir>/test_vectors.npz`` from the model's outputs on ``inputs_file`` (keys:
    each input's name, or ``input:NAME``). Refuses to replace an existing vectors file."""
    out = version_dir / TEST_VECTORS_FILE
    if out.exists():
        raise BundleConfigError(
            f"{out} exists; remove it to make new test vectors from {inputs_file}"
        )
    try:
        with np.load(inputs_file, allow_pickle=False) as npz:
            given = {k.removeprefix("input:"): np.asarray(npz[k]) for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise BundleConfigError(f"cannot read sample inputs {inputs_file}: {exc}") from exc
    model = load_model(version_dir, RuntimeOptions())
    try:
        names = [spec.name for spec in model.inputs]
        missing = sorted(set(names) - set(given))
        extra = sorted(set(given) - set(names))
        if missing or extra:
            raise BundleConfigError(
                f"{inputs_file}: the model's inputs are {', '.join(names)}; missing "
                f"{', '.join(missing) or 'none'}, unknown {', '.join(extra) or 'none'}"
            )
        feeds = {spec.name: given[spec.name].astype(spec.numpy_dtype) for spec in model.inputs}
        outputs = model.run(feeds)
    finally:
        model.close()
    arrays = {f"input:{k}": v for k, v in feeds.items()}
    arrays.update({f"output:{k}": np.asarray(v) for k, v in outputs.items()})
    with out.open("xb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return out
