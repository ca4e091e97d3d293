"""The fleet agent's settings: the ``[mqtt]`` section plus the device id, the state folder and
the agent's own pacing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edged.config import MqttConfig
from edged.errors import ConfigError
from edged.transport.tls import TlsFiles
from edged.transport.topics import Topics


@dataclass(frozen=True)
class AgentSettings:
    device_id: str
    mqtt: MqttConfig
    state_dir: Path  # <state>/transport
    chunk_window: int = 64  # chunk topics subscribed at once
    status_refresh_s: float = 2.0  # how often model changes are looked for
    resume_max_age_s: float = 7 * 24 * 3600  # a download older than this is not resumed
    shutdown_publish_s: float = 2.0  # time allowed for the "offline" status at shutdown

    @property
    def topics(self) -> Topics:
        return Topics(self.mqtt.topic_prefix)

    @property
    def tls(self) -> TlsFiles:
        m = self.mqtt
        if m.ca_file is None or m.cert_file is None or m.key_file is None:
            raise ConfigError("mqtt", "ca_file, cert_file and key_file are required")
        return TlsFiles(m.ca_file, m.cert_file, m.key_file)
