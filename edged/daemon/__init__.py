"""The daemon: wiring, lifecycle (one shutdown deadline), supervision of side services."""

from edged.daemon.lifecycle import Daemon, run_daemon

__all__ = ["Daemon", "run_daemon"]
