"""LiteRT (TFLite) backend: ``ai-edge-litert``, falling back to ``tflite-runtime``.

The interpreter maps ``model.tflite`` from ``model_path``; XNNPACK is the default CPU delegate
in both packages. Inputs whose signature has a dynamic leading dimension are resized per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edged.errors import InferenceFailedError, ModelLoadError
from edged.runtime.base import (
    NUMPY_TO_DATATYPE,
    Array,
    ModelMetadata,
    RuntimeProbe,
    TensorSpec,
    register_backend,
    weight_bytes,
)
from edged.runtime.options import RuntimeOptions

log = logging.getLogger(__name__)

_INTERPRETER_OVERHEAD_BYTES = 8 * 1024 * 1024


def _interpreter_class() -> tuple[Any, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite-runtime"
    except ImportError as exc:
        raise ModelLoadError(
            "no TFLite runtime: install ai-edge-litert (or tflite-runtime on older boards)"
        ) from exc


def _spec(detail: dict[str, Any]) -> TensorSpec:
    dtype = np.dtype(detail["dtype"])
    datatype = NUMPY_TO_DATATYPE.get(dtype)
    if datatype is None:
        raise ModelLoadError(
            f"tensor {detail['name']!r} has dtype {dtype}, which edged does not serve"
        )
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) else detail["shape"]
    return TensorSpec(detail["name"], datatype, tuple(int(d) for d in shape))


class LiteRtModel(ModelMetadata):
    def __init__(self, interpreter: Any, description: str) -> None:
        self._interp = interpreter
        self._input_details = interpreter.get_input_details()
        self._output_details = interpreter.get_output_details()
        super().__init__(
            tuple(_spec(d) for d in self._input_details),
            tuple(_spec(d) for d in self._output_details),
            description,
        )

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        interp = self._interp
        try:
            resized = False
            for detail in self._input_details:
                value = feeds[detail["name"]]
                if tuple(detail["shape"]) != value.shape:
                    interp.resize_tensor_input(detail["index"], list(value.shape))
                    resized = True
            if resized:
                interp.allocate_tensors()
                self._input_details = interp.get_input_details()
            for detail in self._input_details:
                interp.set_tensor(detail["index"], feeds[detail["name"]])
            interp.invoke()
            return {d["name"]: interp.get_tensor(d["index"]).copy() for d in self._output_details}
        except (ValueError, RuntimeError) as exc:
            raise InferenceFailedError(f"LiteRT failed: {exc}") from exc

    def close(self) -> None:
        self._interp = None


class LiteRtBackend:
    kind = "tflite"
    platform = "tensorflow_lite"  # the name Triton clients know it by
    model_file = "model.tflite"
    runtime_name = "litert"
    required = False
    install_hint = "pip install ai-edge-litert (TFLite models cannot load)"

    def probe(self) -> RuntimeProbe:
        _, package = _interpreter_class()
        return RuntimeProbe(f"{package} with XNNPACK", ("xnnpack",))

    def load(self, version_dir: Path, options: RuntimeOptions) -> LiteRtModel:
        interpreter_cls, package = _interpreter_class()
        path = str(version_dir / self.model_file)
        threads = options.intra_op_threads or None
        try:
            interpreter = interpreter_cls(model_path=path, num_threads=threads)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"LiteRT cannot load {path}: {exc}") from exc
        description = f"{package} delegate=XNNPACK threads={threads or 'default'}"
        log.info("loaded %s: %s", path, description)
        return LiteRtModel(interpreter, description)

    def estimate_memory_bytes(self, version_dir: Path, options: RuntimeOptions) -> int:
        # XNNPACK packs weights into private memory unless a weight cache file is used.
        return _INTERPRETER_OVERHEAD_BYTES + weight_bytes(version_dir)


register_backend(LiteRtBackend())
