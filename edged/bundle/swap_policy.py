"""Which policy judges a swap between two installed versions: read from the manifest each
version was verified against (``.verified`` in the store).

Kept apart from ``rollout_policy`` (the pure parser the manifest uses), so that the arrows run
one way: ``rollout_policy`` <- ``manifest`` <- ``store`` <- this module.
"""

from __future__ import annotations

from pathlib import Path

from edged.bundle.manifest import parse_manifest
from edged.bundle.rollout_policy import DEFAULT_POLICY
from edged.bundle.store import VERIFIED_MARKER
from edged.serve.probation import ProbationPolicy


def policy_of_version(version_dir: Path) -> ProbationPolicy | None:
    """The policy of an installed version, from the manifest it was verified against
    (``.verified``); None for a version that did not come from a bundle (a seed repository)."""
    try:
        data = (version_dir / VERIFIED_MARKER).read_bytes()
    except OSError:
        return None
    manifest = parse_manifest(data)
    return manifest.rollout if manifest.rollout is not None else DEFAULT_POLICY


def policy_for_swap(new_dir: Path, old_dir: Path) -> ProbationPolicy | None:
    """The policy a swap from ``old_dir`` to ``new_dir`` is judged by: the new version's, when
    it came from a bundle and is a newer release than the old one (not a rollback)."""
    policy = policy_of_version(new_dir)
    if policy is None:
        return None
    try:
        old = parse_manifest((old_dir / VERIFIED_MARKER).read_bytes())
    except OSError:
        return policy  # the old version came from the seed repository
    new = parse_manifest((new_dir / VERIFIED_MARKER).read_bytes())
    return policy if new.counter > old.counter else None
