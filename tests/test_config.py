"""Daemon config validation: every error names its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edged.config import load_config, parse_config
from edged.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "key_path", "reason"),
    [
        ('[server]\nport = "x"\n', "server.port", "expected an integer"),
        ("[server]\nport = 70000\n", "server.port", "must be <= 65535"),
        ("[server]\nshared_memory = 1\n", "server.shared_memory", "expected true or false"),
        ('[server]\nsocket_mode = "999"\n', "server.socket_mode", "octal"),
        ('[models]\nmemory_policy = "yolo"\n', "models.memory_policy", "must be one of"),
        ("[models]\nmemory_reserve_bytes = -1\n", "models.memory_reserve_bytes", "must be >= 0"),
        ("[telemetry]\ninterval_s = true\n", "telemetry.interval_s", "got a boolean"),
        ("[mqtt]\nenabled = true\n", "mqtt.ca_file", "required when mqtt.enabled"),
        ("[mqtt]\ngroups = [1]\n", "mqtt.groups[0]", "expected a string"),
        ("[serverr]\n", "serverr", "unknown key"),
        ("[server]\nprot = 1\n", "server.prot", "unknown key"),
    ],
)
def test_invalid_values_name_the_key_path(
    tmp_path: Path, text: str, key_path: str, reason: str
) -> None:
    path = tmp_path / "edged.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key_path == key_path
    assert reason in str(info.value)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    config = parse_config(
        {"models": {"repository": "models"}, "state": {"directory": "/var/lib/x"}}, tmp_path
    )
    assert config.models.repository == tmp_path / "models"
    assert config.state.directory == Path("/var/lib/x")


def test_not_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "edged.toml"
    path.write_text("[server\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(path)


def test_config_check_command(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[server]\nport = 8002\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = -5\n")
    edged = [sys.executable, "-m", "edged.cli.main", "config", "check"]
    ok = subprocess.run([*edged, str(good)], capture_output=True, text=True)
    assert ok.returncode == 0
    assert "ok" in ok.stdout
    fail = subprocess.run([*edged, str(bad)], capture_output=True, text=True)
    assert fail.returncode == 1
    assert fail.stderr.strip() == "edged: error: server.port: must be >= 0; got -5"


def test_grpc_port_defaults_to_8001_turns_off_with_0_and_must_differ_from_the_http_port(
    tmp_path: Path,
) -> None:
    path = tmp_path / "edged.toml"
    path.write_text("")
    assert load_config(path).server.grpc_port == 8001
    path.write_text('[server]\ngrpc_port = 0\nsocket = "/run/edged/edged.sock"\n')
    off = load_config(path).server
    assert off.grpc_port == 0 and off.grpc_socket_path is None
    path.write_text('[server]\nsocket = "/run/edged/edged.sock"\n')
    assert load_config(path).server.grpc_socket_path == Path("/run/edged/edged-grpc.sock")
    path.write_text("[server]\nport = 8001\n")
    with pytest.raises(ConfigError, match=r"server\.grpc_port: must differ from server\.port"):
        load_config(path)
    path.write_text("[server]\ngrpc_port = 70000\n")
    with pytest.raises(ConfigError, match=r"server\.grpc_port: must be <= 65535"):
        load_config(path)
