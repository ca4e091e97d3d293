"""Real, openly licensed models from ../shared/models (see its README) served by edged.

The expected outputs come from the raw runtime called directly; edged must give the same
answers through its whole path (repository, self-test, scheduler, HTTP)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from edged.demo.samples import write_test_vectors
from tests.support.daemon import running_daemon

pytestmark = pytest.mark.integration


def silero_inputs() -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(3)
    return {
        "input": (rng.standard_normal((1, 512)) * 0.1).astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, dtype=np.int64),
    }


def test_silero_vad_onnx_and_selfie_segmentation_tflite(
    shared_models: Path, tmp_path: Path
) -> None:
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    repo = tmp_path / "repo"
    vad_dir = repo / "vad" / "1"
    vad_dir.mkdir(parents=True)
    shutil.copy(shared_models / "silero_vad.onnx", vad_dir / "model.onnx")
    vad_in = silero_inputs()
    session = ort.InferenceSession(str(vad_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    vad_out = dict(zip(names, session.run(None, vad_in), strict=True))
    write_test_vectors(vad_dir / "test_vectors.npz", vad_in, vad_out)

    seg_dir = repo / "selfie" / "1"
    seg_dir.mkdir(parents=True)
    shutil.copy(shared_models / "selfie_segmentation.tflite", seg_dir / "model.tflite")
    interp = Interpreter(model_path=str(seg_dir / "model.tflite"))
    interp.allocate_tensors()
    detail_in = interp.get_input_details()[0]
    detail_out = interp.get_output_details()[0]
    frame = np.random.default_rng(5).random((1, 256, 256, 3), dtype=np.float32)
    interp.set_tensor(detail_in["index"], frame)
    interp.invoke()
    mask = interp.get_tensor(detail_out["index"]).copy()
    write_test_vectors(
        seg_dir / "test_vectors.npz", {detail_in["name"]: frame}, {detail_out["name"]: mask}
    )

    with running_daemon(repo, tmp_path / "d") as daemon:
        client = triton.InferenceServerClient(f"127.0.0.1:{daemon.port}")
        inputs = []
        for name, value in vad_in.items():
            dtype = "INT64" if value.dtype == np.int64 else "FP32"
            tensor = triton.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        result = client.infer("vad", inputs)
        np.testing.assert_allclose(
            result.as_numpy("output"), vad_out["output"], rtol=1e-4, atol=1e-5
        )

        tensor = triton.InferInput(detail_in["name"], list(frame.shape), "FP32")
        tensor.set_data_from_numpy(frame)
        result = client.infer("selfie", [tensor])
        np.testing.assert_allclose(result.as_numpy(detail_out["name"]), mask, rtol=1e-4, atol=1e-5)
        assert client.get_model_metadata("selfie")["platform"] == "tensorflow_lite"
        client.close()
