"""The MQTT fleet channel: a mutual-TLS MQTT v5 client, the topic scheme, chunked bundle delivery
with resume, signed commands, the device agent and the fleet manager's tools.

``docs/protocol.md`` is the reference. Device side: ``build_fleet_agent`` / ``FleetAgent`` (a
daemon service; ``publish`` lets telemetry share its connection). Fleet manager side: ``push``,
``send_command``, ``fleet_status``, ``wait_online``, ``wait_progress``. Certificates:
``edged.transport.pki``.
"""

from edged.transport.acl import render_acl
from edged.transport.agent import AgentSettings, FleetAgent, build_fleet_agent
from edged.transport.client import ClientSettings, Message, MqttClient, Will
from edged.transport.fleet import (
    CommandResult,
    DeviceOutcome,
    FleetView,
    ManagerSettings,
    PreparedBundle,
    PushResult,
    deploy_command,
    fleet_status,
    prepare_bundle,
    publish_chunks,
    push,
    send_command,
    wait_online,
    wait_progress,
)
from edged.transport.protocol import (
    Command,
    Deployment,
    DeviceStatus,
    Progress,
    Reply,
    decode_command,
    encode_command,
)
from edged.transport.tls import TlsFiles, certificate_common_name, client_context
from edged.transport.topics import Target, Topics

__all__ = [
    "AgentSettings",
    "ClientSettings",
    "Command",
    "CommandResult",
    "Deployment",
    "DeviceOutcome",
    "DeviceStatus",
    "FleetAgent",
    "FleetView",
    "ManagerSettings",
    "Message",
    "MqttClient",
    "PreparedBundle",
    "Progress",
    "PushResult",
    "Reply",
    "Target",
    "TlsFiles",
    "Topics",
    "Will",
    "build_fleet_agent",
    "certificate_common_name",
    "client_context",
    "decode_command",
    "deploy_command",
    "encode_command",
    "fleet_status",
    "prepare_bundle",
    "publish_chunks",
    "push",
    "render_acl",
    "send_command",
    "wait_online",
    "wait_progress",
]
