"""Pure parts of the fleet channel: topics, backoff, command encoding, replay window, ACL."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edged._backoff import Backoff
from edged._toml import loads as toml_loads
from edged.bundle.keys import generate_key
from edged.bundle.trust import load_trust_state
from edged.config import parse_config
from edged.errors import (
    BadSignatureError,
    BrokerRefusedError,
    ConfigError,
    ConnectFailedError,
    ConnectionLostError,
    FleetMessageError,
    MqttTimeoutError,
    ReplayedCommandError,
    StaleCommandError,
    TlsHandshakeError,
    UnknownKeyError,
)
from edged.fleet.acl import render_acl
from edged.transport.client import map_error
from edged.transport.protocol import (
    Command,
    Deployment,
    Progress,
    decode_command,
    encode_command,
    new_nonce,
)
from edged.transport.replay import NonceStore, NonceWindow
from edged.transport.topics import Target, Topics
from tests.support.daemon import REPO_ROOT
from tests.support.pki import SigningKeys

NOW = 1_800_000_000


# --- topics ----------------------------------------------------------------------------------


def test_topic_names_follow_the_documented_scheme() -> None:
    t = Topics("edged")
    dev, group = Target.device("device-1"), Target.group("lab")
    assert t.cmd(dev) == "edged/devices/device-1/cmd"
    assert t.deploy(group) == "edged/groups/lab/deploy"
    assert t.chunk(group, "ab" * 8, 7) == "edged/groups/lab/chunks/abababababababab/7"
    assert t.status("device-1") == "edged/devices/device-1/status"
    assert t.progress("device-1") == "edged/devices/device-1/progress"
    assert t.telemetry("device-1", "power") == "edged/devices/device-1/telemetry/power"
    assert t.replies("fleet-manager-1234") == "edged/replies/fleet-manager-1234"


def test_chunk_topics_parse_back_and_foreign_topics_do_not() -> None:
    t = Topics("site/edged")
    topic = t.chunk(Target.group("lab"), "0123456789abcdef", 12)
    assert t.parse_chunk(topic) == (Target.group("lab"), "0123456789abcdef", 12)
    for bad in (
        "site/edged/groups/lab/chunks/0123456789abcdef/012",
        "site/edged/groups/lab/chunks/NOTHEX0123456789/1",
        "site/edged/groups/lab/chunks/0123456789abcdef/x",
        "other/groups/lab/chunks/0123456789abcdef/1",
        "site/edged/devices/d/status",
    ):
        assert t.parse_chunk(bad) is None
    assert t.device_of("site/edged/devices/device-7/progress") == "device-7"
    assert t.device_of("site/edged/replies/x") is None


@pytest.mark.parametrize("name", ["", "a/b", "+", "#", "dev#1", "-lead", "x" * 65, "a b"])
def test_names_that_would_break_a_topic_level_are_refused(name: str) -> None:
    with pytest.raises(FleetMessageError):
        Target.device(name)


# --- backoff ---------------------------------------------------------------------------------


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    top = Backoff(0.5, 4.0, uniform=lambda lo, hi: hi)
    assert [top.next_delay_s() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    top.reset()
    assert top.next_delay_s() == 0.5
    low = Backoff(0.5, 4.0, jitter=0.5, uniform=lambda lo, hi: lo)
    assert [low.next_delay_s() for _ in range(4)] == [0.25, 0.5, 1.0, 2.0]
    real = Backoff(1.0, 8.0)
    delays = [real.next_delay_s() for _ in range(50)]
    assert all(0.5 <= d <= 8.0 for d in delays)
    assert len(set(delays)) > 40  # jittered, not in lockstep


# --- signed commands -------------------------------------------------------------------------


def _deployment(**overrides: object) -> dict[str, object]:
    value: dict[str, object] = {
        "id": "00" * 16,
        "model": "mlp",
        "version": 2,
        "size": 10,
        "sha256": "ab" * 32,
        "chunk_size": 256,
        "chunks": ["cd" * 32],
        "manifest": "{}",
        "manifest_signatures": [],
    }
    value.update(overrides)
    return value


def test_a_signed_command_verifies_and_any_edit_breaks_it(tmp_path: Path) -> None:
    keys = SigningKeys(tmp_path)
    trust = load_trust_state(keys.root_bytes(), keys.signers_bytes())
    now = int(time.time())  # the signers list the fixture makes expires in 30 days
    command = Command("ping", Target.group("lab"), now, new_nonce())
    wire = encode_command(command, [keys.signer])
    signed = decode_command(wire)
    assert signed.command == command
    trust.verify_command(signed.payload, signed.signatures, now)

    edited = json.loads(wire)
    edited["signed"]["target"] = "groups/other"
    forged = decode_command(json.dumps(edited).encode())
    with pytest.raises(BadSignatureError):
        trust.verify_command(forged.payload, forged.signatures, now)

    outsider = decode_command(encode_command(command, [generate_key()]))
    with pytest.raises(UnknownKeyError):
        trust.verify_command(outsider.payload, outsider.signatures, now)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"not json", "not valid JSON"),
        (b'{"signed": {}, "signatures": [], "x": 1}', "'x' is not known"),
        (b'{"signed": {"v": 2}, "signatures": []}', "version 2"),
        (b'{"signed": {"v": 1, "type": "reboot"}, "signatures": []}', "reboot"),
        (b'{"signed": {"v": 1.5}, "signatures": []}', "floats"),
    ],
)
def test_malformed_commands_are_refused_with_the_reason(wire: bytes, message: str) -> None:
    with pytest.raises(FleetMessageError, match=message):
        decode_command(wire)


def test_a_deployment_must_list_one_hash_per_chunk() -> None:
    ok = Deployment.from_json(_deployment(size=600, chunks=["cd" * 32] * 3))
    assert ok.chunk_span(2) == (512, 88)
    assert ok.transfer_key == f"{'ab' * 32}-256"
    with pytest.raises(FleetMessageError, match="make 3 chunks"):
        Deployment.from_json(_deployment(size=600, chunks=["cd" * 32] * 2))
    with pytest.raises(FleetMessageError, match="chunk_size"):
        Deployment.from_json(_deployment(chunk_size=1))
    with pytest.raises(FleetMessageError, match="'id'"):
        Deployment.from_json(_deployment(id="../../etc"))


def test_progress_round_trips_and_reports_percent() -> None:
    p = Progress("device-1", "00" * 16, "mlp", 2, "received", 14, 33, 11)
    assert Progress.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert p.to_json()["percent"] == 42
    assert not p.terminal


# --- replay window ---------------------------------------------------------------------------


def test_a_nonce_is_accepted_once_and_stale_or_future_commands_never() -> None:
    window = NonceWindow(max_age_s=300)
    window.check("a" * 32, NOW, NOW + 10)
    window.record("a" * 32, NOW)
    with pytest.raises(ReplayedCommandError):
        window.check("a" * 32, NOW, NOW + 20)
    with pytest.raises(StaleCommandError, match="older than 300s"):
        window.check("b" * 32, NOW - 301, NOW)
    with pytest.raises(StaleCommandError, match="future"):
        window.check("c" * 32, NOW + 61, NOW)
    window.prune(NOW + 400)
    assert window.seen == {}


def test_seen_nonces_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "nonces.json"
    NonceStore(path, 300).check_and_record("a" * 32, NOW, NOW)
    again = NonceStore(path, 300)
    with pytest.raises(ReplayedCommandError):
        again.check_and_record("a" * 32, NOW, NOW + 1)
    again.check_and_record("b" * 32, NOW + 500, NOW + 500)  # prunes the old one
    assert set(json.loads(path.read_text())) == {"b" * 32}
    assert path.stat().st_mode & 0o077 == 0


# --- ACL -------------------------------------------------------------------------------------


def test_the_shipped_acl_is_what_the_generator_makes_of_the_shipped_inventory() -> None:
    folder = REPO_ROOT / "docs" / "mosquitto"
    inventory = toml_loads((folder / "inventory.toml").read_text())
    assert render_acl(Topics("edged"), inventory["groups"]) == (folder / "edged.acl").read_text()


def test_acl_grants_devices_their_own_topics_and_groups_by_user_block() -> None:
    acl = render_acl(Topics("edged"), {"device-1": ["lab"], "device-2": []}).splitlines()
    assert "pattern read edged/devices/%u/cmd" in acl
    assert "pattern write edged/devices/%u/status" in acl
    assert not any(line.startswith("pattern readwrite") for line in acl)
    assert acl[acl.index("user device-1") + 1] == "topic read edged/groups/lab/cmd"
    assert "user device-2" not in acl


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mqtt", "key_path"),
    [
        ({"groups": ["lab", "a/b"]}, "mqtt.groups"),
        ({"groups": ["#"]}, "mqtt.groups"),
        ({"topic_prefix": "edged/+"}, "mqtt.topic_prefix"),
        ({"enabled": True, "ca_file": "ca.crt"}, "mqtt.cert_file"),
    ],
)
def test_bad_mqtt_config_names_its_key(mqtt: dict[str, object], key_path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"mqtt": mqtt}, Path("/etc/edged"))
    assert info.value.key_path == key_path


def test_mqtt_config_defaults_are_safe() -> None:
    cfg = parse_config({"mqtt": {"groups": ["lab"], "session_expiry_s": 60}}, Path("/"))
    assert cfg.mqtt.groups == ("lab",) and cfg.mqtt.session_expiry_s == 60
    assert not cfg.mqtt.enabled
    assert cfg.mqtt.operation_timeout_s == 10.0


# --- error mapping ---------------------------------------------------------------------------


def test_library_errors_become_the_most_specific_transport_error() -> None:
    refused = map_error(MqttConnectError(ReasonCode(PacketTypes.CONNACK, "Not authorized")), "x")
    assert isinstance(refused, BrokerRefusedError) and "Not authorized" in str(refused)
    assert isinstance(map_error(aiomqtt.MqttError("Operation timed out"), "x"), MqttTimeoutError)
    tls = map_error(
        ssl.SSLError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"), "x"
    )
    assert isinstance(tls, TlsHandshakeError) and "mqtt.ca_file" in str(tls)
    refused_tcp = map_error(ConnectionRefusedError(111, "Connection refused"), "connecting")
    assert isinstance(refused_tcp, ConnectFailedError) and "connecting" in str(refused_tcp)
    lost = map_error(aiomqtt.MqttError("Disconnected during message iteration"), "waiting")
    assert isinstance(lost, ConnectionLostError)
