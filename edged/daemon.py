"""Wiring and lifecycle of the daemon: startup, main loop, graceful shutdown.

Signal handlers only set flags (as uvicorn does). SIGTERM / first SIGINT: stop accepting new
requests, drain in-flight ones within ``server.drain_timeout_s``, stop every service, exit 0.
A second SIGINT forces exit. SIGHUP: reload the config and the model repository.
One task group owns every long-lived task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from edged._compat import TaskGroup
from edged.bundle import Installer, detect_device_facts
from edged.bundle.store import MODELS_DIR
from edged.config import DaemonConfig
from edged.errors import ConfigError, EdgedError
from edged.sdnotify import Notifier, Watchdog, watchdog_interval_s
from edged.serve.api import GATE, build_app
from edged.serve.manager import ModelManager
from edged.telemetry.hub import TelemetryHub

if TYPE_CHECKING:  # the MQTT stack is imported only when the fleet channel is enabled
    from edged.transport.agent import FleetAgent

log = logging.getLogger(__name__)

# A long-lived service the daemon runs in its task group until shutdown (MQTT, telemetry...).
Service = Callable[[], Awaitable[None]]


ConfigLoader = Callable[[], DaemonConfig]


class FleetTelemetrySink:
    """Telemetry records go out on the device's telemetry topic at QoS 1 over the agent's
    connection; ``publish`` returns once the broker acknowledged (PUBACK)."""

    def __init__(self, agent: FleetAgent, timeout_s: float = 10.0) -> None:
        self._agent = agent
        self._timeout_s = timeout_s

    @property
    def connected(self) -> bool:
        return self._agent.connected

    async def wait_connected(self) -> None:
        await self._agent.wait_connected()

    async def publish_telemetry(self, payload: bytes) -> None:
        await self._agent.publish("telemetry", payload, qos=1, timeout=self._timeout_s)


class Daemon:
    def __init__(self, config: DaemonConfig, reload_config: ConfigLoader | None = None) -> None:
        """``reload_config`` re-reads the config on SIGHUP (with command-line overrides)."""
        self.config = config
        self._reload_config = reload_config
        self.telemetry = TelemetryHub(config.telemetry, config.state.directory)
        # Installed bundles live in the store under the state directory, layered over the
        # configured (seed) repository: an installed version wins, also after a restart.
        self.manager = ModelManager(
            config.models,
            self.telemetry.observer,
            store=config.state.directory / MODELS_DIR,
            worker_stuck_after_s=config.server.worker_stuck_after_s,
        )
        self.telemetry.queue_depths = self.manager.queue_depths
        self.installer = Installer(
            config.state.directory,
            self.manager,
            detect_device_facts,
            keep_previous=max(1, config.state.keep_versions - 1),
        )
        self.notifier = Notifier.from_environment()
        self.watchdog = Watchdog(self.notifier, watchdog_interval_s())
        self.services: list[tuple[str, Service]] = []
        # The MQTT fleet channel (signed deployments and commands); telemetry may publish on it.
        self.fleet: FleetAgent | None = None
        if config.mqtt.enabled:
            from edged.transport.agent import build_fleet_agent

            self.fleet = build_fleet_agent(config, self.manager, self.installer)
            self.services.append(("fleet", self.fleet.run))
            self.telemetry.device_id = self.fleet.device_id
            self.telemetry.sink = FleetTelemetrySink(self.fleet)
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._sigint_count = 0
        self._runner: web.AppRunner | None = None

    # --- signals --------------------------------------------------------------------------

    def _on_sigint(self) -> None:
        self._sigint_count += 1
        if self._sigint_count > 1:
            log.warning("second SIGINT: exiting now")
            os._exit(130)
        self._stop.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)

    # --- lifecycle ------------------------------------------------------------------------

    async def _start_api(self) -> list[str]:
        server = self.config.server
        app = build_app(
            self.manager,
            server.max_body_bytes,
            server.shared_memory_enabled,
            self.telemetry,
            self.installer,
        )
        self._runner = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=server.drain_timeout_s,
        )
        await self._runner.setup()
        endpoints = []
        if server.port >= 0:
            site = web.TCPSite(self._runner, server.host, server.port, reuse_address=True)
            await site.start()
            endpoints.append(f"http://{server.host}:{server.port}")
        if server.socket_path is not None:
            path = server.socket_path
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            # Bind under a tight umask so the socket never exists with looser permissions.
            old_umask = os.umask(0o777 & ~server.socket_mode)
            try:
                await web.UnixSite(self._runner, str(path)).start()
            finally:
                os.umask(old_umask)
            os.chmod(path, server.socket_mode)
            endpoints.append(f"unix:{path}")
        return endpoints

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            self.notifier.reloading("reloading config and model repository")
            try:
                if self._reload_config is not None:
                    new = self._reload_config()
                    self.manager.repository = new.models.repository
                    self.manager.config = new.models
                    self.config = new
                await self.manager.reload_repository()
                log.info("reloaded: %s", ", ".join(self.manager.model_names()) or "no models")
            except EdgedError as exc:
                log.error("reload failed, keeping the running config: %s", exc)
            self.notifier.ready(self._status_line())

    def _recover_store(self) -> None:
        """Repair whatever a crash interrupted in the bundle store, before anything serves."""
        self.config.state.directory.mkdir(parents=True, exist_ok=True)
        self.installer.recover()

    def _status_line(self) -> str:
        status = self.manager.status()
        serving = [f"{m['name']}@{m['version']}" for m in status["models"] if m["version"]]
        return f"serving {', '.join(serving) or 'no models'}"

    def _workers_healthy(self) -> bool:
        stuck = self.manager.stuck_workers()
        for name, seconds in stuck.items():
            log.error("inference worker of %s stuck in one run for %.0fs", name, seconds)
        return not stuck

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        self.watchdog.add_probe("inference-workers", self._workers_healthy)
        await asyncio.to_thread(self._recover_store)
        await self.manager.start()
        endpoints = await self._start_api()
        log.info("edged serving %s on %s", self.manager.model_names(), ", ".join(endpoints))
        self.notifier.ready(self._status_line())
        try:
            async with TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.watchdog.run(), name="watchdog"),
                    tg.create_task(self._reload_loop(), name="reload"),
                ]
                if self.config.telemetry.enabled:
                    tasks.append(tg.create_task(self.telemetry.run(), name="telemetry"))
                tasks += [tg.create_task(svc(), name=name) for name, svc in self.services]
                await self._stop.wait()
                log.info("stopping: draining in-flight requests")
                self.notifier.stopping("draining")
                await self._shutdown()
                for task in tasks:
                    task.cancel()
        finally:
            self.notifier.close()
        log.info("stopped")
        return 0

    async def _shutdown(self) -> None:
        timeout_s = self.config.server.drain_timeout_s
        if self._runner is not None:
            # New requests now get 503 + Retry-After; admitted ones finish. Only then do the
            # listeners close, so no admitted request is cut off.
            gate = self._runner.app[GATE]
            gate.start_draining()
            grace_s = min(self.config.server.drain_grace_s, timeout_s)
            await asyncio.sleep(grace_s)
            if not await gate.drained(timeout_s - grace_s):
                log.warning("%d request(s) still running after %.1fs", gate.inflight, timeout_s)
            await self._runner.cleanup()
        await self.manager.close(timeout_s)
        socket_path = self.config.server.socket_path
        if socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()


EVENT_LOOP_ENV = "EDGED_EVENT_LOOP"


def event_loop_kind(environ: Mapping[str, str]) -> str:
    """``uvloop`` when it is installed, unless ``EDGED_EVENT_LOOP=asyncio`` asks for the
    standard loop; ``EDGED_EVENT_LOOP=uvloop`` insists on it."""
    wanted = environ.get(EVENT_LOOP_ENV, "").strip().lower() or "auto"
    if wanted not in ("auto", "asyncio", "uvloop"):
        raise ConfigError(EVENT_LOOP_ENV, f"must be auto, asyncio or uvloop; got {wanted!r}")
    if wanted == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError as exc:
        if wanted == "uvloop":
            raise ConfigError(
                EVENT_LOOP_ENV, "uvloop is not installed (pip install 'edged[uvloop]')"
            ) from exc
        return "asyncio"
    return "uvloop"


def run_daemon(load: ConfigLoader) -> int:
    """Load the config (an invalid one fails here, before anything starts) and run."""
    config = load()
    kind = event_loop_kind(os.environ)
    log.info("event loop: %s (%s=asyncio for the standard one)", kind, EVENT_LOOP_ENV)
    if kind == "uvloop":
        import uvloop

        return uvloop.run(Daemon(config, load).run())
    return asyncio.run(Daemon(config, load).run())


def socket_default() -> Path:
    runtime_dir = os.environ.get("RUNTIME_DIRECTORY") or os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime_dir or "/tmp") / "edged.sock"  # noqa: S108 - per-user fallback
