"""Staged rollouts: a signed release goes to a group in waves (a canary, then shares of the
group), each wave only once its devices passed probation; too many failures or a wave that
does not finish abort the rollout and roll back every device that took the release.

The state lives in ``<dir>/<id>.json`` (written only by the engine, atomically after every
change) so the tool can be killed and resumed; ``<dir>/<id>.control`` carries an operator's
``pause`` or ``abort`` to a running engine. One engine per rollout at a time (a lock file).
Devices that are offline when their wave starts get the release when they come back, while the
rollout still runs (``edged rollout resume`` follows them), or nothing once it was aborted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edged.errors import RolloutError
from edged.fleet.artifacts import ArtifactStore
from edged.fleet.channel import (
    DEFAULT_CHUNK_BYTES,
    ManagerSettings,
    _connected,
    _Fleet,
    _publish_chunks,
    deploy_command,
    prepare_bundle,
)
from edged.fleet.rolloutstate import (
    ABORTED,
    ABORTING,
    ANNOUNCED,
    BAD_STATES,
    DECIDED_STATES,
    DEFAULT_ABORT,
    DONE,
    OFFLINE,
    PASSED,
    PAUSED,
    PENDING,
    REFUSED,
    ROLLBACK_FAILED,
    ROLLED_BACK,
    RUNNING,
    AbortPolicy,
    DeviceRecord,
    RolloutState,
    RolloutStore,
    abort_reason,
    check_percents,
    plan_waves,
    summary_line,
    wave_counts,
)
from edged.transport.client import MqttClient
from edged.transport.protocol import (
    FAILED,
    PROMOTED,
    REVERTED,
    Command,
    encode_command,
    new_nonce,
)
from edged.transport.topics import Target, Topics

log = logging.getLogger(__name__)


def new_rollout(
    store: RolloutStore,
    bundle: Path,
    group: str,
    members: Sequence[str],
    *,
    percents: Sequence[int] = (10, 50),
    canary: str | None = None,
    abort: AbortPolicy = DEFAULT_ABORT,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
    rollout_id: str | None = None,
    artifacts: ArtifactStore | None = None,
) -> RolloutState:
    """Plan a rollout and save it. With ``artifacts`` the bundle is written there as
    ``<sha256>.bundle`` and devices fetch it over HTTPS; no chunk goes through the broker."""
    data = bundle.read_bytes()
    urls: tuple[str, ...] = ()
    if artifacts is not None:
        artifacts.publish(data)
        urls = artifacts.urls(hashlib.sha256(data).hexdigest())
    prepared = prepare_bundle(data, chunk_size, urls=urls)
    d = prepared.deployment
    waves = plan_waves(members, percents, canary)
    state = RolloutState(
        id=rollout_id or f"{d.model}-{d.version}-{secrets.token_hex(3)}",
        bundle=str(bundle.resolve()),
        bundle_sha256=hashlib.sha256(data).hexdigest(),
        deployment=d.id,
        model=d.model,
        version=d.version,
        group=group,
        waves=waves,
        abort=abort,
        chunk_size=chunk_size,
        devices={dev: DeviceRecord(i) for i, wave in enumerate(waves) for dev in wave},
        urls=list(urls),
    )
    store.save(state)
    return state


Event = Callable[[RolloutState, str], None]

# A rollout over thousands of devices: verdicts are saved at most this often (they are also
# retained on the broker, so a tool killed in between reads them again on resume); the whole-
# rollout checks (abort policy, wave end, summary) run at most this often; a summary line at
# most this often; announcements and rollbacks in flight at once.
SAVE_INTERVAL_S = 1.0
TICK_S = 0.2
SUMMARY_INTERVAL_S = 5.0
SEND_CONCURRENCY = 64
# Rollouts up to this many devices report every device's change; larger ones only the
# failures, and a per-wave summary.
VERBOSE_DEVICES = 50


class _Engine:
    def __init__(
        self,
        settings: ManagerSettings,
        keys: Sequence[Ed25519PrivateKey],
        store: RolloutStore,
        state: RolloutState,
        on_event: Event | None,
        offline_timeout_s: float | None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.store = store
        self.state = state
        self.topics: Topics = settings.topics
        self.on_event = on_event or (lambda s, m: None)
        self.offline_timeout_s = (
            state.abort.wave_timeout_s if offline_timeout_s is None else offline_timeout_s
        )
        data = Path(state.bundle).read_bytes()
        if hashlib.sha256(data).hexdigest() != state.bundle_sha256:
            raise RolloutError(f"{state.bundle} changed since the rollout started")
        self.prepared = prepare_bundle(
            data, state.chunk_size, deployment_id=state.deployment, urls=state.urls
        )
        del data
        self.nonces: dict[str, str] = {}  # device -> nonce of our deploy/rollback command
        self.verbose = len(state.devices) <= VERBOSE_DEVICES
        self._saved_at = 0.0
        self._unsaved = False
        self._summary_at = 0.0
        # Device states counted over the rollout and per wave, kept by set_device: the
        # whole-rollout checks of every pass cost O(1), not O(devices).
        self.counts: Counter[str] = Counter(r.state for r in state.devices.values())
        self.per_wave: list[Counter[str]] = [
            Counter(state.devices[d].state for d in wave) for wave in state.waves
        ]

    @property
    def over_mqtt(self) -> bool:
        return not self.prepared.deployment.urls

    def event(self, message: str) -> None:
        log.info("rollout %s: %s", self.state.id, message)
        self.on_event(self.state, message)

    def save(self, *, now: bool = True) -> None:
        """Write the state: at once (``now``), or at most every ``SAVE_INTERVAL_S``."""
        if now or time.monotonic() - self._saved_at >= SAVE_INTERVAL_S:
            self.store.save(self.state)
            self._saved_at = time.monotonic()
            self._unsaved = False
        else:
            self._unsaved = True

    def flush(self) -> None:
        if self._unsaved:
            self.save()

    def set_device(self, device: str, state: str, reason: str = "") -> None:
        record = self.state.devices[device]
        if (record.state, record.reason) == (state, reason):
            return
        if record.state != state:
            for counts in (self.counts, self.per_wave[record.wave]):
                counts[record.state] -= 1
                counts[state] += 1
        record.state, record.reason, record.at = state, reason, time.time()
        self.save(now=False)
        if self.verbose or state in BAD_STATES or state == ROLLBACK_FAILED:
            self.event(f"{device}: {state}{' (' + reason + ')' if reason else ''}")

    # --- following the devices -----------------------------------------------------------

    def observe(self, fleet: _Fleet, devices: Iterable[str]) -> None:
        for device in devices:
            record = self.state.devices.get(device)
            if record is None or record.state in (PENDING, OFFLINE, ROLLED_BACK, ROLLBACK_FAILED):
                continue
            progress = fleet.progress.get(device)
            if progress is not None and progress.deployment == self.state.deployment:
                state = PASSED if progress.state == PROMOTED else progress.state
                if record.state not in DECIDED_STATES or state in DECIDED_STATES:
                    self.set_device(device, state, progress.reason)
            reply = fleet.replies.get(device)
            nonce = self.nonces.get(device)
            if (
                reply is not None
                and nonce is not None
                and reply.nonce == nonce
                and not reply.ok
                and record.state == ANNOUNCED
                and not reply.error.startswith("ReplayedCommandError")
            ):
                self.set_device(device, REFUSED, reply.error)

    async def announce_many(self, client: MqttClient, fleet: _Fleet, devices: list[str]) -> None:
        semaphore = asyncio.Semaphore(SEND_CONCURRENCY)

        async def one(device: str) -> None:
            async with semaphore:
                await self.announce(client, fleet, device)

        await asyncio.gather(*(one(d) for d in devices))
        self.save()  # an announcement is an action: never forgotten by a resumed tool

    async def announce(self, client: MqttClient, fleet: _Fleet, device: str) -> None:
        status = fleet.statuses.get(device)
        previous = None
        if status is not None:
            previous = next((m.version for m in status.models if m.name == self.state.model), None)
        target = Target.device(device)
        d = self.prepared.deployment
        if self.over_mqtt:
            await _publish_chunks(
                client,
                self.topics,
                target,
                d.id,
                self.prepared.chunks,
                list(range(len(self.prepared.chunks))),
                set(),
            )
            self.state.messages_sent += len(self.prepared.chunks)
        command = deploy_command(target, d)
        self.nonces[device] = command.nonce
        await client.publish(
            self.topics.deploy(target),
            encode_command(command, self.keys),
            qos=1,
            response_topic=self.topics.replies(client.client_id),
            correlation_data=command.nonce.encode("ascii"),
        )
        self.state.messages_sent += 1
        self.state.devices[device].previous_version = previous
        self.set_device(device, ANNOUNCED)

    async def clear_chunks(self, client: MqttClient, devices: Iterable[str]) -> None:
        if not self.over_mqtt:
            return
        empty = tuple(b"" for _ in self.prepared.chunks)
        semaphore = asyncio.Semaphore(max(1, SEND_CONCURRENCY // max(1, len(empty))))

        async def one(device: str) -> None:
            async with semaphore:
                await _publish_chunks(
                    client,
                    self.topics,
                    Target.device(device),
                    self.state.deployment,
                    empty,
                    list(range(len(empty))),
                    set(),
                )

        await asyncio.gather(*(one(d) for d in devices))

    def announced_devices(self) -> list[str]:
        return [d for d, r in self.state.devices.items() if r.state not in (PENDING, OFFLINE)]

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> RolloutState:
        try:
            return await self._run()
        finally:
            self.flush()

    async def _run(self) -> RolloutState:
        s = self.state
        async with _connected(self.settings) as (client, fleet):
            # Wildcards: the subscriptions do not grow with the fleet; the fleet keeps only
            # the rollout's own devices.
            fleet.only = frozenset(s.devices)
            await client.subscribe(
                [
                    self.topics.all_status(),
                    self.topics.all_progress(),
                    self.topics.replies(client.client_id),
                ]
            )
            await fleet.settle(1.0)
            offline_since: float | None = None
            while True:
                tick_at = time.monotonic()
                self.observe(fleet, fleet.take_touched())
                control = self.store.control(s.id)
                if control == "abort" and s.status not in (ABORTING, ABORTED):
                    s.status, s.reason = ABORTING, "aborted by the operator"
                    self.save()
                if s.status == RUNNING and control == "pause":
                    s.status = PAUSED
                    self.save()
                    self.event("paused")
                    return s
                if s.status == RUNNING:
                    reason = self.abort_check()
                    if not reason:
                        reason = self.wave_timeout()
                    if reason:
                        s.status, s.reason = ABORTING, reason
                        self.save()
                        self.event(f"aborting: {reason}")
                if s.status == ABORTING:
                    if await self.roll_back(client, fleet):
                        s.status = ABORTED
                        self.save()
                        self.event(f"aborted: {s.reason}")
                        return s
                elif s.status == RUNNING:
                    await self.advance(client, fleet)
                    if s.status == DONE:
                        return s
                    # Only offline devices left to wait for (after the last wave, or a wave
                    # whose devices are all offline): bounded, then 'resume' goes on later.
                    waiting_offline = s.wave >= len(s.waves) or self.per_wave[s.wave][
                        OFFLINE
                    ] == len(s.waves[s.wave])
                    if not waiting_offline:
                        offline_since = None
                    else:
                        offline_since = offline_since or time.monotonic()
                        if time.monotonic() - offline_since > self.offline_timeout_s:
                            self.event("devices still offline; 'edged rollout resume' follows them")
                            return s
                    if not self.verbose and time.monotonic() - self._summary_at >= (
                        SUMMARY_INTERVAL_S
                    ):
                        self._summary_at = time.monotonic()
                        self.event(summary_line(s))
                if self._unsaved:
                    self.save(now=False)
                await fleet.wait_change(0.5)
                # Pacing, not synchronisation: a burst of thousands of reports is taken in one
                # pass instead of one whole-rollout check per message.
                rest = TICK_S - (time.monotonic() - tick_at)
                if rest > 0:
                    await asyncio.sleep(rest)

    def abort_check(self) -> str:
        """``abort_reason`` of the policy, from the counts (the full scan only to name the
        devices once the limit is crossed)."""
        s = self.state
        bad = sum(self.counts[state] for state in BAD_STATES)
        decided = bad + self.counts[PASSED]
        if decided < s.abort.min_devices or not bad:
            return ""
        if bad * 1000 <= s.abort.failed_permille * decided:
            return ""
        return abort_reason(
            s.abort,
            {d: r.state for d, r in s.devices.items()},
            {d: r.reason for d, r in s.devices.items()},
        )

    def wave_timeout(self) -> str:
        s = self.state
        if s.wave >= len(s.waves) or not s.wave_started_at:
            return ""
        if time.time() - s.wave_started_at <= s.abort.wave_timeout_s:
            return ""
        late = [
            d
            for d in s.waves[s.wave]
            if s.devices[d].state not in DECIDED_STATES | {OFFLINE, PENDING}
        ]
        if not late:
            return ""
        shown = ", ".join(f"{d} ({s.devices[d].state})" for d in late[:10])
        more = f" and {len(late) - 10} more" if len(late) > 10 else ""
        return f"wave {s.wave + 1} did not finish within {s.abort.wave_timeout_s:g}s: {shown}{more}"

    async def advance(self, client: MqttClient, fleet: _Fleet) -> None:
        s = self.state
        # Devices of started waves that were offline: announce once they are back.
        due: list[str] = []
        for wave in range(min(s.wave + 1, len(s.waves))):
            if not self.per_wave[wave][PENDING] + self.per_wave[wave][OFFLINE]:
                continue
            for device in s.waves[wave]:
                record = s.devices[device]
                if record.state in (PENDING, OFFLINE):
                    status = fleet.statuses.get(device)
                    if status is not None and status.online:
                        due.append(device)
                    elif record.state == PENDING:
                        self.set_device(device, OFFLINE, "announced when it comes back online")
        if due:
            await self.announce_many(client, fleet, due)
        if s.wave < len(s.waves):
            if not s.wave_started_at:
                s.wave_started_at = time.time()
                s.wave_started.append(s.wave_started_at)
                self.save()
                members = s.waves[s.wave]
                names = ", ".join(members) if len(members) <= 10 else f"{len(members)} devices"
                self.event(f"wave {s.wave + 1} of {len(s.waves)}: {names}")
                return
            counts = self.per_wave[s.wave]
            if counts[PASSED] and counts[PASSED] + counts[OFFLINE] == len(s.waves[s.wave]):
                s.wave_done_at.append(time.time())
                s.wave += 1
                s.wave_started_at = 0.0
                self.save()
                self.event(f"wave {s.wave} passed")
        if self.counts[PASSED] == len(s.devices):
            await self.clear_chunks(client, s.devices)
            s.status = DONE
            self.save()
            self.event("done: every device passed probation")

    async def roll_back(self, client: MqttClient, fleet: _Fleet) -> bool:
        """Roll back every device that took the release; True once none is left to do."""
        s = self.state
        took = [
            d
            for d, r in s.devices.items()
            if r.state
            not in (PENDING, OFFLINE, REVERTED, FAILED, REFUSED, ROLLED_BACK, ROLLBACK_FAILED)
        ]
        # A device still installing is waited for (up to the wave timeout), then rolled back.
        busy = [d for d in took if s.devices[d].state != PASSED]
        if busy and time.time() - s.devices[busy[0]].at < s.abort.wave_timeout_s:
            return False
        semaphore = asyncio.Semaphore(SEND_CONCURRENCY)
        nonces: dict[str, str] = {}

        async def send(device: str) -> None:
            record = s.devices[device]
            args: dict[str, Any] = {"model": s.model}
            if record.previous_version is not None and record.previous_version.isdigit():
                args["to_version"] = int(record.previous_version)
            command = Command(
                "rollback", Target.device(device), int(time.time()), new_nonce(), args
            )
            nonces[device] = command.nonce
            async with semaphore:
                await client.publish(
                    self.topics.cmd(Target.device(device)),
                    encode_command(command, self.keys),
                    qos=1,
                    response_topic=self.topics.replies(client.client_id),
                    correlation_data=command.nonce.encode("ascii"),
                )
            s.messages_sent += 1

        await asyncio.gather(*(send(d) for d in took))
        answers = await self.wait_replies(fleet, nonces)
        for device in took:
            ok, reply = answers.get(device, (True, ""))
            self.set_device(
                device,
                ROLLED_BACK if ok else ROLLBACK_FAILED,
                reply or "rollback sent; no answer (it runs when the device is back)",
            )
        await self.clear_chunks(client, self.announced_devices())
        return True

    async def wait_replies(
        self, fleet: _Fleet, nonces: dict[str, str]
    ) -> dict[str, tuple[bool, str]]:
        """Device -> (ok, what it answered) for the replies that came; an unanswered
        rollback counts as sent."""
        answers: dict[str, tuple[bool, str]] = {}
        deadline = time.monotonic() + self.settings.timeout_s * 3
        while len(answers) < len(nonces) and time.monotonic() < deadline:
            for device, nonce in nonces.items():
                reply = fleet.replies.get(device)
                if device not in answers and reply is not None and reply.nonce == nonce:
                    answers[device] = (
                        reply.ok,
                        "rolled back" if reply.ok else f"rollback failed: {reply.error}",
                    )
            if len(answers) < len(nonces):
                await fleet.wait_change(0.5)
        return answers


async def drive(
    settings: ManagerSettings,
    keys: Sequence[Ed25519PrivateKey],
    store: RolloutStore,
    rollout_id: str,
    *,
    on_event: Event | None = None,
    offline_timeout_s: float | None = None,
) -> RolloutState:
    """Run (or resume) a rollout until it is done, aborted, paused, or only offline devices
    are left; the state is saved after every change."""
    with store.engine_lock(rollout_id):
        state = store.load(rollout_id)
        if state.finished:
            return state
        if state.status == PAUSED:
            if store.control(rollout_id) == "pause":
                store.set_control(rollout_id, "")
            state.status = RUNNING
        engine = _Engine(settings, keys, store, state, on_event, offline_timeout_s)
        return await engine.run()


async def members_of(settings: ManagerSettings, group: str, settle_s: float = 30.0) -> list[str]:
    """Devices whose retained status lists ``group``: every retained status, read until none
    came for a second (10,000 of them take a few seconds to arrive; at most ``settle_s``)."""
    async with _connected(settings) as (client, fleet):
        await client.subscribe([settings.topics.all_status()])
        await fleet.settle(settle_s, quiet_s=1.0)
    return sorted(d for d, s in fleet.statuses.items() if group in s.groups)


__all__ = [
    "ABORTED",
    "DONE",
    "PASSED",
    "PAUSED",
    "RUNNING",
    "AbortPolicy",
    "DeviceRecord",
    "RolloutState",
    "RolloutStore",
    "abort_reason",
    "check_percents",
    "drive",
    "members_of",
    "new_rollout",
    "plan_waves",
    "summary_line",
    "wave_counts",
]
