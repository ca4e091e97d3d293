"""The device side of the MQTT fleet channel: a mutual-TLS MQTT v5 client (``client``), the topic
scheme (``topics``), signed messages (``protocol``, ``replay``), chunked bundle delivery with
resume (``download``) and the device agent (``agent``: ``build_fleet_agent`` / ``FleetAgent``, a
daemon service; ``publish`` lets telemetry share its connection), composed of the connection
(``link``), the retained status (``status``), signed commands (``commands``), deployments
(``deployments``) and their progress reports (``progress``), with its ``settings``.

``docs/protocol.md`` is the reference. The fleet manager's tools live in ``edged.fleet``.
Nothing is imported here, so that ``edged.transport.topics`` costs no MQTT stack.
"""
