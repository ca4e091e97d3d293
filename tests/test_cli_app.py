"""The CLI imports only the module of the command it runs: every command must be mapped."""

from __future__ import annotations

import argparse
import subprocess
import sys

from edged.cli.app import COMMANDS, build_parser


def test_every_registered_command_is_mapped_to_its_module() -> None:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    registered = set(actions[0].choices)
    assert registered == set(COMMANDS)
    for command, module in COMMANDS.items():
        alone = build_parser((module,))
        sub = next(a for a in alone._actions if isinstance(a, argparse._SubParsersAction))
        assert command in sub.choices, f"{module} does not register {command!r}"


def test_edged_status_imports_neither_the_daemon_nor_mqtt() -> None:
    probe = (
        "import sys\n"
        "from edged.cli.app import run_cli\n"
        "code = run_cli(['status', '--socket', '/nonexistent/edged.sock'])\n"
        "loaded = [m for m in ('edged.daemon', 'aiomqtt', 'paho', 'edged.fleet', 'aiohttp.web')"
        " if m in sys.modules]\n"
        "print(code, loaded)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "1 []", done.stdout + done.stderr


def test_loading_the_config_imports_no_mqtt_crypto_or_runtime(tmp_path: object) -> None:
    probe = (
        "import sys, pathlib, tempfile\n"
        "import edged.config as c\n"
        "d = pathlib.Path(tempfile.mkdtemp())\n"
        "(d / 'edged.toml').write_text('[mqtt]\\nenabled = false\\ngroups = [\"g\"]\\n')\n"
        "c.load_config(d / 'edged.toml'); c.load_config(None)\n"
        "print([m for m in ('aiomqtt', 'paho', 'cryptography', 'onnxruntime', 'numpy')"
        " if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
