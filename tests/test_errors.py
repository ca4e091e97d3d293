"""The error tree drawn in edged/errors.py names every EdgedError there is."""

from __future__ import annotations

import importlib
import pkgutil
import re

import edged
from edged import errors


def _all_subclasses(cls: type[Exception]) -> set[type[Exception]]:
    found: set[type[Exception]] = set()
    sub: type[Exception]
    for sub in cls.__subclasses__():
        found.add(sub)
        found |= _all_subclasses(sub)
    return found


def test_every_edged_error_appears_in_the_drawn_tree() -> None:
    for module in pkgutil.walk_packages(edged.__path__, "edged."):
        if module.name == "edged.demo.samples":
            continue  # needs the optional samples extra (onnx)
        importlib.import_module(module.name)
    tree = [line for line in (errors.__doc__ or "").splitlines() if "──" in line or "│" in line]
    drawn = set(re.findall(r"\b([A-Z][A-Za-z]+Error)\b", "\n".join(tree)))
    classes = {c.__name__ for c in _all_subclasses(errors.EdgedError)}
    assert classes, "no EdgedError subclasses found"
    assert sorted(classes - drawn) == []
    assert sorted(drawn - classes - {"EdgedError"}) == []


def test_every_edged_error_is_defined_in_errors_py() -> None:
    outside = sorted(
        f"{c.__module__}.{c.__name__}"
        for c in _all_subclasses(errors.EdgedError)
        if c.__module__ != "edged.errors"
    )
    assert outside == []
