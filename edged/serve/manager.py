"""The model manager: loads versions beside the serving one, self-tests them, swaps them in,
and routes inference requests to each model's scheduler.

A swap: (1) load the new version beside the old one, (2) run its test vectors and a warm-up,
(3) switch the slot atomically, (4) batches already running finish on the old version,
(5) the old version is released with its last handle. If (1) or (2) fails the old version keeps
serving and the reason is recorded. This is the ``SwapTarget`` the bundle installer calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from edged._compat import TIMEOUT_ERRORS
from edged.config import ModelsConfig
from edged.errors import (
    DeadlineExceededError,
    EdgedError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotReadyError,
    SelfTestFailedError,
    ShuttingDownError,
)
from edged.modelrepo import layout as repository
from edged.modelrepo.config import ModelConfig, config_for_version
from edged.runtime.base import (
    NUMPY_TO_DATATYPE,
    Array,
    TensorSpec,
    estimate_memory_bytes,
    load_model,
)
from edged.runtime.budget import CpuBudget, usable_cores
from edged.serve.cache import ResultCache
from edged.serve.memory import MemoryRequest, must_unload_first
from edged.serve.probation import ProbationPolicy, VersionWindow
from edged.serve.probation_record import ProbationRecord, ProbationRecords
from edged.serve.scheduler import (
    BatchObserver,
    BatchSignature,
    InferenceResult,
    NullObserver,
    Scheduler,
)
from edged.serve.selftest import self_test
from edged.serve.slot import ModelSlot, ServedVersion
from edged.serve.versionstats import StatsObserver, VersionStats
from edged.serve.watch import EnergyFigure, ProbationOutcome, ProbationWatch, seen_so_far

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwapEvent:
    at: float
    model: str
    from_version: str | None
    to_version: str
    ok: bool
    reason: str


@dataclass(eq=False)
class ModelEntry:
    name: str
    slot: ModelSlot
    scheduler: Scheduler
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: str = "LOADING"  # LOADING | READY | UNAVAILABLE
    last_error: str | None = None
    cache: ResultCache | None = None
    probation: ProbationWatch | None = None  # the new version is on probation
    last_probation: ProbationOutcome | None = None


ObserverFactory = Callable[[str], BatchObserver]
# (new version dir, replaced version dir) -> the policy to judge the new one by, or None.
ProbationPolicyFor = Callable[[Path, Path], "ProbationPolicy | None"]
ProbationListener = Callable[[ProbationOutcome], Awaitable[None]]
SwapListener = Callable[[SwapEvent], None]


def _no_probation(new: Path, old: Path) -> ProbationPolicy | None:
    return None


def validate_inputs(
    model: str,
    specs: tuple[TensorSpec, ...],
    inputs: dict[str, Array],
    dynamic: bool,
    max_rows: int,
) -> tuple[int, BatchSignature]:
    """Check names, datatypes and shapes against the model; return rows and batch signature."""
    if len(inputs) != len(specs) or any(s.name not in inputs for s in specs):
        expected = {s.name: s for s in specs}
        for name in inputs:
            if name not in expected:
                raise InvalidRequestError(
                    f"model {model!r} has no input tensor {name!r} (inputs: {', '.join(expected)})"
                )
    rows: int | None = None
    signature = []
    for spec in specs:
        value = inputs.get(spec.name)
        if value is None:
            raise InvalidRequestError(f"input tensor {spec.name!r} of model {model!r} is missing")
        if value.dtype != spec.numpy_dtype:
            got = _datatype_name(value)
            raise InvalidRequestError(
                f"input tensor {spec.name!r}: datatype {got} does not match the model's "
                f"{spec.datatype}"
            )
        if len(value.shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, value.shape, strict=True)
        ):
            raise InvalidRequestError(
                f"input tensor {spec.name!r}: shape {list(value.shape)} does not match the "
                f"model's {list(spec.shape)} (-1 = any)"
            )
        if dynamic:
            if rows is None:
                rows = value.shape[0]
            elif value.shape[0] != rows:
                raise InvalidRequestError(
                    f"input tensor {spec.name!r}: batch size {value.shape[0]} differs from the "
                    f"other inputs' {rows}"
                )
        signature.append((spec.name, value.shape[1:] if dynamic else value.shape, spec.datatype))
    rows = rows if dynamic and rows is not None else 1
    if rows < 1 or rows > max_rows:
        raise InvalidRequestError(f"batch size {rows} is outside 1..{max_rows} for model {model!r}")
    return rows, tuple(signature)


def resolve_priority(model: str, priority: int, levels: int, default: int) -> int:
    """A request's priority: 0 means the model's default; otherwise 1..levels."""
    if priority == 0:
        return default
    if not 1 <= priority <= levels:
        raise InvalidRequestError(f"priority {priority} is outside 1..{levels} for model {model!r}")
    return priority


def require_version(model: str, asked: str | None, serving: str) -> None:
    """A request that names a version must name the one serving."""
    if asked is not None and asked != serving:
        raise ModelNotFoundError(
            f"version {asked} of model {model!r} is not serving (serving {serving})"
        )


def _config_and_estimate(version_dir: Path) -> tuple[ModelConfig, int]:
    config = config_for_version(version_dir)
    return config, estimate_memory_bytes(version_dir, config.runtime)


def _datatype_name(value: Array) -> str:
    return NUMPY_TO_DATATYPE.get(value.dtype, str(value.dtype))


class ModelManager:
    def __init__(
        self,
        config: ModelsConfig,
        observer_factory: ObserverFactory | None = None,
        store: Path | None = None,
        worker_stuck_after_s: float = 60.0,
    ) -> None:
        """``store``: the bundle store's model repository, layered over ``config.repository``."""
        self.config = config
        self.repository = config.repository
        self.store = store
        self.worker_stuck_after_s = worker_stuck_after_s
        # Cores the processes that parse requests keep (the rest run inference).
        self.front_ends = 1
        self._observer_factory = observer_factory or (lambda name: NullObserver())
        self._entries: dict[str, ModelEntry] = {}
        # Models the repository holds: the CPU budget is split between them.
        self._known_models = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.events: deque[SwapEvent] = deque(maxlen=100)
        # Told of every swap, failed ones too (the daemon counts them for /metrics); called on
        # the event loop, so a listener must not block.
        self.swap_listeners: list[SwapListener] = []
        # Probation after a swap (edged.serve.watch): the daemon says which swaps get one.
        self.stats = VersionStats(live=self._live_versions)
        self.probation_policy: ProbationPolicyFor = _no_probation
        self.probation_listeners: list[ProbationListener] = []
        self._background: set[asyncio.Task[None]] = set()
        # Durable probation (crash-safe rollouts): None keeps probations in memory only.
        self.probation_records: ProbationRecords | None = None
        # Per-version energy for the energy gate (the telemetry's); None: no power source.
        self.energy_per_inference: EnergyFigure | None = None
        # Called after a serving version changed (a swap, an unload), from the swapping thread.
        self.change_listeners: list[Callable[[], None]] = []

    def _changed(self) -> None:
        for listener in self.change_listeners:
            listener()

    def _record_swap(self, event: SwapEvent) -> None:
        self.events.append(event)
        for listener in self.swap_listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not fail the swap it hears about
                log.exception("swap listener failed for %s %s", event.model, event.to_version)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every model in the repository; a model that fails is reported, not fatal."""
        self._loop = asyncio.get_running_loop()
        await self.reload_repository()
        await self._resume_probations()

    @property
    def cpu_budget(self) -> CpuBudget:
        return CpuBudget(usable_cores(), self.config.inference_threads, self.front_ends)

    @property
    def repositories(self) -> list[Path]:
        layers = [self.store] if self.store is not None else []
        return [*layers, *(r for r in [self.repository] if r not in layers)]

    async def reload_repository(self) -> None:
        """Load new models and changed versions, unload models gone from disk (SIGHUP)."""
        found = await asyncio.to_thread(repository.scan_layers, self.repositories)
        self._known_models = len(found)
        for name, model in found.items():
            entry = self._entries.get(name)
            serving = entry.slot.current if entry else None
            if model.current is None:
                continue
            wanted = model.version_dir(model.current)
            if serving is None or serving.version_dir.resolve() != wanted.resolve():
                try:
                    await self.load_version(name, wanted)
                except EdgedError as exc:
                    log.error("model %s: %s", name, exc)
        for name in list(self._entries):
            if name not in found:
                await self.unload(name)

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Stop accepting work, let queued requests finish, release every model."""
        self._closing = True
        for entry in self._entries.values():
            self._save_probation_progress(entry)
            self._end_probation(entry, "stopped", "the daemon is shutting down")
            entry.scheduler.stop()
        deadline = time.monotonic() + drain_timeout_s
        for entry in self._entries.values():
            remaining = max(0.0, deadline - time.monotonic())
            drained = await asyncio.to_thread(entry.scheduler.join, remaining)
            if not drained:
                log.warning("model %s did not drain within %.1fs", entry.name, drain_timeout_s)
            entry.slot.swap(None)

    # --- loading --------------------------------------------------------------------------

    def _entry(self, name: str) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None:
            assert self._loop is not None, "ModelManager.start() was not awaited"
            slot = ModelSlot(name)
            slot.on_swap = self._changed
            scheduler = Scheduler(
                slot,
                ModelConfig().batching,
                self._loop,
                StatsObserver(
                    self._observer_factory(name),
                    self.stats,
                    name,
                    lambda: slot.current.version if slot.current is not None else None,
                ),
                stuck_after_s=self.worker_stuck_after_s,
            )
            scheduler.start()
            entry = self._entries[name] = ModelEntry(name, slot, scheduler)
        return entry

    async def load_model(self, name: str) -> str:
        """(Re)load the version the repository names for ``name``; returns that version."""
        model = await asyncio.to_thread(repository.read_model_layers, self.repositories, name)
        assert model.current is not None
        await self.load_version(name, model.version_dir(model.current))
        return model.current

    async def load_version(self, model: str, version_dir: Path) -> None:
        """Load ``version_dir`` beside the serving version, self-test it, then swap it in."""
        if self._closing:
            raise ShuttingDownError("the daemon is shutting down")
        entry = self._entry(model)
        async with entry.lock:
            version = version_dir.name
            old = entry.slot.current
            self._end_probation(entry, "superseded", f"version {version} is being loaded")
            try:
                await self._load_and_swap(entry, version_dir)
            except EdgedError as exc:
                entry.last_error = str(exc)
                entry.state = "READY" if entry.slot.current is not None else "UNAVAILABLE"
                self._record_swap(
                    SwapEvent(
                        time.time(), model, old.version if old else None, version, False, str(exc)
                    )
                )
                log.error("model %s: version %s not switched in: %s", model, version, exc)
                raise

    async def _load_and_swap(
        self, entry: ModelEntry, version_dir: Path, *, probation: bool = True
    ) -> None:
        name, version = entry.name, version_dir.name
        try:
            # TOML parsing and file sizes: on a thread, the loop keeps serving the old version.
            config, estimate = await asyncio.to_thread(_config_and_estimate, version_dir)
        except EdgedError as exc:
            raise SelfTestFailedError(f"{name} version {version}: {exc}") from exc
        old = entry.slot.current
        unload_first = self._check_memory(name, version, estimate, old)
        if unload_first and old is not None:
            log.warning(
                "model %s: unloading version %s before loading %s (memory policy unload-first); "
                "requests get 503 until the new version is ready",
                name,
                old.version,
                version,
            )
            entry.state = "LOADING"
            entry.slot.swap(None)
            await asyncio.to_thread(old.wait_closed, 30.0)
        started = time.monotonic()
        models = max(self._known_models, len(self._entries))
        options = self.cpu_budget.apply(config.runtime, models)
        loaded = await asyncio.to_thread(load_model, version_dir, options)
        try:
            summary = await asyncio.to_thread(self_test, name, version, loaded, config, version_dir)
        except BaseException:
            loaded.close()
            raise
        new = ServedVersion(name, version, version_dir, loaded, config, estimate)
        policy = self._policy(old.version_dir, version_dir) if probation and old else None
        if policy is not None and old is not None:
            try:  # durable before the switch: a crash from here on is the release's
                await self._save_probation_record(entry, new, old, policy)
            except BaseException:
                loaded.close()
                raise
        # The replaced version stays loaded during probation (one extra handle), unless the
        # memory policy already unloaded it: then a revert reloads it from its directory.
        held = entry.slot.acquire() if policy is not None and not unload_first else None
        entry.scheduler.batching = config.batching
        entry.cache = ResultCache(config.cache.max_entries) if config.cache.enabled else None
        self.stats.reset(name, version)
        previous = entry.slot.swap(new)
        entry.state = "READY"
        entry.last_error = None
        reason = f"{summary}; loaded in {time.monotonic() - started:.2f}s; {loaded.description}"
        self._record_swap(
            SwapEvent(
                time.time(), name, previous.version if previous else None, version, True, reason
            )
        )
        log.info(
            "model %s: now serving version %s (was %s): %s",
            name,
            version,
            previous.version if previous else "none",
            reason,
        )
        if policy is not None and old is not None:
            self._start_probation(entry, new, old, held, policy)

    def _policy(self, old_dir: Path, new_dir: Path) -> ProbationPolicy | None:
        try:
            return self.probation_policy(new_dir, old_dir)
        except EdgedError as exc:
            log.error("model %s: no probation for %s: %s", new_dir.parent.name, new_dir, exc)
            return None

    # --- probation ------------------------------------------------------------------------

    def _live_versions(self, model: str) -> set[str]:
        """Versions whose statistics must never be dropped: serving, or held as a baseline."""
        entry = self._entries.get(model)
        if entry is None:
            return set()
        live = {entry.slot.current.version} if entry.slot.current is not None else set()
        if entry.probation is not None:
            live.add(entry.probation.previous_version)
        return live

    def _start_probation(
        self,
        entry: ModelEntry,
        new: ServedVersion,
        old: ServedVersion,
        held: ServedVersion | None,
        policy: ProbationPolicy,
    ) -> None:
        baseline = self._with_energy(entry.name, self.stats.window(entry.name, old.version))
        watch = ProbationWatch(
            entry.name,
            entry.slot,
            new,
            old.version,
            old.version_dir,
            held,
            policy,
            baseline,
            self.stats,
            energy=self.energy_per_inference,
        )
        entry.probation = watch
        log.info(
            "model %s: version %s on probation (%d s to %d s, %d requests; %s loaded)",
            entry.name,
            new.version,
            policy.min_s,
            policy.max_s,
            policy.min_requests,
            f"version {old.version} stays" if held is not None else "nothing else",
        )
        self._watch_probation(entry, watch)

    def _watch_probation(self, entry: ModelEntry, watch: ProbationWatch) -> None:
        entry.probation = watch
        task = asyncio.get_running_loop().create_task(
            self._watch(entry, watch), name=f"probation-{entry.name}"
        )
        watch.task = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watch(self, entry: ModelEntry, watch: ProbationWatch) -> None:
        try:
            await watch.run(
                lambda w: self._revert(entry, w),
                lambda outcome: self._finish_probation(entry, watch, outcome),
            )
        except Exception as exc:  # a bug in the watch must not pin the old version forever
            log.exception(
                "model %s: probation of version %s failed", entry.name, watch.candidate.version
            )
            if entry.probation is watch:
                entry.probation = None
                watch.release_held()
                self._finish_probation(
                    entry, watch, watch.outcome("stopped", watch.last, f"probation failed: {exc}")
                )

    def _end_probation(self, entry: ModelEntry, decision: str, reason: str) -> None:
        """Stop watching without a verdict (a newer version, shutdown); release the held one."""
        watch = entry.probation
        if watch is None:
            return
        entry.probation = None
        if watch.task is not None:
            watch.task.cancel()
        watch.release_held()
        self._finish_probation(entry, watch, watch.outcome(decision, watch.last, reason))

    def _finish_probation(
        self, entry: ModelEntry, watch: ProbationWatch, outcome: ProbationOutcome
    ) -> None:
        if entry.probation is watch:
            entry.probation = None
        if not self._closing:
            self._forget_probation_record(entry.name, watch.candidate.version)
        entry.last_probation = outcome
        for listener in self.probation_listeners:
            task = asyncio.get_running_loop().create_task(
                self._notify(listener, outcome), name="probation-outcome"
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    @staticmethod
    async def _notify(listener: ProbationListener, outcome: ProbationOutcome) -> None:
        try:
            await listener(outcome)
        except Exception:  # a listener's bug must not end the watch or the loop
            log.exception("probation outcome listener failed for %s", outcome.model)

    async def _revert(self, entry: ModelEntry, watch: ProbationWatch) -> None:
        """Serve the replaced version again: the held one at once, else reloaded."""
        reason = watch.last.reason if watch.last is not None else "probation failed"
        async with entry.lock:
            if entry.probation is not watch:
                return  # a newer load superseded it meanwhile
            held = watch.held
            if held is not None:
                entry.scheduler.batching = held.config.batching
                entry.cache = (
                    ResultCache(held.config.cache.max_entries)
                    if held.config.cache.enabled
                    else None
                )
                entry.slot.swap(held)
                watch.release_held()
            else:
                try:
                    await self._load_and_swap(entry, watch.previous_dir, probation=False)
                except EdgedError as exc:
                    reason = f"{reason}; reloading version {watch.previous_version} failed: {exc}"
                    log.error("model %s: %s", entry.name, reason)
            entry.state = "READY" if entry.slot.current is not None else "UNAVAILABLE"
            self._record_swap(
                SwapEvent(
                    time.time(),
                    entry.name,
                    watch.candidate.version,
                    watch.previous_version,
                    True,
                    f"reverted by probation: {reason}",
                )
            )

    # --- durable probation (edged.serve.probation_record; the crash gate decides at start) ----

    async def _save_probation_record(
        self, entry: ModelEntry, new: ServedVersion, old: ServedVersion, policy: ProbationPolicy
    ) -> None:
        """Before the switch: a restart from here on finds the probation (or a crash of it)."""
        if self.probation_records is None:
            return
        record = ProbationRecord(
            model=entry.name,
            version=new.version,
            version_dir=str(new.version_dir),
            previous_version=old.version,
            previous_dir=str(old.version_dir),
            policy=policy,
            started_at=time.time(),
            baseline=self._with_energy(entry.name, self.stats.window(entry.name, old.version)),
        )
        await asyncio.to_thread(self.probation_records.save, record)

    def _with_energy(self, model: str, window: VersionWindow) -> VersionWindow:
        if self.energy_per_inference is None:
            return window
        energy = self.energy_per_inference(model, window.version)
        return dataclasses.replace(window, energy_j_per_inference=energy)

    def _save_probation_progress(self, entry: ModelEntry) -> None:
        """A clean shutdown: keep what the gates saw so far, for the probation to go on."""
        watch, records = entry.probation, self.probation_records
        if watch is None or records is None:
            return
        try:
            record = records.load(entry.name)
            if record is not None and record.version == watch.candidate.version:
                records.save(
                    dataclasses.replace(record, elapsed_s=watch.elapsed_s, seen=seen_so_far(watch))
                )
        except EdgedError as exc:
            log.error("model %s: probation progress not saved: %s", entry.name, exc)

    def _forget_probation_record(self, model: str, version: str) -> None:
        records = self.probation_records
        if records is None:
            return
        try:
            record = records.load(model)
            if record is not None and record.version == version:
                records.remove(model)
        except EdgedError as exc:
            log.error("model %s: %s", model, exc)

    async def _resume_probations(self) -> None:
        """After a restart: load each held version again beside its release, and go on."""
        if self.probation_records is None:
            return
        for outcome in await asyncio.to_thread(self.probation_records.take_decided):
            self._note_decided(outcome)
        records = await asyncio.to_thread(self.probation_records.load_all)
        for record in records:
            entry = self._entries.get(record.model)
            current = entry.slot.current if entry is not None else None
            if entry is None or current is None or current.version != record.version:
                log.warning(
                    "model %s: version %s is not serving; its probation record is dropped",
                    record.model,
                    record.version,
                )
                self._forget_probation_record(record.model, record.version)
                continue
            async with entry.lock:
                await self._resume_probation(entry, current, record)

    async def _resume_probation(
        self, entry: ModelEntry, current: ServedVersion, record: ProbationRecord
    ) -> None:
        held: ServedVersion | None = None
        previous_dir = Path(record.previous_dir)
        try:
            config, estimate = await asyncio.to_thread(_config_and_estimate, previous_dir)
            unload_first = self._check_memory(
                entry.name, record.previous_version, estimate, current
            )
            if not unload_first:
                options = self.cpu_budget.apply(
                    config.runtime, max(self._known_models, len(self._entries))
                )
                loaded = await asyncio.to_thread(load_model, previous_dir, options)
                try:
                    await asyncio.to_thread(
                        self_test, entry.name, record.previous_version, loaded, config, previous_dir
                    )
                except BaseException:
                    loaded.close()
                    raise
                held = entry.slot.hold_beside(
                    ServedVersion(
                        entry.name,
                        record.previous_version,
                        previous_dir,
                        loaded,
                        config,
                        estimate,
                    )
                )
        except EdgedError as exc:
            log.error(
                "model %s: version %s not loaded again beside %s (%s); a revert reloads it",
                entry.name,
                record.previous_version,
                record.version,
                exc,
            )
        watch = ProbationWatch(
            entry.name,
            entry.slot,
            current,
            record.previous_version,
            previous_dir,
            held,
            record.policy,
            record.baseline,
            self.stats,
            carried=record.seen,
            elapsed_before_s=record.elapsed_s,
            energy=self.energy_per_inference,
        )
        log.info(
            "model %s: probation of version %s goes on after a restart (%.0f s served, "
            "%d crash(es); %s)",
            entry.name,
            record.version,
            record.elapsed_s,
            record.crashes,
            f"version {record.previous_version} loaded again" if held else "nothing held",
        )
        self._watch_probation(entry, watch)

    def _note_decided(self, outcome: ProbationOutcome) -> None:
        """A probation decided outside this process's watch (the crash gate at start-up):
        shown like any other in the status and the swap events."""
        entry = self._entries.get(outcome.model)
        if entry is not None:
            entry.last_probation = outcome
        self.events.append(
            SwapEvent(
                outcome.at,
                outcome.model,
                outcome.version,
                outcome.previous_version,
                True,
                f"reverted by probation: {outcome.reason}",
            )
        )

    def _check_memory(
        self, name: str, version: str, estimate: int, old: ServedVersion | None
    ) -> bool:
        """True when the old version must be unloaded first; raises if the policy refuses."""
        return must_unload_first(
            MemoryRequest(
                model=name,
                version=version,
                estimate_bytes=estimate,
                old_version=old.version if old is not None else None,
                old_estimate_bytes=old.memory_estimate_bytes if old is not None else 0,
                available_bytes=psutil.virtual_memory().available
                - self.config.memory_reserve_bytes,
                # A version held for a probation's revert costs memory too.
                in_use_bytes=sum(
                    e.slot.current.memory_estimate_bytes
                    for e in self._entries.values()
                    if e.slot.current is not None
                )
                + sum(
                    e.probation.held.memory_estimate_bytes
                    for e in self._entries.values()
                    if e.probation is not None and e.probation.held is not None
                ),
                limit_bytes=self.config.memory_limit_bytes,
                policy=self.config.memory_policy,
            )
        )

    async def unload(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"model {name!r} is not loaded")
        async with entry.lock:
            entry.slot.swap(None)
            entry.state = "UNAVAILABLE"
            entry.last_error = "unloaded"

    # --- inference ------------------------------------------------------------------------

    def serving(self, name: str, version: str | None = None) -> ServedVersion:
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"unknown model {name!r}")
        current = entry.slot.current
        if current is None:
            reason = f": {entry.last_error}" if entry.last_error else ""
            raise ModelNotReadyError(f"model {name!r} has no version serving{reason}")
        require_version(name, version, current.version)
        return current

    async def infer(
        self,
        name: str,
        inputs: dict[str, Array],
        *,
        version: str | None = None,
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> InferenceResult:
        if self._closing:
            raise ShuttingDownError("the daemon is shutting down; retry on restart")
        current = self.serving(name, version)
        entry = self._entries[name]
        batching = current.config.batching
        priority = resolve_priority(
            name, priority, batching.priority_levels, batching.default_priority
        )
        dynamic = current.model.dynamic_batch
        rows, signature = validate_inputs(
            name, current.model.inputs, inputs, dynamic, batching.max_batch_size if dynamic else 1
        )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        cache = entry.cache
        if cache is None:
            future = entry.scheduler.submit(inputs, rows, signature, priority, deadline)
            if timeout_s is None:  # the common case, without a coroutine in between
                result = await future
            else:
                result = await self._await_result(entry, future, timeout_s)
            return result if entry.probation is None else self._watched(entry, inputs, result)
        result = await cache.result(
            inputs,
            current.version,
            lambda: entry.scheduler.submit(inputs, rows, signature, priority, deadline),
            lambda future: self._await_result(entry, future, timeout_s),
        )
        return self._watched(entry, inputs, result)

    def _watched(
        self, entry: ModelEntry, inputs: dict[str, Array], result: InferenceResult
    ) -> InferenceResult:
        """During probation, count the new version's answers that hold NaN or Inf, and offer
        the request for a shadow run on the replaced version."""
        watch = entry.probation
        if watch is None or result.model_version != watch.candidate.version:
            return result
        if watch.shadow is not None:
            watch.shadow.offer(inputs, result.outputs, loaded=entry.scheduler.queue_depth > 0)
        if not all(np.isfinite(v).all() for v in result.outputs.values() if v.dtype.kind in "fc"):
            self.stats.record_nonfinite(entry.name, result.model_version)
        return result

    @staticmethod
    async def _await_result(
        entry: ModelEntry, future: asyncio.Future[InferenceResult], timeout_s: float | None
    ) -> InferenceResult:
        if timeout_s is None:
            return await future
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TIMEOUT_ERRORS as exc:
            entry.scheduler.observer.on_outcome("timeout")
            raise DeadlineExceededError(
                f"request deadline of {timeout_s * 1000:.0f} ms passed"
            ) from exc

    # --- introspection --------------------------------------------------------------------

    def queue_depths(self) -> dict[str, tuple[str | None, int]]:
        """Per model: the serving version and how many requests wait."""
        return {
            name: (e.slot.current.version if e.slot.current else None, e.scheduler.queue_depth)
            for name, e in self._entries.items()
        }

    def model_names(self) -> list[str]:
        return sorted(self._entries)

    @property
    def entries(self) -> dict[str, ModelEntry]:
        """Every model by name (read-only use; any thread may look one up)."""
        return self._entries

    @property
    def closing(self) -> bool:
        return self._closing

    def entry(self, name: str) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"unknown model {name!r}")
        return entry

    @property
    def ready(self) -> bool:
        return not self._closing and all(e.slot.current is not None for e in self._entries.values())

    async def index_async(self) -> list[dict[str, Any]]:
        """``index`` with the repository scan on a thread."""
        found = await asyncio.to_thread(repository.scan_layers, self.repositories)
        return self.index(found)

    def index(
        self, found: dict[str, repository.RepositoryModel] | None = None
    ) -> list[dict[str, Any]]:
        """The repository index (Open Inference Protocol repository extension)."""
        rows: list[dict[str, Any]] = []
        if found is None:
            found = repository.scan_layers(self.repositories)
        for name, model in found.items():
            entry = self._entries.get(name)
            serving = entry.slot.current if entry else None
            for version in model.versions:
                is_serving = serving is not None and serving.version == version
                row: dict[str, Any] = {
                    "name": name,
                    "version": version,
                    "state": "READY" if is_serving else "UNAVAILABLE",
                }
                if (
                    not is_serving
                    and entry is not None
                    and entry.last_error
                    and version == model.current
                ):
                    row["reason"] = entry.last_error
                rows.append(row)
        return rows

    def status(self) -> dict[str, Any]:
        models = []
        for name in sorted(self._entries):
            entry = self._entries[name]
            current = entry.slot.current
            models.append(
                {
                    "name": name,
                    "state": entry.state,
                    "version": current.version if current else None,
                    "runtime": current.model.description if current else None,
                    "dynamic_batch": current.model.dynamic_batch if current else None,
                    "queue_depth": entry.scheduler.queue_depth,
                    "last_error": entry.last_error,
                    "probation": entry.probation.status() if entry.probation else None,
                    "last_probation": (
                        entry.last_probation.to_json() if entry.last_probation else None
                    ),
                }
            )
        events = [
            {
                "at": e.at,
                "model": e.model,
                "from": e.from_version,
                "to": e.to_version,
                "ok": e.ok,
                "reason": e.reason,
            }
            for e in self.events
        ]
        return {"ready": self.ready, "models": models, "events": events}

    def running_workers(self) -> list[str]:
        """Models whose worker thread has not ended (after ``close``: one stuck in a run)."""
        return [name for name, e in self._entries.items() if e.scheduler.worker_alive]

    def stuck_workers(self) -> dict[str, float]:
        """Models whose worker has been inside one run past ``worker_stuck_after_s``, with
        how long (the watchdog stops its pings while any is)."""
        return {
            name: e.scheduler.stall.busy_for_s()
            for name, e in self._entries.items()
            if not e.scheduler.stall()
        }
