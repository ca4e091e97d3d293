"""The .deb installs, runs and uninstalls in a throw-away Debian 12 root (opt-in: minutes, root).

Run with ``EDGED_PACKAGE_TESTS=1`` as root. The test builds the package with
``packaging/build-deb.sh`` (or takes ``EDGED_PACKAGE_DEB``), debootstraps ``--variant=minbase
bookworm`` once into a tarball cached under ``/var/cache/edged-tests``, and installs the package
with apt in a fresh copy of that root, so apt resolves the package's Depends from the mirror.
Commands run chrooted in a private mount namespace (its /proc and /dev mounts vanish with it).

``EDGED_PACKAGE_ARCH=arm64`` runs the same checks on the arm64 package under qemu-user-static
(binfmt_misc with the F flag, as the qemu-user-static package registers it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
CACHE_DIR = Path(os.environ.get("EDGED_ROOTFS_CACHE", "/var/cache/edged-tests"))
CLEAN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}


def _host_arch() -> str:
    if shutil.which("dpkg") is None:
        return ""
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


ARCH = os.environ.get("EDGED_PACKAGE_ARCH") or _host_arch()


def _skip_reason() -> str | None:
    if os.environ.get("EDGED_PACKAGE_TESTS") != "1":
        return "builds the .deb and debootstraps a Debian root (minutes); set EDGED_PACKAGE_TESTS=1"
    if os.geteuid() != 0:
        return "debootstrap, chroot and mount namespaces need root"
    for tool in ("debootstrap", "dpkg-deb", "unshare", "chroot", "tar"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if ARCH not in ("amd64", "arm64"):
        return f"no package for architecture {ARCH!r}"
    if _host_arch() != ARCH:
        machine = {"arm64": "aarch64", "amd64": "x86_64"}[ARCH]
        entry = Path(f"/proc/sys/fs/binfmt_misc/qemu-{machine}")
        if not entry.exists() or "enabled" not in entry.read_text():
            return f"running {ARCH} binaries needs qemu-user-static registered in binfmt_misc"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
]


def _apt_mirror() -> str:
    """The Debian mirror this host's apt uses (deb822 or one-line sources)."""
    override = os.environ.get("EDGED_DEBIAN_MIRROR")
    if override:
        return override
    sources = Path("/etc/apt/sources.list.d")
    for path in [*sorted(sources.glob("*.sources")), *sorted(sources.glob("*.list"))]:
        for line in path.read_text().splitlines():
            words = line.split()
            uris = (
                words[1:] if words[:1] == ["URIs:"] else words[1:2] if words[:1] == ["deb"] else []
            )
            for uri in uris:
                if uri.rstrip("/").endswith("/debian"):
                    return uri
    return "http://deb.debian.org/debian"


def _rootfs_tarball() -> Path:
    """A minbase root as a tarball, debootstrapped on first use and cached."""
    tarball = CACHE_DIR / f"{SUITE}-minbase-{ARCH}.tar"
    if tarball.exists():
        return tarball
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="debootstrap-", dir=CACHE_DIR) as work:
        root = Path(work) / "root"
        subprocess.run(
            ["debootstrap", f"--arch={ARCH}", "--variant=minbase", SUITE, str(root), _apt_mirror()],
            check=True,
            capture_output=True,
            env=CLEAN_ENV,
            timeout=3000,
        )
        partial = tarball.with_suffix(".tar.partial")
        subprocess.run(
            ["tar", "-C", str(root), "--numeric-owner", "-cpf", str(partial), "."], check=True
        )
        partial.replace(tarball)
    return tarball


def _fresh_root(parent: Path) -> Path:
    root = parent / "root"
    root.mkdir()
    subprocess.run(
        ["tar", "-C", str(root), "--numeric-owner", "-xpf", str(_rootfs_tarball())], check=True
    )
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    return root


_CHROOT = 'mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" && exec chroot "$1" /bin/sh -ec "$2"'


def _chroot_argv(root: Path, script: str) -> list[str]:
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-ec",
        _CHROOT,
        "sh",
        str(root),
        script,
    ]


def run_in(root: Path, script: str, timeout_s: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run a shell script as root chrooted into ``root``; the result, whatever its status."""
    return subprocess.run(
        _chroot_argv(root, script),
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
        timeout=timeout_s,
        check=False,
    )


def check_in(root: Path, script: str, timeout_s: float = 1800) -> str:
    result = run_in(root, script, timeout_s)
    assert result.returncode == 0, (
        f"{script}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    return result.stdout


@dataclass(frozen=True)
class Package:
    path: Path
    version: str  # the Debian version
    wheel_version: str  # edged's own (PEP 440) version, what `edged --version` prints


@pytest.fixture(scope="module")
def package() -> Package:
    prebuilt = os.environ.get("EDGED_PACKAGE_DEB")
    if prebuilt:
        path = Path(prebuilt)
    else:
        result = subprocess.run(
            [str(REPO / "packaging/build-deb.sh"), ARCH],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        path = Path(result.stdout.strip().splitlines()[-1])
    fields = subprocess.run(
        ["dpkg-deb", "--field", str(path), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    wheels = subprocess.run(
        ["dpkg-deb", "--contents", str(path)], capture_output=True, text=True, check=True
    ).stdout
    wheel_version = next(
        word.rsplit("/", 1)[-1].split("-")[1]
        for word in wheels.split()
        if word.rsplit("/", 1)[-1].startswith("edged-") and word.endswith(".whl")
    )
    return Package(path, fields, wheel_version)


def _install(root: Path, package: Package) -> None:
    shutil.copy(package.path, root / "tmp/edged.deb")
    check_in(
        root,
        "apt-get update -qq && apt-get install -y -qq --no-install-recommends /tmp/edged.deb",
    )


@pytest.fixture(scope="module")
def installed_root(package: Package, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = _fresh_root(tmp_path_factory.mktemp("installed"))
    _install(root, package)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _uid_in(root: Path, user: str) -> int:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2])
    raise AssertionError(f"no user {user} in {root}/etc/passwd")


# --- the package file ----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian is not installed")
def test_package_has_no_lintian_errors(package: Package) -> None:
    result = subprocess.run(
        ["lintian", "--fail-on", "error", str(package.path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert result.returncode == 0 and not errors, result.stdout + result.stderr


# --- installed -----------------------------------------------------------------------------


def test_edged_version_runs_from_the_installed_package(
    installed_root: Path, package: Package
) -> None:
    assert check_in(installed_root, "edged --version").strip() == f"edged {package.wheel_version}"


def test_edged_doctor_runs(installed_root: Path) -> None:
    result = run_in(installed_root, "edged doctor")
    if "invalid choice: 'doctor'" in result.stderr:
        pytest.skip("`edged doctor` is not implemented yet; only `edged --version` was run")
    print(result.stdout, result.stderr)  # shown with pytest -s: what doctor says in a chroot
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 1), result.stdout + result.stderr


def test_install_creates_user_directories_and_venv(installed_root: Path) -> None:
    out = check_in(
        installed_root,
        "getent passwd edged | cut -d: -f6,7;"
        " stat -c '%n %U %G %a' /etc/edged /var/lib/edged /var/lib/edged/models"
        " /var/lib/edged/seed;"
        " readlink /usr/bin/edged; readlink /opt/edged/venv; ls -d /opt/edged/venv-*;"
        " dpkg-query -W -f='${Conffiles}\\n' edged; dpkg --verify edged && echo verified",
    ).splitlines()
    assert out[0] == "/var/lib/edged:/usr/sbin/nologin"
    assert out[1:5] == [
        "/etc/edged root edged 750",
        "/var/lib/edged edged edged 750",
        "/var/lib/edged/models edged edged 750",
        "/var/lib/edged/seed edged edged 750",
    ]
    assert out[5] == "/opt/edged/venv/bin/edged"
    assert out[6].startswith("venv-") and out[7] == f"/opt/edged/{out[6]}"
    assert out[8].split()[0] == "/etc/edged/edged.toml"
    assert out[-1] == "verified"


def test_shipped_config_is_what_the_daemon_loads(installed_root: Path) -> None:
    out = check_in(
        installed_root,
        "/opt/edged/venv/bin/python -c 'from pathlib import Path; from edged.config import"
        ' load_config; c = load_config(Path("/etc/edged/edged.toml"));'
        " print(c.models.repository, c.state.directory, c.mqtt.enabled)'",
    )
    assert out.split() == ["/var/lib/edged/seed", "/var/lib/edged", "False"]


def test_runtimes_run_the_sample_models_inside_the_root(installed_root: Path) -> None:
    shutil.copytree(REPO / "models/mlp", installed_root / "tmp/models/mlp", dirs_exist_ok=True)
    shutil.copytree(REPO / "models/fc", installed_root / "tmp/models/fc", dirs_exist_ok=True)
    probe = """
import numpy as np, onnxruntime as ort
from ai_edge_litert.interpreter import Interpreter
s = ort.InferenceSession("/tmp/models/mlp/1/model.onnx", providers=["CPUExecutionProvider"])
i = s.get_inputs()[0]
x = np.ones([2 if not isinstance(d, int) else d for d in i.shape], np.float32)
print("onnx", s.run(None, {i.name: x})[0].shape)
it = Interpreter(model_path="/tmp/models/fc/1/model.tflite")
it.allocate_tensors()
d = it.get_input_details()[0]
it.set_tensor(d["index"], np.ones(d["shape"], np.float32))
it.invoke()
print("litert", it.get_tensor(it.get_output_details()[0]["index"]).shape)
"""
    (installed_root / "tmp/probe.py").write_text(probe)
    out = check_in(installed_root, "/opt/edged/venv/bin/python /tmp/probe.py", timeout_s=600)
    assert "onnx (2, 10)" in out
    assert "litert (1, 8)" in out


def test_daemon_starts_as_edged_and_notifies_ready(installed_root: Path) -> None:
    """The packaged daemon, run like the unit runs it, sends READY=1 and STOPPING=1."""
    notify_dir = installed_root / "run/notify-test"
    notify_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(notify_dir / "notify"))
        os.chown(notify_dir / "notify", _uid_in(installed_root, "edged"), -1)  # may send
        script = (
            "install -d -o edged -g edged -m 0750 /run/edged;"
            " exec env NOTIFY_SOCKET=/run/notify-test/notify RUNTIME_DIRECTORY=/run/edged"
            " setpriv --reuid=edged --regid=edged --init-groups"
            " /opt/edged/venv/bin/edged run --config /etc/edged/edged.toml --port 18000"
        )
        daemon = subprocess.Popen(
            _chroot_argv(installed_root, script),
            env=CLEAN_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        messages: list[str] = []
        try:
            receiver.settimeout(120)
            while not any("READY=1" in m for m in messages):
                messages.append(receiver.recv(4096).decode())
            daemon.send_signal(signal.SIGTERM)
            receiver.settimeout(30)
            while not any("STOPPING=1" in m for m in messages):
                messages.append(receiver.recv(4096).decode())
            assert daemon.wait(timeout=60) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
            output, _ = daemon.communicate(timeout=30)
        assert messages, output


# --- lifecycle -----------------------------------------------------------------------------


def test_reinstall_remove_and_purge(package: Package, tmp_path: Path) -> None:
    root = _fresh_root(tmp_path)
    try:
        _install(root, package)
        first = check_in(root, "readlink /opt/edged/venv").strip()
        check_in(root, "dpkg -i /tmp/edged.deb")
        second = check_in(root, "readlink /opt/edged/venv; ls -d /opt/edged/venv-* | wc -l")
        assert second.split()[0] != first  # rebuilt ...
        assert second.split()[1] == "1"  # ... and the old venv is gone

        check_in(root, "touch /var/lib/edged/models/keep-me; apt-get remove -y -qq edged")
        kept = check_in(
            root,
            "test ! -e /opt/edged && test ! -e /usr/bin/edged && echo program-gone;"
            " test -f /etc/edged/edged.toml && test -f /var/lib/edged/models/keep-me && echo data-kept;"
            " getent passwd edged >/dev/null && echo user-kept",
        )
        assert kept.split() == ["program-gone", "data-kept", "user-kept"]

        check_in(root, "apt-get purge -y -qq edged")
        purged = check_in(
            root, "test ! -e /etc/edged && test ! -e /var/lib/edged && echo data-gone"
        )
        assert purged.strip() == "data-gone"
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- the real unit under the real service manager -----------------------------------------

_CHECK_UNIT = """\
[Unit]
Description=Report on edged, then power off
After=edged.service multi-user.target
Wants=edged.service

[Service]
Type=oneshot
StandardOutput=file:/root/edged-check.txt
StandardError=inherit
ExecStart=/root/edged-check.sh
ExecStartPost=/bin/systemctl --no-block poweroff

[Install]
WantedBy=multi-user.target
"""

# Longer than WatchdogSec=30: a daemon whose pings did not arrive would have been restarted.
_CHECK_SCRIPT = """\
#!/bin/sh
edged=/opt/edged/venv/bin/edged
sock="--socket /run/edged/edged.sock"
show() { systemctl show edged -p ActiveState -p SubState -p NRestarts -p MainPID -p "$@"; }
sleep 45
echo "--- state"; show WatchdogUSec -p StatusText
/opt/edged/venv/bin/python -c \
    'import numpy as np; np.save("/root/x.npy", np.ones((1, 64), np.float32))'
echo "--- models"; $edged models $sock --json
echo "--- infer"; $edged infer mlp $sock --input /root/x.npy --json
echo "--- reload"; systemctl reload edged; echo "ReloadStatus=$?"; sleep 5; show StatusText
echo "--- security"; systemd-analyze security --no-pager edged.service | tail -n 1
echo "--- journal"; journalctl -u edged --no-pager -o cat | tail -n 60
"""


def _sections(text: str) -> dict[str, str]:
    sections: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if line.startswith("--- "):
            name = line[4:].strip()
            sections[name] = ""
        elif name:
            sections[name] += line + "\n"
    return sections


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@pytest.mark.skipif(shutil.which("systemd-nspawn") is None, reason="needs systemd-container")
@pytest.mark.skipif(_host_arch() != ARCH, reason="systemd under qemu-user is not a faithful test")
def test_unit_serves_models_under_systemd_in_a_container(package: Package, tmp_path: Path) -> None:
    """Boot systemd in a container with the package installed: the hardened unit starts the
    daemon (READY=1), the watchdog keeps it alive, both runtimes serve, reload works."""
    root = _fresh_root(tmp_path)
    try:
        check_in(
            root,
            "apt-get update -qq && apt-get install -y -qq --no-install-recommends"
            " systemd systemd-sysv dbus >/dev/null",
        )
        _install(root, package)
        uid = _uid_in(root, "edged")
        for model in ("mlp", "fc"):
            target = root / "var/lib/edged/seed" / model
            shutil.copytree(REPO / "models" / model, target)
            for path in [target, *target.rglob("*")]:
                os.chown(path, uid, uid)
        (root / "etc/systemd/system/edged-check.service").write_text(_CHECK_UNIT)
        (root / "etc/systemd/system/multi-user.target.wants/edged-check.service").symlink_to(
            "/etc/systemd/system/edged-check.service"
        )
        (root / "root/edged-check.sh").write_text(_CHECK_SCRIPT)
        (root / "root/edged-check.sh").chmod(0o755)
        # nspawn refuses to clean up /run/systemd/nspawn unless it is a tmpfs; give it one in a
        # private mount namespace so nothing leaks onto the host.
        boot = (
            "mkdir -p /run/systemd/nspawn && mount -t tmpfs tmpfs /run/systemd/nspawn && exec"
            ' systemd-nspawn --quiet -D "$1" -b --register=no --keep-unit --console=pipe'
        )
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-ec", boot, "sh", str(root)],
            capture_output=True,
            text=True,
            env=CLEAN_ENV,
            timeout=600,
            check=False,
        )
        report_path = root / "root/edged-check.txt"
        assert report_path.exists(), (
            f"the container did not run the check:\n{result.stdout}\n{result.stderr}"
        )
        report = report_path.read_text()
        sections = _sections(report)

        state = _properties(sections["state"])
        assert state["ActiveState"] == "active", report
        assert state["SubState"] == "running", report
        assert state["NRestarts"] == "0", report
        assert state["WatchdogUSec"] == "30s", report
        assert "serving" in state["StatusText"], report

        assert '"mlp"' in sections["models"] and '"fc"' in sections["models"], report
        assert '"outputs"' in sections["infer"], report

        reloaded = _properties(sections["reload"])
        assert reloaded["ReloadStatus"] == "0", report
        assert "Reloaded edged.service" in sections["journal"], report
        assert reloaded["ActiveState"] == "active", report
        assert reloaded["MainPID"] == state["MainPID"], report

        exposure = re.search(r"exposure level for edged\.service: (\d+\.\d+)", report)
        assert exposure and float(exposure.group(1)) <= 2.0, report
        print(report)  # shown with pytest -s: what the device reported
    finally:
        shutil.rmtree(root, ignore_errors=True)
