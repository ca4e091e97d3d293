"""Per-model config: ``<repo>/<model>/config.toml``, every key optional.

```toml
[runtime]
intra_op_threads = 0          # 0: this model's share of the daemon's CPU budget (cores - 1)
providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
memory_lean = false           # true: no weight prepacking (weights stay in the mmapped file)
spin_wait = false             # true: ONNX Runtime's threads spin between batches (more CPU)

[batching]
max_batch_size = 32           # used only when the model has a dynamic batch dimension
max_queue_delay_us = 0        # 0: no waiting; whatever queued while the worker was busy is batched
max_queue_size = 1024         # beyond this, 429 Too Many Requests
priority_levels = 2           # request parameter "priority": 1 (highest) .. N; 0 = default_priority

[self_test]
atol = 1e-4
rtol = 1e-3
warmup_runs = 2

[cache]
enabled = false               # LRU of results keyed by a hash of the inputs, plus coalescing
max_entries = 256

[[test_vectors]]
file = "test_vectors.npz"     # relative to the version directory; keys "input:NAME", "output:NAME"

[[test_vectors]]              # or inline, for small models
inputs = { x = [[1.0, 2.0]] }
outputs = { y = [[3.0]] }
```

A version directory may also hold ``test_vectors.npz``; it is used when the config lists none.
A version directory may hold its own ``config.toml`` (bundles install one); it wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edged._toml import Table, load_toml_file
from edged.errors import ConfigError
from edged.runtime.options import RuntimeOptions

TEST_VECTORS_FILE = "test_vectors.npz"


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 32
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024
    priority_levels: int = 2
    default_priority: int = 2


@dataclass(frozen=True)
class SelfTestConfig:
    atol: float = 1e-4
    rtol: float = 1e-3
    warmup_runs: int = 2


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = False
    max_entries: int = 256


@dataclass(frozen=True)
class TestVectorSpec:
    """Either a file (relative to the version directory) or inline arrays."""

    file: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TestVector:
    inputs: dict[str, np.ndarray[Any, Any]]
    outputs: dict[str, np.ndarray[Any, Any]]
    source: str


@dataclass(frozen=True)
class ModelConfig:
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    self_test: SelfTestConfig = field(default_factory=SelfTestConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    test_vectors: tuple[TestVectorSpec, ...] = ()


def parse_model_config(data: dict[str, Any], path: str = "") -> ModelConfig:
    root = Table(data, path)
    rt = root.table("runtime")
    d_rt = RuntimeOptions()
    runtime = RuntimeOptions(
        intra_op_threads=rt.integer("intra_op_threads", d_rt.intra_op_threads, 0, 256),
        inter_op_threads=rt.integer("inter_op_threads", d_rt.inter_op_threads, 0, 256),
        providers=rt.strings("providers"),
        memory_lean=rt.boolean("memory_lean", d_rt.memory_lean),
        spin_wait=rt.boolean("spin_wait", d_rt.spin_wait),
    )
    rt.reject_unknown()
    bt = root.table("batching")
    d_bt = BatchingConfig()
    levels = bt.integer("priority_levels", d_bt.priority_levels, 1, 16)
    batching = BatchingConfig(
        max_batch_size=bt.integer("max_batch_size", d_bt.max_batch_size, 1, 4096),
        max_queue_delay_us=bt.integer("max_queue_delay_us", d_bt.max_queue_delay_us, 0, 10_000_000),
        max_queue_size=bt.integer("max_queue_size", d_bt.max_queue_size, 1, 1_000_000),
        priority_levels=levels,
        default_priority=bt.integer("default_priority", levels, 1, levels),
    )
    bt.reject_unknown()
    st = root.table("self_test")
    d_st = SelfTestConfig()
    self_test = SelfTestConfig(
        atol=st.number("atol", d_st.atol, 0.0),
        rtol=st.number("rtol", d_st.rtol, 0.0),
        warmup_runs=st.integer("warmup_runs", d_st.warmup_runs, 0, 1000),
    )
    st.reject_unknown()
    ct = root.table("cache")
    d_ct = CacheConfig()
    cache = CacheConfig(
        enabled=ct.boolean("enabled", d_ct.enabled),
        max_entries=ct.integer("max_entries", d_ct.max_entries, 1, 1_000_000),
    )
    ct.reject_unknown()
    vectors: list[TestVectorSpec] = []
    for tv in root.tables("test_vectors"):
        file = tv.optional_str("file")
        inputs = tv.raw("inputs") or {}
        outputs = tv.raw("outputs") or {}
        tv.reject_unknown()
        if file is None and not inputs:
            raise ConfigError(tv.key_path("file"), "a test vector needs a file or inline inputs")
        if not isinstance(inputs, dict) or not isinstance(outputs, dict):
            raise ConfigError(tv.key_path("inputs"), "inputs and outputs must be tables of arrays")
        vectors.append(TestVectorSpec(file=file, inputs=inputs, outputs=outputs))
    root.reject_unknown()
    return ModelConfig(runtime, batching, self_test, cache, tuple(vectors))


def load_model_config(path: Path) -> ModelConfig:
    """Load ``config.toml``; a missing file gives the defaults."""
    if not path.exists():
        return ModelConfig()
    return parse_model_config(load_toml_file(path), str(path))


def config_for_version(version_dir: Path) -> ModelConfig:
    """A version's own ``config.toml`` (as installed from a bundle) wins over the model's."""
    own = version_dir / "config.toml"
    return load_model_config(own if own.exists() else version_dir.parent / "config.toml")


def load_test_vectors(config: ModelConfig, version_dir: Path) -> list[TestVector]:
    """Resolve the test vectors of one version: files relative to ``version_dir``, or inline."""
    specs = list(config.test_vectors)
    if not specs and (version_dir / TEST_VECTORS_FILE).exists():
        specs = [TestVectorSpec(file=TEST_VECTORS_FILE)]
    vectors: list[TestVector] = []
    for i, spec in enumerate(specs):
        if spec.file is not None:
            file = (version_dir / spec.file).resolve()
            if version_dir.resolve() not in file.parents:
                raise ConfigError(
                    f"test_vectors[{i}].file", f"{spec.file!r} leaves the version directory"
                )
            try:
                with np.load(file, allow_pickle=False) as npz:
                    ins = {
                        k.removeprefix("input:"): npz[k]
                        for k in npz.files
                        if k.startswith("input:")
                    }
                    outs = {
                        k.removeprefix("output:"): npz[k]
                        for k in npz.files
                        if k.startswith("output:")
                    }
            except (OSError, ValueError) as exc:
                raise ConfigError(f"test_vectors[{i}].file", f"cannot read {file}: {exc}") from exc
            vectors.append(TestVector(ins, outs, spec.file))
        else:
            vectors.append(
                TestVector(
                    {k: np.asarray(v) for k, v in spec.inputs.items()},
                    {k: np.asarray(v) for k, v in spec.outputs.items()},
                    f"test_vectors[{i}] (inline)",
                )
            )
    return vectors
