"""A ``SwapTarget`` for installing while the daemon is not running (``edged install`` from a USB
stick, tests): it really loads the version with its runtime and runs its test vectors, then
releases it. Nothing serves, so there is nothing to switch.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from edged.bundle.device import detect_device_facts
from edged.bundle.install import DEFAULT_KEEP_PREVIOUS, Installer, InstallResult
from edged.bundle.limits import DEFAULT_LIMITS, BundleLimits
from edged.bundle.verify import DeviceFacts
from edged.errors import ConfigError, SelfTestFailedError
from edged.modelrepo.config import config_for_version, load_test_vectors
from edged.runtime import load_model
from edged.serve.selftest import self_test

log = logging.getLogger(__name__)


def run_self_test(model: str, version_dir: Path) -> str:
    """Load ``version_dir``, run every test vector and the warm-up; a one-line summary.

    Raises ``ModelLoadError``/``UnsupportedModelError`` from the runtime, or
    ``SelfTestFailedError`` naming the vector and output that failed.
    """
    label = f"{model} version {version_dir.name}"
    try:
        config = config_for_version(version_dir)
        vectors = load_test_vectors(config, version_dir)
    except ConfigError as exc:
        raise SelfTestFailedError(f"{label}: {exc}") from exc
    if not vectors:
        raise SelfTestFailedError(f"{label}: no test vectors")
    loaded = load_model(version_dir, config.runtime)
    try:
        summary = self_test(model, version_dir.name, loaded, config, version_dir)
    finally:
        loaded.close()
    return f"{label}: {summary}"


class OfflineSelfTest:
    """Loads and self-tests a version, then releases it (no serving process to switch)."""

    def __init__(self) -> None:
        self.loaded: list[tuple[str, Path]] = []

    async def load_version(self, model: str, version_dir: Path) -> None:
        summary = await asyncio.to_thread(run_self_test, model, version_dir)
        self.loaded.append((model, version_dir))
        log.info("%s", summary)


def install_direct(
    state_dir: Path,
    bundle: Path,
    *,
    keep_previous: int = DEFAULT_KEEP_PREVIOUS,
    device: DeviceFacts | None = None,
    limits: BundleLimits = DEFAULT_LIMITS,
) -> InstallResult:
    """Install a bundle into a state directory with no daemon running: the same checks as a
    live install (signatures, counters, targets, self-test), recovery first."""
    installer = Installer(
        state_dir,
        OfflineSelfTest(),
        device or detect_device_facts(),
        keep_previous=keep_previous,
        limits=limits,
    )
    installer.recover()
    return asyncio.run(installer.install_file(bundle))
