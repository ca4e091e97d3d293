"""Recovery from a fast-forward attack: a stolen signing key installs a bundle with a huge
release counter; once root revokes that key, the mark it set no longer holds and legitimately
signed bundles install again. Without root keys nothing lowers a mark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edged.bundle.keys import keyid_of
from edged.bundle.store import ModelStore
from edged.bundle.trust import build_signers
from edged.bundle.verify import MAX_MARKS_PER_MODEL, HighWaterMark
from edged.errors import ReplayError, RevokedKeyError, RollbackError, SignatureError
from tests.bundle.helpers import DAY, MODEL, NOW, World

HUGE = 2**53 - 1


def _signers_update(
    world: World,
    keep: list[Ed25519PrivateKey],
    revoked: list[Ed25519PrivateKey],
    signed_with: list[Ed25519PrivateKey],
    version: int = 2,
) -> bytes:
    return build_signers(
        [k.public_key() for k in keep],
        1,
        version,
        NOW + 100 * DAY,
        signed_with,
        [keyid_of(k.public_key()) for k in revoked],
    )


def _keys(world: World) -> tuple[Ed25519PrivateKey, Ed25519PrivateKey, Ed25519PrivateKey]:
    legit, other, stolen = world.keys.signers
    return legit, other, stolen


def test_revoking_the_stolen_key_lets_legitimate_bundles_install_again(world: World) -> None:
    legit, other, stolen = _keys(world)
    assert world.install(world.bundle(3, HUGE, keys=[stolen])).ok  # the attack succeeds
    with pytest.raises(RollbackError):
        world.install(world.bundle(2, 2, keys=[legit]))  # and locks the model
    world.installer().apply_signers_update(
        _signers_update(world, [legit, other], [stolen], world.keys.root[:1])
    )
    result = world.install(world.bundle(2, 2, keys=[legit]))
    assert (result.outcome, result.version, result.previous_version) == ("installed", 2, 3)
    world.assert_serves(2)
    mark = world.store.read_high_water()[MODEL]
    assert mark.counter == HUGE  # the attacker's mark stays on record, set aside
    standing = mark.standing(frozenset({keyid_of(stolen.public_key())}))
    assert standing is not None and standing.counter == 2
    # The fallen-back mark holds like any other: older bundles are still rollbacks, and the
    # attacker's key is refused outright.
    with pytest.raises(RollbackError):
        world.install(world.bundle(4, 1, keys=[legit]))
    with pytest.raises(RevokedKeyError):
        world.install(world.bundle(4, HUGE, keys=[stolen]))
    world.assert_serves(2)


def test_the_stolen_key_alone_cannot_lower_the_mark(world: World) -> None:
    legit, other, stolen = _keys(world)
    world.install(world.bundle(3, HUGE, keys=[stolen]))
    before = world.snapshot()
    installer = world.installer()
    # A signers update revoking the key, but signed by the key instead of root.
    with pytest.raises(SignatureError):
        installer.apply_signers_update(_signers_update(world, [legit, other], [stolen], [stolen]))
    # Bundles the key signs: lower counters are rollbacks, the same counter a replay.
    with pytest.raises(RollbackError):
        world.install(world.bundle(4, 1, keys=[stolen]))
    with pytest.raises(ReplayError):
        world.install(world.bundle(4, HUGE, keys=[stolen]))
    with pytest.raises(RollbackError):
        world.install(world.bundle(2, 2, keys=[legit]))
    world.assert_unchanged(before)
    assert world.store.read_high_water()[MODEL].counter == HUGE


def test_dropping_a_key_without_revoking_it_keeps_its_mark(world: World) -> None:
    legit, other, stolen = _keys(world)
    world.install(world.bundle(3, HUGE, keys=[stolen]))
    world.installer().apply_signers_update(
        _signers_update(world, [legit, other], [], world.keys.root[:1])
    )
    with pytest.raises(RollbackError):
        world.install(world.bundle(2, 2, keys=[legit]))


def test_the_mark_file_records_who_signed_and_reads_older_files(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    a, b = "a" * 64, "b" * 64
    mark = HighWaterMark(5, "d5", frozenset({a})).advanced(9, "d9", frozenset({b}))
    store.write_high_water({MODEL: mark})
    assert store.read_high_water()[MODEL] == mark
    doc = json.loads(store.high_water_path.read_bytes())
    assert doc["models"][MODEL]["signed_by"] == [b]
    assert doc["models"][MODEL]["earlier"][0]["counter"] == 5
    # A file from before signers were recorded: its marks are never set aside.
    store.high_water_path.write_text(
        json.dumps({"models": {MODEL: {"counter": 7, "manifest_sha256": "x"}}, "spec_version": 1})
    )
    legacy = store.read_high_water()[MODEL]
    assert legacy.standing(frozenset({a, b})) == HighWaterMark(7, "x")


def test_mark_arithmetic() -> None:
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    mark = HighWaterMark(3, "d3", frozenset({a}))
    mark = mark.advanced(10, "d10", frozenset({a, c}))  # threshold 2, one key later stolen
    assert mark.advanced(2, "d2", frozenset({a})) == mark  # never lowers
    assert mark.standing(frozenset()) == HighWaterMark(10, "d10", frozenset({a, c}))
    assert mark.standing(frozenset({c})) == HighWaterMark(3, "d3", frozenset({a}))
    assert mark.standing(frozenset({a})) is None  # every mark set by a revoked key
    many = HighWaterMark(1, "d", frozenset({b}))
    for i in range(2, MAX_MARKS_PER_MODEL + 10):
        many = many.advanced(i, f"d{i}", frozenset({f"{i:064x}"}))
    assert len(many.entries()) == MAX_MARKS_PER_MODEL
    assert many.counter == MAX_MARKS_PER_MODEL + 9  # the lowest are the ones dropped


def test_re_pushing_the_serving_version_records_a_missing_mark(world: World) -> None:
    v2 = world.bundle(2)
    world.install(v2)
    store = world.store
    v1_mark = store.read_high_water()[MODEL].earlier  # none: same key set, so it was replaced
    assert v1_mark == ()
    # As after a crash between the pointer switch and the mark update:
    held = store.inspect_version(store.version_dir(MODEL, 1))
    assert held is not None
    store.write_high_water({MODEL: HighWaterMark(1, held.manifest_sha256)})
    assert world.install(v2).outcome == "already-installed"
    mark = store.read_high_water()[MODEL].standing(frozenset())
    assert mark is not None and mark.counter == 2
