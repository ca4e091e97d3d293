"""The runtime seam: tensor metadata, the loaded-model protocol and the backend registry."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edged.errors import UnsupportedModelError
from edged.runtime.options import RuntimeOptions

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]

# KServe v2 / Triton datatype names <-> numpy.
DATATYPE_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_DATATYPE: dict[np.dtype[Any], str] = {v: k for k, v in DATATYPE_TO_NUMPY.items()}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output. ``-1`` marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return DATATYPE_TO_NUMPY[self.datatype]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class LoadedModel(Protocol):
    """One loaded model version. ``run`` is called from worker threads, one batch at a time
    per model instance; ``close`` releases the runtime session."""

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def dynamic_batch(self) -> bool:
        """True when every input and output has a dynamic leading (batch) dimension."""
        ...

    @property
    def description(self) -> str:
        """One line for logs: runtime, providers/delegates chosen, lean or not."""
        ...

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]: ...

    def close(self) -> None: ...


class ModelMetadata:
    """What every loaded model tells about itself; backends' model classes extend it."""

    def __init__(
        self, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], description: str
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.description = description
        # Batchable when every input and output has a dynamic leading dimension.
        self.dynamic_batch = all(t.shape and t.shape[0] == -1 for t in (*inputs, *outputs))


@dataclass(frozen=True)
class RuntimeProbe:
    """What a backend's runtime is on this device."""

    summary: str  # e.g. "onnxruntime 1.20.1: CUDAExecutionProvider, CPUExecutionProvider"
    providers: tuple[str, ...]  # execution providers / delegates, as manifests name them


class Backend(Protocol):
    """A runtime plugin. It owns every fact about its kind; nothing else names backends."""

    kind: str  # what manifests call it (targets.runtime)
    platform: str  # the name Triton clients know it by
    model_file: str
    runtime_name: str  # what edged doctor calls the runtime
    required: bool  # a device without it is broken (else serving its models is optional)
    install_hint: str

    def probe(self) -> RuntimeProbe:
        """Import the runtime and say what it offers here. Raises whatever a missing or broken
        install raises (ImportError, OSError, ...); imports the runtime, so not at start-up."""
        ...

    def load(self, version_dir: Path, options: RuntimeOptions) -> LoadedModel: ...

    def estimate_memory_bytes(self, version_dir: Path, options: RuntimeOptions) -> int:
        """Private (anonymous) memory a load is expected to cost, beyond the mapped files."""
        ...


_BACKEND_MODULES = ("edged.runtime.onnx", "edged.runtime.litert")
_registry: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _registry[backend.kind] = backend


def registered_backends() -> dict[str, Backend]:
    # Every time, not only while the registry is empty: importing one backend module directly
    # must not hide the others. Re-imports are dictionary lookups.
    for name in _BACKEND_MODULES:
        importlib.import_module(name)
    return dict(_registry)


def model_files() -> dict[str, str]:
    """Runtime kind -> the model file a version directory holds for it."""
    return {kind: backend.model_file for kind, backend in registered_backends().items()}


def backend_for(version_dir: Path) -> Backend:
    """The backend whose model file is present in ``version_dir``."""
    for backend in registered_backends().values():
        if (version_dir / backend.model_file).is_file():
            return backend
    expected = ", ".join(b.model_file for b in registered_backends().values())
    raise UnsupportedModelError(f"{version_dir} holds no model file (expected one of: {expected})")


def load_model(version_dir: Path, options: RuntimeOptions) -> LoadedModel:
    return backend_for(version_dir).load(version_dir, options)


def estimate_memory_bytes(version_dir: Path, options: RuntimeOptions) -> int:
    return backend_for(version_dir).estimate_memory_bytes(version_dir, options)


def weight_bytes(version_dir: Path) -> int:
    """Total size of the files in a version directory (what its mmaps can bring in)."""
    return sum(p.stat().st_size for p in version_dir.iterdir() if p.is_file())
