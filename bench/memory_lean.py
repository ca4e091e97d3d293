"""The per-model ``memory_lean`` trade-off, measured: load time and private memory against
batch throughput, with weight prepacking on (``memory_lean = false``) and off (``true``).

An ONNX MLP 1024 -> 4096 -> 4096 -> 4096 -> 1000 (fp32, ~160 MiB of weights in external data)
is loaded through ``edged.runtime.load_model``, the daemon's own code path, in a fresh
subprocess per variant so one variant's memory never shows up in the other's numbers.
Memory comes from /proc/self/smaps_rollup: ``Anonymous`` is private memory (prepacked
weights, arenas); ``Rss`` adds the file pages of the mapped weights, which the kernel can drop
and re-read under pressure. The variants run alternately ``--repeats`` times; the table shows
medians. Writes bench/out/memory_lean.json.

    python bench/memory_lean.py [--duration-s 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
from cpuload import NOISY_CORES, OtherLoad, wait_for_quiet

from edged.demo.samples import SAMPLE_MLP_LAYERS, write_onnx_mlp

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out" / "memory_lean.json"
LAYERS = (1024, 4096, 4096, 4096, 1000)
BATCH = 32
MiB = 1024 * 1024
SMAPS_FIELDS = ("Rss", "Anonymous")
STAGES = ("load", "first_run", "throughput")  # memory is read after each


def smaps_rollup() -> dict[str, int]:
    """Selected /proc/self/smaps_rollup fields, in bytes."""
    values: dict[str, int] = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in SMAPS_FIELDS:
            values[key] = int(rest.split()[0]) * 1024  # the kernel reports kB
    return values


def measure_variant(
    version_dir: Path, warmup_dir: Path, memory_lean: bool, duration_s: float
) -> dict[str, Any]:
    """Runs inside the child process: one load, one first run, a batch-32 throughput loop.

    A tiny model is loaded, run and closed first, so that ONNX Runtime's one-time set-up in a
    process (environment, thread pools, kernel registry) counts neither as load time nor as
    memory of the measured model.
    """
    from edged.runtime import load_model
    from edged.runtime.options import RuntimeOptions

    options = RuntimeOptions(memory_lean=memory_lean)
    tiny = load_model(warmup_dir, options)
    tiny.run({"input": np.zeros((1, SAMPLE_MLP_LAYERS[0]), dtype=np.float32)})
    tiny.close()
    del tiny

    rng = np.random.default_rng(0)
    x1 = {"input": rng.standard_normal((1, LAYERS[0]), dtype=np.float32)}
    xb = {"input": rng.standard_normal((BATCH, LAYERS[0]), dtype=np.float32)}
    before = smaps_rollup()
    growth: dict[str, dict[str, int]] = {}
    other_load = OtherLoad()  # over the whole measurement: /proc/stat ticks are 10 ms

    t0 = time.perf_counter()
    model = load_model(version_dir, options)
    load_s = time.perf_counter() - t0
    growth["load"] = {k: v - before[k] for k, v in smaps_rollup().items()}

    t0 = time.perf_counter()
    model.run(x1)
    first_run_s = time.perf_counter() - t0
    growth["first_run"] = {k: v - before[k] for k, v in smaps_rollup().items()}

    for _ in range(3):
        model.run(xb)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration_s:
        t0 = time.perf_counter()
        model.run(xb)
        times.append(time.perf_counter() - t0)
    other_cores = other_load.cores()
    growth["throughput"] = {k: v - before[k] for k, v in smaps_rollup().items()}
    return {
        "memory_lean": memory_lean,
        "description": model.description,
        "load_s": load_s,
        "first_run_s": first_run_s,
        "samples_per_s": BATCH * len(times) / sum(times),
        "p50_ms": float(np.percentile(times, 50)) * 1e3,
        "growth_bytes": growth,
        "other_load_cores": other_cores,
    }


def run_child(
    version_dir: Path, warmup_dir: Path, memory_lean: bool, duration_s: float
) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--child", "--version-dir", str(version_dir),
        "--warmup-dir", str(warmup_dir), "--duration-s", str(duration_s),
    ] + (["--memory-lean"] if memory_lean else [])  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"variant memory_lean={memory_lean} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of one variant; the worst other load."""

    def med(values: list[float]) -> float:
        return float(median(values))

    growth_mib = {
        stage: {f: med([r["growth_bytes"][stage][f] / MiB for r in runs]) for f in SMAPS_FIELDS}
        for stage in STAGES
    }
    return {
        "load_s": med([r["load_s"] for r in runs]),
        "first_run_s": med([r["first_run_s"] for r in runs]),
        "samples_per_s": med([r["samples_per_s"] for r in runs]),
        "p50_ms": med([r["p50_ms"] for r in runs]),
        "growth_mib": growth_mib,
        "other_load_cores": max(r["other_load_cores"] for r in runs),
        "description": runs[0]["description"],
    }


def noisy(variant: dict[str, Any]) -> bool:
    return bool(variant["other_load_cores"] > NOISY_CORES)


def anonymous_saved_mib(prepack: dict[str, Any], lean: dict[str, Any]) -> float:
    saved = prepack["growth_mib"]["first_run"]["Anonymous"]
    return float(saved - lean["growth_mib"]["first_run"]["Anonymous"])


def print_report(weights_mib: float, off: dict[str, Any], on: dict[str, Any]) -> None:
    print(f"\nmemory_lean: ONNX MLP {' -> '.join(map(str, LAYERS))} fp32, "
          f"{weights_mib:.0f} MiB of weights in external data")  # fmt: skip
    line = "{:13} {:>9} {:>10} {:>11} {:>11} {:>11} {:>11} {:>14} {:>8} {:>6}"
    print(line.format("", "load", "first run", "anon MiB", "anon MiB", "rss MiB", "rss MiB",
                      f"batch-{BATCH}", "p50", "other"))  # fmt: skip
    print(line.format("memory_lean", "ms", "ms", "after load", "after run", "after load",
                      "after run", "samples/s", "ms", "cores"))  # fmt: skip
    for name, v in (("false (prepack)", off), ("true (lean)", on)):
        g = v["growth_mib"]
        print(
            line.format(
                name.split()[0],
                f"{v['load_s'] * 1e3:.1f}",
                f"{v['first_run_s'] * 1e3:.1f}",
                f"{g['load']['Anonymous']:+.1f}",
                f"{g['first_run']['Anonymous']:+.1f}",
                f"{g['load']['Rss']:+.1f}",
                f"{g['first_run']['Rss']:+.1f}",
                f"{v['samples_per_s']:,.0f}",
                f"{v['p50_ms']:.1f}",
                f"{v['other_load_cores']:.2f}" + ("*" if noisy(v) else ""),
            )
        )
    anon_saved = anonymous_saved_mib(off, on)
    print()
    print(f"  load time          lean / prepack = {on['load_s'] / off['load_s']:.3f} "
          f"({off['load_s'] * 1e3:.0f} ms -> {on['load_s'] * 1e3:.1f} ms)")  # fmt: skip
    print(f"  anonymous memory   lean saves {anon_saved:.0f} MiB after the first run")
    print(f"  batch-{BATCH} throughput  lean / prepack = "
          f"{on['samples_per_s'] / off['samples_per_s']:.2f} "
          f"({100 * (1 - on['samples_per_s'] / off['samples_per_s']):.0f}% lower)")  # fmt: skip
    print("  growth from just before load_model; anon = Anonymous, rss = Rss of "
          "/proc/self/smaps_rollup (Rss includes the mapped weight file's pages)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=3.0, help="each throughput loop")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant")
    parser.add_argument("--quiet-wait-s", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--version-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--memory-lean", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = measure_variant(
            args.version_dir, args.warmup_dir, args.memory_lean, args.duration_s
        )
        print(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory(prefix="edged-bench-lean-") as tmp:
        version_dir = Path(tmp) / "big" / "1"
        warmup_dir = Path(tmp) / "tiny" / "1"
        print(f"bench: writing ONNX MLP {' -> '.join(map(str, LAYERS))} to {version_dir}",
              flush=True)  # fmt: skip
        write_onnx_mlp(version_dir, LAYERS, seed=0)
        write_onnx_mlp(warmup_dir, SAMPLE_MLP_LAYERS, seed=0)
        weights_mib = sum(p.stat().st_size for p in version_dir.glob("model.onnx*")) / MiB
        runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        for i in range(args.repeats):
            for lean in (False, True):
                print(f"bench: memory_lean={str(lean).lower()} run {i + 1}/{args.repeats}",
                      flush=True)  # fmt: skip
                wait_for_quiet(args.quiet_wait_s)
                runs[lean].append(run_child(version_dir, warmup_dir, lean, args.duration_s))
    off, on = summarize(runs[False]), summarize(runs[True])
    print_report(weights_mib, off, on)
    report = {
        "model": {"layers": list(LAYERS), "dtype": "fp32", "weights_mib": weights_mib},
        "batch": BATCH,
        "prepack": off,
        "lean": on,
        "runs": {"prepack": runs[False], "lean": runs[True]},
        "ratios": {
            "load_s_lean_over_prepack": on["load_s"] / off["load_s"],
            "throughput_lean_over_prepack": on["samples_per_s"] / off["samples_per_s"],
            "anonymous_mib_saved_after_first_run": anonymous_saved_mib(off, on),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nbench: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
