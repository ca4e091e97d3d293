"""Reading the device facts a bundle's targets are matched against (the I/O half of
``DeviceFacts``)."""

from __future__ import annotations

import logging
import platform

from edged import __version__
from edged.bundle.verify import DeviceFacts
from edged.runtime.base import registered_backends

log = logging.getLogger(__name__)

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}


def normalise_arch(machine: str) -> str:
    machine = machine.lower()
    return _ARCH_ALIASES.get(machine, machine)


def detect_device_facts() -> DeviceFacts:
    """This machine: CPU architecture, the runtimes that import and their providers, edged."""
    runtimes: set[str] = set()
    providers: set[str] = set()
    for kind, backend in registered_backends().items():
        try:
            probe = backend.probe()
        except Exception as exc:  # a broken install raises anything from ImportError to OSError
            log.info("runtime %s is not available here: %s", backend.runtime_name, exc)
            continue
        runtimes.add(kind)
        providers.update(probe.providers)
    return DeviceFacts(
        arch=normalise_arch(platform.machine()),
        runtimes=frozenset(runtimes),
        providers=frozenset(providers),
        edged_version=__version__,
    )
