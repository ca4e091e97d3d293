"""Installer behaviour: results and the install log, re-install and roll-forward, operator
rollback limited to held versions, the state-directory lock, direct (daemon-less) install."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
from pathlib import Path

import pytest

from edged.bundle.offline import install_direct
from edged.bundle.store import LOCK_FILE, ModelStore
from edged.errors import (
    BundleFileError,
    InstallBusyError,
    RollbackError,
    SelfTestFailedError,
    ShuttingDownError,
    StoreError,
    VersionNotHeldError,
)
from tests.bundle.conftest import FAILING_VERSION
from tests.bundle.helpers import MODEL, NOW, World, current_pointer, log_entries


def test_install_switches_and_records(world: World) -> None:
    result = world.install(world.bundle(2))
    assert result.ok
    assert (result.outcome, result.version, result.counter, result.previous_version) == (
        "installed",
        2,
        2,
        1,
    )
    assert result.at == NOW
    world.assert_serves(2)
    assert current_pointer(world.state) == "2"
    assert (world.store.version_dir(MODEL, 2) / "config.toml").is_file()
    entry = log_entries(world.state)[-1]
    assert entry["outcome"] == "installed"
    assert entry["manifest_sha256"] == result.manifest_sha256
    assert world.store.read_high_water()[MODEL].counter == 2


def test_failure_is_recorded_and_raised(world: World) -> None:
    installer = world.installer()
    with pytest.raises(SelfTestFailedError):
        asyncio.run(installer.install_bytes(world.bundle(FAILING_VERSION)))
    assert installer.last_result is not None
    assert installer.last_result.outcome == "load-failed"
    assert installer.last_result.error == "SelfTestFailedError"
    assert installer.history()[-1]["version"] == FAILING_VERSION
    assert world.store.read_high_water()[MODEL].counter == 1
    world.assert_serves(1)


def test_rollback_goes_to_the_previous_held_version(world: World) -> None:
    world.install(world.bundle(2))
    result = world.rollback()
    assert (result.outcome, result.version, result.previous_version) == ("rolled-back", 1, 2)
    world.assert_serves(1)
    assert log_entries(world.state)[-1]["action"] == "rollback"
    assert world.store.read_high_water()[MODEL].counter == 2  # not lowered


def test_rollback_only_to_held_versions(world: World) -> None:
    with pytest.raises(VersionNotHeldError, match="no version older"):
        world.rollback()
    with pytest.raises(VersionNotHeldError, match="not held"):
        world.rollback(7)
    with pytest.raises(VersionNotHeldError, match="already serves"):
        world.rollback(1)
    assert log_entries(world.state)[-1]["error"] == "VersionNotHeldError"
    world.assert_serves(1)


def test_after_rollback_the_newest_bundle_can_be_pushed_again(world: World) -> None:
    """Roll-forward: the exact bundle that set the high-water mark is accepted again."""
    world.install(world.bundle(3))
    world.rollback()
    with pytest.raises(RollbackError):
        world.install(world.bundle(2))
    result = world.install(world.bundle(3))
    assert result.outcome == "reinstalled"
    world.assert_serves(3)


def test_reinstall_after_the_newest_version_was_pruned_away(world: World) -> None:
    world.install(world.bundle(2))
    world.rollback()
    world.store.discard(world.store.version_dir(MODEL, 2))
    result = world.install(world.bundle(2))
    assert result.outcome == "installed"
    world.assert_serves(2)


def test_rollback_that_fails_its_self_test_keeps_serving(world: World) -> None:
    world.install(world.bundle(2))
    vectors = world.store.version_dir(MODEL, 1) / "test_vectors.npz"
    wrong = world.sources / MODEL / str(FAILING_VERSION) / "test_vectors.npz"
    assert wrong.stat().st_size == vectors.stat().st_size  # the store's shallow check passes
    vectors.write_bytes(wrong.read_bytes())
    with pytest.raises(SelfTestFailedError):
        world.rollback()
    assert log_entries(world.state)[-1]["outcome"] == "load-failed"
    world.assert_serves(2)


def test_a_second_installer_process_is_refused(world: World) -> None:
    fd = os.open(world.state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(InstallBusyError):
            world.install(world.bundle(2))
    finally:
        os.close(fd)
    world.install(world.bundle(2))


def test_direct_install_without_a_daemon(empty_world: World, tmp_path: Path) -> None:
    bundle = tmp_path / "mlp-1.bundle"
    bundle.write_bytes(empty_world.bundle(1, created=0, expires=2**40))
    result = install_direct(empty_world.state, bundle)
    assert result.outcome == "installed"
    empty_world.assert_serves(1)


def test_unreadable_bundle_file_is_its_own_error(world: World, tmp_path: Path) -> None:
    with pytest.raises(BundleFileError, match="No such file"):
        asyncio.run(world.installer().install_file(tmp_path / "missing.bundle"))
    world.assert_serves(1)


def test_a_pointer_write_failure_is_reported_not_hidden(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(self: ModelStore, model: str, version: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ModelStore, "set_current", disk_full)
    installer = world.installer()
    with pytest.raises(StoreError, match="No space left"):
        asyncio.run(installer.install_bytes(world.bundle(2)))
    assert installer.last_result is not None
    assert installer.last_result.outcome == "record-failed"
    monkeypatch.undo()
    assert world.store.current_version(MODEL) == 1
    assert world.store.read_high_water()[MODEL].counter == 1
    world.installer().recover()
    world.assert_serves(1)


@pytest.mark.parametrize("big", [10**15, 2**53 - 1], ids=["16-digits", "max"])
def test_versions_over_the_whole_schema_range_serve_roll_back_and_recover(
    world: World, big: int
) -> None:
    from edged.bundle.build import collect_version_files
    from tests.bundle.helpers import CONFIG_TOML

    files = collect_version_files(world.sources / MODEL / "2", MODEL, big)
    files[f"{MODEL}/config.toml"] = CONFIG_TOML
    installed = world.install(world.bundle(big, 2, files=files))
    assert (installed.version, installed.previous_version) == (big, 1)
    world.assert_serves(big)
    assert world.store.current_version(MODEL) == big
    report = world.installer().recover()
    assert report.models[MODEL].current == big and not report.models[MODEL].pointer_repaired
    assert world.install(world.bundle(3)).previous_version == big
    assert world.rollback(big).version == big
    world.assert_serves(big)


class _StoppingTarget:
    """The serving side of a daemon that began shutting down before the load started."""

    async def load_version(self, model: str, version_dir: Path) -> None:
        raise ShuttingDownError("the daemon is shutting down")


def test_an_install_refused_by_a_stopping_daemon_is_interrupted_not_failed(world: World) -> None:
    before = world.snapshot()
    installer = world.installer()
    installer.target = _StoppingTarget()
    with pytest.raises(ShuttingDownError):
        asyncio.run(installer.install_bytes(world.bundle(2)))
    entry = log_entries(world.state)[-1]
    assert (entry["outcome"], entry["error"], entry["version"]) == (
        "interrupted",
        "ShuttingDownError",
        2,
    )
    world.assert_unchanged(before)
