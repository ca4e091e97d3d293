#!/usr/bin/env bash
# Build packaging/out/edged_<version>_<arch>.deb with dpkg-deb (no debhelper, no source package).
#
#   packaging/build-deb.sh ARCH [DISTRO]
#     ARCH    arm64 | amd64
#     DISTRO  bookworm (Debian 12, Python 3.11; the default)
#             jammy    (Ubuntu 22.04 and NVIDIA JetPack 6, Python 3.10)
#
# The package ships a wheelhouse: edged's own wheel plus every dependency as a binary wheel for
# CPython DISTRO-python on ARCH, downloaded here with `pip download --platform`. Its postinst builds
# /opt/edged/venv from those wheels with the system python3 and `pip install --no-index`, so the
# device needs no network and no compiler, and the host needs no emulator for a foreign ARCH.
# The dependency tree is resolved for the target with pip and `uv pip compile` (uv from PATH, or
# installed from PyPI into a throw-away venv) and pinned in the wheelhouse's requirements.txt.
#
# Environment:
#   PYTHON             a Python >= 3.10 with pip, used only to build and download (python3)
#   EDGED_DEB_SOURCE   "head" (default): package the committed tree (git archive HEAD);
#                      "worktree": package the working tree as it is, uncommitted files included
#   EDGED_WHEEL_CACHE  pip's download cache (default: pip's own)
set -euo pipefail

usage() { sed -n '2,7s/^# \{0,1\}//p' "$0" >&2; exit 2; }
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
ARCH=$1
DISTRO=${2:-bookworm}

case "$ARCH" in
    arm64) MACHINE=aarch64 ;;
    amd64) MACHINE=x86_64 ;;
    *) echo "unsupported ARCH '$ARCH' (arm64 or amd64)" >&2; usage ;;
esac
# PYTHON_VERSION: the distribution's python3. GLIBC_MAX: its glibc, the newest manylinux tag
# its loader can run.
case "$DISTRO" in
    bookworm) PYTHON_VERSION=3.11; GLIBC_MAX=36 ;;
    jammy) PYTHON_VERSION=3.10; GLIBC_MAX=35 ;;
    *) echo "unsupported DISTRO '$DISTRO' (bookworm or jammy)" >&2; usage ;;
esac

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
OUT="$HERE/out"
PYTHON=${PYTHON:-python3}
for tool in dpkg-deb "$PYTHON" gzip sed find; do
    command -v "$tool" >/dev/null || { echo "missing build tool: $tool" >&2; exit 1; }
done

BUILD=$(mktemp -d "${TMPDIR:-/tmp}/edged-deb.XXXXXX")
trap 'rm -rf "$BUILD"' EXIT
SRC="$BUILD/src"
WHEELS="$BUILD/wheelhouse"
ROOT="$BUILD/root"
mkdir -p "$SRC" "$WHEELS" "$OUT"

# --- source -----------------------------------------------------------------------------------
if [ "${EDGED_DEB_SOURCE:-head}" = worktree ] || ! git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
    tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=packaging/out --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=.mypy_cache --exclude=.ruff_cache -cf - . | tar -C "$SRC" -xf -
    echo "packaging the working tree" >&2
else
    git -C "$REPO" archive --format=tar HEAD | tar -C "$SRC" -xf -
    echo "packaging commit $(git -C "$REPO" rev-parse --short HEAD)" >&2
fi

# --- wheels -----------------------------------------------------------------------------------
pip=("$PYTHON" -m pip --disable-pip-version-check)
[ -n "${EDGED_WHEEL_CACHE:-}" ] && pip+=(--cache-dir "$EDGED_WHEEL_CACHE")
"${pip[@]}" wheel --quiet --no-deps --wheel-dir "$WHEELS" "$SRC"
EDGED_WHEEL=$(ls "$WHEELS"/edged-*.whl)
VERSION=$(basename "$EDGED_WHEEL" | cut -d- -f2)

# Resolving for a target Python/platform other than this host's takes two tools, each covering
# the other's blind spot:
# - `pip download --python-version --platform` filters wheels by tag and honours Requires-Python,
#   but evaluates environment markers (python_version < "3.11": tomli, taskgroup,
#   async-timeout ...; platform_machine) for the interpreter running pip;
# - `uv pip compile --python-version --python-platform` evaluates markers for the target, but
#   ignores Requires-Python upper bounds (it picks backports-strenum 1.3.1, <3.11, for 3.11).
# So uv names the packages the target needs, pip picks their versions and downloads them, and
# uv then pins the result from the wheelhouse alone, which fails if a wheel is missing.
UV=$(command -v uv || true)
if [ -z "$UV" ]; then
    "$PYTHON" -m venv "$BUILD/tools"
    "$BUILD/tools/bin/python" -m pip install --quiet --disable-pip-version-check uv
    UV="$BUILD/tools/bin/uv"
fi
uv_compile=("$UV" --quiet pip compile --no-config --no-header --no-annotate --only-binary :all:
    --python-version "$PYTHON_VERSION" --python-platform "$MACHINE-manylinux_2_$GLIBC_MAX")
echo "edged[uvloop] @ file://$EDGED_WHEEL" >"$BUILD/requirements.in"  # devices get the faster event loop
"${uv_compile[@]}" --output-file "$BUILD/names.txt" "$BUILD/requirements.in"
mapfile -t needed < <(grep -Ev '^edged(\[[a-z,]+\])? @ ' "$BUILD/names.txt" | sed 's/==.*//')

platforms=(--platform "manylinux2014_$MACHINE")
for minor in $(seq 17 "$GLIBC_MAX"); do
    platforms+=(--platform "manylinux_2_${minor}_$MACHINE")
done
PYTAG=cp${PYTHON_VERSION/./}
"${pip[@]}" download --quiet --dest "$WHEELS" --only-binary=:all: \
    --implementation cp --python-version "$PYTHON_VERSION" --abi "$PYTAG" --abi abi3 --abi none \
    "${platforms[@]}" "$EDGED_WHEEL" "${needed[@]}" pip

echo "edged==$VERSION" >"$BUILD/edged.in"
"${uv_compile[@]}" --no-index --find-links "$WHEELS" --output-file "$WHEELS/requirements.txt" \
    "$BUILD/edged.in"

# Every wheel must be pure or built for this machine; the newest manylinux tag sets libc6.
GLIBC_MIN=$("$PYTHON" - "$WHEELS" "$MACHINE" <<'PY'
import re
import sys
from pathlib import Path

wheels, machine = Path(sys.argv[1]), sys.argv[2]
LEGACY = {"2014": (2, 17), "2010": (2, 12), "1": (2, 5)}
needed = (2, 17)
for wheel in sorted(wheels.glob("*.whl")):
    tags = wheel.stem.split("-")[-1].split(".")
    if tags == ["any"]:
        continue
    glibcs = []
    for tag in tags:
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)|manylinux(2014|2010|1)_(\w+)", tag)
        if not m:
            sys.exit(f"{wheel.name}: platform tag {tag} is not manylinux")
        if (m.group(3) or m.group(5)) != machine:
            sys.exit(f"{wheel.name}: built for {m.group(3) or m.group(5)}, not {machine}")
        glibcs.append((int(m.group(1)), int(m.group(2))) if m.group(1) else LEGACY[m.group(4)])
    needed = max(needed, min(glibcs))  # a wheel runs wherever its oldest tag does
print("%d.%d" % needed)
PY
)

# --- Debian version: PEP 440 pre/dev releases sort before the release (0.2.0rc1 -> 0.2.0~rc1) -
DEB_VERSION=$(echo "$VERSION" | sed -E 's/\.?(a|b|rc|dev)([0-9]+)/~\1\2/; s/\+/+local./')
[ "$DISTRO" = bookworm ] || DEB_VERSION="$DEB_VERSION+$DISTRO"
PYTHON_NEXT="${PYTHON_VERSION%.*}.$(( ${PYTHON_VERSION#*.} + 1 ))"

# --- file tree --------------------------------------------------------------------------------
install -d "$ROOT/DEBIAN" "$ROOT/usr/bin" "$ROOT/usr/lib/edged/wheelhouse" \
    "$ROOT/usr/lib/systemd/system" "$ROOT/usr/lib/sysusers.d" "$ROOT/usr/lib/tmpfiles.d" \
    "$ROOT/etc/edged" "$ROOT/usr/share/doc/edged/examples" "$ROOT/usr/share/man/man1"
install -m 0644 "$WHEELS"/*.whl "$WHEELS/requirements.txt" "$ROOT/usr/lib/edged/wheelhouse/"
ln -s /opt/edged/venv/bin/edged "$ROOT/usr/bin/edged"
install -m 0644 "$SRC/systemd/edged.service" "$ROOT/usr/lib/systemd/system/edged.service"
install -m 0644 "$SRC/systemd/edged.sysusers" "$ROOT/usr/lib/sysusers.d/edged.conf"
install -m 0644 "$SRC/systemd/edged.tmpfiles" "$ROOT/usr/lib/tmpfiles.d/edged.conf"
install -m 0644 "$SRC/packaging/edged.toml" "$ROOT/etc/edged/edged.toml"
install -m 0644 "$SRC/systemd/jetson-gpu.conf" "$ROOT/usr/share/doc/edged/examples/jetson-gpu.conf"
install -m 0644 "$SRC/systemd/rpi5-power.conf" "$ROOT/usr/share/doc/edged/examples/rpi5-power.conf"
[ -f "$SRC/docs/device.md" ] && install -m 0644 "$SRC/docs/device.md" "$ROOT/usr/share/doc/edged/device.md"
install -m 0644 "$SRC/packaging/debian/copyright" "$ROOT/usr/share/doc/edged/copyright"
gzip -9n <"$SRC/packaging/debian/edged.1" >"$ROOT/usr/share/man/man1/edged.1.gz"

BUILD_DATE=$(date -R -d "@${SOURCE_DATE_EPOCH:-$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)}")
{
    echo "edged ($DEB_VERSION) unstable; urgency=medium"
    echo
    echo "  * Package edged $VERSION for $DISTRO (Python $PYTHON_VERSION) on $ARCH."
    echo
    echo " -- edged maintainers <maintainers@edged.invalid>  $BUILD_DATE"
} | gzip -9n >"$ROOT/usr/share/doc/edged/changelog.gz"

INSTALLED_SIZE=0  # known once the tree is complete; only control.in uses it
substitute() {
    sed -e "s/@VERSION@/$VERSION/g" -e "s/@DEB_VERSION@/$DEB_VERSION/g" -e "s/@ARCH@/$ARCH/g" \
        -e "s/@PYTHON_VERSION@/$PYTHON_VERSION/g" -e "s/@PYTHON_NEXT@/$PYTHON_NEXT/g" \
        -e "s/@GLIBC_MIN@/$GLIBC_MIN/g" -e "s/@INSTALLED_SIZE@/$INSTALLED_SIZE/g" "$1"
}
for script in postinst prerm postrm; do
    substitute "$SRC/packaging/debian/$script" >"$ROOT/DEBIAN/$script"
    chmod 0755 "$ROOT/DEBIAN/$script"
done
echo /etc/edged/edged.toml >"$ROOT/DEBIAN/conffiles"
(cd "$ROOT" && find usr etc -type f -print0 | sort -z | xargs -0 md5sum) >"$ROOT/DEBIAN/md5sums"
INSTALLED_SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
substitute "$SRC/packaging/debian/control.in" >"$ROOT/DEBIAN/control"
chmod 0644 "$ROOT/DEBIAN/conffiles" "$ROOT/DEBIAN/md5sums" "$ROOT/DEBIAN/control"

# --- package ----------------------------------------------------------------------------------
DEB="$OUT/edged_${DEB_VERSION}_${ARCH}.deb"
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)} \
    dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >/dev/null
echo "$DEB"
