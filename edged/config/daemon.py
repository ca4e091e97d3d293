"""The daemon's typed config: one frozen dataclass per subsystem, validated once at load.

The file is TOML (``/etc/edged/edged.toml`` on a device). Every key is optional; defaults are
safe for a development machine. An invalid value raises ``ConfigError`` naming its key path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from edged._toml import Table, load_toml_file
from edged.config.names import NAME_RE, PREFIX_RE

DEFAULT_CONFIG_PATH = Path("/etc/edged/edged.toml")


def default_socket_path() -> Path:
    """systemd's ``$RUNTIME_DIRECTORY`` (the unit's), else ``$XDG_RUNTIME_DIR``, else /tmp."""
    runtime_dir = os.environ.get("RUNTIME_DIRECTORY") or os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime_dir or "/tmp") / "edged.sock"  # noqa: S108 - per-user fallback


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # KServe v2 gRPC (inference.GRPCInferenceService) on the same host; 0 turns gRPC off.
    grpc_port: int = 8001
    socket_path: Path | None = None
    socket_mode: int = 0o660
    max_body_bytes: int = 64 * 1024 * 1024
    shared_memory_enabled: bool = False
    drain_timeout_s: float = 10.0
    # After SIGTERM, keep answering new requests with 503 + Retry-After this long before the
    # listeners close, so clients learn to go elsewhere instead of finding a reset connection.
    drain_grace_s: float = 0.5
    # A worker inside one run for longer than this counts as hung: watchdog pings stop.
    worker_stuck_after_s: float = 60.0
    # Front-end processes (HTTP parsing, tensor coding) beside the one engine process.
    # -1: chosen from the CPU budget (edged.runtime.budget.front_ends); 0: one process, the
    # engine in the daemon's own process (no isolation, the smallest footprint).
    workers: int = -1

    @property
    def grpc_socket_path(self) -> Path | None:
        """gRPC's Unix socket, beside the HTTP one (``edged.sock`` -> ``edged-grpc.sock``):
        where the repository extension's load and unload are accepted."""
        if self.socket_path is None or not self.grpc_port:
            return None
        path = self.socket_path
        return path.with_name(f"{path.stem}-grpc{path.suffix}")


@dataclass(frozen=True)
class ModelsConfig:
    repository: Path = Path("models")
    # What to do when the old and new version of a model cannot both fit in memory.
    memory_policy: str = "refuse"  # "refuse" | "unload-first"
    memory_reserve_bytes: int = 64 * 1024 * 1024
    # Budget for all loaded models together (0: whatever the system has available).
    memory_limit_bytes: int = 0
    # Inference threads of all models together, split evenly between them (a model's own
    # [runtime] intra_op_threads wins). 0: the usable cores - 1, at least 1, so that the event
    # loop keeps a core under load.
    inference_threads: int = 0


@dataclass(frozen=True)
class StateConfig:
    directory: Path = Path("/var/lib/edged")
    keep_versions: int = 3


MIN_ARTIFACT_REQUEST_BYTES = 4096


@dataclass(frozen=True)
class MqttConfig:
    enabled: bool = False
    host: str = "localhost"
    port: int = 8883
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    groups: tuple[str, ...] = ()
    topic_prefix: str = "edged"
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    download_stall_timeout_s: float = 60.0
    max_bundle_bytes: int = 512 * 1024 * 1024
    command_max_age_s: float = 300.0
    # How long the broker keeps this device's session (subscriptions, queued QoS 1 messages).
    session_expiry_s: int = 7 * 24 * 3600
    # Every broker operation (connect, publish, subscribe) gives up after this long.
    operation_timeout_s: float = 10.0
    # Free space that must remain on the state directory's file system after a download.
    download_reserve_bytes: int = 64 * 1024 * 1024
    # Received-% progress reports are sent at most this often.
    progress_interval_s: float = 0.5
    # A deployment whose install crashed the daemon this many times is reported failed.
    max_install_crashes: int = 3
    # Bundles announced with mirror URLs (HTTPS artifacts): the CA that vouches for the
    # artifact servers (None: the system trust store), and whether to present the device's
    # own client certificate (cert_file/key_file) to them (a private artifact store).
    artifact_ca_file: Path | None = None
    artifact_client_cert: bool = False
    # One HTTP Range request asks for at most this many bytes (then the next request).
    artifact_request_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class TelemetryConfig:
    enabled: bool = True
    interval_s: float = 10.0
    spool_max_bytes: int = 16 * 1024 * 1024
    backfill_per_s: float = 20.0
    sysfs_root: Path = Path("/sys")
    power_sample_s: float = 0.5
    # Rails whose sum is the board total, when the automatic choice does not fit the board.
    total_rails: tuple[str, ...] = ()


@dataclass(frozen=True)
class DaemonConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    state: StateConfig = field(default_factory=StateConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    source: Path | None = None


def _server(t: Table, base: Path) -> ServerConfig:
    d = ServerConfig()
    socket = t.optional_str("socket")
    mode_text = t.string("socket_mode", oct(d.socket_mode)[2:])
    try:
        mode = int(mode_text, 8)
    except ValueError:
        from edged.errors import ConfigError

        raise ConfigError(
            t.key_path("socket_mode"), f"must be an octal mode like '660'; got {mode_text!r}"
        ) from None
    cfg = ServerConfig(
        host=t.string("host", d.host),
        port=t.integer("port", d.port, 0, 65535),
        grpc_port=t.integer("grpc_port", d.grpc_port, 0, 65535),
        socket_path=(base / socket if socket and not Path(socket).is_absolute() else Path(socket))
        if socket
        else None,
        socket_mode=mode,
        max_body_bytes=t.integer("max_body_bytes", d.max_body_bytes, 1024),
        shared_memory_enabled=t.boolean("shared_memory", d.shared_memory_enabled),
        drain_timeout_s=t.number("drain_timeout_s", d.drain_timeout_s, 0.0),
        drain_grace_s=t.number("drain_grace_s", d.drain_grace_s, 0.0),
        worker_stuck_after_s=t.number("worker_stuck_after_s", d.worker_stuck_after_s, 0.1),
        workers=t.integer("workers", d.workers, -1, 256),
    )
    t.reject_unknown()
    if cfg.grpc_port and cfg.grpc_port == cfg.port:
        from edged.errors import ConfigError

        raise ConfigError(
            t.key_path("grpc_port"),
            f"must differ from server.port (both are {cfg.port}); set another port, or 0 to "
            "turn gRPC off",
        )
    return cfg


def _models(t: Table, base: Path) -> ModelsConfig:
    d = ModelsConfig()
    cfg = ModelsConfig(
        repository=t.path("repository", d.repository, base),
        memory_policy=t.string("memory_policy", d.memory_policy, ("refuse", "unload-first")),
        memory_reserve_bytes=t.integer("memory_reserve_bytes", d.memory_reserve_bytes, 0),
        memory_limit_bytes=t.integer("memory_limit_bytes", d.memory_limit_bytes, 0),
        inference_threads=t.integer("inference_threads", d.inference_threads, 0, 1024),
    )
    t.reject_unknown()
    return cfg


def _state(t: Table, base: Path) -> StateConfig:
    d = StateConfig()
    cfg = StateConfig(
        directory=t.path("directory", d.directory, base),
        keep_versions=t.integer("keep_versions", d.keep_versions, 1, 100),
    )
    t.reject_unknown()
    return cfg


def _mqtt(t: Table, base: Path) -> MqttConfig:
    d = MqttConfig()

    def opt_path(key: str) -> Path | None:
        v = t.optional_str(key)
        return None if v is None else (Path(v) if Path(v).is_absolute() else base / v)

    cfg = MqttConfig(
        enabled=t.boolean("enabled", d.enabled),
        host=t.string("host", d.host),
        port=t.integer("port", d.port, 1, 65535),
        ca_file=opt_path("ca_file"),
        cert_file=opt_path("cert_file"),
        key_file=opt_path("key_file"),
        groups=t.strings("groups"),
        topic_prefix=t.string("topic_prefix", d.topic_prefix),
        keepalive_s=t.integer("keepalive_s", d.keepalive_s, 5, 3600),
        reconnect_min_s=t.number("reconnect_min_s", d.reconnect_min_s, 0.01),
        reconnect_max_s=t.number("reconnect_max_s", d.reconnect_max_s, 0.1),
        download_stall_timeout_s=t.number(
            "download_stall_timeout_s", d.download_stall_timeout_s, 0.1
        ),
        max_bundle_bytes=t.integer("max_bundle_bytes", d.max_bundle_bytes, 1024),
        command_max_age_s=t.number("command_max_age_s", d.command_max_age_s, 1.0),
        session_expiry_s=t.integer("session_expiry_s", d.session_expiry_s, 0, 2**32 - 1),
        operation_timeout_s=t.number("operation_timeout_s", d.operation_timeout_s, 0.1),
        download_reserve_bytes=t.integer("download_reserve_bytes", d.download_reserve_bytes, 0),
        progress_interval_s=t.number("progress_interval_s", d.progress_interval_s, 0.0),
        max_install_crashes=t.integer("max_install_crashes", d.max_install_crashes, 1, 1000),
        artifact_ca_file=opt_path("artifact_ca_file"),
        artifact_client_cert=t.boolean("artifact_client_cert", d.artifact_client_cert),
        artifact_request_bytes=t.integer(
            "artifact_request_bytes", d.artifact_request_bytes, MIN_ARTIFACT_REQUEST_BYTES
        ),
    )
    t.reject_unknown()
    from edged.errors import ConfigError

    if not PREFIX_RE.match(cfg.topic_prefix):
        raise ConfigError(
            t.key_path("topic_prefix"),
            "must be 1-4 levels of letters, digits, '_', '.', '-' separated by '/' "
            f"(no wildcards); got {cfg.topic_prefix!r}",
        )
    for group in cfg.groups:
        if not NAME_RE.match(group):
            raise ConfigError(
                t.key_path("groups"),
                f"group {group!r} must be 1-64 letters, digits, '_', '.', '-' starting with a "
                "letter or digit",
            )
    if cfg.enabled:
        for key in ("ca_file", "cert_file", "key_file"):
            if getattr(cfg, key) is None:
                raise ConfigError(t.key_path(key), "required when mqtt.enabled = true")
    return cfg


def _telemetry(t: Table, base: Path) -> TelemetryConfig:
    d = TelemetryConfig()
    cfg = TelemetryConfig(
        enabled=t.boolean("enabled", d.enabled),
        interval_s=t.number("interval_s", d.interval_s, 0.05),
        spool_max_bytes=t.integer("spool_max_bytes", d.spool_max_bytes, 4096),
        backfill_per_s=t.number("backfill_per_s", d.backfill_per_s, 0.1),
        sysfs_root=t.path("sysfs_root", d.sysfs_root, base),
        power_sample_s=t.number("power_sample_s", d.power_sample_s, 0.01),
        total_rails=t.strings("total_rails"),
    )
    t.reject_unknown()
    return cfg


def parse_config(data: dict[str, object], base: Path, source: Path | None = None) -> DaemonConfig:
    """Validate a parsed TOML document; relative paths resolve against ``base``."""
    root = Table(data)
    cfg = DaemonConfig(
        server=_server(root.table("server"), base),
        models=_models(root.table("models"), base),
        state=_state(root.table("state"), base),
        mqtt=_mqtt(root.table("mqtt"), base),
        telemetry=_telemetry(root.table("telemetry"), base),
        source=source,
    )
    root.reject_unknown()
    return cfg


def load_config(path: Path | None) -> DaemonConfig:
    """Load and validate ``path``; ``None`` gives the defaults."""
    if path is None:
        return DaemonConfig()
    return parse_config(load_toml_file(path), path.parent.resolve(), source=path)
