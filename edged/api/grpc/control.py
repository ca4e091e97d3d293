"""A front-end process's backend for gRPC: inference and metadata from the engine's client,
the repository extension from the control plane (HTTP over its private socket), which answers
it for every front end, as the HTTP routes forward it there."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import ClientError, ClientSession, UnixConnector

from edged.api.backend import InferenceBackend
from edged.api.context import VIA_HEADER
from edged.errors import (
    EdgedError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotReadyError,
    SelfTestFailedError,
)
from edged.runtime.base import Array
from edged.serve.scheduler import InferenceResult
from edged.serve.view import ModelView

# The control plane's answer, back to the error the in-process backend would raise.
_ERRORS: dict[int, type[EdgedError]] = {
    400: InvalidRequestError,
    404: ModelNotFoundError,
    409: SelfTestFailedError,
    503: ModelNotReadyError,
}


class ControlPlaneRepository:
    """``backend`` for everything but index, load and unload, which go to the control plane.
    The gRPC service checks who may load and unload before it calls (its Unix socket)."""

    def __init__(self, backend: InferenceBackend, control_socket: str) -> None:
        self.backend = backend
        self._control_socket = control_socket
        self._session: ClientSession | None = None

    @property
    def ready(self) -> bool:
        return self.backend.ready

    def view(self, name: str, version: str | None = None) -> ModelView:
        return self.backend.view(name, version)

    async def infer(
        self,
        name: str,
        inputs: dict[str, Array],
        *,
        version: str | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> InferenceResult:
        return await self.backend.infer(
            name, inputs, version=version, priority=priority, timeout_s=timeout_s
        )

    async def index_async(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self._post("/v2/repository/index")
        return rows

    async def load_model(self, name: str) -> str:
        answer = await self._post(f"/v2/repository/models/{name}/load")
        return str(answer["version"])

    async def unload(self, name: str) -> None:
        await self._post(f"/v2/repository/models/{name}/unload")

    async def _post(self, path: str) -> Any:
        if self._session is None:
            self._session = ClientSession(connector=UnixConnector(path=self._control_socket))
        try:
            async with self._session.post(
                f"http://edged{path}", headers={VIA_HEADER: "unix"}
            ) as answer:
                body = await answer.read()
                status = answer.status
        except ClientError as exc:
            raise ModelNotReadyError(f"the control plane did not answer: {exc}") from exc
        doc = json.loads(body) if body else {}
        if status != 200:
            message = doc.get("error", f"HTTP {status}") if isinstance(doc, dict) else str(doc)
            raise _ERRORS.get(status, ModelNotReadyError)(message)
        return doc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
