"""The sample-model generator: models load in the real runtimes and match their numpy vectors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter

from edged.demo import samples
from edged.modelrepo.config import TEST_VECTORS_FILE, load_model_config, load_test_vectors
from tests.support.daemon import running_daemon

COMMITTED_REPOSITORY = samples.CHECKOUT_MODELS
COMMITTED_SOURCES = Path(samples.__file__).resolve().parent / "sources"
Arrays = dict[str, npt.NDArray[Any]]


def _vectors(version_dir: Path) -> tuple[Arrays, Arrays]:
    with np.load(version_dir / TEST_VECTORS_FILE, allow_pickle=False) as npz:
        inputs = {k.removeprefix("input:"): npz[k] for k in npz.files if k.startswith("input:")}
        outputs = {k.removeprefix("output:"): npz[k] for k in npz.files if k.startswith("output:")}
    return inputs, outputs


def _run_onnx(version_dir: Path, inputs: Arrays) -> Arrays:
    session = ort.InferenceSession(
        str(version_dir / samples.ONNX_MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def _run_tflite(version_dir: Path, inputs: Arrays) -> Arrays:
    interpreter = Interpreter(model_path=str(version_dir / samples.TFLITE_MODEL_FILE))
    interpreter.allocate_tensors()
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(detail["index"], inputs[detail["name"]])
    interpreter.invoke()
    return {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}


def _matches(actual: Arrays, expected: Arrays) -> bool:
    assert actual.keys() == expected.keys()
    return all(np.allclose(actual[k], expected[k], atol=1e-4, rtol=1e-3) for k in expected)


@pytest.fixture
def mlp_dir(tmp_path: Path) -> Path:
    version_dir = tmp_path / "mlp" / "1"
    samples.write_onnx_mlp(version_dir, (8, 16, 4), seed=3, test_batch=3)
    return version_dir


def test_onnx_mlp_has_a_dynamic_batch_dimension(mlp_dir: Path) -> None:
    session = ort.InferenceSession(
        str(mlp_dir / samples.ONNX_MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    [model_input] = session.get_inputs()
    [model_output] = session.get_outputs()
    assert (model_input.name, model_input.shape, model_input.type) == (
        "input",
        ["batch", 8],
        "tensor(float)",
    )
    assert (model_output.name, model_output.shape) == ("output", ["batch", 4])
    for batch in (1, 5, 32):
        x = np.ones((batch, 8), dtype=np.float32)
        [y] = session.run(None, {"input": x})
        assert y.shape == (batch, 4)


def test_onnx_mlp_output_matches_its_numpy_test_vector(mlp_dir: Path) -> None:
    inputs, outputs = _vectors(mlp_dir)
    assert inputs["input"].shape == (3, 8)
    assert outputs["output"].shape == (3, 4)
    assert _matches(_run_onnx(mlp_dir, inputs), outputs)


def test_onnx_weights_are_in_one_aligned_external_file(mlp_dir: Path) -> None:
    model_file = mlp_dir / samples.ONNX_MODEL_FILE
    data_file = mlp_dir / samples.ONNX_DATA_FILE
    weight_bytes = 4 * (8 * 16 + 16 + 16 * 4 + 4)
    assert model_file.stat().st_size < 2048
    assert data_file.stat().st_size >= weight_bytes
    onnx.checker.check_model(str(model_file), full_check=True)
    model = onnx.load(str(model_file), load_external_data=False)
    assert [t.name for t in model.graph.initializer] == [
        "fc0.weight",
        "fc0.bias",
        "fc1.weight",
        "fc1.bias",
    ]
    for tensor in model.graph.initializer:
        assert tensor.data_location == onnx.TensorProto.EXTERNAL
        info = {entry.key: entry.value for entry in tensor.external_data}
        assert info["location"] == samples.ONNX_DATA_FILE
        assert int(info["offset"]) % samples.EXTERNAL_DATA_ALIGNMENT_BYTES == 0


def test_onnx_mlp_without_external_data_is_one_file(tmp_path: Path) -> None:
    samples.write_onnx_mlp(tmp_path / "1", (4, 3), seed=0, external_data=False, activation="none")
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == [
        samples.ONNX_MODEL_FILE,
        TEST_VECTORS_FILE,
    ]
    inputs, outputs = _vectors(tmp_path / "1")
    assert _matches(_run_onnx(tmp_path / "1", inputs), outputs)


def test_bias_shift_gives_a_new_version_visibly_different_outputs(tmp_path: Path) -> None:
    samples.write_onnx_mlp(tmp_path / "1", (8, 16, 4), seed=3)
    samples.write_onnx_mlp(tmp_path / "2", (8, 16, 4), seed=3, bias_shift=0.5)
    inputs, outputs_v1 = _vectors(tmp_path / "1")
    _, outputs_v2 = _vectors(tmp_path / "2")
    np.testing.assert_allclose(outputs_v2["output"] - outputs_v1["output"], 0.5, atol=1e-5)
    assert _matches(_run_onnx(tmp_path / "2", inputs), outputs_v2)


def test_tflite_fc_runs_in_litert_and_matches_its_test_vector(tmp_path: Path) -> None:
    version_dir = tmp_path / "fc" / "1"
    samples.write_tflite_fc(version_dir, 16, 8, seed=5, input_name="x", output_name="y")
    interpreter = Interpreter(model_path=str(version_dir / samples.TFLITE_MODEL_FILE))
    [model_input] = interpreter.get_input_details()
    [model_output] = interpreter.get_output_details()
    assert (model_input["name"], list(model_input["shape"]), model_input["dtype"]) == (
        "x",
        [1, 16],
        np.float32,
    )
    assert (model_output["name"], list(model_output["shape"])) == ("y", [1, 8])
    inputs, outputs = _vectors(version_dir)
    actual = _run_tflite(version_dir, inputs)
    assert _matches(actual, outputs)
    assert (actual["y"] >= 0).all()  # fused ReLU
    assert interpreter.get_signature_list() == {
        "serving_default": {"inputs": ["x"], "outputs": ["y"]}
    }


def test_tflite_flatbuffer_header(tmp_path: Path) -> None:
    samples.write_tflite_fc(tmp_path / "1", 4, 2, seed=0)
    assert (tmp_path / "1" / samples.TFLITE_MODEL_FILE).read_bytes()[4:8] == b"TFL3"


def test_failing_version_runs_but_mismatches_its_test_vector(tmp_path: Path) -> None:
    samples.write_onnx_mlp(tmp_path / "1", samples.SAMPLE_MLP_LAYERS, seed=1)
    samples.write_failing_version(tmp_path / "2")
    good_inputs, good_outputs = _vectors(tmp_path / "1")
    bad_inputs, bad_outputs = _vectors(tmp_path / "2")
    actual = _run_onnx(tmp_path / "2", bad_inputs)
    assert not _matches(actual, bad_outputs)
    # The model itself is sound: only its expected outputs are off.
    np.testing.assert_array_equal(bad_inputs["input"], good_inputs["input"])
    assert _matches(actual, good_outputs)


def test_tflite_expected_offset_makes_the_vector_mismatch(tmp_path: Path) -> None:
    samples.write_tflite_fc(tmp_path / "1", 4, 2, seed=0, expected_offset=1.0)
    inputs, outputs = _vectors(tmp_path / "1")
    assert not _matches(_run_tflite(tmp_path / "1", inputs), outputs)


def test_same_seed_gives_the_same_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        samples.write_onnx_mlp(tmp_path / name / "1", (8, 16, 4), seed=7)
        samples.write_tflite_fc(tmp_path / name / "2", 6, 3, seed=7)
    for version, file in [
        ("1", samples.ONNX_DATA_FILE),
        ("1", samples.ONNX_MODEL_FILE),
        ("1", TEST_VECTORS_FILE),
        ("2", samples.TFLITE_MODEL_FILE),
        ("2", TEST_VECTORS_FILE),
    ]:
        a = (tmp_path / "a" / version / file).read_bytes()
        b = (tmp_path / "b" / version / file).read_bytes()
        assert a == b, f"{version}/{file} differs between two runs with the same seed"


def test_another_seed_gives_other_weights(tmp_path: Path) -> None:
    samples.write_onnx_mlp(tmp_path / "1", (8, 16, 4), seed=7)
    samples.write_onnx_mlp(tmp_path / "2", (8, 16, 4), seed=8)
    data_1 = (tmp_path / "1" / samples.ONNX_DATA_FILE).read_bytes()
    data_2 = (tmp_path / "2" / samples.ONNX_DATA_FILE).read_bytes()
    assert len(data_1) == len(data_2)
    assert data_1 != data_2


def test_rewriting_a_version_replaces_its_model_and_leaves_no_staging_dirs(
    tmp_path: Path,
) -> None:
    version_dir = tmp_path / "m" / "1"
    samples.write_onnx_mlp(version_dir, (8, 16, 4), seed=1)
    (version_dir / "notes.txt").write_text("kept")
    samples.write_onnx_mlp(version_dir, (8, 16, 4), seed=1)  # onnx would append to old data
    inputs, outputs = _vectors(version_dir)
    assert _matches(_run_onnx(version_dir, inputs), outputs)

    samples.write_tflite_fc(version_dir, 4, 2, seed=1)
    assert sorted(p.name for p in version_dir.iterdir()) == [
        samples.TFLITE_MODEL_FILE,
        "notes.txt",
        TEST_VECTORS_FILE,
    ]
    assert [p.name for p in version_dir.parent.iterdir()] == ["1"]


def test_invalid_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layer_sizes"):
        samples.write_onnx_mlp(tmp_path / "1", (8,), seed=0)
    with pytest.raises(ValueError, match="test_batch"):
        samples.write_onnx_mlp(tmp_path / "1", (8, 2), seed=0, test_batch=0)
    with pytest.raises(ValueError, match="n_in"):
        samples.write_tflite_fc(tmp_path / "1", 0, 2, seed=0)
    assert not (tmp_path / "1").exists()


def test_sample_repository_passes_its_own_self_tests(tmp_path: Path) -> None:
    samples.make_sample_repository(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fc", "mlp"]
    mlp_config = load_model_config(tmp_path / "mlp" / "config.toml")
    assert mlp_config.batching.max_batch_size == 32
    for model, run in (("mlp", _run_onnx), ("fc", _run_tflite)):
        config = load_model_config(tmp_path / model / "config.toml")
        [vector] = load_test_vectors(config, tmp_path / model / "1")
        actual = run(tmp_path / model / "1", vector.inputs)
        assert actual.keys() == vector.outputs.keys()
        for name, expected in vector.outputs.items():
            np.testing.assert_allclose(
                actual[name], expected, atol=config.self_test.atol, rtol=config.self_test.rtol
            )


def test_committed_samples_are_what_the_generator_writes(tmp_path: Path) -> None:
    samples.make_sample_repository(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(COMMITTED_REPOSITORY)
        for model in ("mlp", "fc")
        for p in (COMMITTED_REPOSITORY / model).rglob("*")
        if p.is_file()
    )
    assert generated == committed, "run `python -m edged.demo.samples` and commit models/"
    for relative in generated:
        assert (tmp_path / relative).read_bytes() == (
            COMMITTED_REPOSITORY / relative
        ).read_bytes(), f"{relative} is stale: run `python -m edged.demo.samples`"
    total = sum((COMMITTED_REPOSITORY / p).stat().st_size for p in committed)
    assert total < 200 * 1024


@pytest.mark.slow
def test_bench_mlp_matches_its_test_vector(tmp_path: Path) -> None:
    samples.make_bench_mlp(tmp_path / "1")
    data_bytes = (tmp_path / "1" / samples.ONNX_DATA_FILE).stat().st_size
    assert 33_000_000 < data_bytes < 34_000_000
    inputs, outputs = _vectors(tmp_path / "1")
    assert inputs["input"].shape[1] == 1024
    assert _matches(_run_onnx(tmp_path / "1", inputs), outputs)


def test_committed_demo_sources_are_what_the_generator_writes(tmp_path: Path) -> None:
    samples.make_demo_sources(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(COMMITTED_SOURCES) for p in COMMITTED_SOURCES.rglob("*"))
    assert generated == [p for p in committed if (COMMITTED_SOURCES / p).is_file()]
    for relative in generated:
        assert (tmp_path / relative).read_bytes() == (COMMITTED_SOURCES / relative).read_bytes()


# --- one sample repository: models/ at the top, linked into the package --------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_package_links_the_one_sample_repository_at_the_top_level() -> None:
    link = REPO_ROOT / "edged" / "demo" / "models"
    assert link.is_symlink(), "edged/demo/models must link to models/, not hold a second copy"
    assert os.readlink(link) == "../../models"
    assert link.resolve() == COMMITTED_REPOSITORY == REPO_ROOT / "models"
    assert sorted(p.name for p in COMMITTED_REPOSITORY.iterdir()) == ["fc", "mlp"]


def _copy_of_the_checkout(target: Path) -> Path:
    """The checkout without build outputs, venvs or caches, symlinks kept as symlinks."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "out"
    )
    shutil.copytree(REPO_ROOT, target, symlinks=True, ignore=ignore)
    return target


@pytest.mark.slow
def test_a_wheel_ships_the_top_level_models_as_files(tmp_path: Path) -> None:
    source = _copy_of_the_checkout(tmp_path / "src")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    [wheel] = (tmp_path / "wheels").glob("edged-*.whl")
    committed = {
        p.relative_to(COMMITTED_REPOSITORY).as_posix(): p.read_bytes()
        for p in COMMITTED_REPOSITORY.rglob("*")
        if p.is_file()
    }
    with zipfile.ZipFile(wheel) as archive:
        shipped = {
            name.removeprefix("edged/demo/models/"): archive.read(name)
            for name in archive.namelist()
            if name.startswith("edged/demo/models/")
        }
    assert shipped == committed


@pytest.mark.integration
def test_edged_run_on_the_checkouts_models_serves_mlp_and_fc(tmp_path: Path) -> None:
    with running_daemon(Path("models"), tmp_path, cwd=REPO_ROOT) as daemon:
        for model, width in (("mlp", 64), ("fc", 16)):
            body = {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, width],
                        "datatype": "FP32",
                        "data": [0.5] * width,
                    }
                ]
            }
            request = urllib.request.Request(
                f"{daemon.url}/v2/models/{model}/infer", data=json.dumps(body).encode()
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.loads(response.read())
            assert answer["model_name"] == model
            assert answer["outputs"][0]["name"] == "output"
