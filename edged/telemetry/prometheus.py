"""Prometheus ``/metrics`` for the local API (placeholder until the exporter lands)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST


def render_metrics(hub: Any, manager: Any) -> tuple[bytes, str]:
    return b"", CONTENT_TYPE_LATEST
