"""The HTTP app in-process over real loopback TCP: the metadata route probes the version's
files once, not per request; every route still runs behind the admission gate and the error
mapping (they wrap each route now instead of an aiohttp middleware)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edged.api.app import build_app
from edged.api.context import GATE
from edged.config import ModelsConfig
from edged.runtime import base
from edged.serve import view
from edged.serve.manager import ModelManager


@asynccontextmanager
async def serving(repo: Path) -> AsyncIterator[tuple[str, web.Application]]:
    manager = ModelManager(ModelsConfig(repository=repo))
    await manager.start()
    app = build_app(manager, 1 << 20, shared_memory=False)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()
        await manager.close()


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(fn())


def test_metadata_probes_the_version_directory_once(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes: list[Path] = []

    def counting_backend_for(version_dir: Path) -> Any:
        probes.append(version_dir)
        return base.backend_for(version_dir)

    monkeypatch.setattr(view, "backend_for", counting_backend_for)

    async def main() -> None:
        async with serving(model_repo) as (url, _app), aiohttp.ClientSession() as session:
            docs = []
            for _ in range(3):
                async with session.get(f"{url}/v2/models/mlp") as response:
                    assert response.status == 200
                    assert response.content_type == "application/json"
                    docs.append(await response.json())
            assert docs[0] == docs[2]
            assert docs[0]["platform"] == "onnxruntime_onnx"
            assert docs[0]["name"] == "mlp" and docs[0]["versions"] == ["1"]
            assert docs[0]["inputs"][0]["name"] == "input"

    run(main)
    assert len(probes) == 1


def test_routes_map_errors_and_close_the_gate_while_draining(model_repo: Path) -> None:
    async def main() -> None:
        async with serving(model_repo) as (url, app), aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v2/models/mlp/infer", data=b"{nope") as response:
                assert response.status == 400
                assert "not valid JSON" in (await response.json())["error"]
            async with session.get(f"{url}/v2/models/nope") as response:
                assert response.status == 404
            async with session.post(f"{url}/v2/models/nope/infer", json={}) as response:
                assert response.status == 400
            app[GATE].start_draining()
            async with session.get(f"{url}/v2/models/mlp") as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "1"
            assert app[GATE].inflight == 0

    run(main)


def test_a_disabled_subsystem_is_404_and_an_operator_action_over_tcp_is_403(
    model_repo: Path, tmp_path: Path
) -> None:
    from edged.bundle import Installer, detect_device_facts

    async def main() -> None:
        manager = ModelManager(ModelsConfig(repository=model_repo))
        await manager.start()
        installer = Installer(tmp_path / "state", manager, detect_device_facts)
        app = build_app(manager, 1 << 20, shared_memory=False, installer=installer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with aiohttp.ClientSession() as session:
                for path in ("/edged/v1/telemetry", "/metrics"):
                    async with session.get(url + path) as response:
                        assert response.status == 404, path
                        assert "telemetry is disabled" in (await response.json())["error"]
                async with session.post(f"{url}/edged/v1/bundles", data=b"x") as response:
                    assert response.status == 403
                    assert "Unix socket only" in (await response.json())["error"]
                async with session.post(f"{url}/edged/v1/models/mlp/rollback") as response:
                    assert response.status == 403
        finally:
            await runner.cleanup()
            await manager.close()

    run(main)
