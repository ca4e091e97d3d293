"""Inference load over gRPC (``tritonclient.grpc``) from client threads, counting every answer
and keeping which version gave which output: the gRPC twin of ``tests.support.load``."""

from __future__ import annotations

import threading
import time
from collections import Counter
from types import TracebackType
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

MLP_INPUT = np.full((1, 64), 0.1, np.float32)


class GrpcInferenceLoad:
    def __init__(
        self,
        url: str,
        model: str = "mlp",
        x: np.ndarray[Any, Any] = MLP_INPUT,
        clients: int = 4,
    ) -> None:
        self.url = url
        self.model = model
        self.x = x
        self.outcomes: Counter[str] = Counter()
        self.answers: list[tuple[str, np.ndarray[Any, Any]]] = []  # (model_version, output)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, name=f"grpc-load-{i}", daemon=True)
            for i in range(clients)
        ]

    def __enter__(self) -> GrpcInferenceLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    @property
    def ok(self) -> int:
        with self._lock:
            return self.outcomes["ok"]

    @property
    def failures(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in self.outcomes.items() if k != "ok"}

    def versions(self) -> set[str]:
        with self._lock:
            return {version for version, _ in self.answers}

    def wait_for_ok(self, more: int, timeout_s: float = 60.0) -> None:
        """Block until ``more`` further requests have succeeded (serving goes on)."""
        target = self.ok + more
        self._wait(lambda: self.ok >= target, timeout_s)

    def wait_for_version(self, version: str, timeout_s: float = 60.0) -> None:
        self._wait(lambda: version in self.versions(), timeout_s)

    def _wait(self, done: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"gRPC load stalled: {dict(self.outcomes)}")
            time.sleep(0.01)

    def _client(self) -> None:
        client = triton.InferenceServerClient(self.url)
        infer_input = triton.InferInput("input", list(self.x.shape), "FP32")
        infer_input.set_data_from_numpy(self.x)
        try:
            while not self._stop.is_set():
                try:
                    result = client.infer(self.model, [infer_input], client_timeout=30)
                except InferenceServerException as exc:
                    with self._lock:
                        self.outcomes[f"error {exc.status()}"] += 1
                    continue
                version = result.get_response().model_version
                output = result.as_numpy("output")
                with self._lock:
                    self.outcomes["ok"] += 1
                    self.answers.append((version, output))
        finally:
            client.close()
