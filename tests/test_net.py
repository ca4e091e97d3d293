"""Free ports for the tests: distinct, bindable, and never from the kernel's ephemeral range,
where any outgoing connection could take one before the server binds it."""

from __future__ import annotations

import socket
from pathlib import Path

from edged._net import free_port, free_ports


def _ephemeral() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> None:
    low, high = _ephemeral()
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        assert not low <= port <= high
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


def test_a_port_someone_listens_on_is_never_handed_out() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        busy = taken.getsockname()[1]
        assert free_port(busy) != busy
        assert busy not in free_ports(50)
