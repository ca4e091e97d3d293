"""Inference runtimes behind one interface: ``load(version_dir, options) -> LoadedModel``.

Backends register under a ``kind`` key (``onnx``, ``tflite``); the rest of edged never branches
on backend names.
"""

from edged.runtime.base import (
    Backend,
    LoadedModel,
    TensorSpec,
    backend_for,
    estimate_memory_bytes,
    load_model,
    registered_backends,
)

__all__ = [
    "Backend",
    "LoadedModel",
    "TensorSpec",
    "backend_for",
    "estimate_memory_bytes",
    "load_model",
    "registered_backends",
]
