"""The device side of the MQTT fleet channel: a mutual-TLS MQTT v5 client (``client``), the topic
scheme (``topics``), signed messages (``protocol``, ``replay``), chunked bundle delivery with
resume (``download``) and the device agent (``agent``: ``build_fleet_agent`` / ``FleetAgent``, a
daemon service; ``publish`` lets telemetry share its connection).

``docs/protocol.md`` is the reference. The fleet manager's tools live in ``edged.fleet``.
Nothing is imported here, so that ``edged.transport.topics`` costs no MQTT stack.
"""
