"""The memory policy as numbers: fits beside, unload first, or refuse with the figures."""

from __future__ import annotations

import pytest

from edged.errors import InsufficientMemoryError
from edged.serve.memory import MemoryRequest, MiB, must_unload_first


def request(**overrides: object) -> MemoryRequest:
    values: dict[str, object] = {
        "model": "det",
        "version": "2",
        "estimate_bytes": 100 * MiB,
        "old_version": "1",
        "old_estimate_bytes": 80 * MiB,
        "available_bytes": 150 * MiB,
        "in_use_bytes": 80 * MiB,
        "limit_bytes": 0,
        "policy": "refuse",
    }
    values.update(overrides)
    return MemoryRequest(**values)  # type: ignore[arg-type]


def test_a_version_that_fits_loads_beside_the_serving_one() -> None:
    assert must_unload_first(request()) is False


def test_the_budget_counts_what_is_already_loaded() -> None:
    with pytest.raises(InsufficientMemoryError, match="needs about 100 MiB but 70 MiB is free"):
        must_unload_first(request(limit_bytes=150 * MiB))


def test_unload_first_when_releasing_the_old_version_makes_room() -> None:
    tight = request(available_bytes=60 * MiB, policy="unload-first")
    assert must_unload_first(tight) is True


def test_unload_first_still_refuses_what_would_not_fit_after_releasing() -> None:
    with pytest.raises(InsufficientMemoryError, match="policy unload-first"):
        must_unload_first(request(available_bytes=10 * MiB, policy="unload-first"))


def test_refuse_names_the_numbers_and_that_the_old_version_keeps_serving() -> None:
    with pytest.raises(InsufficientMemoryError) as caught:
        must_unload_first(request(available_bytes=60 * MiB))
    assert str(caught.value) == (
        "version 2 of det needs about 100 MiB but 60 MiB is free for models "
        "(policy refuse); version 1 keeps serving"
    )


def test_a_first_load_has_nothing_to_unload() -> None:
    first = request(
        old_version=None, old_estimate_bytes=0, available_bytes=60 * MiB, policy="unload-first"
    )
    with pytest.raises(InsufficientMemoryError, match=r"\(policy unload-first\)$"):
        must_unload_first(first)
