"""uvloop when installed, the standard asyncio loop on request (EDGED_EVENT_LOOP=asyncio)."""

from __future__ import annotations

import importlib.util
import urllib.request
from pathlib import Path

import pytest

from edged.daemon.loops import event_loop_kind
from edged.errors import ConfigError
from tests.support.daemon import running_daemon

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def test_uvloop_is_the_default_when_installed() -> None:
    assert event_loop_kind({}) == ("uvloop" if HAVE_UVLOOP else "asyncio")
    assert event_loop_kind({"EDGED_EVENT_LOOP": "auto"}) == event_loop_kind({})


def test_asyncio_opts_out_of_uvloop() -> None:
    assert event_loop_kind({"EDGED_EVENT_LOOP": "asyncio"}) == "asyncio"
    assert event_loop_kind({"EDGED_EVENT_LOOP": " AsyncIO "}) == "asyncio"


def test_an_unknown_loop_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="EDGED_EVENT_LOOP: must be auto, asyncio or uvloop"):
        event_loop_kind({"EDGED_EVENT_LOOP": "trio"})


@pytest.mark.integration
@pytest.mark.parametrize("wanted", ["asyncio", "auto"])
def test_the_daemon_serves_on_the_loop_it_was_given(
    model_repo: Path, tmp_path: Path, wanted: str
) -> None:
    expected = "asyncio" if wanted == "asyncio" or not HAVE_UVLOOP else "uvloop"
    with running_daemon(model_repo, tmp_path / "d", env={"EDGED_EVENT_LOOP": wanted}) as daemon:
        with urllib.request.urlopen(f"{daemon.url}/v2/models/mlp", timeout=10) as response:
            assert response.status == 200
        assert f"event loop: {expected} " in daemon.log()
