"""Wiring and lifecycle of the daemon: startup, main loop, graceful shutdown.

Signal handlers only set flags (as uvicorn does). SIGTERM / first SIGINT start one shutdown,
bounded by one deadline (``server.drain_timeout_s``) and done in order: stop admitting
requests, stop the producers of work (fleet channel, reload), drain admitted requests, close
the models, flush telemetry. A second SIGINT cancels what is left of it; the daemon then exits
130 through the same path. SIGHUP: reload the config and the model repository.

One task group owns every long-lived task; side services run under a ``Supervisor``, so a
failing one is restarted and never takes inference down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from edged._compat import TIMEOUT_ERRORS, TaskGroup
from edged._net import unix_socket_file
from edged.api.app import add_control_routes, build_app
from edged.api.backend import ManagerBackend
from edged.api.context import FORWARDED, GATE, MAX_BODY, REFRESH, SHM
from edged.bundle import Installer, detect_device_facts
from edged.bundle.crash_revert import apply_crash_gate
from edged.bundle.store import MODELS_DIR
from edged.bundle.swap_policy import policy_for_swap
from edged.config import DaemonConfig
from edged.daemon.children import PRELOAD
from edged.daemon.loops import EVENT_LOOP_ENV, event_loop_kind
from edged.daemon.sdnotify import Notifier, Watchdog, watchdog_interval_s
from edged.daemon.serving import ServingProcesses
from edged.daemon.supervisor import Supervisor
from edged.daemon.zygote import Zygote, can_fork
from edged.engine.proxy import EngineProxy
from edged.errors import EdgedError, EngineUnavailableError, NotifyError
from edged.runtime.budget import front_ends, usable_cores
from edged.serve.crashgate import CrashInfo, RunMarker
from edged.serve.manager import ModelManager
from edged.serve.probation_record import PROBATION_DIR, ProbationRecords
from edged.serve.watch import ProbationOutcome
from edged.telemetry.hub import TelemetryHub

if TYPE_CHECKING:  # the MQTT and gRPC stacks are imported only when enabled
    from edged.api.grpc.server import GrpcServer
    from edged.transport.agent import FleetAgent

log = logging.getLogger(__name__)

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
    # Producers of new work stop first at shutdown, so nothing starts an install or a reload
    # while the models close.
    PRODUCERS = ("fleet", "reload")

    def __init__(self, config: DaemonConfig, reload_config: ConfigLoader | None = None) -> None:
        """``reload_config`` re-reads the config on SIGHUP (with command-line overrides)."""
        self.config = config
        self._reload_config = reload_config
        self.telemetry = TelemetryHub(config.telemetry, config.state.directory)
        # Front-end processes; 0: the engine serves inside this process (docs/serving.md).
        self.front_ends = front_ends(usable_cores(), config.server.workers)
        self.manager: ModelManager | EngineProxy
        if self.front_ends == 0:
            # Installed bundles live in the store under the state directory, layered over the
            # configured (seed) repository: an installed version wins, also after a restart.
            self.manager = ModelManager(
                config.models,
                self.telemetry.observer,
                store=config.state.directory / MODELS_DIR,
                worker_stuck_after_s=config.server.worker_stuck_after_s,
            )
            # Probation after a swap: the signed policy of each installed release decides.
            self.manager.probation_policy = policy_for_swap
        else:
            self.manager = EngineProxy(config.models, self.telemetry.observer)
        self.processes: ServingProcesses | None = None
        self.zygote: Zygote | None = None
        self.telemetry.queue_depths = self.manager.queue_depths
        self.installer = Installer(
            config.state.directory,
            self.manager,
            detect_device_facts,
            keep_previous=max(1, config.state.keep_versions - 1),
        )
        self.manager.probation_listeners.append(self._record_probation)
        # Swaps, probation verdicts and service restarts are counted for /metrics.
        self.manager.swap_listeners.append(
            lambda e: self.telemetry.count_swap(e.model, e.to_version, e.ok)
        )
        # Crash-safe rollouts: durable probation records (the engine keeps them in engine mode)
        # and the clean-shutdown marker.
        self.probation_records = ProbationRecords(config.state.directory / PROBATION_DIR)
        if isinstance(self.manager, ModelManager):
            self.manager.probation_records = self.probation_records
            if self.telemetry.attributes_energy:  # else the energy gate says "no power source"
                self.manager.energy_per_inference = self.telemetry.energy_per_inference_j
        self.run_marker = RunMarker(config.state.directory)
        self.notifier = Notifier.from_environment()
        self.watchdog = Watchdog(self.notifier, watchdog_interval_s())
        self.supervisor = Supervisor(on_failure=self._report_failure)
        self.telemetry.service_restarts = self._restarts
        self.supervisor.add("watchdog", self.watchdog.run)
        if isinstance(self.manager, EngineProxy) and self.telemetry.attributes_energy:
            # The probation's energy gate runs in the engine; the figures are measured here.
            self.supervisor.add("energy-feed", self._feed_energy)
        self.supervisor.add("reload", self._reload_loop)
        if config.telemetry.enabled:
            self.supervisor.add("telemetry", self.telemetry.run)
        # The MQTT fleet channel (signed deployments and commands); telemetry may publish on it.
        self.fleet: FleetAgent | None = None
        if config.mqtt.enabled:
            from edged.transport.agent import build_fleet_agent

            self.fleet = build_fleet_agent(config, self.manager, self.installer)
            self.supervisor.add("fleet", self.fleet.run)
            self.telemetry.device_id = self.fleet.device_id
            self.telemetry.sink = FleetTelemetrySink(self.fleet)
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._sigint_count = 0
        self._runner: web.AppRunner | None = None
        self._grpc: GrpcServer | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.exit_code = 0

    async def _feed_energy(self) -> None:
        """Send the engine each version's energy per inference, once per telemetry interval."""
        assert isinstance(self.manager, EngineProxy)
        while True:
            await asyncio.sleep(self.config.telemetry.interval_s)
            figures = [
                [key.model, key.version, joules]
                for key in list(self.telemetry.energy_totals)
                if (joules := self.telemetry.energy_per_inference_j(key.model, key.version))
                is not None
            ]
            if not figures or not self.manager.connected:
                continue
            try:
                await self.manager.call("energy", wait_s=10.0, figures=figures)
            except EngineUnavailableError as exc:  # it restarts: the next interval sends them
                log.info("energy figures not sent to the engine: %s", exc)
            except TIMEOUT_ERRORS:
                log.info("energy figures not sent: the engine did not answer within 10 s")

    def _restarts(self) -> dict[str, int]:
        """Restarts of the side services and of the serving processes (engine, front ends)."""
        restarts = {s.name: s.restarts for s in self.supervisor.status()}
        if self.processes is not None:
            restarts.update({p["name"]: p["restarts"] for p in self.processes.status()})
        return restarts

    async def _record_probation(self, outcome: ProbationOutcome) -> None:
        self.telemetry.count_probation_verdict(outcome.model, outcome.version, outcome.decision)
        try:
            await self.installer.record_probation(outcome)
        except EdgedError as exc:
            log.error("probation of %s %s not recorded: %s", outcome.model, outcome.version, exc)
        if self.fleet is not None:
            await self.fleet.report_probation(outcome)

    # --- crash gate (edged.serve.crashgate, edged.bundle.crash_revert) ----------------------

    async def _crash_gate_at_start(self) -> list[ProbationOutcome]:
        """Before any model loads: a probation found without a clean shutdown before it counts
        a crash; at the policy's limit its release is reverted and never serves again."""
        last_exit = await asyncio.to_thread(self.run_marker.begin)
        return await apply_crash_gate(self.probation_records, self.installer, last_exit)

    async def _engine_crashed(self, code: int | None) -> None:
        """The engine died (and restarts next): a crash of the release on probation."""
        info = CrashInfo.from_returncode(code, "engine") if code is not None else CrashInfo()
        reverted = await apply_crash_gate(self.probation_records, self.installer, info)
        await self._report_reverts_at_start(reverted)

    async def _report_reverts_at_start(self, reverted: list[ProbationOutcome]) -> None:
        """On the fleet's progress topic (the manager shows them itself: take_decided)."""
        for outcome in reverted:
            if self.fleet is not None:
                await self.fleet.report_probation(outcome)

    # --- signals --------------------------------------------------------------------------

    def _on_sigint(self) -> None:
        self._sigint_count += 1
        if self._sigint_count > 1:
            log.warning("second SIGINT: cancelling what is left of the shutdown")
            self.exit_code = 130
            if self._shutdown_task is not None:
                self._shutdown_task.cancel()
        self._stop.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    # --- systemd and failure reports ------------------------------------------------------

    def _notify(self, send: Callable[[str], bool], status: str) -> None:
        """A state change for systemd; a failing notification socket is logged, never fatal."""
        try:
            send(status)
        except NotifyError as exc:
            log.warning("%s", exc)

    def _report_failure(self, service: str, exc: BaseException) -> None:
        """Tell the fleet (when connected) that a side service failed and is restarting."""
        fleet = self.fleet
        if fleet is None or not fleet.connected or service == "fleet":
            return
        payload = json.dumps(
            {
                "type": "service-failure",
                "ts": time.time(),
                "service": service,
                "error": f"{type(exc).__name__}: {exc}",
                "restarts": next(
                    (s.restarts for s in self.supervisor.status() if s.name == service), 0
                ),
            }
        ).encode()

        async def publish() -> None:
            try:
                await fleet.publish("telemetry/health", payload, qos=1, timeout=10.0)
            except EdgedError as error:
                log.info("service failure not reported over MQTT: %s", error)

        task = asyncio.get_running_loop().create_task(publish(), name="report-failure")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def status(self) -> dict[str, object]:
        """``/edged/v1/status``: the models, recent swaps, and the side services' health."""
        status = self.manager.status()
        status["services"] = [s.to_json() for s in self.supervisor.status()]
        if self.processes is not None:
            status["processes"] = self.processes.status()
            status["engine"] = self.processes.proxy.engine_status
        return status

    # --- lifecycle ------------------------------------------------------------------------

    async def _start_api(self) -> list[str]:
        server = self.config.server
        app = build_app(
            self.manager,
            server.max_body_bytes,
            server.shared_memory_enabled,
            self.telemetry,
            self.installer,
            status=self.status,
        )
        # The drain itself is bounded by the shutdown deadline (the admission gate); handlers
        # still running once it has passed get this long before they are cancelled.
        self._runner = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=min(1.0, server.drain_timeout_s),
        )
        await self._runner.setup()
        endpoints = []
        if server.port >= 0:
            site = web.TCPSite(self._runner, server.host, server.port, reuse_address=True)
            await site.start()
            endpoints.append(f"http://{server.host}:{server.port}")
        if server.socket_path is not None:
            path = server.socket_path
            with unix_socket_file(path, server.socket_mode):
                await web.UnixSite(self._runner, str(path)).start()
            endpoints.append(f"unix:{path}")
        if server.grpc_port and isinstance(self.manager, ModelManager):  # one process
            from edged.api.grpc.server import GrpcServer

            self._grpc = GrpcServer(ManagerBackend(self.manager), app[SHM], server)
            endpoints.extend(await self._grpc.start())
        return endpoints

    def _control_app(self) -> web.Application:
        """The control plane's own routes, which front ends forward to."""
        app = web.Application(client_max_size=self.config.server.max_body_bytes + 1)
        app[FORWARDED] = True
        if isinstance(self.manager, EngineProxy):
            app[REFRESH] = self.manager.refresh
        app[MAX_BODY] = self.config.server.max_body_bytes
        return add_control_routes(
            app, self.manager, self.telemetry, self.installer, status=self.status
        )

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            self._notify(self.notifier.reloading, "reloading config and model repository")
            try:
                if self._reload_config is not None:
                    new = await asyncio.to_thread(self._reload_config)
                    self.manager.repository = new.models.repository
                    self.manager.config = new.models
                    self.config = new
                await self.manager.reload_repository()
                log.info("reloaded: %s", ", ".join(self.manager.model_names()) or "no models")
            except EdgedError as exc:
                log.error("reload failed, keeping the running config: %s", exc)
            finally:
                self._notify(self.notifier.ready, self._status_line())

    def _recover_store(self) -> None:
        """Repair whatever a crash interrupted in the bundle store, before anything serves."""
        self.config.state.directory.mkdir(parents=True, exist_ok=True)
        self.installer.recover()

    def _status_line(self) -> str:
        status = self.manager.status()
        serving = [f"{m['name']}@{m['version']}" for m in status["models"] if m["version"]]
        return f"serving {', '.join(serving) or 'no models'}"

    def _workers_healthy(self) -> bool:
        if self.processes is not None and not self.processes.engine_healthy():
            return False
        stuck = self.manager.stuck_workers()
        for name, seconds in stuck.items():
            log.error("inference worker of %s stuck in one run for %.0fs", name, seconds)
        return not stuck

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, shut down in order; the exit code."""
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        self.watchdog.add_probe("inference-workers", self._workers_healthy)
        try:
            await asyncio.to_thread(self._recover_store)
            reverted_at_start = await self._crash_gate_at_start()
            async with TaskGroup() as tg:
                if isinstance(self.manager, ModelManager):
                    await self.manager.start()
                    endpoints = await self._start_api()
                else:
                    if self.zygote is None:  # run_daemon forks one before threads start
                        self.zygote = Zygote.launch(PRELOAD)
                    self.processes = ServingProcesses(
                        self.config,
                        self.manager,
                        self.front_ends,
                        self.zygote,
                        power=self.telemetry.attributes_energy,
                    )
                    self.processes.engine_crashed = self._engine_crashed
                    endpoints = await self.processes.start(tg, self._control_app())
                await self._report_reverts_at_start(reverted_at_start)
                log.info("edged serving %s on %s", self.manager.model_names(), ", ".join(endpoints))
                self._notify(self.notifier.ready, self._status_line())
                tasks = {
                    name: tg.create_task(self.supervisor.run_service(name), name=name)
                    for name in self.supervisor.names
                }
                try:
                    await self._stop.wait()
                finally:
                    await self._shut_down(tasks)
            await asyncio.to_thread(self.run_marker.end_cleanly)  # not reached after a crash
        finally:
            self._remove_signals(loop)
            self.notifier.close()
        log.info("stopped (exit code %d)", self.exit_code)
        return self.exit_code

    async def _shut_down(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        """Run the ordered shutdown as its own task, so that a second SIGINT can cancel it;
        whatever is left (services, listeners, models) is then closed without waiting."""
        log.info("stopping: draining in-flight requests")
        self._notify(self.notifier.stopping, "draining")
        self._shutdown_task = asyncio.get_running_loop().create_task(
            self._ordered_shutdown(tasks), name="shutdown"
        )
        try:
            await asyncio.shield(self._shutdown_task)
        except asyncio.CancelledError:
            if not self._shutdown_task.cancelled():
                self._shutdown_task.cancel()
            self.exit_code = self.exit_code or 130
            log.warning("shutdown cancelled: closing what is left without waiting")
        if self._shutdown_task.cancelled():
            for task in tasks.values():
                task.cancel()
            if self.processes is not None:
                await self.processes.kill()
            if self._runner is not None:
                await self._runner.cleanup()
            if self._grpc is not None:
                await self._grpc.stop(0.0)
            await self.manager.close(0.0)
            self._remove_socket()
        else:
            self._shutdown_task.result()

    async def _ordered_shutdown(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        server = self.config.server
        deadline = loop.time() + server.drain_timeout_s

        def remaining() -> float:
            return max(0.0, deadline - loop.time())

        gate = self._runner.app[GATE] if self._runner is not None else None
        if gate is not None:  # 1. new requests now get 503 + Retry-After (gRPC: UNAVAILABLE)
            gate.start_draining()
        if self._grpc is not None:
            self._grpc.start_draining()
        if self.processes is not None:  # the front ends drain on their own (SIGTERM)
            self.processes.start_draining()
        # 2. nothing starts new work: an install cut off here resumes at the next start
        await _cancel_and_wait([tasks[n] for n in self.PRODUCERS if n in tasks], remaining())
        if self.processes is not None:
            # 3. the front ends finish what they admitted, then 4. the engine drains its
            # queues and releases the models.
            await self.processes.stop(remaining)
        elif gate is not None and self._runner is not None:
            # 3. admitted requests finish; only then do the listeners close, so no admitted
            # request is cut off. The grace keeps answering 503 to clients that retry.
            await asyncio.sleep(min(server.drain_grace_s, remaining()))
            grpc = self._grpc
            if not await gate.drained(remaining()) or (
                grpc is not None and not await grpc.drained(remaining())
            ):
                inflight = gate.inflight + (grpc.inflight if grpc is not None else 0)
                log.warning(
                    "%d request(s) still running after %.1fs", inflight, server.drain_timeout_s
                )
            await self._runner.cleanup()
            if grpc is not None:
                await grpc.stop(min(1.0, remaining()))
        if self.processes is None:
            await self.manager.close(remaining())  # 4. release the models
        self._remove_socket()
        # 5. the last telemetry record goes to the spool; then the rest of the services stop
        if "telemetry" in tasks and not tasks["telemetry"].done():
            await self.telemetry.flush(remaining())
        await _cancel_and_wait(list(tasks.values()), remaining())

    def _remove_socket(self) -> None:
        socket_path = self.config.server.socket_path
        if socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()


async def _cancel_and_wait(tasks: list[asyncio.Task[None]], timeout_s: float) -> None:
    """Cancel ``tasks`` and wait for them to end, at most ``timeout_s``."""
    for task in tasks:
        task.cancel()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(timeout_s, 0.001))
        for task in pending:
            log.warning("service %s did not stop in time", task.get_name())


def run_daemon(load: ConfigLoader) -> int:
    """Load the config (an invalid one fails here, before anything starts) and run."""
    kind = event_loop_kind(os.environ)
    daemon = Daemon(load(), load)
    if daemon.front_ends and can_fork():
        # Before the event loop and any thread: the engine and front ends are forked from it.
        daemon.zygote = Zygote.fork(PRELOAD)
    log.info("event loop: %s (%s=asyncio for the standard one)", kind, EVENT_LOOP_ENV)
    if kind == "uvloop":
        import uvloop

        code = uvloop.run(daemon.run())
    else:
        code = asyncio.run(daemon.run())
    stuck = daemon.manager.running_workers()
    if stuck:
        # A runtime torn down by interpreter exit while a thread still runs inside it aborts
        # the process; everything else is closed and logged, so leave without that teardown.
        log.warning("inference worker(s) of %s still inside a run; exiting now", stuck)
        logging.shutdown()
        os._exit(code)
    return code
