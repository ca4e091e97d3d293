"""``edged top``: a live terminal view of the local daemon's models and device.

Each refresh reads ``/edged/v1/status`` (models, versions, queues), ``/edged/v1/telemetry``
(the latest telemetry record: latency percentiles, CPU, temperatures, power, energy) and
``/metrics`` (cumulative request counters, so the request rate covers exactly the time between
two refreshes rather than the last telemetry interval). Rendering is a pure function of those
documents; power and energy show "unavailable" when the device has no sensor for them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edged.api.client import LocalClient
from edged.cli.client import add_endpoint_args, client_from
from edged.errors import ApiError, DaemonUnreachableError, InvalidRequestError

__all__ = [
    "Sample",
    "fetch_sample",
    "register",
    "render_frame",
    "request_counts",
    "request_rates",
]

UNAVAILABLE = "unavailable"
_REQUESTS_METRIC = "edged_inference_requests"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("top", help="live view of the local daemon's models and device")
    add_endpoint_args(p)
    p.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default 1)"
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="print one frame and exit (it takes one interval: the rate needs two readings)",
    )
    p.set_defaults(handler=handle_top)


# --- reading the daemon ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One reading of the daemon at monotonic time ``t``."""

    t: float
    status: dict[str, Any]
    telemetry: dict[str, Any]
    requests: dict[tuple[str, str], float]
    """Cumulative successful requests per (model, version)."""


def request_counts(metrics_text: str) -> dict[tuple[str, str], float]:
    """``edged_inference_requests_total`` per (model, version) from a ``/metrics`` body."""
    counts: dict[tuple[str, str], float] = {}
    try:
        for family in text_string_to_metric_families(metrics_text):
            if family.name != _REQUESTS_METRIC:
                continue
            for sample in family.samples:
                if sample.name == f"{_REQUESTS_METRIC}_total":
                    key = (sample.labels["model"], sample.labels["version"])
                    counts[key] = sample.value
    except (ValueError, KeyError) as exc:
        raise InvalidRequestError(
            f"the daemon's /metrics could not be parsed ({exc}); is it an edged daemon?"
        ) from exc
    return counts


def fetch_sample(client: LocalClient, clock: Callable[[], float] = time.monotonic) -> Sample:
    status = client.json("GET", "/edged/v1/status")
    telemetry = client.json("GET", "/edged/v1/telemetry")
    code, _, body = client.request("GET", "/metrics")
    if code >= 400:
        raise ApiError(code, body.decode(errors="replace"))
    return Sample(clock(), status, telemetry, request_counts(body.decode()))


def request_rates(previous: Sample | None, current: Sample) -> dict[str, float | None]:
    """Requests per second of each model (all its versions) between two samples.

    None without a previous sample, for a zero-length gap, or when a counter went backwards
    (the daemon restarted in between).
    """
    models = {m["name"] for m in current.status.get("models", [])}
    models.update(model for model, _ in current.requests)
    if previous is None or current.t <= previous.t:
        return dict.fromkeys(models)
    elapsed = current.t - previous.t
    done: dict[str, float] = {}
    restarted: set[str] = set()
    for key, count in current.requests.items():
        # A version missing from the previous reading had not run a request yet then.
        delta = count - previous.requests.get(key, 0.0)
        if delta < 0:
            restarted.add(key[0])
        done[key[0]] = done.get(key[0], 0.0) + delta
    return {
        model: None if model in restarted else done.get(model, 0.0) / elapsed for model in models
    }


# --- rendering (pure) -----------------------------------------------------------------------


def _number(value: Any, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _power_text(telemetry: Mapping[str, Any], record: Mapping[str, Any] | None) -> str:
    if not telemetry.get("power_available"):
        return f"{UNAVAILABLE} (no power sensor)"
    watts = telemetry.get("power_total_w")
    if watts is None:
        return f"{UNAVAILABLE} (no sensor measures the board total)"
    power = (record or {}).get("power") or {}
    where = ", ".join(str(p) for p in (power.get("source"), power.get("scope")) if p)
    return f"{watts:.2f} W" + (f" ({where})" if where else "")


def _temperature_text(system: Mapping[str, Any]) -> str:
    temperatures: Mapping[str, float] = system.get("temperatures_c") or {}
    if not temperatures:
        return "-"
    sensor, celsius = max(temperatures.items(), key=lambda item: item[1])
    return f"{celsius:.1f} °C ({sensor})"


def _header(status: Mapping[str, Any], telemetry: Mapping[str, Any]) -> Text:
    record = telemetry.get("record")
    system: Mapping[str, Any] = (record or {}).get("system") or {}
    ready = "ready" if status.get("ready") else "NOT READY"
    device = (record or {}).get("device", "?")
    interval = telemetry.get("interval_s")
    spool: Mapping[str, Any] = telemetry.get("spool") or {}
    text = Text()
    text.append("edged top", style="bold")
    text.append(f"  {device}  {ready}  telemetry every {_number(interval, 'g')} s")
    if record is None:
        text.append("  (no telemetry record yet)", style="yellow")
    text.append("\n")
    cpu = _number(system.get("cpu_percent"), ".0f")
    freq = system.get("cpu_freq_mhz")
    text.append(f"CPU {cpu} %" + (f" @ {freq:.0f} MHz" if freq is not None else ""))
    text.append(f"   temp {_temperature_text(system)}")
    text.append(f"   power {_power_text(telemetry, record)}")
    rss = system.get("rss_bytes")
    if rss is not None:
        text.append(f"   RSS {rss / 1e6:.0f} MB")
    text.append(
        f"   spool {_number(spool.get('pending'), 'd')} pending,"
        f" {telemetry.get('published', 0)} published"
    )
    return text


def _energy_text(entry: Mapping[str, Any], telemetry: Mapping[str, Any]) -> str:
    value = entry.get("energy_mj_per_inference")
    if value is not None:
        return f"{value:.2f}"
    if not telemetry.get("power_available") or telemetry.get("power_total_w") is None:
        return UNAVAILABLE
    return "-"


def render_frame(
    status: Mapping[str, Any],
    telemetry: Mapping[str, Any],
    rates: Mapping[str, float | None],
) -> RenderableType:
    """One screen: a header (device, CPU, temperature, power, spool) and a row per model.

    ``status`` and ``telemetry`` are the ``/edged/v1/status`` and ``/edged/v1/telemetry``
    documents; ``rates`` is requests per second per model (None: not known yet). Latency
    percentiles and energy come from the latest telemetry record, so they cover its interval.
    """
    record: Mapping[str, Any] = telemetry.get("record") or {}
    entries: Mapping[str, Any] = record.get("models") or {}
    table = Table(expand=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("model", "left"),
        ("version", "left"),
        ("state", "left"),
        ("req/s", "right"),
        ("p50 ms", "right"),
        ("p99 ms", "right"),
        ("queue", "right"),
        ("errors", "right"),
        ("mJ/inference", "right"),
    )
    for column, justify in columns:
        table.add_column(column, justify=justify)
    for model in status.get("models", []):
        name = model["name"]
        entry: Mapping[str, Any] = entries.get(name) or {}
        e2e: Mapping[str, Any] = (entry.get("latency_ms") or {}).get("e2e") or {}
        failures = None
        if entry:
            failures = sum(int(entry.get(k) or 0) for k in ("errors", "rejected", "timeouts"))
        table.add_row(
            name,
            model.get("version") or "-",
            model.get("state") or "-",
            _number(rates.get(name), ".1f"),
            _number(e2e.get("p50"), ".2f"),
            _number(e2e.get("p99"), ".2f"),
            str(model.get("queue_depth", "-")),
            _number(failures, "d"),
            _energy_text(entry, telemetry) if entry else "-",
        )
    footer = Text(
        "p50/p99: end-to-end latency and errors over the last telemetry interval; "
        "req/s: since the previous refresh",
        style="dim",
    )
    processes = status.get("processes")
    if processes:
        from edged.cli.client import processes_table

        return Group(_header(status, telemetry), table, processes_table(processes), footer)
    return Group(_header(status, telemetry), table, footer)


def _error_frame(message: str) -> RenderableType:
    return Text(f"edged top: {message} (retrying)", style="bold red")


# --- the command ----------------------------------------------------------------------------


def handle_top(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise InvalidRequestError(f"--interval must be positive, got {args.interval}")
    client = client_from(args)
    console = Console()
    if args.once:
        first = fetch_sample(client)
        time.sleep(args.interval)
        second = fetch_sample(client)
        console.print(render_frame(second.status, second.telemetry, request_rates(first, second)))
        return 0
    previous: Sample | None = None
    try:
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                try:
                    sample = fetch_sample(client)
                except (DaemonUnreachableError, ApiError) as exc:
                    previous = None
                    live.update(_error_frame(str(exc)), refresh=True)
                else:
                    rates = request_rates(previous, sample)
                    live.update(render_frame(sample.status, sample.telemetry, rates), refresh=True)
                    previous = sample
                time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
