"""Trust documents: root-signed signers lists that add, rotate and revoke keys without a
reflash; and context-bound payload signatures for fleet commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.bundle.keys import (
    CONTEXT_COMMAND,
    CONTEXT_MANIFEST,
    keyid_of,
    sign_payload,
    verify_payload,
)
from edged.bundle.trust import (
    add_document_signature,
    apply_signers_update,
    build_root,
    build_signers,
    load_trust_state,
    parse_root,
)
from edged.bundle.truststore import TrustStore
from edged.errors import (
    BadSignatureError,
    BundleError,
    DuplicateSignatureError,
    NoSignaturesError,
    RevokedKeyError,
    ThresholdNotMetError,
    TrustDocumentError,
    TrustExpiredError,
    TrustVersionError,
    UnknownKeyError,
)
from tests.bundle.helpers import DAY, NOW, Keys, make_keys, trust_documents


@pytest.fixture(scope="module")
def tkeys() -> Keys:
    return make_keys(root=3, signers=3)


def test_trust_state_loads_and_lists_public_keys_only(tkeys: Keys) -> None:
    root, signers = trust_documents(tkeys, threshold=2, root_threshold=2)
    state = load_trust_state(root, signers)
    assert state.root.threshold == 2
    assert state.signers.threshold == 2
    assert set(state.signers.keys) == {keyid_of(k.public_key()) for k in tkeys.signers}
    assert b"PRIVATE" not in root + signers


def test_root_needs_its_own_threshold(tkeys: Keys) -> None:
    root = build_root([k.public_key() for k in tkeys.root], 2, tkeys.root[:1])
    with pytest.raises(ThresholdNotMetError, match="root.json"):
        parse_root(root)
    parse_root(add_document_signature(root, tkeys.root[1]))


def test_signers_signed_by_a_non_root_key_are_refused(tkeys: Keys) -> None:
    root, _ = trust_documents(tkeys)
    signers = build_signers([tkeys.signers[0].public_key()], 1, 1, NOW + DAY, [tkeys.outsider])
    with pytest.raises(UnknownKeyError, match="root signatures"):
        load_trust_state(root, signers)


def test_edited_signers_document_is_refused(tkeys: Keys) -> None:
    root, signers = trust_documents(tkeys)
    doc = json.loads(signers)
    doc["signed"]["threshold"] = 3
    with pytest.raises(BadSignatureError):
        load_trust_state(root, json.dumps(doc).encode())


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["signed"].update(threshold=9), "threshold 9"),
        (lambda d: d["signed"].update(threshold=0), "threshold"),
        (lambda d: d["signed"].update(version=0), "version"),
        (lambda d: d["signed"].update(_type="edged/root"), "_type"),
        (lambda d: d["signed"].update(extra=1), "extra"),
        (
            lambda d: d["signed"]["keys"].update(
                {"0" * 64: next(iter(d["signed"]["keys"].values()))}
            ),
            "SHA-256",
        ),
        (
            lambda d: d["signed"].update(revoked=[next(iter(d["signed"]["keys"]))]),
            "both trusted and revoked",
        ),
        (lambda d: d["signatures"].append({"keyid": "zz", "sig": "00"}), "signatures"),
    ],
    ids=[
        "threshold-too-high",
        "threshold-zero",
        "version-zero",
        "type",
        "unknown-field",
        "keyid",
        "revoked-and-trusted",
        "bad-sig-entry",
    ],
)
def test_malformed_signers_documents_are_refused(tkeys: Keys, edit: object, match: str) -> None:
    root, signers = trust_documents(tkeys)
    doc = json.loads(signers)
    edit(doc)  # type: ignore[operator]
    with pytest.raises(TrustDocumentError, match=match):
        load_trust_state(root, json.dumps(doc).encode())


def test_signers_update_rotates_and_revokes_without_reflash(tkeys: Keys, tmp_path: Path) -> None:
    root, signers = trust_documents(tkeys, signers=tkeys.signers[:1])
    store = TrustStore(tmp_path / "trust")
    store.initialise(root, signers)
    old, new = tkeys.signers[0], tkeys.signers[1]
    update = build_signers(
        [new.public_key()],
        1,
        2,
        NOW + 30 * DAY,
        tkeys.root[:1],
        revoked=[keyid_of(old.public_key())],
    )
    state = store.apply_signers_update(update, NOW)
    assert state.signers.version == 2
    reloaded = store.load()
    assert set(reloaded.signers.keys) == {keyid_of(new.public_key())}
    assert keyid_of(old.public_key()) in reloaded.signers.revoked
    assert store.apply_signers_update(update, NOW).signers_bytes == update  # re-applying: no-op


def test_signers_update_must_increase_the_version(tkeys: Keys) -> None:
    root, signers = trust_documents(tkeys, version=3)
    state = load_trust_state(root, signers)
    older = build_signers([tkeys.signers[0].public_key()], 1, 2, NOW + DAY, tkeys.root[:1])
    with pytest.raises(TrustVersionError, match="version 2"):
        apply_signers_update(state, older, NOW)
    same_version = build_signers([tkeys.signers[0].public_key()], 1, 3, NOW + DAY, tkeys.root[:1])
    with pytest.raises(TrustVersionError):
        apply_signers_update(state, same_version, NOW)


def test_expired_signers_update_is_refused(tkeys: Keys) -> None:
    root, signers = trust_documents(tkeys)
    state = load_trust_state(root, signers)
    stale = build_signers([tkeys.signers[0].public_key()], 1, 2, NOW - 1, tkeys.root[:1])
    with pytest.raises(TrustExpiredError):
        apply_signers_update(state, stale, NOW)


def test_missing_trust_store_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(TrustDocumentError, match="edged trust init"):
        TrustStore(tmp_path / "nowhere").load()


def test_existing_root_is_not_replaced_by_accident(tkeys: Keys, tmp_path: Path) -> None:
    root, signers = trust_documents(tkeys)
    store = TrustStore(tmp_path)
    store.initialise(root, signers)
    with pytest.raises(TrustDocumentError, match="exists"):
        store.initialise(root, signers)


# --- signed fleet commands ---------------------------------------------------------------


def test_command_signatures_verify_against_the_signers_list(tkeys: Keys) -> None:
    root, signers = trust_documents(tkeys, threshold=2)
    state = load_trust_state(root, signers)
    payload = b'{"action":"rollback","model":"mlp"}'
    sigs = [sign_payload(k, payload, context=CONTEXT_COMMAND) for k in tkeys.signers[:2]]
    assert len(state.verify_command(payload, sigs, NOW)) == 2
    with pytest.raises(ThresholdNotMetError):
        state.verify_command(payload, sigs[:1], NOW)
    with pytest.raises(BadSignatureError):
        state.verify_command(payload + b" ", sigs, NOW)
    with pytest.raises(TrustExpiredError):
        state.verify_command(payload, sigs, NOW + 400 * DAY)


def test_a_manifest_signature_is_not_a_command_signature(tkeys: Keys) -> None:
    key = tkeys.signers[0]
    keys = {keyid_of(key.public_key()): key.public_key()}
    sig = sign_payload(key, b"payload", context=CONTEXT_MANIFEST)
    with pytest.raises(BadSignatureError):
        verify_payload(b"payload", [sig], context=CONTEXT_COMMAND, keys=keys, threshold=1)


def test_payload_signature_failures_are_distinct(tkeys: Keys) -> None:
    a, b = tkeys.signers[:2]
    keys = {keyid_of(a.public_key()): a.public_key()}
    sig_a = sign_payload(a, b"p", context=CONTEXT_COMMAND)
    sig_b = sign_payload(b, b"p", context=CONTEXT_COMMAND)
    with pytest.raises(NoSignaturesError):
        verify_payload(b"p", [], context=CONTEXT_COMMAND, keys=keys, threshold=1)
    with pytest.raises(UnknownKeyError):
        verify_payload(b"p", [sig_b], context=CONTEXT_COMMAND, keys=keys, threshold=1)
    with pytest.raises(DuplicateSignatureError):
        verify_payload(b"p", [sig_a, sig_a], context=CONTEXT_COMMAND, keys=keys, threshold=1)
    with pytest.raises(RevokedKeyError):
        verify_payload(
            b"p",
            [sig_a, sig_b],
            context=CONTEXT_COMMAND,
            keys=keys,
            threshold=1,
            revoked=frozenset({sig_b.keyid}),
        )
    assert verify_payload(
        b"p", [sig_a, sig_b], context=CONTEXT_COMMAND, keys=keys, threshold=1
    ) == {sig_a.keyid}


_KEYS = make_keys(1, 1)
_ROOT, _SIGNERS = trust_documents(_KEYS)


@settings(max_examples=200, deadline=2000)
@given(st.binary(max_size=600))
def test_trust_parsers_raise_only_bundle_errors(data: bytes) -> None:
    for parse in (parse_root, lambda d: load_trust_state(_ROOT, d)):
        try:
            parse(data)
        except BundleError:
            pass


@settings(max_examples=200, deadline=2000)
@given(st.integers(0, len(_SIGNERS) - 1), st.binary(min_size=1, max_size=8))
def test_edited_trust_documents_raise_only_bundle_errors(at: int, junk: bytes) -> None:
    data = _SIGNERS[:at] + junk + _SIGNERS[at + len(junk) :]
    try:
        load_trust_state(_ROOT, data)
    except BundleError:
        pass
