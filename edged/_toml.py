"""Typed, path-aware reading of TOML: every error names the key path that was wrong.

``tomllib`` on Python >= 3.11, the ``tomli`` backport on 3.10 (JetPack 6).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from edged.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on JetPack 6's Python 3.10
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError
loads = tomllib.loads

T = TypeVar("T")


def load_toml_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data: dict[str, Any] = loads(text)
        return data
    except TOMLDecodeError as exc:
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from exc


class Table:
    """A TOML table plus the dotted path that led to it; unknown keys are an error."""

    def __init__(self, data: Mapping[str, Any], path: str = "") -> None:
        self._data = data
        self._path = path
        self._seen: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def _get(self, key: str, kind: type[T] | tuple[type, ...], kind_name: str) -> T | None:
        self._seen.add(key)
        if key not in self._data:
            return None
        value = self._data[key]
        # bool is an int in Python; a TOML `true` is never a number here.
        if isinstance(value, bool) and kind is not bool:
            raise ConfigError(self.key_path(key), f"expected {kind_name}, got a boolean")
        if not isinstance(value, kind):
            raise ConfigError(
                self.key_path(key), f"expected {kind_name}, got {type(value).__name__} {value!r}"
            )
        return value  # type: ignore[return-value]

    def string(self, key: str, default: str, choices: tuple[str, ...] = ()) -> str:
        value = self._get(key, str, "a string")
        if value is None:
            return default
        if choices and value not in choices:
            raise ConfigError(
                self.key_path(key), f"must be one of {', '.join(choices)}; got {value!r}"
            )
        return value

    def optional_str(self, key: str) -> str | None:
        return self._get(key, str, "a string")

    def integer(
        self, key: str, default: int, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = self._get(key, int, "an integer")
        if value is None:
            return default
        if minimum is not None and value < minimum:
            raise ConfigError(self.key_path(key), f"must be >= {minimum}; got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(self.key_path(key), f"must be <= {maximum}; got {value}")
        return value

    def number(self, key: str, default: float, minimum: float | None = None) -> float:
        raw: object = self._get(key, (int, float), "a number")
        if raw is None:
            return default
        value = float(raw)  # type: ignore[arg-type]
        if minimum is not None and value < minimum:
            raise ConfigError(self.key_path(key), f"must be >= {minimum}; got {value}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, bool, "true or false")
        return default if value is None else value

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(key, list, "a list of strings")
        if value is None:
            return default
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{self.key_path(key)}[{i}]", f"expected a string, got {item!r}")
        return tuple(value)

    def path(self, key: str, default: Path, base: Path | None = None) -> Path:
        value = self.optional_str(key)
        if value is None:
            return default
        p = Path(value)
        return p if p.is_absolute() or base is None else base / p

    def table(self, key: str) -> Table:
        value = self._get(key, dict, "a table")
        return Table(value or {}, self.key_path(key))

    def tables(self, key: str) -> list[Table]:
        value = self._get(key, list, "an array of tables")
        out: list[Table] = []
        for i, item in enumerate(value or []):
            if not isinstance(item, dict):
                raise ConfigError(f"{self.key_path(key)}[{i}]", "expected a table")
            out.append(Table(item, f"{self.key_path(key)}[{i}]"))
        return out

    def raw(self, key: str) -> Any:
        self._seen.add(key)
        return self._data.get(key)

    def reject_unknown(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ConfigError(self.key_path(unknown[0]), "unknown key (check the spelling)")
