"""The shipped systemd files pass systemd's own checks: verify, security, sysusers, tmpfiles.

``systemd-analyze verify`` insists that ExecStart=/ExecReload= binaries exist, and the unit's
binary lives in the package's venv (/opt/edged/venv). So the checks run with ``--root`` on a
throw-away tree laid out like an installed system: the host's unit directory (for the targets
the unit orders against), stub executables at the unit's command paths, and our files where the
package installs them. Nothing is written to the host.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO / "systemd"
UNIT = SYSTEMD_DIR / "edged.service"
JETSON_DROPIN = SYSTEMD_DIR / "jetson-gpu.conf"
DROPINS = [JETSON_DROPIN, SYSTEMD_DIR / "rpi5-power.conf"]
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)

_ENV = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}


def _unit_settings(path: Path) -> dict[str, list[str]]:
    """KEY -> values of a unit file, in order (keys may repeat, so not configparser)."""
    settings: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _command_paths(unit: Path) -> list[str]:
    settings = _unit_settings(unit)
    return [
        value.lstrip("-@:+!").split()[0]
        for key in (
            "ExecStart",
            "ExecReload",
            "ExecStop",
            "ExecStartPre",
            "ExecStartPost",
            "ExecStopPost",
        )
        for value in settings.get(key, [])
        if value
    ]


def _host_unit_dir() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "multi-user.target").exists():
            return candidate
    pytest.skip("the host has no systemd unit directory to order the unit against")


@pytest.fixture(scope="module")
def system_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree laid out like a device with the package installed (no drop-ins yet)."""
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(_host_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    shutil.copy(UNIT, root / "usr/lib/systemd/system/edged.service")
    for command in _command_paths(UNIT):
        stub = root / command.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    return root


@pytest.fixture
def dropin_dir(system_root: Path) -> Iterator[Path]:
    directory = system_root / "etc/systemd/system/edged.service.d"
    directory.mkdir()
    yield directory
    shutil.rmtree(directory)


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *args], capture_output=True, text=True, env=_ENV, timeout=60, check=False
    )


def _verify_findings(root: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about edged.service; [] when clean."""
    result = _analyze("verify", f"--root={root}", "--man=no", "edged.service")
    findings = [line for line in (result.stdout + result.stderr).splitlines() if "edged" in line]
    if result.returncode != 0 and not findings:
        findings = [f"exit status {result.returncode}: {result.stderr.strip()}"]
    return findings


def _exposure(*args: str) -> float:
    result = _analyze("security", "--offline=true", *args)
    match = re.search(r"Overall exposure level for edged\.service: (\d+\.\d+)", result.stdout)
    assert match, f"no exposure line in:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1))


# --- verify --------------------------------------------------------------------------------


def test_unit_verifies_clean(system_root: Path) -> None:
    assert _verify_findings(system_root) == []


@pytest.mark.parametrize("dropin", DROPINS, ids=lambda p: p.name)
def test_unit_with_each_shipped_dropin_verifies_clean(
    system_root: Path, dropin_dir: Path, dropin: Path
) -> None:
    shutil.copy(dropin, dropin_dir / dropin.name)
    assert _verify_findings(system_root) == []


def test_verify_harness_reports_a_broken_setting(system_root: Path, dropin_dir: Path) -> None:
    # Guards against a vacuous pass: systemd only warns ("ignoring") about bad lines.
    (dropin_dir / "broken.conf").write_text("[Service]\nProtectSystem=sometimes\nNoSuchKey=1\n")
    findings = _verify_findings(system_root)
    assert any("broken.conf:2:" in line for line in findings), findings
    assert any("NoSuchKey" in line for line in findings), findings


def test_verify_harness_reports_a_missing_binary(tmp_path: Path, system_root: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(system_root, root, symlinks=True)
    (root / "opt/edged/venv/bin/edged").unlink()
    assert any("/opt/edged/venv/bin/edged" in line for line in _verify_findings(root))


# --- security exposure ---------------------------------------------------------------------


def test_security_exposure_is_at_most_two() -> None:
    assert _exposure(str(UNIT)) <= MAX_EXPOSURE


@pytest.mark.parametrize("dropin", DROPINS, ids=lambda p: p.name)
def test_security_exposure_with_each_shipped_dropin_is_at_most_two(
    system_root: Path, dropin_dir: Path, dropin: Path
) -> None:
    shutil.copy(dropin, dropin_dir / dropin.name)
    assert _exposure(f"--root={system_root}", "edged.service") <= MAX_EXPOSURE


# --- what the package and the daemon rely on ------------------------------------------------


def test_unit_is_the_notify_contract_the_daemon_implements() -> None:
    settings = _unit_settings(UNIT)
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["WatchdogSec"] == ["30"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["ExecStart"] == ["/opt/edged/venv/bin/edged run --config /etc/edged/edged.toml"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_unit_runs_as_the_user_sysusers_creates() -> None:
    settings = _unit_settings(UNIT)
    entries = [
        line.split()
        for line in (SYSTEMD_DIR / "edged.sysusers").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert entries[0][:2] == ["u", "edged"]
    assert settings["User"] == ["edged"]
    assert settings["Group"] == ["edged"]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers missing")
def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    target = tmp_path / "usr/lib/sysusers.d"
    target.mkdir(parents=True)
    shutil.copy(SYSTEMD_DIR / "edged.sysusers", target / "edged.conf")
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", "edged.conf"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    lines = (tmp_path / "etc/passwd").read_text().splitlines()
    passwd = {line.split(":")[0]: line.split(":") for line in lines}
    assert passwd["edged"][5] == "/var/lib/edged"
    assert passwd["edged"][6].endswith("nologin")
    assert "edged:" in (tmp_path / "etc/group").read_text()


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="systemd-tmpfiles missing")
@pytest.mark.skipif(os.geteuid() != 0, reason="creating root/edged-owned directories needs root")
def test_tmpfiles_creates_private_config_and_state_directories(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for kind, name in (("sysusers.d", "edged.sysusers"), ("tmpfiles.d", "edged.tmpfiles")):
        (tmp_path / "usr/lib" / kind).mkdir(parents=True)
        shutil.copy(SYSTEMD_DIR / name, tmp_path / "usr/lib" / kind / "edged.conf")
    for command in (["systemd-sysusers"], ["systemd-tmpfiles", "--create"]):
        subprocess.run(
            [*command, f"--root={tmp_path}", "edged.conf"],
            check=True,
            capture_output=True,
            timeout=60,
        )
    uid = int((tmp_path / "etc/passwd").read_text().split("edged:x:")[1].split(":")[0])
    config, state = (tmp_path / "etc/edged").stat(), (tmp_path / "var/lib/edged").stat()
    assert (config.st_uid, config.st_gid, config.st_mode & 0o7777) == (0, uid, 0o750)
    assert (state.st_uid, state.st_mode & 0o7777) == (uid, 0o750)
