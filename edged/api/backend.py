"""The seam between a front end (HTTP, gRPC) and what serves its requests.

A front end parses requests, decodes and encodes tensors and answers; everything else (queues,
batching, versions, the repository) is behind an ``InferenceBackend``: the engine's client in a
front-end process, or ``ManagerBackend`` around an in-process ``ModelManager``.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

from edged.runtime.base import Array
from edged.serve.manager import ModelManager
from edged.serve.scheduler import InferenceResult
from edged.serve.slot import ServedVersion
from edged.serve.view import ModelView


class InferenceBackend(Protocol):
    @property
    def ready(self) -> bool:
        """Every known model has a version serving and the backend is not shutting down."""
        ...

    def view(self, name: str, version: str | None = None) -> ModelView:
        """The serving version of ``name`` (``version``, when given, must be it); raises
        ``ModelNotFoundError`` or ``ModelNotReadyError``."""
        ...

    async def infer(
        self,
        name: str,
        inputs: dict[str, Array],
        *,
        version: str | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> InferenceResult: ...

    # The model-repository extension (operator actions; the caller checks permission).
    async def index_async(self) -> list[dict[str, Any]]: ...

    async def load_model(self, name: str) -> str: ...

    async def unload(self, name: str) -> None: ...


class ManagerBackend:
    """An ``InferenceBackend`` over a ``ModelManager`` in this process."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self._views: weakref.WeakKeyDictionary[ServedVersion, ModelView] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def ready(self) -> bool:
        return self.manager.ready

    def view(self, name: str, version: str | None = None) -> ModelView:
        served = self.manager.serving(name, version)
        view = self._views.get(served)
        if view is None:
            view = self._views[served] = ModelView.of(served)
        return view

    async def infer(
        self,
        name: str,
        inputs: dict[str, Array],
        *,
        version: str | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> InferenceResult:
        return await self.manager.infer(
            name, inputs, version=version, priority=priority, timeout_s=timeout_s
        )

    async def index_async(self) -> list[dict[str, Any]]:
        return await self.manager.index_async()

    async def load_model(self, name: str) -> str:
        return await self.manager.load_model(name)

    async def unload(self, name: str) -> None:
        await self.manager.unload(name)
