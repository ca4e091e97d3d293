"""systemd service notifications without libsystemd, and a watchdog that pings only while healthy.

The protocol is one ``AF_UNIX`` datagram of newline-separated ``KEY=value`` fields sent to
``$NOTIFY_SOCKET`` (a path, or an abstract-namespace name when it starts with ``@``). When the
variable is unset the process is not running under a ``Type=notify`` unit and every call is a
no-op. See sd_notify(3) and systemd.service(5) ``WatchdogSec=``.

Typical use by the daemon::

    notifier = Notifier.from_environment()
    watchdog = Watchdog(notifier, watchdog_interval_s())
    watchdog.add_probe("inference", stall_detector)      # Callable[[], bool]
    async with TaskGroup() as tg:
        tg.create_task(watchdog.run())
        ...                                               # start up
        notifier.ready("serving 3 models")
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType

from edged.errors import NotifyError

logger = logging.getLogger(__name__)

Probe = Callable[[], bool]
"""A health probe: returns ``True`` while its subsystem is healthy. Runs on the event loop, so it
must be quick and must not block; raising counts as unhealthy."""

LOOP_PROBE_NAME = "event-loop"


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _socket_address(value: str) -> bytes:
    """Translate ``$NOTIFY_SOCKET`` into a ``sendto`` address, as sd_notify(3) does."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    raise NotifyError(
        f"NOTIFY_SOCKET={value!r} is neither an absolute path nor an abstract socket name "
        "starting with '@'; edged supports only AF_UNIX notification sockets"
    )


class Notifier:
    """Sends state changes to the service manager; does nothing when not under systemd.

    Sends never block: the socket is non-blocking, and a full receive queue on the service
    manager's side raises ``NotifyError`` rather than stalling the event loop.
    """

    def __init__(self, socket_path: str | None) -> None:
        """``socket_path`` is the raw ``$NOTIFY_SOCKET`` value, or ``None`` for a no-op notifier."""
        self._address = None if not socket_path else _socket_address(socket_path)
        self._display = socket_path or ""
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, unset_environment: bool = False
    ) -> Notifier:
        """Build from ``$NOTIFY_SOCKET``.

        ``unset_environment`` removes the variable from ``os.environ`` so that child processes
        (model converters, helpers) do not inherit it and confuse the service manager.
        """
        env = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET"))
        if unset_environment and environ is None:
            os.environ.pop("NOTIFY_SOCKET", None)
        return notifier

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening (``$NOTIFY_SOCKET`` was set)."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one message made of ``KEY=value`` fields; ``False`` when not under systemd.

        Keys are passed as keyword arguments in systemd's spelling (``READY=1`` is
        ``notify(READY=1)``). A value containing a newline would inject another field, so it is
        refused.
        """
        if self._address is None:
            return False
        if not fields:
            raise NotifyError("a notification needs at least one KEY=value field")
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:
                raise NotifyError(f"notification field {key} contains a newline: {text!r}")
            lines.append(f"{key}={text}")
        payload = ("\n".join(lines) + "\n").encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.setblocking(False)
                    self._sock = sock
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                reason = (
                    "the service manager's queue is full"
                    if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
                    else exc.strerror or str(exc)
                )
                raise NotifyError(
                    f"cannot notify systemd via NOTIFY_SOCKET={self._display!r}: {reason}"
                ) from exc
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up finished: ``READY=1`` (plus ``STATUS=`` when given)."""
        return self._send_with_status({"READY": "1"}, status)

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status``."""
        return self.notify(STATUS=_one_line(text))

    def watchdog(self) -> bool:
        """Keep-alive ping: ``WATCHDOG=1``. Prefer ``Watchdog``, which pings only while healthy."""
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began: ``STOPPING=1``."""
        return self._send_with_status({"STOPPING": "1"}, status)

    def reloading(self, status: str | None = None) -> bool:
        """Reload began: ``RELOADING=1`` with ``MONOTONIC_USEC``; send ``ready()`` when done."""
        fields = {"RELOADING": "1", "MONOTONIC_USEC": str(_monotonic_usec())}
        return self._send_with_status(fields, status)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop: ``EXTEND_TIMEOUT_USEC`` (e.g. a slow model load)."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(0, int(seconds * 1_000_000)))

    def _send_with_status(self, fields: dict[str, str], status: str | None) -> bool:
        if status is not None:
            fields["STATUS"] = _one_line(status)
        return self.notify(**fields)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Notifier({self._display!r})" if self.enabled else "Notifier(disabled)"


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def watchdog_interval_s(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """The watchdog timeout systemd expects pings within, in seconds; ``None`` when disabled.

    Mirrors sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` sets the interval and, when
    ``$WATCHDOG_PID`` is present, it must name this process (``pid`` defaults to ours).
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC")
    if usec_text is None:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        raise NotifyError(
            f"WATCHDOG_USEC={usec_text!r} is not an integer number of microseconds"
        ) from None
    if usec <= 0:
        raise NotifyError(f"WATCHDOG_USEC={usec_text!r} must be a positive number of microseconds")
    pid_text = env.get("WATCHDOG_PID")
    if pid_text is not None:
        try:
            watchdog_pid = int(pid_text)
        except ValueError:
            raise NotifyError(f"WATCHDOG_PID={pid_text!r} is not a process id") from None
        if watchdog_pid != (os.getpid() if pid is None else pid):
            return None  # the variables were meant for another process (e.g. our parent)
    return usec / 1_000_000


class Watchdog:
    """Sends ``WATCHDOG=1`` every half interval, but only while every health probe passes.

    If the pings stop, systemd kills the service after ``WatchdogSec=`` and ``Restart=`` brings
    it back. Besides the registered probes, the loop's own responsiveness is a probe
    (``"event-loop"``): a wake-up later than ``max_loop_lag_s`` withholds that ping. A loop
    blocked outright sends nothing, which needs no probe at all.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval_s: float | None,
        *,
        max_loop_lag_s: float | None = None,
    ) -> None:
        """``interval_s`` is from ``watchdog_interval_s()``; ``None`` disables pinging.

        ``max_loop_lag_s`` defaults to a quarter of the interval (half the ping period).
        """
        if interval_s is not None and interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._notifier = notifier
        self.interval_s = interval_s
        self.period_s = None if interval_s is None else interval_s / 2
        if max_loop_lag_s is None:
            max_loop_lag_s = None if interval_s is None else interval_s / 4
        self.max_loop_lag_s = max_loop_lag_s
        self._probes: dict[str, Probe] = {}
        self._failing: tuple[str, ...] = ()
        self.pings_sent = 0

    @property
    def enabled(self) -> bool:
        return self._notifier.enabled and self.interval_s is not None

    def add_probe(self, name: str, probe: Probe) -> None:
        if name == LOOP_PROBE_NAME or name in self._probes:
            raise ValueError(f"a watchdog probe named {name!r} is already registered")
        self._probes[name] = probe

    def remove_probe(self, name: str) -> None:
        self._probes.pop(name, None)

    @property
    def failing(self) -> tuple[str, ...]:
        """Names of the probes that failed at the last check (empty when healthy)."""
        return self._failing

    def check(self, loop_lag_s: float = 0.0) -> tuple[str, ...]:
        """Run every probe now; returns the names of those that failed."""
        failing: list[str] = []
        if self.max_loop_lag_s is not None and loop_lag_s > self.max_loop_lag_s:
            failing.append(LOOP_PROBE_NAME)
        for name, probe in list(self._probes.items()):
            try:
                healthy = probe()
            except Exception:
                logger.exception("watchdog probe %s raised; counting it as unhealthy", name)
                healthy = False
            if not healthy:
                failing.append(name)
        return tuple(failing)

    def _tick(self, loop_lag_s: float) -> None:
        failing = self.check(loop_lag_s)
        if failing != self._failing:
            if failing:
                logger.warning(
                    "withholding systemd watchdog pings: unhealthy %s (event-loop lag %.3f s)",
                    ", ".join(failing),
                    loop_lag_s,
                )
            else:
                logger.info("all watchdog probes healthy again; resuming pings")
        self._failing = failing
        if failing:
            return
        try:
            self._notifier.watchdog()
        except NotifyError as exc:
            # One lost ping is not fatal; if they all fail systemd restarts us, which is right.
            logger.warning("%s", exc)
        else:
            self.pings_sent += 1

    async def run(self) -> None:
        """Ping until cancelled; returns at once when systemd asked for no watchdog."""
        if not self.enabled or self.period_s is None:
            return
        period = self.period_s
        loop = asyncio.get_running_loop()
        lag = 0.0
        while True:
            self._tick(lag)
            started = loop.time()
            await asyncio.sleep(period)
            lag = max(0.0, loop.time() - started - period)
