"""The MQTT topic scheme of the fleet channel (pure: names only, no I/O).

Everything lives under one prefix (``mqtt.topic_prefix``, default ``edged``)::

    <p>/devices/<device>/cmd                 manager -> device   signed commands
    <p>/devices/<device>/deploy              manager -> device   signed deployment announcements
    <p>/devices/<device>/chunks/<dep>/<i>    manager -> device   retained bundle chunks
    <p>/groups/<group>/cmd                   manager -> group    signed commands
    <p>/groups/<group>/deploy                manager -> group    signed deployment announcements
    <p>/groups/<group>/chunks/<dep>/<i>      manager -> group    retained bundle chunks
    <p>/devices/<device>/status              device  -> all      retained online/offline + models
    <p>/devices/<device>/progress            device  -> manager  retained deployment progress
    <p>/devices/<device>/telemetry[/...]     device  -> manager  telemetry
    <p>/replies/<manager-client>             device  -> manager  MQTT v5 response topic

``docs/protocol.md`` describes the messages and the broker ACL that enforces who may read and
write what.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edged.config.names import NAME_RE, PREFIX_RE
from edged.errors import FleetMessageError

# Device ids (certificate CNs), group names, deployment ids and topic prefixes: one topic level
# each, never a wildcard or a separator, and nothing a file name could misread.
DEPLOYMENT_ID_RE = re.compile(r"^[0-9a-f]{16,64}$")

TELEMETRY = "telemetry"


def check_name(value: str, what: str) -> str:
    """``value`` if it is a valid device id or group name, else ``FleetMessageError``."""
    if not NAME_RE.match(value):
        raise FleetMessageError(
            f"{what} {value!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
            "(no '/', '+' or '#'), starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Target:
    """Who a deployment or command is for: one device, or every device of a group."""

    kind: str  # "devices" | "groups"
    name: str

    def __post_init__(self) -> None:
        if self.kind not in ("devices", "groups"):
            raise ValueError(f"target kind must be 'devices' or 'groups', got {self.kind!r}")
        check_name(self.name, "device id" if self.kind == "devices" else "group name")

    @classmethod
    def device(cls, name: str) -> Target:
        return cls("devices", name)

    @classmethod
    def group(cls, name: str) -> Target:
        return cls("groups", name)

    @classmethod
    def parse(cls, text: str) -> Target:
        """``devices/<id>`` or ``groups/<name>`` (the form signed into commands)."""
        kind, sep, name = text.partition("/")
        if not sep or kind not in ("devices", "groups"):
            raise FleetMessageError(f"target {text!r} must be 'devices/<id>' or 'groups/<name>'")
        return cls(kind, check_name(name, "target name"))

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class Topics:
    prefix: str = "edged"

    def __post_init__(self) -> None:
        if not PREFIX_RE.match(self.prefix):
            raise ValueError(
                f"topic prefix {self.prefix!r} must be 1-4 levels of letters, digits, '_', '.', "
                "'-' separated by '/'"
            )

    # --- manager -> devices ---------------------------------------------------------------

    def base(self, target: Target) -> str:
        return f"{self.prefix}/{target.kind}/{target.name}"

    def cmd(self, target: Target) -> str:
        return f"{self.base(target)}/cmd"

    def deploy(self, target: Target) -> str:
        return f"{self.base(target)}/deploy"

    def chunk(self, target: Target, deployment_id: str, index: int) -> str:
        return f"{self.base(target)}/chunks/{deployment_id}/{index}"

    # --- device -> manager ----------------------------------------------------------------

    def status(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/status"

    def progress(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/progress"

    def telemetry(self, device: str, suffix: str = "") -> str:
        topic = f"{self.prefix}/devices/{device}/{TELEMETRY}"
        return f"{topic}/{suffix}" if suffix else topic

    def device_topic(self, device: str, suffix: str) -> str:
        return f"{self.prefix}/devices/{device}/{suffix}"

    def replies(self, client_id: str) -> str:
        return f"{self.prefix}/replies/{client_id}"

    # --- wildcards the fleet manager subscribes to ----------------------------------------

    def all_status(self) -> str:
        return f"{self.prefix}/devices/+/status"

    def all_progress(self) -> str:
        return f"{self.prefix}/devices/+/progress"

    # --- parsing --------------------------------------------------------------------------

    def device_of(self, topic: str) -> str | None:
        """The device id in ``<p>/devices/<id>/...``, or ``None`` for other topics."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            return None
        device = topic[len(head) :].split("/", 1)[0]
        return device if NAME_RE.match(device) else None

    def parse_chunk(self, topic: str) -> tuple[Target, str, int] | None:
        """``(target, deployment_id, index)`` of a chunk topic, or ``None``."""
        head = f"{self.prefix}/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 5 or parts[2] != "chunks" or parts[0] not in ("devices", "groups"):
            return None
        kind, name, _, deployment_id, index = parts
        if not NAME_RE.match(name) or not DEPLOYMENT_ID_RE.match(deployment_id):
            return None
        if not index.isdigit() or len(index) > 9 or (index != "0" and index.startswith("0")):
            return None
        return Target(kind, name), deployment_id, int(index)
