"""Inference load from client threads, counting every answer: the proof that serving never
stopped while a test broke something else."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

MLP_BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.1] * 64}]}
).encode()


class ClientThreads:
    """``clients`` threads run ``_client`` until stopped; ``outcomes`` counts "ok" and every
    kind of failure. The load generators below differ only in what a client sends."""

    def __init__(self, clients: int, name: str) -> None:
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, name=f"{name}-{i}", daemon=True)
            for i in range(clients)
        ]

    def __enter__(self) -> Self:
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

    def wait_for_ok(self, more: int, timeout_s: float = 60.0) -> None:
        """Block until ``more`` further requests have succeeded (serving goes on)."""
        target = self.ok + more
        self._wait(lambda: self.ok >= target, timeout_s)

    def _wait(self, done: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"serving stalled: {dict(self.outcomes)}")
            time.sleep(0.01)

    def _count(self, key: str) -> None:
        with self._lock:
            self.outcomes[key] += 1

    def _client(self) -> None:
        raise NotImplementedError


class InferenceLoad(ClientThreads):
    """``clients`` threads POST to ``/v2/models/<model>/infer`` over keep-alive connections
    until stopped."""

    def __init__(
        self, port: int, model: str = "mlp", body: bytes = MLP_BODY, clients: int = 4
    ) -> None:
        self.port = port
        self.path = f"/v2/models/{model}/infer"
        self.body = body
        super().__init__(clients, "load")

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json"}
        while not self._stop.is_set():
            try:
                conn.request("POST", self.path, self.body, headers)
                response = conn.getresponse()
                response.read()
                self._count("ok" if response.status == 200 else f"status {response.status}")
            except (OSError, http.client.HTTPException) as exc:
                self._count(f"error {type(exc).__name__}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.close()
