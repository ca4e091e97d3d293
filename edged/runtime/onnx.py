"""ONNX Runtime backend.

Weights live in external-data files next to ``model.onnx``; ONNX Runtime maps those files
instead of reading them into the heap. With ``memory_lean`` the session does not prepack
weights either, so a model costs page cache, not private memory (at some GEMM throughput).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edged.errors import InferenceFailedError, ModelLoadError
from edged.runtime.base import (
    Array,
    ModelMetadata,
    RuntimeProbe,
    TensorSpec,
    register_backend,
    weight_bytes,
)
from edged.runtime.options import RuntimeOptions

log = logging.getLogger(__name__)

# Preference when the model config names none: accelerators first, CPU always last.
DEFAULT_PROVIDER_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)

_ONNX_TYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
}

# Fixed cost of a session (arena, graph, kernels) observed with small models.
_SESSION_OVERHEAD_BYTES = 16 * 1024 * 1024


def choose_providers(requested: tuple[str, ...], available: list[str]) -> list[str]:
    """Requested providers that this ONNX Runtime build has, in order, CPU always last."""
    wanted = requested or DEFAULT_PROVIDER_PREFERENCE
    chosen = [p for p in wanted if p in available and p != "CPUExecutionProvider"]
    chosen.append("CPUExecutionProvider")
    return chosen


def _spec(arg: Any) -> TensorSpec:
    datatype = _ONNX_TYPES.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"tensor {arg.name!r} has type {arg.type}, which edged does not serve")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, datatype, shape)


class OnnxModel(ModelMetadata):
    def __init__(self, session: Any, description: str) -> None:
        super().__init__(
            tuple(_spec(a) for a in session.get_inputs()),
            tuple(_spec(a) for a in session.get_outputs()),
            description,
        )
        self._session = session
        self._output_names = [o.name for o in self.outputs]

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        try:
            results = self._session.run(self._output_names, dict(feeds))
        except Exception as exc:  # ORT raises its own untyped errors
            raise InferenceFailedError(f"ONNX Runtime failed: {exc}") from exc
        return {name: np.asarray(r) for name, r in zip(self._output_names, results, strict=True)}

    def close(self) -> None:
        self._session = None


class OnnxBackend:
    kind = "onnx"
    platform = "onnxruntime_onnx"  # the name Triton clients know it by
    model_file = "model.onnx"
    runtime_name = "onnxruntime"
    required = True
    install_hint = "reinstall edged (pip install onnxruntime)"

    def probe(self) -> RuntimeProbe:
        import onnxruntime as ort

        providers = tuple(ort.get_available_providers())
        return RuntimeProbe(f"{ort.__version__}: {', '.join(providers)}", providers)

    def load(self, version_dir: Path, options: RuntimeOptions) -> OnnxModel:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.intra_op_threads:
            so.intra_op_num_threads = options.intra_op_threads
        if options.inter_op_threads:
            so.inter_op_num_threads = options.inter_op_threads
        spin = "1" if options.spin_wait else "0"  # ONNX Runtime's own default is to spin
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if options.memory_lean:
            so.add_session_config_entry("session.disable_prepacking", "1")
            so.enable_cpu_mem_arena = False
        providers = choose_providers(options.providers, ort.get_available_providers())
        path = str(version_dir / self.model_file)
        try:
            session = ort.InferenceSession(path, sess_options=so, providers=providers)
        except Exception as exc:
            if providers == ["CPUExecutionProvider"]:
                raise ModelLoadError(f"ONNX Runtime cannot load {path}: {exc}") from exc
            log.warning(
                "providers %s failed for %s (%s); falling back to CPU", providers, path, exc
            )
            try:
                session = ort.InferenceSession(
                    path, sess_options=so, providers=["CPUExecutionProvider"]
                )
            except Exception as exc2:
                raise ModelLoadError(f"ONNX Runtime cannot load {path}: {exc2}") from exc2
        active = session.get_providers()
        if options.providers and active[0] != options.providers[0]:
            log.warning("%s: wanted %s, running on %s", path, options.providers[0], active[0])
        description = (
            f"onnxruntime {ort.__version__} providers={','.join(active)} "
            f"intra_op_threads={options.intra_op_threads or 'default'} "
            f"spin_wait={options.spin_wait} memory_lean={options.memory_lean}"
        )
        log.info("loaded %s: %s", path, description)
        return OnnxModel(session, description)

    def estimate_memory_bytes(self, version_dir: Path, options: RuntimeOptions) -> int:
        # Prepacking copies (and re-lays out) every weight matrix into private memory.
        weights = weight_bytes(version_dir)
        return _SESSION_OVERHEAD_BYTES + (weights // 20 if options.memory_lean else weights)


register_backend(OnnxBackend())
