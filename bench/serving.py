"""Serving benchmark: edged against a thread-per-request server and the raw runtime, in one run.

One model (ONNX MLP 1024 -> 2048 -> 2048 -> 1000, fp32, dynamic batch, max batch 32):

  a      raw ``load_model(...).run`` at batch 1 (edged's thread settings)   latency floor
  bT     raw runtime at batch 32 with T intra-op threads, T = 1..cores       the machine's limit
  cN     ``ThreadingHTTPServer``, one runtime call per request, N clients    the usual server
  eN     the same with 1 intra-op thread per request                         the best it can do
  dN     ``edged run`` with default settings (its processes), N clients
  gN     the same edged over KServe v2 gRPC (raw contents), N ModelInfer calls in flight
  gsN    the same, N ModelStreamInfer messages in flight over min(N, 64) streams
  d64wK  edged with K front ends (``--workers-sweep``), 64 clients; g64wK the same over gRPC
  pN     edged in one process (``[server] workers = 0``)                     the old design
  s64    edged with ``spin_wait = true``, 64 clients (``--legacy-rows``)    battery vs spinning
  wN     edged with ``intra_op_threads`` = all cores (``--legacy-rows``)     the CPU budget's price
  oN     edged at an older git ref (``--compare-ref``), default settings     "today"

``--cores N`` pins every server (and the raw rows) to N cores and wrk to the others, when the
machine has more than N.

N is 1, 64 and 1000 concurrent batch-1 clients (wrk); a ``j`` after the letter marks JSON
tensor bodies (what curl and most scripts send), rows without it send the binary tensor
extension. Every HTTP row reports throughput, latency, failed requests, and CPU time per
request from /proc accounting: the server's (all its processes and threads), edged's event-loop
thread alone ("loop": the control plane's in the process design), edged's engine apart from the
runtime's compute ("engine": its reader threads, its workers outside ``run`` and its loop, from
thread CPU clocks; every request passes through it), and wrk's. CPU accounting is far less
noisy than wall clock on a shared machine. The g rows' load generator is ``bench/grpc_load.py``
(Python, grpc.aio: wrk speaks no gRPC), N calls in flight over min(N, 64) connections; its CPU
shows in the wrk column.

Prints one table and the ratios against the serving issue's targets, and writes everything to
bench/out/serving.json. Exit status 1 when any edged request failed.

    python bench/serving.py [--duration-s 5] [--compare-ref REF] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from cpuload import NOISY_CORES, OtherLoad, ServerCpu, children_cpu_s, wait_for_quiet

from edged._net import free_port, free_ports
from edged._process import stop_process
from edged.demo.samples import BENCH_MLP_LAYERS, make_bench_mlp
from edged.runtime import LoadedModel, load_model
from edged.runtime.budget import CpuBudget, front_ends, usable_cores
from edged.runtime.options import RuntimeOptions

BENCH_DIR = Path(__file__).resolve().parent
LUA_SCRIPT = BENCH_DIR / "infer.lua"
THREAD_SERVER = BENCH_DIR / "thread_server.py"
GRPC_LOAD = BENCH_DIR / "grpc_load.py"
GRPC_MAX_CONNECTIONS = 64
DEFAULT_OUT = BENCH_DIR / "out" / "serving.json"

MODEL_NAME = "mlp"
MAX_BATCH = 32
HEADER_LENGTH = "Inference-Header-Content-Length"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
WRK_TIMEOUT = "10s"  # a stalled request is counted in the latency, not dropped as a timeout
RAW_WARMUP_RUNS = 20

CLIENTS = (1, 64, 1000)
# An older edged for the o rows (``--compare-ref``); none by default (the p rows run edged's
# one-process design from this tree).
DEFAULT_COMPARE_REF = ""

# The targets of "Serving at scale": (name, ratio key, comparison, bound, rows it is made of,
# least cores the target is for). "raw" is the best bT row: the machine's limit.
TARGETS = (
    ("d64 / raw limit, binary", "d64_over_raw", ">=", 0.6, ("d64", "raw"), 1),
    ("d1000 / raw limit, binary", "d1000_over_raw", ">=", 0.55, ("d1000", "raw"), 1),
    ("dj64 / raw limit, JSON", "dj64_over_raw", ">=", 0.45, ("dj64", "raw"), 1),
    ("d1 p50 - a p50 (ms)", "d1_minus_a_p50_ms", "<=", 0.15, ("d1", "a"), 1),
    ("engine CPU µs/req, d64 binary", "d64_engine_us", "<=", 20.0, ("d64",), 1),
    ("engine CPU µs/req, dj64 JSON", "dj64_engine_us", "<=", 30.0, ("dj64",), 1),
    ("d64 / raw limit (>= 12 cores)", "d64_over_raw", ">=", 0.5, ("d64", "raw"), 12),
    ("d64 / c64 (>= 12 cores)", "d64_over_c64", ">=", 8.0, ("d64", "c64"), 12),
    ("d64 / e64 (>= 12 cores)", "d64_over_e64", ">=", 3.0, ("d64", "e64"), 12),
    ("d1000 / c1000 (>= 12 cores)", "d1000_over_c1000", ">=", 8.0, ("d1000", "c1000"), 12),
    ("d1000 / e1000 (>= 12 cores)", "d1000_over_e1000", ">=", 3.0, ("d1000", "e1000"), 12),
)

Array = np.ndarray[Any, Any]


@dataclass
class Row:
    """One line of the table. Latencies are per runtime call (raw rows) or per request (HTTP)."""

    key: str
    label: str
    unit: str  # samples/s or req/s
    throughput: float
    p50_ms: float
    p99_ms: float
    other_load_cores: float  # CPU used by processes outside the benchmark during the phase
    settings: dict[str, Any] = field(default_factory=dict)
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    server_cpu_us_per_request: float | None = None
    loop_cpu_us_per_request: float | None = None  # edged's event-loop (main) thread only
    engine_cpu_us_per_request: float | None = None  # edged's engine apart from the runtime
    client_cpu_us_per_request: float | None = None  # wrk
    rounds: list[dict[str, Any]] = field(default_factory=list)  # every measurement of the phase

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def spread(self) -> float:
        """1 - slowest / fastest undisturbed round: how much the phase varied."""
        clean = [r["throughput"] for r in self.rounds if r["other_load_cores"] <= NOISY_CORES]
        return 1.0 - min(clean) / max(clean) if len(clean) > 1 and max(clean) > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.other_load_cores > NOISY_CORES


# --- request body -------------------------------------------------------------------------


def infer_body(x: Array) -> tuple[bytes, int]:
    """The binary-tensor request edged's own client sends: (body, JSON header length)."""
    data = np.ascontiguousarray(x, dtype=np.float32).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "parameters": {"binary_data_output": True},
        },
        separators=(",", ":"),
    ).encode()
    return header + data, len(header)


def json_infer_body(x: Array) -> bytes:
    """The same request with a JSON tensor, as curl or a script would send it."""
    doc = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                       "data": x.ravel().tolist()}]}  # fmt: skip
    return json.dumps(doc).encode()


def decode_output(data: bytes, header_length: int | None) -> Array:
    if header_length is None:
        out = json.loads(data)["outputs"][0]
        values: Array = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        return values
    doc = json.loads(data[:header_length])
    out = doc["outputs"][0]
    size = out["parameters"]["binary_data_size"]
    raw = data[header_length : header_length + size]
    array: Array = np.frombuffer(raw, dtype=np.float32).reshape(out["shape"])
    return array


# --- measuring on a shared machine ----------------------------------------------------------


@dataclass(frozen=True)
class Patience:
    """How hard to try for measurements that other processes did not disturb."""

    rounds: int  # each phase is measured this many times; the best round is reported
    quiet_wait_s: float  # before each round, wait up to this long for the machine to go idle
    retries: int  # extra rounds allowed per phase to replace disturbed ones


def best_of(measure: Callable[[], Row], patience: Patience, pids: Sequence[int] = ()) -> Row:
    """Measure ``patience.rounds`` times and report the best undisturbed round.

    Other processes, the hypervisor and other tenants of the host only ever slow a phase down,
    so the best round is the closest to what the machine can do; ``rounds`` keeps every round
    so the spread shows how much the machine varied. Failed requests of every round count.
    """
    rounds: list[Row] = []
    retries = patience.retries
    while sum(not r.noisy for r in rounds) < patience.rounds:
        wait_for_quiet(patience.quiet_wait_s, pids)
        row = measure()
        rounds.append(row)
        if row.noisy:
            if not retries:
                break
            retries -= 1
            print(f"bench: {row.key} was disturbed ({row.other_load_cores:.2f} cores of other "
                  "load); measuring again", flush=True)  # fmt: skip
        elif len(rounds) >= patience.rounds + patience.retries:
            break
    best = max(rounds, key=lambda r: (not r.noisy, r.throughput))
    errors: dict[str, int] = {}
    for r in rounds:
        for kind, count in r.errors.items():
            errors[kind] = errors.get(kind, 0) + count
    best.errors = errors
    best.rounds = [
        {"throughput": r.throughput, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
         "other_load_cores": r.other_load_cores, "errors": sum(r.errors.values())}
        for r in rounds
    ]  # fmt: skip
    return best


# --- (a), (b): the raw runtime ------------------------------------------------------------


def raw_row(model: LoadedModel, x: Array, duration_s: float, key: str, label: str) -> Row:
    """Back-to-back ``model.run`` calls for ``duration_s``: samples/s and per-call latency."""
    feeds = {"input": x}
    for _ in range(RAW_WARMUP_RUNS):
        model.run(feeds)
    load = OtherLoad()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration_s:
        t0 = time.perf_counter()
        model.run(feeds)
        times.append(time.perf_counter() - t0)
    seconds = np.asarray(times)
    return Row(
        key,
        label,
        "samples/s",
        x.shape[0] * len(times) / float(seconds.sum()),
        float(np.percentile(seconds, 50)) * 1e3,
        float(np.percentile(seconds, 99)) * 1e3,
        load.cores(),
        requests=len(times),
    )


# --- servers under test ---------------------------------------------------------------------


def http_call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@contextlib.contextmanager
def server_process(
    cmd: Sequence[str], port: int, log_path: Path, cwd: Path | None = None
) -> Iterator[int]:
    """Start a server, wait until ``/v2/health/ready`` answers 200, stop it with SIGTERM."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*PINNING.server, *cmd], stdout=log, stderr=subprocess.STDOUT, cwd=cwd
        )
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{cmd[0]} exited with {proc.returncode} before it was ready; log:\n"
                        + log_path.read_text(errors="replace")[-3000:]
                    )
                with contextlib.suppress(OSError):
                    if http_call(port, "GET", "/v2/health/ready")[0] == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready after {READY_TIMEOUT_S:.0f}s: {' '.join(cmd)}")
                time.sleep(0.1)
            yield proc.pid
        finally:
            stop_process(proc, STOP_TIMEOUT_S)


def edged_command(
    repo: Path,
    port: int,
    tmp: Path,
    state: str = "state",
    workers: int | None = None,
    grpc_port: int | None = 0,
) -> list[str]:
    """``grpc_port``: 0 turns gRPC off; None leaves the flag out (an edged from before it)."""
    config = tmp / f"edged-{state}.toml"
    config.write_text(
        "# bench: defaults only, so /etc/edged/edged.toml cannot leak in\n"
        + (f"[server]\nworkers = {workers}\n" if workers is not None else "")
    )
    grpc = [] if grpc_port is None else ["--grpc-port", str(grpc_port)]
    return [
        sys.executable, "-m", "edged.cli.main", "run",
        "--models", str(repo), "--port", str(port), *grpc, "--no-socket",
        "--config", str(config), "--state-dir", str(tmp / state),
    ]  # fmt: skip


def write_model_config(
    model_dir: Path, intra_op_threads: int = 0, spin_wait: bool | None = None
) -> None:
    """0 threads and ``spin_wait`` None leave the daemon's defaults."""
    runtime = ""
    if intra_op_threads:
        runtime += f"intra_op_threads = {intra_op_threads}\n"
    if spin_wait is not None:
        runtime += f"spin_wait = {'true' if spin_wait else 'false'}\n"
    (model_dir / "config.toml").write_text(
        "# Written by bench/serving.py.\n"
        + (f"[runtime]\n{runtime}\n" if runtime else "")
        + "[batching]\n"
        f"max_batch_size = {MAX_BATCH}\n"
        "max_queue_delay_us = 0\n"
    )


@contextlib.contextmanager
def checkout(ref: str, tmp: Path) -> Iterator[Path]:
    """The ``edged`` package at git ``ref``, extracted under ``tmp`` (for PYTHONPATH)."""
    root = tmp / f"ref-{ref.replace('/', '_')}"
    root.mkdir()
    repo = BENCH_DIR.parent
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", ref, "edged"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    yield root


def _has_ref(ref: str) -> bool:
    done = subprocess.run(
        ["git", "-C", str(BENCH_DIR.parent), "cat-file", "-e", f"{ref}^{{commit}}"],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def with_pythonpath(cmd: list[str], path: Path) -> list[str]:
    return ["env", f"PYTHONPATH={path}", *cmd]


# --- load generator ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The request every HTTP phase sends, and the answer the runtime gives to it."""

    body_file: Path
    body: bytes
    header_length: int | None  # None: a JSON body
    expected: Array

    @property
    def kind(self) -> str:
        return "JSON" if self.header_length is None else "binary"


def check_response(port: int, work: Workload) -> None:
    """One request before the load: the server must answer 200 with the runtime's output."""
    if work.header_length is None:
        headers = {"Content-Type": "application/json"}
    else:
        headers = {
            HEADER_LENGTH: str(work.header_length),
            "Content-Type": "application/octet-stream",
        }
    path = f"/v2/models/{MODEL_NAME}/infer"
    status, resp_headers, data = http_call(port, "POST", path, work.body, headers)
    if status != 200:
        raise RuntimeError(f"check request got HTTP {status}: {data[:500]!r}")
    length = resp_headers.get(HEADER_LENGTH)
    got = decode_output(data, int(length) if length is not None else None)
    if got.shape != work.expected.shape or not np.allclose(
        got, work.expected, atol=1e-4, rtol=1e-3
    ):
        raise RuntimeError("check request: the server's output differs from the raw runtime's")


def run_wrk(
    port: int, work: Workload, threads: int, connections: int, duration_s: float
) -> dict[str, Any]:
    """wrk with bench/infer.lua: the parsed ``WRK_RESULT`` line plus the non-2xx count."""
    url = f"http://127.0.0.1:{port}/v2/models/{MODEL_NAME}/infer"
    cmd = [
        *PINNING.wrk, "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s",
        "--timeout", WRK_TIMEOUT, "-s", str(LUA_SCRIPT), url, "--", str(work.body_file),
    ]  # fmt: skip
    if work.header_length is not None:
        cmd.append(str(work.header_length))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    result: dict[str, Any] | None = None
    non_2xx = 0
    for line in done.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            result = json.loads(line.removeprefix("WRK_RESULT "))
        elif "Non-2xx or 3xx responses:" in line:
            non_2xx = int(line.rsplit(":", 1)[1])
    if result is None:
        raise RuntimeError(f"wrk printed no WRK_RESULT line:\n{done.stdout}\n{done.stderr}")
    result["errors"]["non_2xx"] = non_2xx
    result["command"] = " ".join(cmd)
    return result


def http_row(
    key: str,
    label: str,
    port: int,
    server_pid: int,
    work: Workload,
    load: tuple[int, int, float],
    settings: dict[str, Any],
    event_loop: bool = True,
) -> Row:
    """One wrk run against a server; ``load`` is (wrk threads, connections, seconds).
    ``event_loop``: the server's main thread is an event loop (edged), so report its CPU."""
    threads, connections, duration_s = load
    tree = process_tree(server_pid)
    other = OtherLoad(tree)
    engine0 = engine_cpu_s(port) if event_loop else None
    server0, client0 = ServerCpu.read(server_pid, tree), children_cpu_s()
    result = run_wrk(port, work, threads, connections, duration_s)
    server1, client1 = ServerCpu.read(server_pid, tree), children_cpu_s()
    engine1 = engine_cpu_s(port) if event_loop else None
    other_cores = other.cores()

    errors = {k: int(v) for k, v in result["errors"].items() if k != "status"}  # ⊂ non_2xx
    requests = int(result["requests"])
    per_request = 1e6 / max(requests, 1)
    latency = result["latency_us"]
    return Row(
        key,
        label,
        "req/s",
        (requests - errors["non_2xx"]) / (result["duration_us"] / 1e6),
        latency["p50"] / 1e3,
        latency["p99"] / 1e3,
        other_cores,
        {**settings, "wrk_threads": threads, "connections": connections},
        requests,
        errors,
        server_cpu_us_per_request=(server1.total_s - server0.total_s) * per_request,
        loop_cpu_us_per_request=(server1.main_thread_s - server0.main_thread_s) * per_request
        if event_loop
        else None,
        client_cpu_us_per_request=(client1 - client0) * per_request,
        engine_cpu_us_per_request=(engine1 - engine0) * per_request
        if engine0 is not None and engine1 is not None
        else None,
    )


def grpc_row(
    key: str,
    label: str,
    ports: tuple[int, int],
    server_pid: int,
    clients: int,
    duration_s: float,
    settings: dict[str, Any],
    stream: bool = False,
) -> Row:
    """One bench/grpc_load.py run against edged's gRPC port (``ports``: HTTP, gRPC):
    ``clients`` ModelInfer calls (``stream``: ModelStreamInfer messages) in flight, raw."""
    port, grpc_port = ports
    connections = min(clients, GRPC_MAX_CONNECTIONS)
    cmd = [
        *PINNING.wrk, sys.executable, str(GRPC_LOAD), "--target", f"127.0.0.1:{grpc_port}",
        "--model", MODEL_NAME, "--shape", "1", str(BENCH_MLP_LAYERS[0]),
        "--concurrency", str(clients), "--connections", str(connections),
        "--duration-s", f"{duration_s:g}", "--timeout-s", WRK_TIMEOUT.removesuffix("s"),
        *(["--stream"] if stream else []),
    ]  # fmt: skip
    tree = process_tree(server_pid)
    other = OtherLoad(tree)
    engine0 = engine_cpu_s(port)
    server0, client0 = ServerCpu.read(server_pid, tree), children_cpu_s()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    server1, client1 = ServerCpu.read(server_pid, tree), children_cpu_s()
    engine1 = engine_cpu_s(port)
    other_cores = other.cores()
    lines = [x for x in done.stdout.splitlines() if x.startswith("GRPC_RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"grpc_load failed ({done.returncode}): {done.stderr or done.stdout}")
    result = json.loads(lines[0].removeprefix("GRPC_RESULT "))
    requests = int(result["requests"])
    per_request = 1e6 / max(requests, 1)
    return Row(
        key,
        label,
        "req/s",
        int(result["ok"]) / result["duration_s"],
        result["p50_ms"],
        result["p99_ms"],
        other_cores,
        {**settings, "connections": connections, "command": " ".join(cmd)},
        requests,
        {k.lower(): int(v) for k, v in result["errors"].items()},
        server_cpu_us_per_request=(server1.total_s - server0.total_s) * per_request,
        loop_cpu_us_per_request=(server1.main_thread_s - server0.main_thread_s) * per_request,
        client_cpu_us_per_request=(client1 - client0) * per_request,
        engine_cpu_us_per_request=(engine1 - engine0) * per_request
        if engine0 is not None and engine1 is not None
        else None,
    )


def process_tree(pid: int) -> list[int]:
    """The server and every process it started (edged's fork server, engine, front ends)."""
    with contextlib.suppress(psutil.Error):
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    return [pid]


def engine_cpu_s(port: int) -> float | None:
    """CPU seconds edged's engine spent so far apart from the runtime's compute (None: edged
    runs in one process, with no engine apart)."""
    status, _, body = http_call(port, "GET", "/edged/v1/status")
    if status != 200:
        return None
    cpu = json.loads(body).get("engine", {}).get("cpu")
    return None if not cpu else float(sum(cpu.values()))


@dataclass(frozen=True)
class Pinning:
    """Which cores the servers (and the raw rows) run on, and which the load generator."""

    server_cores: tuple[int, ...] = ()
    wrk_cores: tuple[int, ...] = ()

    @property
    def server(self) -> list[str]:
        return _taskset(self.server_cores)

    @property
    def wrk(self) -> list[str]:
        return _taskset(self.wrk_cores)


def _taskset(cores: tuple[int, ...]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cores))] if cores else []


PINNING = Pinning()


# --- report -----------------------------------------------------------------------------------


def raw_limit(rows: dict[str, Row]) -> Row | None:
    """The best batch-32 raw row over the thread counts measured: the machine's limit."""
    raw = [r for k, r in rows.items() if k.startswith("b")]
    return max(raw, key=lambda r: r.throughput) if raw else None


def ratios(rows: dict[str, Row]) -> dict[str, float]:
    """Every ratio of TARGETS whose rows were measured."""
    limit = raw_limit(rows)
    have = dict(rows, **({"raw": limit} if limit is not None else {}))

    def tp(key: str) -> float:
        return have[key].throughput

    formulas: dict[str, Callable[[], float]] = {
        "d64_over_raw": lambda: tp("d64") / tp("raw"),
        "d1000_over_raw": lambda: tp("d1000") / tp("raw"),
        "dj64_over_raw": lambda: tp("dj64") / tp("raw"),
        "d1_minus_a_p50_ms": lambda: have["d1"].p50_ms - have["a"].p50_ms,
        "d64_engine_us": lambda: _engine(have["d64"]),
        "dj64_engine_us": lambda: _engine(have["dj64"]),
        "d64_over_c64": lambda: tp("d64") / tp("c64"),
        "d64_over_e64": lambda: tp("d64") / tp("e64"),
        "d1000_over_c1000": lambda: tp("d1000") / tp("c1000"),
        "d1000_over_e1000": lambda: tp("d1000") / tp("e1000"),
    }
    out: dict[str, float] = {}
    for _name, key, _op, _bound, needs, _cores in TARGETS:
        if all(k in have for k in needs):
            out[key] = formulas[key]()
    return out


def _loop(row: Row) -> float:
    return row.loop_cpu_us_per_request or float("nan")


def _engine(row: Row) -> float:
    return row.engine_cpu_us_per_request or float("nan")


def extra_ratios(rows: dict[str, Row]) -> dict[str, float]:
    """Ratios without a target, for the record."""
    pairs = {
        "d64_over_p64": ("d64", "p64"), "d1000_over_p1000": ("d1000", "p1000"),
        "dj64_over_pj64": ("dj64", "pj64"), "dj64_over_cj64": ("dj64", "cj64"),
        "d64_over_o64": ("d64", "o64"), "dj64_over_d64": ("dj64", "d64"),
        "e64_over_c64": ("e64", "c64"),
        "g64_over_d64": ("g64", "d64"), "g1000_over_d1000": ("g1000", "d1000"),
        "gs64_over_d64": ("gs64", "d64"),
    }  # fmt: skip
    out = {k: rows[x].throughput / rows[y].throughput for k, (x, y) in pairs.items()
           if x in rows and y in rows}  # fmt: skip
    if "p1" in rows and "d1" in rows:
        out["d1_minus_p1_p50_ms"] = rows["d1"].p50_ms - rows["p1"].p50_ms
    if "g64" in rows and "d64" in rows:
        out["g64_over_d64_server_cpu"] = (rows["g64"].server_cpu_us_per_request or 0.0) / (
            rows["d64"].server_cpu_us_per_request or float("nan")
        )
    return out


def verdicts(values: dict[str, float], rows: dict[str, Row], cores: int) -> list[dict[str, Any]]:
    """PASS/MISS per target that applies to ``cores``; ``noisy`` when a row the ratio is made
    of was disturbed."""
    out = []
    limit = raw_limit(rows)
    have = dict(rows, **({"raw": limit} if limit is not None else {}))
    for name, key, op, bound, needs, least_cores in TARGETS:
        if key not in values or cores < least_cores:
            continue
        value = values[key]
        ok = value >= bound if op == ">=" else value <= bound
        noisy = any(have[k].noisy for k in needs)
        out.append(
            {"name": name, "key": key, "value": value, "target": f"{op} {bound:g}", "pass": ok,
             "noisy": noisy}
        )  # fmt: skip
    return out


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def print_report(
    rows: list[Row], checks: list[dict[str, Any]], extra: dict[str, float], notes: list[str]
) -> None:
    line = "{:6} {:44} {:>18} {:>7} {:>8} {:>8} {:>6} {:>7} {:>6} {:>6} {:>5} {:>7}"
    print()
    print(line.format("", "what", "throughput", "spread", "p50 ms", "p99 ms", "errors", "server",
                      "loop", "engine", "wrk", "other"))  # fmt: skip
    print(line.format("", "", "(best round)", "", "", "", "", "CPU µs", "per", "req", "", "cores"))
    for r in rows:
        print(
            line.format(
                r.key,
                r.label,
                f"{r.throughput:,.0f} {r.unit}",
                f"{100 * r.spread:.0f}%",
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                str(r.error_count) if r.unit == "req/s" else "-",
                _us(r.server_cpu_us_per_request),
                _us(r.loop_cpu_us_per_request),
                _us(r.engine_cpu_us_per_request),
                _us(r.client_cpu_us_per_request),
                f"{r.other_load_cores:.2f}" + ("*" if r.noisy else " "),
            )
        )
    print()
    for check in checks:
        verdict = ("PASS" if check["pass"] else "MISS") + (" (noisy)" if check["noisy"] else "")
        print(f"  {check['name']:34} {check['value']:7.2f}   target {check['target']:7} {verdict}")
    if extra:
        print("  also: " + ", ".join(f"{k} = {v:.2f}" for k, v in extra.items()))
    print()
    for note in notes:
        print(f"  note: {note}")
    noisy = [r.key for r in rows if r.noisy]
    if noisy:
        print(
            f"\n  *** {', '.join(noisy)}: other processes used more than {NOISY_CORES} cores "
            "during the phase; those numbers are not trustworthy: rerun on a quiet machine ***"
        )
    for r in rows:
        if r.error_count:
            print(f"\n!!! {r.key} ({r.label}) HAD {r.error_count} FAILED REQUESTS: {r.errors} !!!")


def markdown(rows: list[Row], checks: list[dict[str, Any]]) -> str:
    """The table and the verdicts as Markdown, for bench/README.md."""
    out = [
        "| | | throughput | p50 ms | p99 ms | errors | server CPU µs/req | loop µs/req "
        "| engine µs/req |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        star = "*" if r.noisy else ""
        out.append(
            f"| {r.key}{star} | {r.label} | {r.throughput:,.0f} {r.unit} | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.error_count if r.unit == 'req/s' else ''} | "
            f"{_us(r.server_cpu_us_per_request)} | {_us(r.loop_cpu_us_per_request)} | "
            f"{_us(r.engine_cpu_us_per_request)} |"
        )
    out += ["", "| target | measured | bound | verdict |", "|---|---|---|---|"]
    for c in checks:
        verdict = ("PASS" if c["pass"] else "MISS") + (" (noisy)" if c["noisy"] else "")
        out.append(f"| {c['name']} | {c['value']:.2f} | {c['target']} | {verdict} |")
    return "\n".join(out)


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {
        "cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cpu": cpu,
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "wrk": (wrk_version.stdout or wrk_version.stderr).splitlines()[0],
    }


# --- main -------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=5.0, help="each HTTP round")
    parser.add_argument("--raw-duration-s", type=float, default=3.0, help="each raw round")
    parser.add_argument(
        "--clients", type=int, nargs="+", default=list(CLIENTS), help="concurrent clients"
    )
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (1 for 1 client)")
    parser.add_argument(
        "--compare-ref",
        default=DEFAULT_COMPARE_REF,
        help="also run edged from this git ref (rows o1, o64, oj64); empty: skip "
        "(default: edged before the serving-speed work)",
    )
    parser.add_argument(
        "--baseline-intra-op-threads",
        type=int,
        default=0,
        help="intra_op_threads of the thread-per-request server; 0: the runtime's default",
    )
    parser.add_argument(
        "--baseline-spin-wait",
        choices=("on", "off"),
        default="off",
        help="spin_wait of the thread-per-request server (off: its faster setting here; "
        "on: ONNX Runtime's own default)",
    )
    parser.add_argument(
        "--no-json", action="store_true", help="binary bodies only (skip the j rows)"
    )
    parser.add_argument("--no-grpc", action="store_true", help="skip the gRPC rows (g, gs)")
    parser.add_argument(
        "--quiet-wait-s",
        type=float,
        default=20.0,
        help="before each phase, wait up to this long for other processes to go idle",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="measurements per phase; the best is reported"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="extra rounds per phase to replace rounds that other processes disturbed",
    )
    parser.add_argument(
        "--cores",
        type=int,
        default=0,
        help="pin the servers and the raw rows to this many cores and wrk to the others "
        "(0: no pinning; ignored unless the machine has more cores)",
    )
    parser.add_argument(
        "--legacy-rows", action="store_true", help="also the s64 (spin) and w (wide) rows"
    )
    parser.add_argument(
        "--no-one-process", action="store_true", help="skip the p rows (workers = 0)"
    )
    parser.add_argument("--no-thread-server", action="store_true", help="skip the c and e rows")
    parser.add_argument(
        "--switch-interval",
        type=float,
        nargs="*",
        default=[],
        help="also edged whose engine has this GIL switch interval (s), 64 binary clients "
        "(rows d64sK, K in µs)",
    )
    parser.add_argument(
        "--workers-sweep",
        type=int,
        nargs="*",
        default=[],
        help="also edged with each of these [server] workers at 64 binary clients (rows d64wK)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def raw_thread_counts(cores: int) -> list[int]:
    """Intra-op thread counts for the bT rows: every count on a small machine, a spread on a
    big one (the best of them is the machine's limit)."""
    if cores <= 4:
        return list(range(1, cores + 1))
    return sorted({1, 2, 4, cores // 2, cores - 2, cores - 1, cores} - {0})


@dataclass
class Phases:
    """Runs HTTP phases against one server process at a time and collects their rows."""

    patience: Patience
    duration_s: float
    wrk_threads: int
    rows: dict[str, Row] = field(default_factory=dict)

    def load(self, clients: int) -> tuple[int, int, float]:
        return (1 if clients == 1 else self.wrk_threads, clients, self.duration_s)

    def measure(
        self,
        key: str,
        label: str,
        port: int,
        pid: int,
        work: Workload,
        clients: int,
        settings: dict[str, Any],
        event_loop: bool = True,
    ) -> None:
        print(f"bench: {key}: {label} for {self.duration_s:g}s", flush=True)
        measure = partial(
            http_row, key, label, port, pid, work, self.load(clients), settings, event_loop
        )
        self.rows[key] = best_of(measure, self.patience, [pid])

    def measure_grpc(
        self,
        key: str,
        label: str,
        ports: tuple[int, int],
        pid: int,
        clients: int,
        settings: dict[str, Any],
        stream: bool = False,
    ) -> None:
        print(f"bench: {key}: {label} for {self.duration_s:g}s", flush=True)
        measure = partial(
            grpc_row, key, label, ports, pid, clients, self.duration_s, settings, stream
        )
        self.rows[key] = best_of(measure, self.patience, [pid])


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk is missing; install it with `apt-get install -y wrk`", file=sys.stderr)
        return 2
    global PINNING
    cpus = sorted(os.sched_getaffinity(0))
    if 0 < args.cores < len(cpus):
        PINNING = Pinning(tuple(cpus[: args.cores]), tuple(cpus[args.cores :]))
        os.sched_setaffinity(0, PINNING.server_cores)  # the raw rows run on the server's cores
        print(f"bench: servers on cores {PINNING.server_cores}, wrk on {PINNING.wrk_cores}")
    cores = usable_cores()
    patience = Patience(args.rounds, args.quiet_wait_s, args.retries)
    phases = Phases(patience, args.duration_s, args.wrk_threads)
    clients: list[int] = args.clients

    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp_name:
        tmp = Path(tmp_name)
        repo = tmp / "models"
        model_dir = repo / MODEL_NAME
        version_dir = model_dir / "1"
        layers = " -> ".join(map(str, BENCH_MLP_LAYERS))
        print(f"bench: writing ONNX MLP {layers} fp32 to {version_dir}", flush=True)
        make_bench_mlp(version_dir)

        rng = np.random.default_rng(1)
        x1 = rng.standard_normal((1, BENCH_MLP_LAYERS[0]), dtype=np.float32)
        xb = rng.standard_normal((MAX_BATCH, BENCH_MLP_LAYERS[0]), dtype=np.float32)

        # What `edged run` gives a model with no [runtime] settings on this machine.
        budget = CpuBudget(cores, 0, front_ends(cores))
        edged_options = budget.apply(RuntimeOptions(), models=1)
        raw_settings = {
            "intra_op_threads": edged_options.intra_op_threads,
            "spin_wait": edged_options.spin_wait,
            "via": "load_model",
        }
        model = load_model(version_dir, edged_options)
        body, header_length = infer_body(x1)
        expected = model.run({"input": x1})["output"]
        binary = Workload(tmp / "request.bin", body, header_length, expected)
        binary.body_file.write_bytes(body)
        json_body = json_infer_body(x1)
        as_json = Workload(tmp / "request.json", json_body, None, expected)
        as_json.body_file.write_bytes(json_body)
        works = [("", binary)] + ([] if args.no_json else [("j", as_json)])

        print(f"bench: a: raw batch 1 for {args.raw_duration_s:g}s", flush=True)
        label = "raw runtime, batch 1"
        a = best_of(partial(raw_row, model, x1, args.raw_duration_s, "a", label), patience)
        a.settings = raw_settings
        model.close()
        del model
        phases.rows["a"] = a
        for threads in raw_thread_counts(cores):
            print(f"bench: b{threads}: raw batch {MAX_BATCH}, {threads} threads", flush=True)
            options = RuntimeOptions(intra_op_threads=threads, spin_wait=False)
            wide = load_model(version_dir, options)
            label = f"raw runtime, batch {MAX_BATCH}, {threads} thread{'s' * (threads > 1)}"
            key = f"b{threads}"
            row = best_of(partial(raw_row, wide, xb, args.raw_duration_s, key, label), patience)
            row.settings = {"intra_op_threads": threads, "spin_wait": False, "via": "load_model"}
            phases.rows[key] = row
            wide.close()

        # d: edged as installed, no [runtime] settings; g: the same process over gRPC.
        write_model_config(model_dir)
        port, grpc_port = free_ports(2)
        command = edged_command(repo, port, tmp, grpc_port=0 if args.no_grpc else grpc_port)
        with server_process(command, port, tmp / "edged.log") as pid:
            for suffix, work in works:
                check_response(port, work)
                for n in clients:
                    label = f"edged, {n} client{'s' * (n > 1)}, {work.kind}"
                    settings: dict[str, Any] = {"defaults": True, "max_batch_size": MAX_BATCH}
                    phases.measure(f"d{suffix}{n}", label, port, pid, work, n, settings)
            for n in [] if args.no_grpc else clients:
                label = f"edged over gRPC, {n} call{'s' * (n > 1)} in flight, raw"
                settings = {"defaults": True, "max_batch_size": MAX_BATCH, "protocol": "grpc"}
                phases.measure_grpc(f"g{n}", label, (port, grpc_port), pid, n, settings)
                label = f"edged over gRPC, {n} stream message{'s' * (n > 1)} in flight"
                settings = {**settings, "stream": True}
                phases.measure_grpc(
                    f"gs{n}", label, (port, grpc_port), pid, n, settings, stream=True
                )

        # d64wK: the number of front ends, for choosing the default; g64wK: gRPC, which every
        # front end serves on the one port (SO_REUSEPORT).
        for workers in args.workers_sweep:
            port, grpc_port = free_ports(2)
            sweep_grpc = 0 if args.no_grpc else grpc_port
            cmd = edged_command(repo, port, tmp, f"state-w{workers}", workers, sweep_grpc)
            with server_process(cmd, port, tmp / f"w{workers}.log") as pid:
                check_response(port, binary)
                label = f"edged, 64 clients, binary, {workers} front ends"
                phases.measure(f"d64w{workers}", label, port, pid, binary, 64, {"workers": workers})
                if sweep_grpc:
                    label = f"edged over gRPC, 64 calls in flight, raw, {workers} front ends"
                    settings = {"workers": workers, "protocol": "grpc"}
                    ports = (port, grpc_port)
                    phases.measure_grpc(f"g64w{workers}", label, ports, pid, 64, settings)

        # d64sK: the engine's GIL switch interval, for the hand-off between its threads.
        for interval in args.switch_interval:
            port = free_port()
            key = f"d64s{interval * 1e6:.0f}"
            cmd = [
                "env", f"EDGED_ENGINE_SWITCH_INTERVAL_S={interval}",
                *edged_command(repo, port, tmp, f"state-{key}"),
            ]  # fmt: skip
            with server_process(cmd, port, tmp / f"{key}.log") as pid:
                check_response(port, binary)
                label = f"edged, 64 clients, binary, engine switch interval {interval * 1e3:g} ms"
                phases.measure(key, label, port, pid, binary, 64, {"switch_interval_s": interval})

        # p: edged in one process (the engine in the daemon's process), the design before.
        if not args.no_one_process:
            write_model_config(model_dir)
            port = free_port()
            cmd = edged_command(repo, port, tmp, "state-one", workers=0)
            with server_process(cmd, port, tmp / "one.log") as pid:
                for suffix, work in works:
                    check_response(port, work)
                    for n in clients:
                        label = f"edged one process, {n} client{'s' * (n > 1)}, {work.kind}"
                        settings = {"workers": 0}
                        phases.measure(f"p{suffix}{n}", label, port, pid, work, n, settings)

        # s: edged with spinning intra-op threads (the old default), for the spin_wait target.
        if 64 in clients and args.legacy_rows:
            write_model_config(model_dir, spin_wait=True)
            port = free_port()
            with server_process(edged_command(repo, port, tmp), port, tmp / "spin.log") as pid:
                check_response(port, binary)
                label = "edged, 64 clients, binary, spin_wait=true"
                phases.measure("s64", label, port, pid, binary, 64, {"spin_wait": True})

        # w: every core for inference (the loop gets no core of its own), for the budget rule.
        if args.legacy_rows:
            write_model_config(model_dir, intra_op_threads=cores)
            port = free_port()
            with server_process(edged_command(repo, port, tmp), port, tmp / "wide.log") as pid:
                check_response(port, binary)
                for n in (1, 64):
                    if n in clients:
                        label = f"edged, {n} client{'s' * (n > 1)}, binary, intra_op={cores}"
                        settings = {"intra_op_threads": cores}
                        phases.measure(f"w{n}", label, port, pid, binary, n, settings)

        # o: edged at an older ref, its own defaults ("today").
        if args.compare_ref and not _has_ref(args.compare_ref):
            print(f"bench: git ref {args.compare_ref} is not here; skipping the o rows")
        elif args.compare_ref:
            write_model_config(model_dir)
            port = free_port()
            with checkout(args.compare_ref, tmp) as path:
                ref_cmd = edged_command(repo, port, tmp, "state-ref", grpc_port=None)
                cmd = with_pythonpath(ref_cmd, path)
                # From the checkout: `python -m` puts the working directory first on the path.
                with server_process(cmd, port, tmp / "edged-ref.log", cwd=path) as pid:
                    old = [(s, w, n) for s, w in works for n in (1, 64)
                           if n in clients and not (s and n == 1)]  # fmt: skip
                    for suffix, work, n in old:
                        check_response(port, work)
                        label = (
                            f"edged {args.compare_ref[:10]}, {n} client{'s' * (n > 1)}, {work.kind}"
                        )
                        settings = {"ref": args.compare_ref}
                        phases.measure(f"o{suffix}{n}", label, port, pid, work, n, settings)

        # c: thread-per-request with the runtime's default threads; e: with 1 intra-op thread
        # per request (the best such a server can do: requests in parallel, one core each).
        thread_servers = (("c", args.baseline_intra_op_threads), ("e", 1))
        for letter, threads in () if args.no_thread_server else thread_servers:
            port = free_port()
            cmd = [
                sys.executable, str(THREAD_SERVER), "--version-dir", str(version_dir),
                "--port", str(port), "--intra-op-threads", str(threads),
                "--spin-wait", args.baseline_spin_wait,
            ]  # fmt: skip
            with server_process(cmd, port, tmp / f"thread_server_{letter}.log") as pid:
                settings = {
                    "intra_op_threads": threads,
                    "spin_wait": args.baseline_spin_wait,
                    "via": "bench/thread_server.py",
                }
                for suffix, work in works:
                    if letter == "e" and suffix:
                        continue  # JSON parsing costs the thread server the same either way
                    check_response(port, work)
                    for n in clients:
                        what = "default threads" if letter == "c" else "1 thread"
                        label = f"ThreadingHTTPServer ({what}), {n} client{'s' * (n > 1)}, "
                        label += work.kind
                        key = f"{letter}{suffix}{n}"
                        phases.measure(key, label, port, pid, work, n, settings, event_loop=False)

    rows = phases.rows
    values = ratios(rows)
    extra = extra_ratios(rows)
    checks = verdicts(values, rows, cores)
    limit = raw_limit(rows)
    notes = [
        f"a: raw runtime with edged's default thread settings here "
        f"(intra_op_threads={edged_options.intra_op_threads}, "
        f"spin_wait={edged_options.spin_wait}); the machine's limit (raw) is "
        f"{limit.key if limit else '-'}; "
        f"c: intra_op_threads={args.baseline_intra_op_threads} (0: one per core), "
        f"spin_wait {args.baseline_spin_wait}",
        "HTTP rows include the loopback round trip, and wrk shares the cores with the server; "
        "raw rows are one in-process runtime call",
        "CPU µs per request: server = all its processes and threads, loop = edged's "
        "event-loop thread (the control plane's), engine = edged's engine apart from the "
        "runtime, wrk = the load generator; other = cores used by unrelated processes "
        "(* = noisy)",
        f"cores: {cores} for the servers"
        + (
            f" (pinned to {list(PINNING.server_cores)}, wrk on {list(PINNING.wrk_cores)})"
            if PINNING.server_cores
            else " (not pinned: wrk shares them)"
        ),
    ]
    ordered = sorted(rows.values(), key=lambda r: (r.key[0], "j" in r.key, len(r.key), r.key))
    print_report(ordered, checks, extra, notes)

    failed = [r for r in rows.values() if r.error_count and not r.key.startswith("c")]
    report = {
        "model": {"layers": list(BENCH_MLP_LAYERS), "dtype": "fp32", "max_batch_size": MAX_BATCH},
        "raw_limit": limit.key if limit else None,
        "pinning": asdict(PINNING),
        "machine": machine(),
        "rows": [asdict(r) for r in ordered],
        "ratios": values,
        "other_ratios": extra,
        "targets": checks,
        "noisy_phases": [r.key for r in ordered if r.noisy],
        "failed_requests": bool(failed),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(ordered, checks) + "\n")
    print(f"\nbench: wrote {args.out} and {args.out.with_suffix('.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
