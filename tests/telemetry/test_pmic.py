"""Raspberry Pi 5 power from its PMIC: the real parser on the firmware's output format, the
real discovery and command runner against a fake ``vcgencmd`` on the PATH, and a real daemon
that reports the rails and energy per inference from it (``/metrics``, the telemetry record,
``edged doctor``)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from edged.config import DaemonConfig, TelemetryConfig
from edged.daemon.doctor import PASS, WARN, check_power
from edged.errors import PowerSourceError
from edged.telemetry.pmic import PmicSource, parse_pmic_adc
from edged.telemetry.power import discover_power_sources
from tests.support.daemon import SAMPLE_MODELS, running_daemon
from tests.support.metrics import samples

from .pi5 import PI5, PMIC_RAIL_WATTS, PMIC_READ_ADC, PMIC_TOTAL_W, fake_vcgencmd, path_with
from .sysfs_trees import ORIN_NANO, Tree

Sysfs = Callable[[Tree], Path]


@pytest.fixture
def vcgencmd_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = fake_vcgencmd(tmp_path / "bin")
    monkeypatch.setenv("PATH", path_with(directory))
    return directory


def test_the_firmwares_output_gives_watts_for_every_rail_with_current_and_voltage() -> None:
    channels = parse_pmic_adc(PMIC_READ_ADC)
    assert channels.volts["EXT5V"] == 5.12  # the input: a voltage, no current
    watts = channels.watts()
    assert watts == pytest.approx(PMIC_RAIL_WATTS)
    assert list(watts) == list(PMIC_RAIL_WATTS)  # in the firmware's order
    assert "EXT5V" not in watts and "BATT" not in watts
    assert sum(watts.values()) == pytest.approx(PMIC_TOTAL_W)
    assert watts["VDD_CORE"] == pytest.approx(2.8)


def test_lines_of_another_shape_or_with_the_wrong_unit_are_ignored() -> None:
    text = (
        'error=1 error_msg="Command not registered"\n'
        "  VDD_CORE_A current(7)=1.50000000V\n"  # an ampere channel in volts: not trusted
        "  VDD_CORE_V volt(15)=0.80000000V\n"
        "    HDMI_A current(22)=0.02000000A\n"
        "    HDMI_V volt(23)=5.00000000V\n"
    )
    assert parse_pmic_adc(text).watts() == pytest.approx({"HDMI": 0.1})
    assert parse_pmic_adc("").watts() == {}


def test_a_pi5_with_vcgencmd_reports_pmic_rails_and_their_sum_as_the_total(
    sysfs: Sysfs, vcgencmd_on_path: Path
) -> None:
    monitor = discover_power_sources(sysfs(PI5))
    assert [s.name for s in monitor.sources] == ["pmic:vcgencmd"]
    assert monitor.sources[0].rails == list(PMIC_RAIL_WATTS)
    reading = monitor.read()
    assert reading.rails == pytest.approx(PMIC_RAIL_WATTS)
    assert reading.total_watts == pytest.approx(PMIC_TOTAL_W)
    assert reading.total_scope == "pmic"
    assert reading.total_source == "sum of 12 PMIC rails (pmic:vcgencmd)"
    assert not reading.total_interval_average  # instantaneous ADC samples: LINEAR energy
    calls = (vcgencmd_on_path / "calls").read_text().splitlines()
    assert set(calls) == {"pmic_read_adc"}


def test_configured_total_rails_may_name_pmic_rails(sysfs: Sysfs, vcgencmd_on_path: Path) -> None:
    monitor = discover_power_sources(sysfs(PI5), total_rails=["VDD_CORE", "DDR_VDD2"])
    reading = monitor.read()
    assert reading.total_watts == pytest.approx(2.8 + 0.198)
    assert reading.total_scope == "configured"


def test_other_boards_never_run_vcgencmd(sysfs: Sysfs, vcgencmd_on_path: Path) -> None:
    monitor = discover_power_sources(sysfs(ORIN_NANO))
    assert "pmic:vcgencmd" not in [s.name for s in monitor.sources]
    assert not (vcgencmd_on_path / "calls").exists()


def test_a_pi5_without_vcgencmd_says_what_to_install(
    sysfs: Sysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with caplog.at_level(logging.WARNING):
        monitor = discover_power_sources(sysfs(PI5))
    assert not monitor.available
    assert "raspi-utils" in caplog.text


def test_a_failing_vcgencmd_gives_no_total_and_doctor_says_why(
    sysfs: Sysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = fake_vcgencmd(
        tmp_path / "bin", body='echo "VCHI initialization failed" >&2; exit 1\n'
    )
    monkeypatch.setenv("PATH", path_with(failing))
    root = sysfs(PI5)
    monitor = discover_power_sources(root)
    reading = monitor.read()
    assert reading.rails == {} and reading.total_watts is None
    assert "VCHI initialization failed" in monitor.failures["pmic:vcgencmd"]
    check = check_power(DaemonConfig(telemetry=TelemetryConfig(sysfs_root=root)))
    assert check.status == WARN
    assert "/dev/vcio" in check.detail and "VCHI initialization failed" in check.detail


def test_a_hung_vcgencmd_is_killed_with_what_it_started(tmp_path: Path) -> None:
    # The script's child (sleep) holds the output pipe: only killing the group ends the read.
    hung = fake_vcgencmd(tmp_path / "bin", body="sleep 600\n")
    source = PmicSource(str(hung / "vcgencmd"), timeout_s=0.2)
    with pytest.raises(PowerSourceError, match="did not answer within 0.2 s"):
        source.read()


def test_a_missing_executable_is_a_power_source_error(tmp_path: Path) -> None:
    with pytest.raises(PowerSourceError, match="cannot run"):
        PmicSource(str(tmp_path / "gone" / "vcgencmd")).read()


def test_doctor_shows_the_pi5_rails_and_total(sysfs: Sysfs, vcgencmd_on_path: Path) -> None:
    check = check_power(DaemonConfig(telemetry=TelemetryConfig(sysfs_root=sysfs(PI5))))
    assert check.status == PASS
    assert check.detail == (
        "pmic:vcgencmd: 12 rails; total 4.31 W (pmic) from sum of 12 PMIC rails (pmic:vcgencmd)"
    )


@pytest.mark.integration
def test_edged_doctor_prints_the_pi5_power_from_the_fixture(
    sysfs: Sysfs, tmp_path: Path, vcgencmd_on_path: Path
) -> None:
    config = tmp_path / "edged.toml"
    config.write_text(
        f"[state]\ndirectory = {json.dumps(str(tmp_path / 'state'))}\n"
        f"[telemetry]\nsysfs_root = {json.dumps(str(sysfs(PI5)))}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "edged.cli.main", "doctor", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    checks = {c["item"]: c for c in json.loads(done.stdout)}
    assert checks["power sensors"]["status"] == PASS, done.stdout + done.stderr
    assert "total 4.31 W (pmic)" in checks["power sensors"]["detail"]


def _infer(url: str, model: str, width: int) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, width], "datatype": "FP32",
                        "data": [0.25] * width}]}  # fmt: skip
    request = urllib.request.Request(f"{url}/v2/models/{model}/infer", json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


@pytest.mark.integration
def test_a_daemon_on_a_pi5_reports_pmic_power_and_energy_per_inference(
    sysfs: Sysfs, tmp_path: Path, vcgencmd_on_path: Path
) -> None:
    config = (
        "[telemetry]\n"
        f"sysfs_root = {json.dumps(str(sysfs(PI5)))}\n"
        "interval_s = 0.5\n"
        "power_sample_s = 0.1\n"
    )
    env = {"PATH": path_with(vcgencmd_on_path)}
    with running_daemon(SAMPLE_MODELS, tmp_path / "d", config, env=env) as daemon:
        for _ in range(20):
            _infer(daemon.url, "mlp", 64)
        # Energy is attributed once its time has settled (settle_delay_s behind the clock):
        # poll the real state, bounded.
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(f"{daemon.url}/metrics", timeout=10) as response:
                body = response.read()
            found = samples(body)
            key = (("model", "mlp"), ("version", "1"))
            attributed = found.get(("edged_energy_attributed_requests_total", key), 0.0)
            if attributed > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert attributed > 0, body.decode()
        assert found["edged_energy_joules_total", key] > 0
        board = [v for (name, labels), v in found.items() if name == "edged_board_power_watts"]
        assert board == [pytest.approx(PMIC_TOTAL_W)]
        assert (
            "edged_board_power_watts",
            (("scope", "pmic"), ("source", "sum of 12 PMIC rails (pmic:vcgencmd)")),
        ) in found
        assert found["edged_power_watts", (("rail", "VDD_CORE"),)] == pytest.approx(2.8)
        with urllib.request.urlopen(f"{daemon.url}/edged/v1/telemetry", timeout=10) as response:
            record = json.loads(response.read())["record"]
        assert record["power"]["scope"] == "pmic"
        assert record["power"]["rails"]["VDD_CORE"] == pytest.approx(2.8)
