"""Canonical JSON: the exact bytes that get signed, and a parser that only ever raises the
caller's ``BundleError``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.bundle.canonical import MAX_SAFE_INTEGER, encode_canonical, parse_canonical, parse_strict
from edged.errors import BundleError, ManifestEncodingError

printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
ints = st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
json_values = st.recursive(
    st.booleans() | ints | printable,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(printable, children, max_size=4)
    ),
    max_leaves=20,
)


def test_encoding_sorts_keys_and_drops_whitespace() -> None:
    assert encode_canonical({"b": [1, True], "a": 'x"y\\z/'}) == b'{"a":"x\\"y\\\\z/","b":[1,true]}'


@pytest.mark.parametrize(
    "value",
    [1.5, None, "caf\u00e9", "tab\t", 2**53, -(2**53), {"k": [0.0]}, {1: "non-string key"}],
    ids=["float", "null", "non-ascii", "control", "big", "small", "nested-float", "int-key"],
)
def test_forbidden_values_cannot_be_encoded(value: Any) -> None:
    with pytest.raises(ValueError, match="not allowed|not printable|outside|not a string"):
        encode_canonical(value)


@pytest.mark.parametrize(
    "text",
    [
        b'{"a":1,"a":2}',
        b'{"a":1.0}',
        b'{"a":1e3}',
        b'{"a":NaN}',
        b'{"a":null}',
        b'{"a":"\\u00e9"}',
        b'{"a":"\xc3\xa9"}',
        b'{"a":123456789012345678901234567890}',
        b"[" * 5000 + b"]" * 5000,
        b'{"a":',
        b"",
    ],
    ids=[
        "duplicate-key",
        "float",
        "exponent",
        "nan",
        "null",
        "escaped-non-ascii",
        "raw-utf8",
        "huge-int",
        "deep",
        "truncated",
        "empty",
    ],
)
def test_strict_parser_rejects(text: bytes) -> None:
    with pytest.raises(ManifestEncodingError):
        parse_strict(text, "doc", ManifestEncodingError)


def test_non_canonical_form_is_rejected_with_the_offset() -> None:
    with pytest.raises(ManifestEncodingError, match="byte 1"):
        parse_canonical(b'{ "a":1}', "doc", ManifestEncodingError)
    with pytest.raises(ManifestEncodingError, match="canonical"):
        parse_canonical(b'{"b":1,"a":2}', "doc", ManifestEncodingError)


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_canonical_round_trip(value: Any) -> None:
    data = encode_canonical(value)
    assert parse_canonical(data, "doc", ManifestEncodingError) == value
    assert json.loads(data) == value


@settings(max_examples=60, deadline=None)
@given(json_values, st.sampled_from([None, 1, 2]), st.sampled_from([(", ", ": "), (",", ":")]))
def test_only_the_canonical_form_is_accepted(
    value: Any, indent: int | None, seps: tuple[str, str]
) -> None:
    other = json.dumps(value, indent=indent, separators=seps).encode()
    try:
        parse_canonical(other, "doc", ManifestEncodingError)
    except ManifestEncodingError:
        assert other != encode_canonical(value)
    else:
        assert other == encode_canonical(value)


@settings(max_examples=500, deadline=2000)
@given(st.binary(max_size=300))
def test_parser_never_raises_anything_but_its_error(data: bytes) -> None:
    try:
        parse_strict(data, "doc", ManifestEncodingError)
    except BundleError:
        pass
