"""Test vectors that cannot hurt: the bounded .npz check, the installer's generic guard, and a
hypothesis fuzz run in a subprocess whose peak memory is measured."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edged.bundle.limits import DEFAULT_LIMITS, BundleLimits
from edged.bundle.vectors import check_vector_file
from edged.errors import InstallFailedError, VectorFileError
from tests.bundle.helpers import MODEL, World, log_entries, source_files
from tests.bundle.npz_corpus import ATTACKS, BOMB_ARRAY_BYTES, bad_crc, huge_shape, valid_npz

REPO = Path(__file__).resolve().parents[2]
VECTORS = f"{MODEL}/2/test_vectors.npz"


def _check(tmp_path: Path, data: bytes, limits: BundleLimits = DEFAULT_LIMITS) -> int:
    path = tmp_path / "v.npz"
    path.write_bytes(data)
    return check_vector_file(path, VECTORS, limits, limits.max_vector_bytes)


def test_a_stored_npz_passes_with_its_array_bytes(tmp_path: Path) -> None:
    assert _check(tmp_path, valid_npz()) == 8 * 4 + 6 * 4


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_each_malformed_npz_is_a_vector_file_error(tmp_path: Path, attack: str) -> None:
    with pytest.raises(VectorFileError, match=VECTORS):
        _check(tmp_path, ATTACKS[attack]())


def test_array_bytes_over_the_limit_are_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(VectorFileError, match="max_vector_bytes"):
        _check(tmp_path, valid_npz(), BundleLimits(max_vector_bytes=40))


def _bundle_with_vectors(world: World, npz: bytes) -> bytes:
    files = source_files(world.sources, 2)
    files[VECTORS] = npz
    return world.bundle(2, files=files)


@pytest.mark.parametrize("make", [bad_crc, huge_shape], ids=["bad-crc", "huge-shape"])
def test_signed_bundle_with_malformed_vectors_is_logged_and_changes_nothing(
    world: World, make: object
) -> None:
    assert callable(make)
    before = world.snapshot()
    with pytest.raises(VectorFileError):
        world.install(_bundle_with_vectors(world, make()))
    entry = log_entries(world.state)[-1]
    assert (entry["outcome"], entry["error"]) == ("rejected", "VectorFileError")
    assert "staging" not in entry["message"] and VECTORS in entry["message"]
    world.assert_unchanged(before)


class _BuggyTarget:
    async def load_version(self, model: str, version_dir: Path) -> None:
        raise ZeroDivisionError("a bug in the serving side")


def test_any_exception_in_the_installer_is_logged_and_leaves_the_store_clean(world: World) -> None:
    before = world.snapshot()
    installer = world.installer()
    installer.target = _BuggyTarget()
    with pytest.raises(InstallFailedError, match="ZeroDivisionError") as caught:
        asyncio.run(installer.install_bytes(world.bundle(2)))
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    entry = log_entries(world.state)[-1]
    assert (entry["outcome"], entry["error"], entry["version"]) == (
        "failed",
        "InstallFailedError",
        2,
    )
    world.assert_unchanged(before)


def test_fuzzed_vectors_only_ever_give_logged_errors_in_bounded_memory(tmp_path: Path) -> None:
    """Hand-made attacks (a ~260 KB deflate bomb of 256 MiB first) and 120 hypothesis
    mutations, each through a real install in a fresh process whose peak RSS is measured."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bundle.vector_fuzz_driver", str(tmp_path), "120"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["examples"] == 120
    # The bomb alone would add 256 MiB; what is allowed is a fraction of it.
    assert report["rss_growth_kib"] * 1024 < BOMB_ARRAY_BYTES // 4, report


def test_a_zip64_locator_before_the_end_record_is_refused_before_zipfile_reads_it(
    tmp_path: Path,
) -> None:
    """zipfile would follow it to a second central directory of any size."""
    from tests.bundle.npz_corpus import zip64_locator

    with pytest.raises(VectorFileError, match="zip64 end records are not accepted"):
        _check(tmp_path, zip64_locator())


class _BlockingTarget:
    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def load_version(self, model: str, version_dir: Path) -> None:
        self.entered.set()
        await asyncio.Event().wait()  # until cancelled


def test_a_cancelled_install_is_logged_and_recovery_restores_the_store(world: World) -> None:
    before = world.snapshot()
    installer = world.installer()
    target = _BlockingTarget()
    installer.target = target

    async def scenario() -> None:
        task = asyncio.ensure_future(installer.install_bytes(world.bundle(2)))
        await asyncio.wait_for(target.entered.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    entry = log_entries(world.state)[-1]
    assert (entry["outcome"], entry["error"], entry["version"]) == (
        "interrupted",
        "CancelledError",
        2,
    )
    world.installer().recover()  # as at the next start
    world.assert_unchanged(before)
