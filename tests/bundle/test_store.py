"""The crash-safe store: recovery of every leftover a crash or a disk fault can leave,
pruning, and the high-water marks kept apart from the versions."""

from __future__ import annotations

import shutil

import pytest

from edged.bundle.build import Content
from edged.bundle.store import ModelStore
from edged.bundle.verify import HighWaterMark
from edged.errors import StoreCorruptError
from edged.modelrepo.layout import CURRENT_POINTER
from tests.bundle.helpers import MODEL, World, source_files


def recover(world: World) -> None:
    world.installer().recover()


def test_recover_on_a_healthy_store_changes_nothing(world: World) -> None:
    before = world.snapshot()
    report = world.installer().recover(deep=True)
    assert report.models[MODEL].current == 1
    assert report.models[MODEL].removed == ()
    assert world.snapshot() == before


def test_staging_trash_and_temp_leftovers_are_removed(world: World) -> None:
    store = world.store
    (store.staging_dir / "abc" / "sub").mkdir(parents=True)
    (store.staging_dir / "abc" / "sub" / "model.onnx").write_bytes(b"half")
    (store.trash_dir / "old").mkdir()
    (store.model_dir(MODEL) / ".CURRENT.tmp-1234").write_text("2\n")
    (world.state / ".highwater.json.tmp-99").write_text("{")
    recover(world)
    world.assert_serves(1)


def test_unverified_version_dir_is_removed(world: World) -> None:
    foreign = world.store.version_dir(MODEL, 5)
    shutil.copytree(world.store.version_dir(MODEL, 1), foreign)
    (foreign / ".verified").unlink()
    recover(world)
    assert not foreign.exists()
    world.assert_serves(1)


def test_verified_but_never_switched_in_version_is_removed(world: World) -> None:
    """A rename happened, the pointer switch did not: the counter is above the mark."""
    world.install(world.bundle(2))
    store = world.store
    store.set_current(MODEL, 1)
    v1 = store.inspect_version(store.version_dir(MODEL, 1))
    assert v1 is not None
    store.write_high_water({MODEL: HighWaterMark(v1.counter, v1.manifest_sha256)})
    recover(world)
    assert not store.version_dir(MODEL, 2).exists()
    world.assert_serves(1)


def test_current_pointing_at_a_damaged_version_falls_back(world: World) -> None:
    world.install(world.bundle(2))
    store = world.store
    (store.version_dir(MODEL, 2) / "model.onnx.data").write_bytes(b"short")
    report = world.installer().recover()
    assert report.models[MODEL].pointer_repaired
    assert not store.version_dir(MODEL, 2).exists()
    world.assert_serves(1)


def test_deep_recovery_catches_bit_rot(world: World) -> None:
    world.install(world.bundle(2))
    path = world.store.version_dir(MODEL, 2) / "model.onnx.data"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    world.installer().recover()
    assert world.store.current_version(MODEL) == 2  # sizes match: a shallow check trusts it
    world.installer().recover(deep=True)
    world.assert_serves(1)


def test_garbage_pointer_is_repaired(world: World) -> None:
    (world.store.model_dir(MODEL) / CURRENT_POINTER).write_text("not a number")
    recover(world)
    world.assert_serves(1)


def test_a_garbage_pointer_is_an_error_and_recovery_keeps_it_aside(world: World) -> None:
    model_dir = world.store.model_dir(MODEL)
    (model_dir / CURRENT_POINTER).write_text("not a number")
    with pytest.raises(StoreCorruptError, match="not a version number"):
        world.store.current_version(MODEL)
    recover(world)
    kept = list(model_dir.glob(f"{CURRENT_POINTER}.corrupt-*"))
    assert [k.read_text() for k in kept] == ["not a number"]
    assert world.store.current_version(MODEL) == 1


def test_missing_high_water_is_rebuilt_from_the_current_version(world: World) -> None:
    world.install(world.bundle(2))
    (world.state / "highwater.json").unlink()
    recover(world)
    assert world.store.read_high_water()[MODEL].counter == 2
    world.assert_serves(2)


def test_corrupt_high_water_is_never_silently_reset(world: World) -> None:
    (world.state / "highwater.json").write_text('{"models": 3}')
    with pytest.raises(StoreCorruptError, match="highwater.json"):
        world.installer().recover()
    with pytest.raises(StoreCorruptError):
        world.install(world.bundle(2))


def test_prune_keeps_the_configured_number_of_previous_versions(world: World) -> None:
    for version in (2, 3, 4):
        world.install(world.bundle(version), keep_previous=1)
    assert [h.version for h in world.store.held_versions(MODEL)] == [3, 4]
    world.install(world.bundle(5, files=_relabelled(world, 2, 5)), keep_previous=2)
    assert [h.version for h in world.store.held_versions(MODEL)] == [3, 4, 5]


def _relabelled(world: World, source: int, version: int) -> dict[str, Content]:
    return {
        p.replace(f"{MODEL}/{source}/", f"{MODEL}/{version}/"): c
        for p, c in source_files(world.sources, source).items()
    }


def test_prune_never_removes_the_previous_version(world: World) -> None:
    """After a rollback to 1, installing 4 keeps 1 (previous) even with keep_previous=1."""
    world.install(world.bundle(2))
    world.install(world.bundle(3))
    world.rollback(1)
    world.install(world.bundle(4), keep_previous=1)
    held = [h.version for h in world.store.held_versions(MODEL)]
    assert 1 in held and 4 in held
    assert len(held) == 2


def test_store_paths(world: World) -> None:
    store = ModelStore(world.state)
    assert store.version_dir(MODEL, 3) == world.state / "models" / MODEL / "3"
    assert store.model_names() == [MODEL]
