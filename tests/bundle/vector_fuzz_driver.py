"""Fuzz driver, run as ``python -m tests.bundle.vector_fuzz_driver WORKDIR EXAMPLES``.

Sets up a device state with version 1 installed (which loads ONNX Runtime and numpy), notes
the peak RSS, then installs signed bundles whose ``test_vectors.npz`` is each hand-made attack
and ``EXAMPLES`` hypothesis-generated mutations. Every install must end in a logged
``EdgedError`` other than ``InstallFailedError`` with the store unchanged; the swap target
loads the vectors with the serving side's own loader before it refuses every version, so
any file the installer accepts is proven loadable. Prints one JSON line: examples run and
peak-RSS growth.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from edged.bundle.install import Installer
from edged.bundle.offline import OfflineSelfTest
from edged.demo.samples import write_onnx_mlp
from edged.errors import ConfigError, EdgedError, InstallFailedError, SelfTestFailedError
from edged.modelrepo.config import config_for_version, load_test_vectors
from tests.bundle.helpers import (
    DEVICE,
    LAYERS,
    MODEL,
    NOW,
    World,
    bundle_bytes,
    init_trust,
    log_entries,
    make_keys,
    source_files,
)
from tests.bundle.npz_corpus import ATTACKS, mutated_npz


class LoadVectorsThenRefuse:
    """Reads the installed version's vectors as the self-test would, then refuses it."""

    async def load_version(self, model: str, version_dir: Path) -> None:
        try:
            load_test_vectors(config_for_version(version_dir), version_dir)
        except ConfigError as exc:
            raise SelfTestFailedError(f"vectors unreadable: {exc}") from exc
        raise SelfTestFailedError("the fuzz target refuses every version")


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> int:
    work = Path(sys.argv[1])
    examples = int(sys.argv[2])
    keys = make_keys()
    sources = work / "sources"
    write_onnx_mlp(sources / MODEL / "1", LAYERS, seed=1)
    write_onnx_mlp(sources / MODEL / "2", LAYERS, seed=2)
    state = work / "state"
    init_trust(state, keys)
    world = World(state, sources, keys)
    baseline = Installer(state, OfflineSelfTest(), DEVICE, clock=lambda: NOW)
    baseline.recover()
    asyncio.run(baseline.install_bytes(bundle_bytes(sources, keys.signers[:1], 1)))
    files = source_files(sources, 2)
    vectors_path = f"{MODEL}/2/test_vectors.npz"
    installer = Installer(state, LoadVectorsThenRefuse(), DEVICE, clock=lambda: NOW)
    before = world.snapshot()
    start_rss = peak_rss_kib()
    errors: dict[str, int] = {}

    def attempt(npz: bytes) -> None:
        data = bundle_bytes(sources, keys.signers[:1], 2, files={**files, vectors_path: npz})
        logged = len(log_entries(state))
        try:
            asyncio.run(installer.install_bytes(data))
        except InstallFailedError:
            raise
        except EdgedError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        else:
            raise AssertionError("a malformed vector file installed")
        entries = log_entries(state)
        assert len(entries) == logged + 1 and entries[-1]["error"], entries[-1:]
        world.assert_unchanged(before)

    for name, make in ATTACKS.items():
        try:
            attempt(make())
        except BaseException:
            print(f"attack {name} failed", file=sys.stderr)
            raise

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(mutated_npz())
    def fuzz(npz: bytes) -> None:
        attempt(npz)

    fuzz()
    growth = peak_rss_kib() - start_rss
    print(
        json.dumps(
            {
                "attacks": len(ATTACKS),
                "examples": examples,
                "rss_growth_kib": growth,
                "errors": errors,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
