"""Fast checks of the packaging sources: the shipped config, the maintainer scripts, and the paths
the unit, the postinst and build-deb.sh must agree on. The package itself is built and installed
by test_package_install.py (opt-in)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edged.config import DaemonConfig, load_config

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
SCRIPTS = [PACKAGING / "debian" / name for name in ("postinst", "prerm", "postrm")]


def test_shipped_config_loads_and_keeps_state_under_var_lib() -> None:
    config = load_config(PACKAGING / "edged.toml")
    assert config.models.repository == Path("/var/lib/edged/seed")  # not the bundle store
    assert config.state.directory == Path("/var/lib/edged")
    assert config.server.host == "127.0.0.1"
    assert not config.mqtt.enabled


def test_every_commented_out_default_in_the_shipped_config_is_a_real_key(tmp_path: Path) -> None:
    # Uncommenting any "#key = value" line must give a valid config (typos would be errors).
    lines = (PACKAGING / "edged.toml").read_text().splitlines()
    uncommented = [
        re.sub(r"^#(\w+ = )", r"\1", line) if re.match(r"^#\w+ = ", line) else line
        for line in lines
    ]
    assert uncommented != lines
    path = tmp_path / "edged.toml"
    text = "\n".join(uncommented).replace("enabled = false", "enabled = true", 1)
    path.write_text(text)
    config = load_config(path)
    assert isinstance(config, DaemonConfig)
    assert config.mqtt.key_file == Path("/etc/edged/mqtt/device.key")


def test_unit_postinst_and_build_script_agree_on_the_venv_path() -> None:
    unit = (REPO / "systemd/edged.service").read_text()
    postinst = (PACKAGING / "debian/postinst").read_text()
    build = (PACKAGING / "build-deb.sh").read_text()
    assert "ExecStart=/opt/edged/venv/bin/edged " in unit
    assert "VENV_LINK=/opt/edged/venv\n" in postinst
    assert 'ln -s /opt/edged/venv/bin/edged "$ROOT/usr/bin/edged"' in build


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_maintainer_script_is_valid_posix_sh(script: Path) -> None:
    assert script.read_text().startswith("#!/bin/sh\n")
    assert "\nset -e\n" in script.read_text()
    subprocess.run(["sh", "-n", str(script)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shell_scripts_pass_shellcheck() -> None:
    result = subprocess.run(
        ["shellcheck", "-s", "sh", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout
    result = subprocess.run(
        ["shellcheck", str(PACKAGING / "build-deb.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout
