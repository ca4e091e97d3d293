"""Canonical JSON: the one byte encoding edged signs, and a strict parser for it.

Values are objects, arrays, strings of printable ASCII (0x20-0x7E), integers with magnitude
below 2**53, ``true`` and ``false``. No floats and no ``null``. The encoding sorts object keys by
code point, has no whitespace, escapes only ``"`` and ``\\``, and writes integers in plain
decimal. ``docs/bundle-format.md`` states the same rules for people writing their own signer.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn, TypeAlias

from edged.errors import BundleError

Json: TypeAlias = "dict[str, Json] | list[Json] | str | int | bool"

MAX_SAFE_INTEGER = 2**53 - 1
MAX_DEPTH = 16


class _Reject(ValueError):
    """Raised inside the json hooks; turned into the caller's error class."""


def _reject(reason: str) -> NoReturn:
    raise _Reject(reason)


def _check_string(value: str, where: str) -> None:
    for ch in value:
        if not " " <= ch <= "~":
            _reject(f"{where}: character {ch!r} is not printable ASCII")


def _check(value: Any, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        _reject(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            _reject(f"{where}: integer {value} is outside +-(2**53 - 1)")
        return
    if isinstance(value, str):
        _check_string(value, where)
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                _reject(f"{where}: object key {key!r} is not a string")
            _check_string(key, f"{where}: key")
            _check(item, f"{where}.{key}", depth + 1)
        return
    kind = {type(None): "null", float: "floating-point"}.get(type(value), "non-JSON")
    _reject(f"{where}: {kind} values are not allowed (no floats, no null)")


def encode_canonical(value: Json) -> bytes:
    """The canonical bytes of ``value``; ``ValueError`` when it holds a forbidden value."""
    try:
        _check(value, "$", 0)
    except _Reject as exc:
        raise ValueError(str(exc)) from None
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            _reject(f"duplicate object key {key!r}")
        result[key] = value
    return result


def _no_float(text: str) -> NoReturn:
    _reject(f"number {text} is not an integer (floats are not allowed)")


def _no_constant(text: str) -> NoReturn:
    _reject(f"{text} is not allowed")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 16:
        _reject(f"integer {text[:20]}... is outside +-(2**53 - 1)")
    return int(text)


def parse_strict(data: bytes, what: str, error: type[BundleError]) -> Json:
    """Parse JSON under the canonical value rules (any whitespace, any key order).

    Every failure raises ``error`` with ``what`` in the message; nothing else escapes.
    """
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise error(f"{what}: byte {exc.start} is not ASCII") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_float=_no_float,
            parse_constant=_no_constant,
            parse_int=_int,
        )
        _check(value, "$", 0)
    except _Reject as exc:
        raise error(f"{what}: {exc}") from None
    except RecursionError:
        raise error(f"{what}: nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise error(f"{what}: not valid JSON: {exc}") from None
    return value  # type: ignore[no-any-return]


def parse_canonical(data: bytes, what: str, error: type[BundleError]) -> Json:
    """Parse ``data`` and require it to be exactly the canonical encoding of its value."""
    value = parse_strict(data, what, error)
    expected = encode_canonical(value)
    if expected != data:
        at = next(
            (i for i, (a, b) in enumerate(zip(expected, data, strict=False)) if a != b),
            min(len(expected), len(data)),
        )
        raise error(
            f"{what}: not in canonical form (first difference at byte {at}; expected sorted "
            "keys, no whitespace, minimal escapes)"
        )
    return value
