"""Reading the device facts a bundle's targets are matched against (the I/O half of
``DeviceFacts``)."""

from __future__ import annotations

import importlib.util
import platform

from edged import __version__
from edged.bundle.verify import DeviceFacts

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}


def normalise_arch(machine: str) -> str:
    machine = machine.lower()
    return _ARCH_ALIASES.get(machine, machine)


def _onnx_providers() -> frozenset[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return frozenset()
    return frozenset(ort.get_available_providers())


def detect_device_facts() -> DeviceFacts:
    """This machine: CPU architecture, runtimes importable, ONNX Runtime providers, edged."""
    runtimes: set[str] = set()
    providers: set[str] = set()
    onnx_providers = _onnx_providers()
    if onnx_providers:
        runtimes.add("onnx")
        providers |= onnx_providers
    if any(importlib.util.find_spec(m) for m in ("ai_edge_litert", "tflite_runtime")):
        runtimes.add("tflite")
        providers.add("xnnpack")
    return DeviceFacts(
        arch=normalise_arch(platform.machine()),
        runtimes=frozenset(runtimes),
        providers=frozenset(providers),
        edged_version=__version__,
    )
