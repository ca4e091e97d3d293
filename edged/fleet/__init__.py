"""The fleet manager's tools: push, signed commands and fleet status over the channel
(``channel``), the PKI that never replaces a CA (``pki``), the fleet directory made by
``edged fleet init`` (``directory``), the broker config (``brokerconf``) and its ACL (``acl``),
and staged rollouts with probation and abort (``rollout``).

These run on the manager's machine, never on a device: the device side (``edged.transport``)
does not import them.
"""
