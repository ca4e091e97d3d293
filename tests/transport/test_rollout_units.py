"""Pure parts of rollouts at scale: the state module agrees with the protocol, a 10,000-device
state file round-trips, and ``edged rollout status`` shows it per wave."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edged.fleet import rolloutstate
from edged.fleet.rolloutstate import (
    AbortPolicy,
    DeviceRecord,
    RolloutState,
    RolloutStore,
    plan_waves,
    summary_line,
)
from edged.transport import protocol
from tests.support.daemon import REPO_ROOT


def test_the_state_module_names_the_protocol_states_and_imports_no_mqtt() -> None:
    assert (rolloutstate.FAILED, rolloutstate.PROMOTED, rolloutstate.REVERTED) == (
        protocol.FAILED, protocol.PROMOTED, protocol.REVERTED,
    )  # fmt: skip
    from edged.fleet import channel

    assert rolloutstate.DEFAULT_CHUNK_BYTES == channel.DEFAULT_CHUNK_BYTES
    code = (
        "import sys; import edged.cli.rollout; "
        "print(sorted(m for m in ('aiomqtt', 'edged.fleet.channel', 'edged.bundle') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    ).stdout
    assert out.strip() == "[]"


def big_state(n: int) -> RolloutState:
    names = [f"sim-{i:05}" for i in range(n)]
    waves = plan_waves(names, (10, 50))
    state = RolloutState(
        id="wide", bundle="/b", bundle_sha256="ab" * 32, deployment="cd" * 16, model="mlp",
        version=2, group="fleet", waves=waves, abort=AbortPolicy(),
        devices={d: DeviceRecord(i) for i, wave in enumerate(waves) for d in wave},
    )  # fmt: skip
    for i, name in enumerate(names):
        record = state.devices[name]
        record.state = "passed" if i % 100 else "reverted"
        record.reason = "" if i % 100 else "error rate 0.3 > 0.05"
    state.wave = 2
    return state


def test_a_ten_thousand_device_state_round_trips_and_status_shows_waves(tmp_path: Path) -> None:
    store = RolloutStore(tmp_path)
    state = big_state(10_000)
    store.save(state)
    assert store.load("wide") == state
    assert (tmp_path / "wide.json").stat().st_size < 2_000_000
    line = summary_line(state)
    assert line.startswith("wave 3/4 (4000 devices): 3960 passed, 40 reverted;")
    assert line.endswith("fleet: 9900/10000 passed")
    out = subprocess.run(
        [sys.executable, "-m", "edged.cli.main", "rollout", "status", "wide",
         "--state-dir", str(tmp_path)],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    assert len(lines) < 120  # a summary per wave and the devices that did not pass
    assert "wave 4 (5000 devices: 4950 passed, 50 reverted)" in out
    assert "... and 30 more (--devices lists all)" in out
    full = subprocess.run(
        [sys.executable, "-m", "edged.cli.main", "rollout", "status", "wide", "--devices",
         "--state-dir", str(tmp_path)],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    ).stdout  # fmt: skip
    assert full.count("sim-") == 10_000
