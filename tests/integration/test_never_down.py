"""Never down: a real daemon under inference load keeps serving, with zero failed requests,
while its side services fail under it (a full or read-only spool disk, a removed sd_notify
socket, a broken config on SIGHUP), and shuts down cleanly when requests outlive the drain."""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import running_daemon
from tests.support.load import InferenceLoad

pytestmark = pytest.mark.integration

FAST_TELEMETRY = "[telemetry]\ninterval_s = 0.1\npower_sample_s = 0.05\n"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """Mounts a 512 KiB tmpfs at a path: a disk that fills up, or turns read-only, on demand."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted: list[Path] = []

    def mount(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write until the file system is full."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return filler
    finally:
        os.close(fd)


def test_a_full_spool_disk_pauses_telemetry_with_a_gap_and_serving_goes_on(
    model_repo: Path, tmp_path: Path, small_fs: Callable[[Path], Path]
) -> None:
    work = tmp_path / "d"
    spool_dir = small_fs(work / "state" / "telemetry")
    with running_daemon(model_repo, work, FAST_TELEMETRY) as daemon:
        with InferenceLoad(daemon.port, clients=8) as load:
            load.wait_for_ok(50)
            filler = fill(spool_dir)
            daemon.wait_for_log("telemetry spool paused")
            load.wait_for_ok(200)  # still serving with the disk full
            filler.unlink()
            daemon.wait_for_log("telemetry spool writable again")
            load.wait_for_ok(50)
        assert load.failures == {}
        with urllib.request.urlopen(f"{daemon.url}/edged/v1/telemetry", timeout=10) as r:
            assert json.load(r)["record"]["seq"] > 0
        assert daemon.stop() == 0, daemon.log()
    assert "Traceback" not in daemon.log()


def test_a_spool_that_cannot_open_is_restarted_with_backoff_and_shown_in_status(
    model_repo: Path, tmp_path: Path
) -> None:
    work = tmp_path / "d"
    (work / "state").mkdir(parents=True)
    (work / "state" / "telemetry").write_text("a file where the spool directory should be")
    with running_daemon(model_repo, work, FAST_TELEMETRY) as daemon:
        with InferenceLoad(daemon.port, clients=4) as load:
            daemon.wait_for_log("service telemetry failed (restart 2)")
            load.wait_for_ok(100)
        assert load.failures == {}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "edged.cli.main",
                "status",
                "--json",
                "--socket",
                str(daemon.socket_path),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        services = {s["name"]: s for s in json.loads(done.stdout)["services"]}
        assert services["telemetry"]["restarts"] >= 2
        assert "cannot open telemetry spool" in services["telemetry"]["last_error"]
        assert services["reload"]["state"] == "running"
        assert daemon.stop() == 0, daemon.log()


def test_a_removed_notify_socket_and_a_broken_config_on_sighup_never_stop_serving(
    model_repo: Path, tmp_path: Path
) -> None:
    notify_dir = Path(tempfile.mkdtemp(prefix="edged-notify-"))
    address = notify_dir / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(address))
    receiver.settimeout(30)
    env = {"NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": "400000"}
    work = tmp_path / "d"
    try:
        with running_daemon(model_repo, work, env=env) as daemon:
            assert b"READY=1" in receiver.recv(4096)
            with InferenceLoad(daemon.port) as load:
                load.wait_for_ok(20)
                receiver.close()
                address.unlink()  # systemd's socket is gone: every notification now fails
                daemon.signal(signal.SIGHUP)  # RELOADING=1 and READY=1 cannot be sent
                daemon.wait_for_log("reloaded:")
                (work / "edged.toml").write_text("[server\nbroken = ")
                daemon.signal(signal.SIGHUP)
                daemon.wait_for_log("reload failed, keeping the running config")
                load.wait_for_ok(100)
            assert load.failures == {}
            assert daemon.stop() == 0, daemon.log()  # STOPPING=1 cannot be sent either
        assert "cannot notify systemd" in daemon.log()
    finally:
        receiver.close()


LOOP_INFER = "/v2/models/loop/infer"


def loop_request(iterations: int) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1], "datatype": "FP32", "data": [0.0]},
                {"name": "iterations", "shape": [1], "datatype": "INT64", "data": [iterations]},
            ]
        }
    ).encode()


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get_content_type(), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get_content_type(), exc.read()


def start_hung_request(url: str) -> threading.Thread:
    """A request whose run never ends (10^12 loop iterations): the worker is busy for good."""

    def call() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            post(url + LOOP_INFER, loop_request(10**12))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def timeouts_counted(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("edged_inference_timeouts_total{") and 'model="loop"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_deadline_that_passes_while_the_request_runs_answers_json_504_and_is_counted(
    loop_repo: Path, tmp_path: Path
) -> None:
    with running_daemon(loop_repo, tmp_path / "d", "[server]\ndrain_timeout_s = 1\n") as daemon:
        status, _, _ = post(daemon.url + LOOP_INFER, loop_request(2))
        assert status == 200
        status, content_type, body = post(
            daemon.url + LOOP_INFER, loop_request(10**12), {"Edged-Timeout-Ms": "300"}
        )
        assert status == 504
        assert content_type == "application/json"
        assert "deadline" in json.loads(body)["error"]
        assert timeouts_counted(daemon.url) == 1.0


def test_sigterm_with_requests_running_past_the_drain_timeout_closes_the_models_and_exits_0(
    loop_repo: Path, tmp_path: Path
) -> None:
    with running_daemon(loop_repo, tmp_path / "d", "[server]\ndrain_timeout_s = 1\n") as daemon:
        start_hung_request(daemon.url)
        deadline = time.monotonic() + 30
        while not worker_busy(daemon.url) and time.monotonic() < deadline:
            time.sleep(0.02)
        daemon.signal(signal.SIGTERM)
        code = daemon.process.wait(60)
    log = daemon.log()
    assert code == 0, log
    assert "1 request(s) still running after 1.0s" in log
    assert "model loop did not drain" in log
    assert "stopped (exit code 0)" in log
    assert "Traceback" not in log


def worker_busy(url: str) -> bool:
    """The hung request holds the worker: a probe with a tiny deadline times out queued."""
    code, _, _ = post(url + LOOP_INFER, loop_request(1), {"Edged-Timeout-Ms": "50"})
    return code == 504


def test_metrics_scrapes_while_models_swap_continuously_never_fail(
    model_repo: Path, tmp_path: Path
) -> None:
    with running_daemon(model_repo, tmp_path / "d", FAST_TELEMETRY) as daemon:
        failures: list[str] = []
        scrapes = 0
        stop = threading.Event()

        def scrape() -> None:
            nonlocal scrapes
            while not stop.is_set():
                try:
                    with urllib.request.urlopen(f"{daemon.url}/metrics", timeout=30) as r:
                        r.read()
                    scrapes += 1
                except (urllib.error.URLError, OSError) as exc:
                    failures.append(str(exc))

        scrapers = [threading.Thread(target=scrape, daemon=True) for _ in range(2)]
        for thread in scrapers:
            thread.start()
        with InferenceLoad(daemon.port, clients=2) as load:
            for _ in range(40):
                for model in ("mlp", "fc"):
                    status, _, body = post(f"{daemon.url}/v2/repository/models/{model}/load", b"{}")
                    assert status == 200, body
        stop.set()
        for thread in scrapers:
            thread.join(30)
        assert failures == []
        assert scrapes > 0
        assert load.failures == {}
