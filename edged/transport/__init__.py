"""The MQTT fleet channel: mutual-TLS MQTT v5 client, topic scheme, chunked bundle delivery with
resume, signed commands, the device agent and the fleet manager's push."""
