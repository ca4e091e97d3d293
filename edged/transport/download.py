"""Partial bundle downloads on disk, resumable after a disconnect or a restart.

Layout under ``<state>/transport/downloads/<sha256>-<chunk_size>/``::

    deployment.json   the announced deployment (written once, atomically)
    bundle.part       the bundle, chunks written at their offsets (a sparse file at first)
    bundle            the complete bundle once its SHA-256 matched (renamed from bundle.part)

There is no separate record of which chunks arrived: on opening, every chunk region of
``bundle.part`` is hashed and compared with the signed chunk hash, so a chunk counts as present
exactly when its bytes are right. That makes a crash at any point harmless (a torn write is a
missing chunk) and needs no fsync per chunk. All methods block: call them from a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from edged._fs import atomic_write
from edged.errors import (
    ChunkHashMismatchError,
    DownloadError,
    InsufficientSpaceError,
    TooLargeError,
)
from edged.transport.protocol import Deployment, check_chunk

log = logging.getLogger(__name__)

DEPLOYMENT_FILE = "deployment.json"
PART_FILE = "bundle.part"
BUNDLE_FILE = "bundle"


def check_size(deployment: Deployment, max_bundle_bytes: int) -> None:
    if deployment.size > max_bundle_bytes:
        raise TooLargeError(
            f"bundle is {deployment.size} bytes, the limit is {max_bundle_bytes} "
            "(mqtt.max_bundle_bytes)"
        )


def check_space(
    deployment: Deployment, directory: Path, reserve_bytes: int, already_bytes: int = 0
) -> None:
    """Refuse a bundle the file system cannot hold: the rest of the download, a staged copy
    for the installer, and ``reserve_bytes`` left over."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    needed = (deployment.size - already_bytes) + deployment.size + reserve_bytes
    if free < needed:
        raise InsufficientSpaceError(
            f"{directory} has {free} bytes free; the {deployment.size}-byte bundle needs "
            f"{needed} (rest of the download, staged install, mqtt.download_reserve_bytes "
            f"{reserve_bytes})"
        )


class PartialDownload:
    def __init__(self, directory: Path, deployment: Deployment) -> None:
        self.directory = directory
        self.deployment = deployment
        self.have: set[int] = set()
        self.resumed = False  # bytes of an earlier attempt were found on disk

    @property
    def part_path(self) -> Path:
        return self.directory / PART_FILE

    @property
    def bundle_path(self) -> Path:
        return self.directory / BUNDLE_FILE

    @classmethod
    def open(cls, root: Path, deployment: Deployment) -> PartialDownload:
        """Open (and re-verify) the partial download of these bytes, or start one."""
        directory = root / deployment.transfer_key
        download = cls(directory, deployment)
        directory.mkdir(parents=True, exist_ok=True)
        record = directory / DEPLOYMENT_FILE
        atomic_write(record, json.dumps(deployment.to_json(), sort_keys=True).encode("ascii"))
        if download.bundle_path.exists():
            os.replace(download.bundle_path, download.part_path)
        download.resumed = download.part_path.exists()
        if not download.resumed:
            with open(download.part_path, "wb") as f:
                f.truncate(deployment.size)
        elif download.part_path.stat().st_size != deployment.size:
            log.warning("discarding %s: it has the wrong size", download.part_path)
            with open(download.part_path, "r+b") as f:
                f.truncate(0)
                f.truncate(deployment.size)
        download.have = download._verify_regions()
        return download

    def _verify_regions(self) -> set[int]:
        have: set[int] = set()
        with open(self.part_path, "rb") as f:
            for index, expected in enumerate(self.deployment.chunks):
                offset, length = self.deployment.chunk_span(index)
                f.seek(offset)
                if hashlib.sha256(f.read(length)).hexdigest() == expected:
                    have.add(index)
        return have

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.deployment.chunk_count) if i not in self.have]

    @property
    def complete(self) -> bool:
        return len(self.have) == self.deployment.chunk_count

    @property
    def bytes_present(self) -> int:
        return sum(self.deployment.chunk_span(i)[1] for i in self.have)

    def store_chunk(self, index: int, data: bytes) -> bool:
        """Verify and write chunk ``index``; False when it was already present."""
        if index in self.have and 0 <= index < self.deployment.chunk_count:
            return False
        check_chunk(self.deployment, index, data)
        offset = self.deployment.chunk_span(index)[0]
        fd = os.open(self.part_path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        self.have.add(index)
        return True

    def finish(self) -> Path:
        """Check the whole bundle's SHA-256, fsync it, and return its final path."""
        if not self.complete:
            raise DownloadError(f"{len(self.missing)} chunk(s) still missing")
        digest = hashlib.sha256()
        with open(self.part_path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
            os.fsync(f.fileno())
        if digest.hexdigest() != self.deployment.sha256:
            # Every chunk matched, so only a disk error gets here: start over.
            self.have.clear()
            raise ChunkHashMismatchError(
                f"bundle SHA-256 {digest.hexdigest()[:16]}... differs from the announced "
                f"{self.deployment.sha256[:16]}... although every chunk matched"
            )
        os.replace(self.part_path, self.bundle_path)
        return self.bundle_path

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def prune_downloads(root: Path, keep: set[str], older_than_s: float) -> list[str]:
    """Remove partial downloads not named in ``keep`` and untouched for ``older_than_s``."""
    removed: list[str] = []
    if not root.is_dir():
        return removed
    horizon = time.time() - older_than_s
    for entry in root.iterdir():
        if entry.name in keep or not entry.is_dir():
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_mtime < horizon:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
    return removed
