"""Publishing bundles as HTTPS artifacts: the signed bundle is written, content-addressed, as
``<sha256>.bundle`` into a directory that any HTTPS server serves (nginx, a CDN origin, a
bucket synced from it), and the announcement names its URL under each ``--base-url``.
No chunks go through the broker then; the device checks every byte against the signed hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edged._fs import atomic_write
from edged.errors import FleetSetupError
from edged.transport.protocol import artifact_name, artifact_urls


@dataclass(frozen=True)
class ArtifactStore:
    """Where artifacts are written and the mirrors' base URLs that serve that directory."""

    directory: Path
    base_urls: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.base_urls:
            raise FleetSetupError("artifacts need at least one --base-url")
        artifact_urls(self.base_urls, "0" * 64)  # every base URL is a valid http(s) URL

    def urls(self, sha256: str) -> tuple[str, ...]:
        return artifact_urls(self.base_urls, sha256)

    def publish(self, data: bytes) -> Path:
        """Write ``<sha256>.bundle`` (atomically, readable by the web server); a file that
        is already there with the same bytes is left alone. Blocks."""
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.directory / artifact_name(sha256)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if path.is_file() and path.stat().st_size == len(data) and _sha256(path) == sha256:
                return path
            atomic_write(path, data, mode=0o644)
        except OSError as exc:
            raise FleetSetupError(f"cannot write the artifact {path}: {exc}") from exc
        return path


def artifact_store(directory: Path | None, base_urls: Sequence[str]) -> ArtifactStore | None:
    """The store the CLI options name, or None (chunks over MQTT) when neither is given."""
    if directory is None and not base_urls:
        return None
    if directory is None or not base_urls:
        raise FleetSetupError("--artifacts DIR and --base-url URL go together")
    return ArtifactStore(directory, tuple(base_urls))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["ArtifactStore", "artifact_store"]
