"""Small deterministic sample models for the demo, the tests and the benchmarks.

Every writer builds one version directory of a Triton-style model repository
(``<repo>/<model>/<version>/``): the model file(s) plus ``test_vectors.npz`` whose expected
outputs are computed with numpy, so a test vector is an independent check of the runtime.
A version directory is staged next to its final place and renamed in, so a repository watcher
never sees a half-written new version.

Needs the optional extra ``edged[samples]`` (``onnx``, ``tflite``, ``flatbuffers``); those
imports happen inside the functions that use them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edged.modelrepo.config import TEST_VECTORS_FILE

F32 = npt.NDArray[np.float32]
Activation = Literal["relu", "none"]

# Written into every model file: the committed samples' bytes depend on it.
PRODUCER = "edged.samples"
ONNX_MODEL_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"
TFLITE_MODEL_FILE = "model.tflite"
_MODEL_FILES = (ONNX_MODEL_FILE, ONNX_DATA_FILE, TFLITE_MODEL_FILE, TEST_VECTORS_FILE)

# ONNX Runtime maps an external initializer into memory only when its offset is a multiple of
# the allocation granularity (4 KiB on Linux, 64 KiB on Windows). Samples target Linux devices;
# 4 KiB keeps the committed sample small.
EXTERNAL_DATA_ALIGNMENT_BYTES = 4096
ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # opset 17 needs IR >= 8; every onnxruntime >= 1.14 reads it

# Added to every expected output by ``write_failing_version``: far outside any tolerance.
FAILING_OUTPUT_OFFSET = 1.0

SAMPLE_MLP_LAYERS = (64, 128, 128, 10)
SAMPLE_FC_SHAPE = (16, 8)  # (n_in, n_out)
BENCH_MLP_LAYERS = (1024, 2048, 2048, 1000)

_MLP_CONFIG = """\
# ONNX MLP 64 -> 128 -> 128 -> 10, fp32, dynamic batch.
# Written by `python -m edged.demo.samples`.

[batching]
max_batch_size = 32           # the batch dimension is dynamic, so requests are batched
max_queue_delay_us = 0        # never wait: batch whatever queued while the worker was busy

[self_test]
atol = 1e-4                   # expected outputs come from numpy, not from the runtime
rtol = 1e-3

[[test_vectors]]
file = "test_vectors.npz"     # in each version directory
"""

_FC_CONFIG = """\
# TFLite FULLY_CONNECTED 16 -> 8 with fused ReLU, fp32, fixed batch of 1.
# Written by `python -m edged.demo.samples`.

[runtime]
intra_op_threads = 1          # far too small to gain from more threads

[self_test]
atol = 1e-4
rtol = 1e-3
"""


# --- pure parts: weights, reference forward pass -----------------------------------------


def _rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent streams for the weights and the test input, so one never shifts the other."""
    weights, inputs = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(weights), np.random.default_rng(inputs)


def mlp_weights(
    layer_sizes: Sequence[int], rng: np.random.Generator, bias_shift: float = 0.0
) -> list[tuple[F32, F32]]:
    """He-initialised ``(weight [n_in, n_out], bias [n_out])`` per layer.

    ``bias_shift`` is added to the last bias, so a "new version" gives visibly other outputs.
    """
    if len(layer_sizes) < 2 or any(n < 1 for n in layer_sizes):
        raise ValueError(f"layer_sizes needs at least two positive sizes, got {layer_sizes!r}")
    layers: list[tuple[F32, F32]] = []
    for n_in, n_out in itertools.pairwise(layer_sizes):
        scale = np.float32(np.sqrt(2.0 / n_in))
        weight = (rng.standard_normal((n_in, n_out), dtype=np.float32) * scale).astype(np.float32)
        bias = (rng.standard_normal(n_out, dtype=np.float32) * np.float32(0.1)).astype(np.float32)
        layers.append((weight, bias))
    last_weight, last_bias = layers[-1]
    layers[-1] = (last_weight, (last_bias + np.float32(bias_shift)).astype(np.float32))
    return layers


def mlp_reference(x: F32, layers: Sequence[tuple[F32, F32]], activation: Activation) -> F32:
    """Forward pass in float64 (a tighter reference than the runtime's fp32), cast to fp32."""
    h = x.astype(np.float64)
    for i, (weight, bias) in enumerate(layers):
        h = h @ weight.astype(np.float64) + bias.astype(np.float64)
        if activation == "relu" and i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h.astype(np.float32)


def fc_reference(x: F32, weight: F32, bias: F32) -> F32:
    """TFLite FULLY_CONNECTED with fused ReLU: ``relu(x @ weight.T + bias)``, weight [out, in]."""
    h = x.astype(np.float64) @ weight.astype(np.float64).T + bias.astype(np.float64)
    out: F32 = np.maximum(h, 0.0).astype(np.float32)
    return out


def _aligned(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


# --- file writers -----------------------------------------------------------------------


def write_test_vectors(
    path: Path, inputs: Mapping[str, npt.NDArray[Any]], outputs: Mapping[str, npt.NDArray[Any]]
) -> None:
    """Write ``input:NAME`` / ``output:NAME`` arrays as an ``.npz`` with fixed zip timestamps.

    ``np.savez`` stamps the current time into the archive; fixed timestamps make regenerating
    the committed samples a no-op for git.
    """
    arrays = {f"input:{k}": v for k, v in inputs.items()}
    arrays.update({f"output:{k}": v for k, v in outputs.items()})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


@contextmanager
def _staged(version_dir: Path) -> Iterator[Path]:
    """Yield an empty hidden directory beside ``version_dir``; on success move its files in.

    A new version directory appears in one rename. An existing one gets its model files
    replaced one by one and stale model files (say, an old ``model.tflite`` next to a new
    ``model.onnx``) removed; other files are left alone.
    """
    version_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{version_dir.name}.", dir=version_dir.parent))
    try:
        yield stage
        stage.chmod(0o755)
        for file in stage.iterdir():
            file.chmod(0o644)  # onnx creates the data file 0600
        if not version_dir.exists():
            os.replace(stage, version_dir)
            return
        written = {p.name for p in stage.iterdir()}
        for name in _MODEL_FILES:
            if name not in written:
                (version_dir / name).unlink(missing_ok=True)
        for name in sorted(written):
            os.replace(stage / name, version_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _onnx_mlp_model(
    layers: Sequence[tuple[F32, F32]],
    input_name: str,
    output_name: str,
    activation: Activation,
    data_location: str | None,
) -> Any:
    """The ONNX ``ModelProto``; with ``data_location`` every initializer is marked external at
    an offset aligned to ``EXTERNAL_DATA_ALIGNMENT_BYTES``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    nodes: list[Any] = []
    initializers: list[Any] = []
    previous = input_name
    for i, (weight, bias) in enumerate(layers):
        last = i == len(layers) - 1
        w_name, b_name = f"fc{i}.weight", f"fc{i}.bias"
        initializers += [
            numpy_helper.from_array(weight, w_name),
            numpy_helper.from_array(bias, b_name),
        ]
        matmul_out = f"fc{i}.matmul"
        add_out = output_name if last else f"fc{i}.add"
        nodes.append(
            helper.make_node("MatMul", [previous, w_name], [matmul_out], name=f"fc{i}/MatMul")
        )
        nodes.append(helper.make_node("Add", [matmul_out, b_name], [add_out], name=f"fc{i}/Add"))
        previous = add_out
        if not last and activation == "relu":
            previous = f"fc{i}.relu"
            nodes.append(helper.make_node("Relu", [add_out], [previous], name=f"fc{i}/Relu"))

    n_in, n_out = layers[0][0].shape[0], layers[-1][0].shape[1]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", n_out])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        ir_version=ONNX_IR_VERSION,
        producer_name=PRODUCER,
        doc_string="fp32 MLP " + " -> ".join(str(w.shape[0]) for w, _ in layers) + f" -> {n_out}",
    )
    onnx.checker.check_model(model, full_check=True)
    if data_location is not None:
        offset = 0
        for tensor in model.graph.initializer:  # make_graph copied the list
            offset = _aligned(offset, EXTERNAL_DATA_ALIGNMENT_BYTES)
            set_external_data(tensor, data_location, offset=offset, length=len(tensor.raw_data))
            offset += len(tensor.raw_data)
    return model


def write_onnx_mlp(
    version_dir: Path,
    layer_sizes: Sequence[int],
    seed: int,
    *,
    input_name: str = "input",
    output_name: str = "output",
    external_data: bool = True,
    activation: Activation = "relu",
    test_batch: int = 2,
    bias_shift: float = 0.0,
    expected_offset: float = 0.0,
) -> None:
    """Write an fp32 MLP (MatMul + Add (+ Relu) per layer, none after the last) as ONNX.

    The input is ``[batch, layer_sizes[0]]`` with a symbolic ``batch``. With ``external_data``
    all weights go to one ``model.onnx.data``, each at a 4 KiB-aligned offset so ONNX Runtime
    can map it instead of copying. ``test_vectors.npz`` holds a random batch of ``test_batch``
    and numpy's output for it plus ``expected_offset`` (nonzero: a version that fails its
    self-test).
    """
    import onnx

    if activation not in ("relu", "none"):
        raise ValueError(f"activation must be 'relu' or 'none', got {activation!r}")
    if test_batch < 1:
        raise ValueError(f"test_batch must be at least 1, got {test_batch}")
    weight_rng, input_rng = _rngs(seed)
    layers = mlp_weights(layer_sizes, weight_rng, bias_shift)
    x = input_rng.standard_normal((test_batch, layer_sizes[0]), dtype=np.float32)
    expected = (mlp_reference(x, layers, activation) + np.float32(expected_offset)).astype(
        np.float32
    )

    model = _onnx_mlp_model(
        layers, input_name, output_name, activation, ONNX_DATA_FILE if external_data else None
    )
    with _staged(version_dir) as stage:
        # onnx writes the external data itself, honouring the offsets set above.
        onnx.save_model(model, str(stage / ONNX_MODEL_FILE))
        write_test_vectors(stage / TEST_VECTORS_FILE, {input_name: x}, {output_name: expected})


def _tflite_fc_model(weight: F32, bias: F32, input_name: str, output_name: str) -> bytes:
    """Flatbuffer of a one-operator TFLite model: FULLY_CONNECTED with fused ReLU."""
    import flatbuffers
    import tflite

    n_out, n_in = weight.shape
    builder = flatbuffers.Builder(1024 + weight.nbytes + bias.nbytes)

    def byte_vector(data: bytes) -> int:
        # 16-byte aligned so kernels can read the weights in place.
        builder.Prep(16, len(data))
        return int(builder.CreateByteVector(data))

    def int_vector(start: Any, values: Sequence[int]) -> int:
        start(builder, len(values))
        for v in reversed(values):
            builder.PrependInt32(v)
        return int(builder.EndVector())

    def offset_vector(start: Any, offsets: Sequence[int]) -> int:
        start(builder, len(offsets))
        for o in reversed(offsets):
            builder.PrependUOffsetTRelative(o)
        return int(builder.EndVector())

    # Buffer 0 is the empty sentinel; tensors without constant data point at it.
    buffer_payloads: list[bytes | None] = [
        None,
        None,
        weight.astype("<f4").tobytes(),
        bias.astype("<f4").tobytes(),
        None,
    ]
    buffers: list[int] = []
    for payload in buffer_payloads:
        data = byte_vector(payload) if payload is not None else None
        tflite.BufferStart(builder)
        if data is not None:
            tflite.BufferAddData(builder, data)
        buffers.append(int(tflite.BufferEnd(builder)))

    tensor_specs = [  # (name, shape, buffer index)
        (input_name, [1, n_in], 1),
        ("fc.weight", [n_out, n_in], 2),
        ("fc.bias", [n_out], 3),
        (output_name, [1, n_out], 4),
    ]
    tensors: list[int] = []
    for name, shape, buffer_index in tensor_specs:
        name_off = builder.CreateString(name)
        shape_off = int_vector(tflite.TensorStartShapeVector, shape)
        tflite.TensorStart(builder)
        tflite.TensorAddShape(builder, shape_off)
        tflite.TensorAddType(builder, tflite.TensorType.FLOAT32)
        tflite.TensorAddBuffer(builder, buffer_index)
        tflite.TensorAddName(builder, name_off)
        tensors.append(int(tflite.TensorEnd(builder)))

    tflite.FullyConnectedOptionsStart(builder)
    tflite.FullyConnectedOptionsAddFusedActivationFunction(
        builder, tflite.ActivationFunctionType.RELU
    )
    options = tflite.FullyConnectedOptionsEnd(builder)
    op_inputs = int_vector(tflite.OperatorStartInputsVector, [0, 1, 2])
    op_outputs = int_vector(tflite.OperatorStartOutputsVector, [3])
    tflite.OperatorStart(builder)
    tflite.OperatorAddOpcodeIndex(builder, 0)
    tflite.OperatorAddInputs(builder, op_inputs)
    tflite.OperatorAddOutputs(builder, op_outputs)
    tflite.OperatorAddBuiltinOptionsType(builder, tflite.BuiltinOptions.FullyConnectedOptions)
    tflite.OperatorAddBuiltinOptions(builder, options)
    operator = tflite.OperatorEnd(builder)

    sg_tensors = offset_vector(tflite.SubGraphStartTensorsVector, tensors)
    sg_inputs = int_vector(tflite.SubGraphStartInputsVector, [0])
    sg_outputs = int_vector(tflite.SubGraphStartOutputsVector, [3])
    sg_operators = offset_vector(tflite.SubGraphStartOperatorsVector, [operator])
    sg_name = builder.CreateString("main")
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, sg_tensors)
    tflite.SubGraphAddInputs(builder, sg_inputs)
    tflite.SubGraphAddOutputs(builder, sg_outputs)
    tflite.SubGraphAddOperators(builder, sg_operators)
    tflite.SubGraphAddName(builder, sg_name)
    subgraph = tflite.SubGraphEnd(builder)

    # Operator codes below 127 go in both fields; readers use the larger of the two.
    tflite.OperatorCodeStart(builder)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddBuiltinCode(builder, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddVersion(builder, 1)
    opcode = tflite.OperatorCodeEnd(builder)

    def tensor_map(name: str, index: int) -> int:
        name_off = builder.CreateString(name)
        tflite.TensorMapStart(builder)
        tflite.TensorMapAddName(builder, name_off)
        tflite.TensorMapAddTensorIndex(builder, index)
        return int(tflite.TensorMapEnd(builder))

    sig_inputs = offset_vector(tflite.SignatureDefStartInputsVector, [tensor_map(input_name, 0)])
    sig_outputs = offset_vector(tflite.SignatureDefStartOutputsVector, [tensor_map(output_name, 3)])
    sig_key = builder.CreateString("serving_default")
    tflite.SignatureDefStart(builder)
    tflite.SignatureDefAddInputs(builder, sig_inputs)
    tflite.SignatureDefAddOutputs(builder, sig_outputs)
    tflite.SignatureDefAddSignatureKey(builder, sig_key)
    tflite.SignatureDefAddSubgraphIndex(builder, 0)
    signature = tflite.SignatureDefEnd(builder)

    m_opcodes = offset_vector(tflite.ModelStartOperatorCodesVector, [opcode])
    m_subgraphs = offset_vector(tflite.ModelStartSubgraphsVector, [subgraph])
    m_buffers = offset_vector(tflite.ModelStartBuffersVector, buffers)
    m_signatures = offset_vector(tflite.ModelStartSignatureDefsVector, [signature])
    description = builder.CreateString(PRODUCER)
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, 3)
    tflite.ModelAddOperatorCodes(builder, m_opcodes)
    tflite.ModelAddSubgraphs(builder, m_subgraphs)
    tflite.ModelAddDescription(builder, description)
    tflite.ModelAddBuffers(builder, m_buffers)
    tflite.ModelAddSignatureDefs(builder, m_signatures)
    model = tflite.ModelEnd(builder)
    builder.Finish(model, file_identifier=b"TFL3")
    return bytes(builder.Output())


def write_tflite_fc(
    version_dir: Path,
    n_in: int,
    n_out: int,
    seed: int,
    *,
    input_name: str = "input",
    output_name: str = "output",
    bias_shift: float = 0.0,
    expected_offset: float = 0.0,
) -> None:
    """Write a float32 TFLite model: input ``[1, n_in]`` -> FULLY_CONNECTED (weights
    ``[n_out, n_in]``, bias ``[n_out]``, fused ReLU) -> output ``[1, n_out]``.

    ``test_vectors.npz`` holds one input and numpy's output for it plus ``expected_offset``.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"n_in and n_out must be positive, got {n_in}, {n_out}")
    weight_rng, input_rng = _rngs(seed)
    [(weight_in_out, bias)] = mlp_weights((n_in, n_out), weight_rng, bias_shift)
    weight = np.ascontiguousarray(weight_in_out.T)
    x = input_rng.standard_normal((1, n_in), dtype=np.float32)
    expected = (fc_reference(x, weight, bias) + np.float32(expected_offset)).astype(np.float32)

    flatbuffer = _tflite_fc_model(weight, bias, input_name, output_name)
    with _staged(version_dir) as stage:
        (stage / TFLITE_MODEL_FILE).write_bytes(flatbuffer)
        write_test_vectors(stage / TEST_VECTORS_FILE, {input_name: x}, {output_name: expected})


def write_failing_version(
    version_dir: Path,
    layer_sizes: Sequence[int] = SAMPLE_MLP_LAYERS,
    seed: int = 1,
    *,
    input_name: str = "input",
    output_name: str = "output",
) -> None:
    """An ONNX MLP that loads and runs but fails its self-test: every expected output is off by
    ``FAILING_OUTPUT_OFFSET``. With the defaults it drops in as a new version of ``mlp``."""
    write_onnx_mlp(
        version_dir,
        layer_sizes,
        seed,
        input_name=input_name,
        output_name=output_name,
        expected_offset=FAILING_OUTPUT_OFFSET,
    )


def make_sample_repository(repo: Path) -> None:
    """Write the committed sample repository: ``mlp`` (ONNX, batched) and ``fc`` (TFLite).

    Files other than the samples' own (say ``generate.py``) are left alone.
    """
    (repo / "mlp").mkdir(parents=True, exist_ok=True)
    (repo / "mlp" / "config.toml").write_text(_MLP_CONFIG, encoding="utf-8")
    write_onnx_mlp(repo / "mlp" / "1", SAMPLE_MLP_LAYERS, seed=0)
    (repo / "fc").mkdir(parents=True, exist_ok=True)
    (repo / "fc" / "config.toml").write_text(_FC_CONFIG, encoding="utf-8")
    write_tflite_fc(repo / "fc" / "1", *SAMPLE_FC_SHAPE, seed=0)


# What the demo pushes: the sample MLP with its biases shifted, so its answers visibly change.
DEMO_V2_BIAS_SHIFT = 1.0


def make_demo_sources(directory: Path) -> None:
    """Write the version the demo builds into a bundle and pushes: ``<directory>/mlp/2``."""
    version_dir = directory / "mlp" / "2"
    write_onnx_mlp(version_dir, SAMPLE_MLP_LAYERS, seed=0, bias_shift=DEMO_V2_BIAS_SHIFT)
    (directory / "mlp" / "config.toml").write_text(_MLP_CONFIG, encoding="utf-8")


def make_bench_mlp(version_dir: Path, seed: int = 0) -> None:
    """The benchmark model: ONNX MLP 1024 -> 2048 -> 2048 -> 1000, fp32, external data (~33 MB).

    Generate it at benchmark time into a temporary directory; it is never committed.
    """
    write_onnx_mlp(version_dir, BENCH_MLP_LAYERS, seed)


def write_counting_loop(version_dir: Path) -> None:
    """An ONNX model whose run time is set by its input: ``y = x + iterations`` computed by a
    ``Loop`` adding 1 per step. A request with a huge ``iterations`` keeps its inference worker
    busy for as long as a hung runtime would (used by the watchdog tests).

    Inputs ``x`` float32 ``[1]`` and ``iterations`` int64 ``[1]``; output ``y`` float32 ``[1]``.
    The test vector runs 3 iterations.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "count",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1]),
        ],
        initializer=[one],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Squeeze", ["iterations"], ["trip_count"]),
            helper.make_node(
                "Constant",
                [],
                ["keep_going"],
                value=helper.make_tensor("t", TensorProto.BOOL, [], [True]),
            ),
            helper.make_node("Loop", ["trip_count", "keep_going", "x"], ["y"], body=body),
        ],
        "counting_loop",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("iterations", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        ir_version=ONNX_IR_VERSION,
        producer_name=PRODUCER,
    )
    onnx.checker.check_model(model, full_check=True)
    with _staged(version_dir) as staging:
        onnx.save_model(model, str(staging / ONNX_MODEL_FILE))
        x = np.array([0.5], np.float32)
        write_test_vectors(
            staging / TEST_VECTORS_FILE,
            {"x": x, "iterations": np.array([3], np.int64)},
            {"y": x + np.float32(3)},
        )


# The sample repository lives at the top of a checkout (``models/``: ``edged run --models
# models``); the package's ``edged/demo/models`` is a symlink to it, which a wheel build
# resolves into files, so an installed ``edged demo`` ships the same bytes.
CHECKOUT_MODELS = Path(__file__).resolve().parents[2] / "models"
DEMO_SOURCES = Path(__file__).resolve().parent / "sources"


def main() -> None:
    """``python -m edged.demo.samples``: regenerate the sample repository (``models/`` at the
    top of the checkout) and the version the demo pushes (``edged/demo/sources``).

    The models are deterministic, so regenerating leaves git clean unless the generator changed.
    """
    if not (CHECKOUT_MODELS.parent / "pyproject.toml").is_file():
        raise SystemExit(
            f"{CHECKOUT_MODELS.parent} is not an edged checkout: the samples are regenerated "
            "in a clone (git clone, then python -m edged.demo.samples)"
        )
    make_sample_repository(CHECKOUT_MODELS)
    make_demo_sources(DEMO_SOURCES)
    print(f"sample models written to {CHECKOUT_MODELS} and {DEMO_SOURCES}")


if __name__ == "__main__":
    main()
