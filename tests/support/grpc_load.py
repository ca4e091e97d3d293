"""Inference load over gRPC (``tritonclient.grpc``) from client threads, counting every answer
and keeping which version gave which output: the gRPC twin of ``tests.support.load``."""

from __future__ import annotations

from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.support.load import ClientThreads

MLP_INPUT = np.full((1, 64), 0.1, np.float32)


class GrpcInferenceLoad(ClientThreads):
    """``clients`` threads call ModelInfer until stopped, keeping (model_version, output)."""

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
        self.answers: list[tuple[str, np.ndarray[Any, Any]]] = []  # (model_version, output)
        super().__init__(clients, "grpc-load")

    def versions(self) -> set[str]:
        with self._lock:
            return {version for version, _ in self.answers}

    def wait_for_version(self, version: str, timeout_s: float = 60.0) -> None:
        self._wait(lambda: version in self.versions(), timeout_s)

    def _client(self) -> None:
        client = triton.InferenceServerClient(self.url)
        infer_input = triton.InferInput("input", list(self.x.shape), "FP32")
        infer_input.set_data_from_numpy(self.x)
        try:
            while not self._stop.is_set():
                try:
                    result = client.infer(self.model, [infer_input], client_timeout=30)
                except InferenceServerException as exc:
                    self._count(f"error {exc.status()}")
                    continue
                version = result.get_response().model_version
                output = result.as_numpy("output")
                with self._lock:
                    self.outcomes["ok"] += 1
                    self.answers.append((version, output))
        finally:
            client.close()
