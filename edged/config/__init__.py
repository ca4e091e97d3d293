"""The daemon's typed config (``daemon``: one frozen dataclass per subsystem, validated once at
load, every error naming its key path) and the names it validates for the fleet channel."""

from edged.config.daemon import (
    DEFAULT_CONFIG_PATH,
    DaemonConfig,
    ModelsConfig,
    MqttConfig,
    ServerConfig,
    StateConfig,
    TelemetryConfig,
    default_socket_path,
    load_config,
    parse_config,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DaemonConfig",
    "ModelsConfig",
    "MqttConfig",
    "ServerConfig",
    "StateConfig",
    "TelemetryConfig",
    "default_socket_path",
    "load_config",
    "parse_config",
]
