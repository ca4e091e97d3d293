"""Sample-MLP-compatible ONNX models that misbehave only in use: one that passes its test
vectors but spends tens of milliseconds per run (a hidden branch of large matrix products whose
result is multiplied by zero), and one that answers NaN for negative inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edged.demo.samples import write_test_vectors

HEAVY_ROWS = 3072  # rows x 1024 x 1024 multiply-adds, twice per run: tens of ms


def _save(version_dir: Path, nodes: list[Any], initializers: list[Any]) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "misbehaving",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    version_dir.mkdir(parents=True)
    onnx.save_model(model, str(version_dir / "model.onnx"))


def write_slow_mlp(version_dir: Path, seed: int = 3) -> None:
    """``output = relu(x @ W1 + b1) @ W2 + b2`` plus zero times a heavy branch."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((64, 128), dtype=np.float32) * np.float32(0.1)
    b1 = np.zeros(128, np.float32)
    w2 = rng.standard_normal((128, 10), dtype=np.float32) * np.float32(0.1)
    b2 = np.zeros(10, np.float32)
    h0 = rng.standard_normal((64, 1024), dtype=np.float32) * np.float32(0.01)
    h1 = rng.standard_normal((1024, 1024), dtype=np.float32) * np.float32(0.01)
    from onnx import helper

    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["a1"]),
        helper.make_node("Add", ["a1", "b1"], ["a2"]),
        helper.make_node("Relu", ["a2"], ["a3"]),
        helper.make_node("MatMul", ["a3", "w2"], ["a4"]),
        helper.make_node("Add", ["a4", "b2"], ["mlp"]),
        helper.make_node("MatMul", ["input", "h0"], ["p0"]),
        helper.make_node("ReduceMean", ["p0"], ["p1"], axes=[0], keepdims=1),
        helper.make_node("Expand", ["p1", "rows"], ["p2"]),
        helper.make_node("MatMul", ["p2", "h1"], ["p3"]),
        helper.make_node("Tanh", ["p3"], ["p4"]),
        helper.make_node("MatMul", ["p4", "h1"], ["p5"]),
        helper.make_node("Tanh", ["p5"], ["p6"]),
        helper.make_node("ReduceMean", ["p6"], ["p7"], keepdims=0),
        helper.make_node("Mul", ["p7", "zero"], ["p8"]),
        helper.make_node("Add", ["mlp", "p8"], ["output"]),
    ]
    initializers = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(b2, "b2"),
        numpy_helper.from_array(h0, "h0"),
        numpy_helper.from_array(h1, "h1"),
        numpy_helper.from_array(np.array([HEAVY_ROWS, 1024], np.int64), "rows"),
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
    ]
    _save(version_dir, nodes, initializers)
    x = rng.standard_normal((2, 64), dtype=np.float32)
    expected = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    write_test_vectors(version_dir / "test_vectors.npz", {"input": x}, {"output": expected})


def write_sqrt_model(version_dir: Path) -> None:
    """``output = sqrt(input) @ W + b``: finite on its (non-negative) test vectors, NaN for
    any negative live input."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(5)
    weight = rng.standard_normal((64, 10), dtype=np.float32) * np.float32(0.1)
    bias = np.zeros(10, np.float32)
    nodes = [
        helper.make_node("Sqrt", ["input"], ["root"]),
        helper.make_node("MatMul", ["root", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["output"]),
    ]
    _save(
        version_dir,
        nodes,
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    x = np.abs(rng.standard_normal((2, 64), dtype=np.float32))
    write_test_vectors(
        version_dir / "test_vectors.npz", {"input": x}, {"output": np.sqrt(x) @ weight + bias}
    )


def write_hanging_mlp(version_dir: Path, seed: int = 4) -> None:
    """The sample MLP plus zero times the result of a loop of 10^15 iterations: loads, then
    hangs in its first run (its self-test), as a runtime stuck on an input can."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((64, 10), dtype=np.float32) * np.float32(0.1)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
        ],
        initializer=[numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["mlp"]),
        helper.make_node("ReduceSum", ["input"], ["s"], keepdims=0),
        helper.make_node("Reshape", ["s", "shape1"], ["s1"]),
        helper.make_node("Loop", ["trips", "true", "s1"], ["spun"], body=body),
        helper.make_node("Mul", ["spun", "zero"], ["nothing"]),
        helper.make_node("Add", ["mlp", "nothing"], ["output"]),
    ]
    initializers = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array(10**15, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(np.array([1], np.int64), "shape1"),
        numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
    ]
    _save(version_dir, nodes, initializers)
    x = rng.standard_normal((2, 64), dtype=np.float32)
    write_test_vectors(version_dir / "test_vectors.npz", {"input": x}, {"output": x @ w})
