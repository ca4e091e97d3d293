"""The runtime seam with real ONNX Runtime and LiteRT sessions on the sample models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edged.errors import ModelLoadError, UnsupportedModelError
from edged.modelrepo.config import load_model_config, load_test_vectors, parse_model_config
from edged.runtime import backend_for, load_model
from edged.runtime.onnx import choose_providers
from edged.runtime.options import RuntimeOptions


def test_provider_choice_keeps_available_ones_and_cpu_last() -> None:
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers((), available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(("TensorrtExecutionProvider",), available) == ["CPUExecutionProvider"]
    assert choose_providers((), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    "options",
    [
        RuntimeOptions(),
        RuntimeOptions(memory_lean=True),
        RuntimeOptions(intra_op_threads=1, spin_wait=False),
    ],
)
def test_onnx_options_give_the_same_answers(model_repo: Path, options: RuntimeOptions) -> None:
    version = model_repo / "mlp" / "1"
    (vector,) = load_test_vectors(load_model_config(model_repo / "mlp" / "config.toml"), version)
    model = load_model(version, options)
    assert model.dynamic_batch
    assert f"memory_lean={options.memory_lean}" in model.description
    np.testing.assert_allclose(
        model.run(vector.inputs)["output"], vector.outputs["output"], rtol=1e-3, atol=1e-4
    )
    model.close()


def test_litert_runs_the_sample(model_repo: Path) -> None:
    version = model_repo / "fc" / "1"
    (vector,) = load_test_vectors(load_model_config(model_repo / "fc" / "config.toml"), version)
    model = load_model(version, RuntimeOptions(intra_op_threads=1))
    assert not model.dynamic_batch
    assert model.inputs[0].shape == (1, 16)
    np.testing.assert_allclose(
        model.run(vector.inputs)["output"], vector.outputs["output"], rtol=1e-3, atol=1e-4
    )


def test_runtime_config_keys_parse() -> None:
    config = parse_model_config(
        {
            "runtime": {
                "spin_wait": False,
                "memory_lean": True,
                "providers": ["CPUExecutionProvider"],
            }
        }
    )
    assert config.runtime == RuntimeOptions(
        memory_lean=True, spin_wait=False, providers=("CPUExecutionProvider",)
    )


def test_a_directory_without_a_model_and_a_corrupt_model_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="holds no model file"):
        backend_for(tmp_path)
    (tmp_path / "model.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(ModelLoadError, match="LiteRT cannot load"):
        load_model(tmp_path, RuntimeOptions())
