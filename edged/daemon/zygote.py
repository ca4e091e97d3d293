"""The zygote: a fork of the control plane made at start-up, before any thread exists, that
forks the engine and the front ends when the control plane asks, and reports how each ended.

Forking the control plane later would be unsafe (it runs threads: a child could inherit a lock
held by one of them), and a fresh interpreter per child costs a second of imports and its own
copy of every module. A zygote forked after the imports costs neither: its children start in
milliseconds and share the imported pages with the control plane (``gc.freeze`` keeps the
garbage collector from copying them). It is what ``multiprocessing``'s forkserver does, without
the second interpreter and the resource tracker beside it.

Protocol over one SOCK_SEQPACKET pair, pickled tuples (the control plane's own, never a
client's): ``("spawn", token, "module:function", args)`` with file descriptors attached →
``("started", token, pid)``; later ``("exited", pid, code)`` with ``code`` as
``multiprocessing`` gives it (negative: the signal). The zygote ends when the control plane does.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20
MAX_FDS = 16


class Zygote:
    """The control plane's side."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self._tokens = 0
        self._started: dict[int, asyncio.Future[int]] = {}
        self._exited: dict[int, asyncio.Future[int]] = {}
        self._attached = False

    @classmethod
    def fork(cls, preload: Sequence[str] = ()) -> Zygote:
        """Fork the zygote from this process, after importing ``preload``. Only while no
        thread runs here (``can_fork``)."""
        if not can_fork():
            raise RuntimeError(
                f"the zygote must be forked before threads start ({threading.active_count()})"
            )
        _preload(preload)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the zygote
            code = 0
            try:
                ours.close()
                _serve(theirs)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        return cls(pid, ours)

    @classmethod
    def launch(cls, preload: Sequence[str] = ()) -> Zygote:
        """A zygote in a fresh interpreter, for a process that already runs threads (slower:
        it imports everything again)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = subprocess.Popen(
            [sys.executable, "-m", "edged.daemon.zygote", str(theirs.fileno()), *preload],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        zygote = cls(process.pid, ours)
        zygote._process = process
        return zygote

    _process: subprocess.Popen[bytes] | None = None

    def _attach(self) -> None:
        if not self._attached:
            self._sock.setblocking(False)
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._receive)
            self._attached = True

    def _receive(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                log.error("the zygote (pid %d) ended; no process can be started", self.pid)
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
                return
            message = pickle.loads(data)  # noqa: S301 (our own child's messages)
            if message[0] == "started":
                _, token, pid = message
                future = self._started.pop(token, None)
                if future is not None and not future.done():
                    future.set_result(pid)
            elif message[0] == "exited":
                _, pid, code = message
                exited = self._exited.setdefault(pid, asyncio.get_running_loop().create_future())
                if not exited.done():
                    exited.set_result(code)

    async def spawn(self, target: str, args: tuple[Any, ...], fds: Sequence[int] = ()) -> int:
        """Start ``target(*args, fds)`` (a "module:function") in a new process; its pid."""
        self._attach()
        self._tokens += 1
        token = self._tokens
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._started[token] = started
        message = pickle.dumps(("spawn", token, target, args))
        await asyncio.get_running_loop().run_in_executor(
            None, socket.send_fds, self._sock, [message], list(fds)
        )
        pid = await started
        self._exited.setdefault(pid, asyncio.get_running_loop().create_future())
        return pid

    async def wait(self, pid: int) -> int:
        """How process ``pid`` ended: its exit status, or minus the signal that ended it."""
        self._attach()
        exited = self._exited.setdefault(pid, asyncio.get_running_loop().create_future())
        try:
            return await exited
        finally:
            self._exited.pop(pid, None)

    def close(self) -> None:
        """Let the zygote end (it exits when this side closes) and reap it."""
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(5)
        else:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


def can_fork() -> bool:
    return threading.active_count() == 1


def _preload(modules: Sequence[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # an optional runtime that is not installed
            log.debug("not preloaded: %s: %s", name, exc)


class ZygoteProcess:
    """One child as the control plane's ``Child`` sees it."""

    def __init__(self, zygote: Zygote, target: str, args: tuple[Any, ...], fds: Sequence[int]):
        self._zygote = zygote
        self._target = target
        self._args = args
        self._fds = list(fds)
        self.pid: int | None = None
        self.exitcode: int | None = None

    async def start(self) -> None:
        self.pid = await self._zygote.spawn(self._target, self._args, self._fds)

    async def wait(self) -> int:
        assert self.pid is not None, "not started"
        self.exitcode = await self._zygote.wait(self.pid)
        return self.exitcode

    def _signal(self, signum: int) -> None:
        if self.pid is not None and self.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


# --- the zygote itself ---------------------------------------------------------------------------


def _serve(sock: socket.socket) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the control plane decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    gc.freeze()  # what the control plane imported stays shared with every child
    while True:
        readable, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            _reap(sock)
        if sock.fileno() in readable:
            try:
                data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
            except OSError:
                data, fds = b"", []
            if not data:
                return  # the control plane is gone; its children notice it themselves
            _, token, target, args = pickle.loads(data)  # noqa: S301 (the control plane's)
            pid = os.fork()
            if pid == 0:
                _run_child(sock, wake_r, wake_w, target, args, fds)
            for fd in fds:
                os.close(fd)
            sock.send(pickle.dumps(("started", token, pid)))
            _reap(sock)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):
            sock.send(pickle.dumps(("exited", pid, os.waitstatus_to_exitcode(status))))


def _run_child(
    sock: socket.socket,
    wake_r: int,
    wake_w: int,
    target: str,
    args: tuple[Any, ...],
    fds: list[int],
) -> None:
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
        module, _, function = target.partition(":")
        main = getattr(importlib.import_module(module), function)
        main(*args, fds)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":  # Zygote.launch
    _preload(sys.argv[2:])
    _serve(socket.socket(fileno=int(sys.argv[1])))
