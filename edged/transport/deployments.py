"""Deployments on the device: the accepted job kept in ``active.json`` (so a restart resumes
it), the worker that runs one job at a time, the chunk download over the live link with resume
across reconnects, install and the progress reports on the way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edged.bundle.install import Installer
from edged.bundle.verify import verify_manifest
from edged.errors import (
    ConnectFailedError,
    ConnectionLostError,
    DownloadStalledError,
    EdgedError,
    ExpiredBundleError,
    FileIntegrityError,
    FleetMessageError,
    InstallCrashLoopError,
    ManifestError,
    MqttTimeoutError,
    ReplayError,
    RevertedReleaseError,
    RollbackError,
    ShuttingDownError,
    SignatureError,
    TargetMismatchError,
    TransportError,
)
from edged.transport.artifacts import HttpFetch, artifact_ssl_context
from edged.transport.client import MqttClient
from edged.transport.download import PartialDownload, check_size, check_space, prune_downloads
from edged.transport.link import Link
from edged.transport.progress import ProgressReporter, deployment_progress, error_reason
from edged.transport.protocol import (
    FAILED,
    INSTALLED,
    PROMOTED,
    RECEIVED,
    REFUSED,
    REVERTED,
    SERVING,
    VERIFIED,
    Command,
    Deployment,
    encode_json,
)
from edged.transport.settings import AgentSettings
from edged.transport.status import StatusPublisher, StatusSource
from edged.transport.topics import Target

log = logging.getLogger(__name__)

T = TypeVar("T")

ACTIVE_FILE = "active.json"
DOWNLOADS_DIR = "downloads"

# The bundle's own trust checks: the device refuses it (progress ``refused``, not ``failed``).
REFUSALS = (
    SignatureError,
    ManifestError,
    ExpiredBundleError,
    RollbackError,
    ReplayError,
    TargetMismatchError,
    RevertedReleaseError,
    FileIntegrityError,
)

# Connection problems a download waits out (it resumes after the reconnect).
_LINK_ERRORS = (ConnectionLostError, ConnectFailedError, MqttTimeoutError)


@dataclass
class _Job:
    command: Command
    deployment: Deployment
    accepted_at: float
    fetched: int = 0  # chunks stored since the last (re)connect or resume
    # Installs started and not finished: a crash of the daemon leaves it counted, a clean
    # shutdown takes its count back.
    install_attempts: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "target": str(self.command.target),
            "nonce": self.command.nonce,
            "issued_at": self.command.issued_at,
            "deployment": self.deployment.to_json(),
            "accepted_at": self.accepted_at,
            "install_attempts": self.install_attempts,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> _Job:
        deployment = Deployment.from_json(value["deployment"])
        command = Command(
            "deploy",
            Target.parse(str(value["target"])),
            int(value["issued_at"]),
            str(value["nonce"]),
            {"deployment": deployment.to_json()},
        )
        attempts = int(value.get("install_attempts", 0))
        return cls(command, deployment, float(value["accepted_at"]), install_attempts=attempts)


@dataclass
class _Inbox:
    """Chunks for the deployment being downloaded, handed over by the message loop."""

    deployment_id: str
    queue: asyncio.Queue[tuple[int, bytes]] = field(default_factory=asyncio.Queue)


class Deployments:
    def __init__(
        self,
        settings: AgentSettings,
        link: Link,
        status: StatusPublisher,
        progress: ProgressReporter,
        manager: StatusSource,
        installer: Installer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.topics = settings.topics
        self.manager = manager
        self.installer = installer
        self.clock = clock
        self._link = link
        self._status = status
        self._progress = progress
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self._inbox: _Inbox | None = None

    def deliver_chunk(self, deployment_id: str, index: int, payload: bytes) -> None:
        """A chunk from the message loop: kept if its deployment is being downloaded."""
        inbox = self._inbox
        if inbox is not None and inbox.deployment_id == deployment_id and payload:
            inbox.queue.put_nowait((index, payload))

    async def accept(self, command: Command) -> dict[str, Any]:
        """Queue a verified ``deploy`` command; the reply's result."""
        deployment = command.deployment
        job = _Job(command, deployment, self.clock())
        await self._jobs.put(job)
        return {"accepted": True, "deployment": deployment.id, "queued": self._jobs.qsize()}

    # --- active.json ----------------------------------------------------------------------

    @property
    def _downloads(self) -> Path:
        return self.settings.state_dir / DOWNLOADS_DIR

    @property
    def _active_file(self) -> Path:
        return self.settings.state_dir / ACTIVE_FILE

    def _load_active(self) -> _Job | None:
        try:
            value = json.loads(self._active_file.read_bytes())
            job = _Job.from_json(value)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, EdgedError) as exc:
            log.error("ignoring unreadable %s: %s", self._active_file, exc)
            return None
        if self.clock() - job.accepted_at > self.settings.resume_max_age_s:
            log.info("not resuming deployment %s: accepted too long ago", job.deployment.id)
            return None
        return job

    def _save_active(self, job: _Job | None) -> None:
        from edged._fs import atomic_write

        if job is None:
            self._active_file.unlink(missing_ok=True)
        else:
            atomic_write(self._active_file, encode_json(job.to_json()), mode=0o600)

    # --- the worker -----------------------------------------------------------------------

    async def worker(self) -> None:
        job = await asyncio.to_thread(self._load_active)
        if job is not None:
            log.info("resuming deployment %s after a restart", job.deployment.id)
        while True:
            if job is None:
                job = await self._link.until_stopping(self._jobs.get())
            try:
                await self._run_job(job)
            except Exception:
                log.exception("deployment %s: unexpected error", job.deployment.id)
            job = None

    async def _run_job(self, job: _Job) -> None:
        d = job.deployment
        m = self.settings.mqtt
        report = self._progress.report
        log.info(
            "deployment %s: %s version %s, %d bytes in %d chunks",
            d.id,
            d.model,
            d.version,
            d.size,
            d.chunk_count,
        )
        download: PartialDownload | None = None
        keep_partial = True
        try:
            await asyncio.to_thread(self._save_active, job)
            await asyncio.to_thread(self._preverify, d)
            check_size(d, m.max_bundle_bytes)
            download = await asyncio.to_thread(PartialDownload.open, self._downloads, d)
            await asyncio.to_thread(
                check_space, d, self._downloads, m.download_reserve_bytes, download.bytes_present
            )
            if download.resumed:
                log.info(
                    "deployment %s: resuming with %d of %d chunks already on disk",
                    d.id,
                    len(download.have),
                    d.chunk_count,
                )
            await report(deployment_progress(self.device_id, d, RECEIVED, len(download.have)))
            await self._fetch(job, download)
            path = await asyncio.to_thread(download.finish)
            keep_partial = False
            n, fetched = d.chunk_count, job.fetched
            await report(deployment_progress(self.device_id, d, VERIFIED, n, fetched))
            await asyncio.to_thread(self._count_install, job)
            try:
                result = await self.installer.install_file(path)
            except (asyncio.CancelledError, ShuttingDownError):
                await asyncio.to_thread(self._count_install, job, -1)  # a clean shutdown
                raise
            job.install_attempts = 0
            await report(
                deployment_progress(self.device_id, d, INSTALLED, n, fetched, reason=result.outcome)
            )
            await self._status.refresh_now()
            self._check_serving(d)
            await report(deployment_progress(self.device_id, d, SERVING, n, fetched))
            log.info("deployment %s: %s version %s is serving", d.id, d.model, d.version)
            ended = self._probation_state(d)
            if ended is not None:
                state, reason = ended
                await report(
                    deployment_progress(self.device_id, d, state, n, fetched, reason=reason)
                )
        except asyncio.CancelledError:
            raise  # shutdown: active.json stays, the download resumes at the next start
        except ShuttingDownError as exc:
            # Not the deployment's failure: active.json stays and it resumes at the next start.
            log.info("deployment %s: %s; it resumes at the next start", d.id, exc)
            return
        except Exception as exc:
            if isinstance(exc, EdgedError):
                log.warning("deployment %s failed: %s", d.id, exc)
            else:
                log.exception("deployment %s failed unexpectedly", d.id)
            done = len(download.have) if download is not None else 0
            state = REFUSED if isinstance(exc, REFUSALS) else FAILED
            failed = deployment_progress(
                self.device_id, d, state, done, job.fetched, reason=error_reason(exc)
            )
            with contextlib.suppress(TransportError):
                await report(failed)
        await asyncio.to_thread(self._finish_job, d, keep_partial)

    def _count_install(self, job: _Job, step: int = 1) -> None:
        """Count an install before it starts (kept in ``active.json``); refuse one that
        crashes of the daemon have cut off ``mqtt.max_install_crashes`` times."""
        limit = self.settings.mqtt.max_install_crashes
        if step > 0 and job.install_attempts >= limit:
            raise InstallCrashLoopError(
                f"the install of {job.deployment.model} version {job.deployment.version} was "
                f"interrupted by a crash of the daemon {job.install_attempts} times (limit "
                f"mqtt.max_install_crashes = {limit}); not tried again: the device serves what "
                "it served before"
            )
        job.install_attempts = max(0, job.install_attempts + step)
        self._save_active(job)

    def _finish_job(self, d: Deployment, keep_partial: bool) -> None:
        self._save_active(None)
        keep = {d.transfer_key} if keep_partial else set()
        if not keep_partial:
            PartialDownload(self._downloads / d.transfer_key, d).discard()
        prune_downloads(self._downloads, keep, older_than_s=self.settings.resume_max_age_s)

    def _preverify(self, d: Deployment) -> None:
        """The bundle's own signed manifest, checked like the installer will (signatures,
        expiry, release counter, targets) before a byte is downloaded."""
        installer = self.installer
        verified = verify_manifest(
            d.manifest.encode("ascii"),
            d.manifest_signatures,
            installer.load_trust(),
            installer.store.read_high_water(),
            installer.device,
            int(self.clock()),
            installer.limits,
        )
        manifest = verified.manifest
        if (manifest.model, manifest.version) != (d.model, d.version):
            raise FleetMessageError(
                f"deployment {d.id} announces {d.model} version {d.version} but its bundle "
                f"manifest is {manifest.model} version {manifest.version}"
            )

    def _probation_state(self, d: Deployment) -> tuple[str, str] | None:
        """After ``serving``: how the probation already ended, that there is none, or None
        while it runs (``FleetAgent.report_probation`` reports its end)."""
        for m in self.manager.status().get("models", []):
            if m.get("name") != d.model:
                continue
            watching = m.get("probation")
            if watching and str(watching.get("version")) == str(d.version):
                return None
            last = m.get("last_probation")
            if last and str(last.get("version")) == str(d.version):
                if last.get("decision") == "reverted":
                    return REVERTED, str(last.get("reason", ""))
                return PROMOTED, str(last.get("reason", ""))
        return PROMOTED, "no probation: no earlier version to compare with"

    def _check_serving(self, d: Deployment) -> None:
        serving = None
        for m in self.manager.status().get("models", []):
            if m.get("name") == d.model and m.get("version") is not None:
                serving = str(m["version"])
        if serving != str(d.version):
            raise TransportError(
                f"installed {d.model} version {d.version} but the daemon serves {serving}"
            )

    # --- the download ---------------------------------------------------------------------

    async def _fetch(self, job: _Job, download: PartialDownload) -> None:
        """Fetch every missing chunk: from the artifact mirrors the announcement names, else
        over MQTT across as many reconnects as it takes."""
        if job.deployment.urls:
            await self._fetch_http(job, download)
            return
        inbox = _Inbox(job.deployment.id)
        self._inbox = inbox
        failed_generation = 0
        try:
            while not download.complete:
                client, generation = await self._link.wait_live(failed_generation)
                try:
                    await self._fetch_connected(job, download, inbox, client, generation)
                except _LINK_ERRORS as exc:
                    log.info(
                        "deployment %s: %s; resuming after the reconnect", job.deployment.id, exc
                    )
                    if not isinstance(exc, MqttTimeoutError):
                        failed_generation = generation
        finally:
            self._inbox = None

    async def _fetch_http(self, job: _Job, download: PartialDownload) -> None:
        d = job.deployment
        m = self.settings.mqtt
        interval_s = m.progress_interval_s
        job.fetched = 0
        reported, last_report_at = -1, 0.0

        async def report_received(complete: bool) -> None:
            nonlocal reported, last_report_at
            done, now = len(download.have), time.monotonic()
            job.fetched = fetch.fetched
            if done != reported and (complete or now - last_report_at >= interval_s):
                reported, last_report_at = done, now
                await self._progress.report(
                    deployment_progress(self.device_id, d, RECEIVED, done, job.fetched)
                )

        context = await asyncio.to_thread(artifact_ssl_context, m)
        fetch = HttpFetch(
            download,
            d.urls,
            context,
            stall_s=m.download_stall_timeout_s,
            request_bytes=m.artifact_request_bytes,
            on_stored=report_received,
        )
        log.info("deployment %s: downloading from %s", d.id, ", ".join(d.urls))
        job.fetched = await fetch.run()

    async def _fetch_connected(
        self,
        job: _Job,
        download: PartialDownload,
        inbox: _Inbox,
        client: MqttClient,
        generation: int,
    ) -> None:
        """Fetch over one connection: subscribe to a window of missing chunk topics (the broker
        sends their retained chunks), store what arrives, then the next window."""
        d = job.deployment
        link = self._link
        stall_s = self.settings.mqtt.download_stall_timeout_s
        interval_s = self.settings.mqtt.progress_interval_s
        job.fetched = 0
        last_chunk_at = time.monotonic()
        reported, last_report_at = -1, 0.0

        async def report_received(force: bool) -> None:
            nonlocal reported, last_report_at
            done, now = len(download.have), time.monotonic()
            if done != reported and (force or now - last_report_at >= interval_s):
                reported, last_report_at = done, now
                await self._progress.report(
                    deployment_progress(self.device_id, d, RECEIVED, done, job.fetched)
                )

        while not download.complete:
            window = download.missing[: self.settings.chunk_window]
            topics = [self.topics.chunk(job.command.target, d.id, i) for i in window]
            await client.subscribe(topics, qos=1)
            try:
                pending = set(window)
                while pending:
                    if link.stopping:
                        raise asyncio.CancelledError
                    if link.generation != generation or not link.connected:
                        raise ConnectionLostError("the connection was replaced")
                    left = stall_s - (time.monotonic() - last_chunk_at)
                    if left <= 0:
                        raise DownloadStalledError(
                            f"no chunk for {stall_s:g}s while connected ({len(download.have)} "
                            f"of {d.chunk_count} received); the chunks may have been cleared "
                            "or never published"
                        )
                    item = await _get_within(inbox.queue, min(left, 0.25))
                    if item is None:
                        await report_received(force=True)  # what the interval held back
                        continue
                    index, data = item
                    if await asyncio.to_thread(download.store_chunk, index, data):
                        job.fetched += 1
                        last_chunk_at = time.monotonic()
                    pending.discard(index)
                    await report_received(force=download.complete)
            finally:
                with contextlib.suppress(TransportError):
                    await client.unsubscribe(topics)


async def _get_within(queue: asyncio.Queue[T], timeout_s: float) -> T | None:
    """The next item, or None after ``timeout_s``. Not ``wait_for``: before 3.12 it returns
    the item and drops a cancellation that arrives as the item does."""
    getter = asyncio.ensure_future(queue.get())
    try:
        done, _ = await asyncio.wait((getter,), timeout=timeout_s)
    finally:
        if not getter.done():
            getter.cancel()  # Queue.get() leaves the item queued when cancelled
    return getter.result() if getter in done else None
