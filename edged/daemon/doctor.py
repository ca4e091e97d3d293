"""``edged doctor``: one check per thing that can keep a device from working, each with a
verdict (pass, warn, fail) and a hint that says how to fix it. Checks read; they change nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edged import __version__
from edged._time import utc_text
from edged.config import DaemonConfig, load_config
from edged.errors import ConfigError, EdgedError

PASS, WARN, FAIL = "pass", "warn", "fail"

# A clock before this is certainly wrong (no RTC battery, no NTP yet); expiry checks need
# a sane one.
EARLIEST_SANE_TIME = int(dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc).timestamp())
LATEST_SANE_TIME = int(dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc).timestamp())
CERT_WARN_DAYS = 30
MIN_FREE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Check:
    item: str
    status: str
    detail: str
    hint: str = ""


@dataclass(frozen=True)
class DoctorOptions:
    now: Callable[[], float] = time.time
    broker_timeout_s: float = 5.0
    min_free_bytes: int = MIN_FREE_BYTES


def check_config(path: Path | None) -> tuple[Check, DaemonConfig | None]:
    if path is None:
        return Check(
            "config", WARN, "no config file: built-in defaults", "write /etc/edged/edged.toml"
        ), DaemonConfig()
    try:
        config = load_config(path)
    except ConfigError as exc:
        return Check(
            "config", FAIL, str(exc), f"fix {path}, then `edged config check {path}`"
        ), None
    return Check("config", PASS, f"{path} is valid"), config


def check_clock(now: float) -> Check:
    if now < EARLIEST_SANE_TIME or now > LATEST_SANE_TIME:
        return Check(
            "clock",
            FAIL,
            f"system time is {utc_text(now)}",
            "set the clock (timedatectl set-ntp true, or fit an RTC battery): bundle and "
            "certificate expiry checks need it",
        )
    return Check("clock", PASS, f"system time {utc_text(now)}")


def check_certificates(config: DaemonConfig, now: float) -> list[Check]:
    mqtt = config.mqtt
    if not mqtt.enabled:
        return [Check("certificates", PASS, "fleet channel disabled: no certificates needed")]
    from cryptography import x509

    from edged.transport.tls import check_key_permissions

    checks: list[Check] = []
    for label, path in (("CA certificate", mqtt.ca_file), ("device certificate", mqtt.cert_file)):
        assert path is not None
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            checks.append(Check(label, FAIL, f"{path}: {exc}", "install a PEM certificate there"))
            continue
        not_after = cert.not_valid_after_utc.timestamp()
        not_before = cert.not_valid_before_utc.timestamp()
        subject = cert.subject.rfc4514_string()
        if now >= not_after:
            checks.append(
                Check(
                    label,
                    FAIL,
                    f"{subject} expired {utc_text(not_after)}",
                    "issue a new certificate",
                )
            )
        elif now < not_before:
            checks.append(
                Check(
                    label,
                    FAIL,
                    f"{subject} not valid before {utc_text(not_before)}",
                    "check the clock, or the certificate",
                )
            )
        elif not_after - now < CERT_WARN_DAYS * 86400:
            days = int((not_after - now) // 86400)
            checks.append(Check(label, WARN, f"{subject} expires in {days} days", "renew it soon"))
        else:
            checks.append(Check(label, PASS, f"{subject} valid until {utc_text(not_after)}"))
    assert mqtt.key_file is not None
    try:
        check_key_permissions(mqtt.key_file)
    except EdgedError as exc:
        checks.append(Check("key file", FAIL, str(exc), f"chmod 600 {mqtt.key_file}"))
    else:
        checks.append(Check("key file", PASS, f"{mqtt.key_file} is private"))
    return checks


def check_trust_store(config: DaemonConfig, now: float) -> Check:
    from edged.bundle.truststore import TrustStore

    trust_dir = config.state.directory / "trust"
    try:
        state = TrustStore(trust_dir).load()
    except EdgedError as exc:
        return Check(
            "trust store",
            FAIL,
            f"{trust_dir}: {exc}",
            "provision it with `edged trust init` (or the package's provisioning step)",
        )
    signers = state.signers
    if now >= signers.expires:
        return Check(
            "trust store",
            FAIL,
            f"signers list version {signers.version} expired {utc_text(signers.expires)}: "
            "no bundle can install",
            "apply a newer root-signed signers list (`edged trust apply`)",
        )
    detail = (
        f"signers v{signers.version}, {signers.threshold} of {len(signers.keys)} keys, "
        f"expires {utc_text(signers.expires)}"
    )
    if signers.expires - now < CERT_WARN_DAYS * 86400:
        return Check("trust store", WARN, detail, "push a renewed signers list before it expires")
    return Check("trust store", PASS, detail)


def check_store(config: DaemonConfig) -> Check:
    from edged.bundle.limits import BundleLimits
    from edged.bundle.store import ModelStore

    store = ModelStore(config.state.directory, BundleLimits())
    problems: list[str] = []
    serving: list[str] = []
    for model in store.model_names():
        try:
            current = store.current_version(model)
        except EdgedError as exc:
            problems.append(f"{model}: {exc}")
            continue
        if current is None:
            continue
        held = {h.version: h for h in store.held_versions(model, deep=True)}
        if current not in held:
            problems.append(
                f"{model}: CURRENT names version {current}, which is missing or fails its manifest"
            )
        else:
            serving.append(f"{model}@{current}")
    try:
        store.read_high_water()
    except EdgedError as exc:
        problems.append(str(exc))
    if problems:
        return Check(
            "store",
            FAIL,
            "; ".join(problems),
            "restart edged (recovery falls back to a verified version) or reinstall the bundle",
        )
    return Check(
        "store", PASS, f"{store.models_dir}: " + (", ".join(serving) or "no bundles installed")
    )


def check_broker(config: DaemonConfig, timeout_s: float) -> Check:
    mqtt = config.mqtt
    if not mqtt.enabled:
        return Check("broker", PASS, "fleet channel disabled")
    from edged.transport.client import ClientSettings, MqttClient
    from edged.transport.tls import TlsFiles, certificate_common_name, client_context

    assert mqtt.ca_file is not None
    assert mqtt.cert_file is not None
    assert mqtt.key_file is not None
    try:
        context = client_context(TlsFiles(mqtt.ca_file, mqtt.cert_file, mqtt.key_file))
        device = certificate_common_name(mqtt.cert_file)
    except EdgedError as exc:
        return Check("broker", FAIL, f"cannot set up TLS: {exc}", "fix the certificate files first")

    async def connect() -> None:
        settings = ClientSettings(
            mqtt.host, mqtt.port, f"{device}-doctor", context, timeout_s=timeout_s
        )
        async with MqttClient(settings):
            pass

    try:
        asyncio.run(connect())
    except EdgedError as exc:
        return Check(
            "broker",
            FAIL,
            f"{mqtt.host}:{mqtt.port}: {exc}",
            "check the network, mqtt.host/port, and that the broker trusts this device's CA",
        )
    return Check(
        "broker", PASS, f"connected to {mqtt.host}:{mqtt.port} as {device} with mutual TLS"
    )


def check_runtimes() -> list[Check]:
    from edged.runtime.base import registered_backends

    checks: list[Check] = []
    for backend in registered_backends().values():
        try:
            probe = backend.probe()
        except Exception as exc:  # a broken install raises anything from ImportError to OSError
            status = FAIL if backend.required else WARN
            reason = f"cannot import: {exc}" if backend.required else f"not available: {exc}"
            checks.append(Check(backend.runtime_name, status, reason, backend.install_hint))
        else:
            checks.append(Check(backend.runtime_name, PASS, probe.summary))
    return checks


def check_power(config: DaemonConfig) -> Check:
    from edged.telemetry.power import discover_power_sources

    monitor = discover_power_sources(
        config.telemetry.sysfs_root, total_rails=config.telemetry.total_rails
    )
    if not monitor.available:
        return Check(
            "power sensors",
            WARN,
            f"none under {config.telemetry.sysfs_root}: power and energy per inference "
            "are unavailable",
            "on a Jetson, check that the INA3221/INA238 drivers are loaded",
        )
    try:
        reading = monitor.read()
    except OSError as exc:
        return Check("power sensors", FAIL, f"read failed: {exc}", "check sysfs permissions")
    names = ", ".join(s.name for s in monitor.sources)
    failures = monitor.failures
    if failures and not reading.rails:
        detail = "; ".join(f"{name}: {why}" for name, why in failures.items())
        return Check(
            "power sensors",
            WARN,
            f"read failed, so power and energy per inference are unavailable: {detail}",
            "the message says what the sensor needs",
        )
    rails = f"{len(reading.rails)} rails"
    if reading.total_watts is None:
        return Check(
            "power sensors",
            WARN,
            f"{names}: {rails}, no board total rail",
            "set [telemetry] total_rails",
        )
    return Check(
        "power sensors",
        PASS,
        f"{names}: {rails}; total {reading.total_watts:.2f} W ({reading.total_scope}) "
        f"from {reading.total_source}",
    )


def check_disk(config: DaemonConfig, min_free_bytes: int) -> Check:
    directory = config.state.directory
    probe = directory if directory.exists() else directory.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as exc:
        return Check("disk", FAIL, f"{directory}: {exc}", "create the state directory")
    free_mb = usage.free // (1024 * 1024)
    if not os.access(probe, os.W_OK):
        return Check(
            "disk", FAIL, f"{probe} is not writable", "check the ownership of the state directory"
        )
    if usage.free < min_free_bytes:
        return Check(
            "disk",
            FAIL,
            f"{free_mb} MiB free in {probe} (need {min_free_bytes // (1024 * 1024)} MiB)",
            "free space: bundles, the telemetry spool and downloads live there",
        )
    return Check("disk", PASS, f"{free_mb} MiB free in {probe}")


def run_checks(config_path: Path | None, options: DoctorOptions | None = None) -> list[Check]:
    options = options or DoctorOptions()
    now = options.now()
    checks = [Check("edged", PASS, f"version {__version__}")]
    config_check, config = check_config(config_path)
    checks.append(config_check)
    checks.append(check_clock(now))
    if config is None:
        config = DaemonConfig()
    checks += check_certificates(config, now)
    checks.append(check_trust_store(config, now))
    checks.append(check_store(config))
    checks.append(check_broker(config, options.broker_timeout_s))
    checks += check_runtimes()
    checks.append(check_power(config))
    checks.append(check_disk(config, options.min_free_bytes))
    return checks
