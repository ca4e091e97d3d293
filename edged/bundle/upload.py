"""Receiving a bundle over the daemon's local API: one upload at a time, spooled under
``<state>/uploads/`` within a disk quota, and checked as it arrives, so a compressed, foreign,
oversized or badly signed bundle is refused from its first blocks instead of after it has been
written in full.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from edged.bundle.install import Installer, InstallResult
from edged.errors import EdgedError, InstallBusyError, LimitExceededError, StoreError

log = logging.getLogger(__name__)

UPLOADS_DIR = "uploads"
DISK_RESERVE_BYTES = 64 * 1024 * 1024  # left free for the rest of the device
_SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9_.+@=-]")


def upload_source(name: str | None) -> str:
    """The bundle name a client sent, made safe to log (at most 128 printable characters)."""
    if not name:
        return "upload"
    return _SAFE_NAME_RE.sub("_", name.rsplit("/", 1)[-1])[:128] or "upload"


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


async def receive_upload(
    installer: Installer,
    chunks: AsyncIterator[bytes],
    source: str,
    declared_bytes: int | None,
) -> InstallResult:
    """Spool and install one uploaded bundle.

    Raises ``InstallBusyError`` while another upload is being received or installed, and
    ``LimitExceededError`` for a bundle over ``max_archive_bytes`` or over the disk quota
    (twice its size, for the spool and the staged copy, plus a reserve, must be free); these
    are refused before the bundle is an install attempt. Everything after that is recorded in
    the install log: a refusal is returned as a failed ``InstallResult`` (or raised where
    nothing was recorded).
    """
    if installer.upload_lock.locked():
        raise InstallBusyError("another bundle upload is in progress; retry when it has finished")
    async with installer.upload_lock:
        spool_dir = installer.store.state_dir / UPLOADS_DIR
        try:
            path = await _open_spool(spool_dir)
        except OSError as exc:
            raise StoreError(f"cannot spool the upload of {source}: {exc.strerror}") from exc
        try:
            limit = installer.limits.max_archive_bytes
            free = await asyncio.to_thread(free_bytes, spool_dir)
            _check_quota(declared_bytes or 0, declared_bytes, limit, free)
            try:
                with path.open("wb") as out:
                    await _spool(installer, chunks, out, source, declared_bytes, free)
            except OSError as exc:
                raise StoreError(
                    f"cannot spool the upload of {source}: {exc.strerror or exc}"
                ) from exc
            return await installer.install_file(path, source)
        except EdgedError as exc:
            recorded = installer.result_for(exc)
            if recorded is None:
                raise
            return recorded
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)


async def _open_spool(spool_dir: Path) -> Path:
    """An empty spool file; only one upload exists at a time, so whatever else is in
    ``spool_dir`` was left by a crash and goes."""
    await asyncio.to_thread(shutil.rmtree, spool_dir, True)
    await asyncio.to_thread(spool_dir.mkdir, parents=True, exist_ok=True)
    fd, name = await asyncio.to_thread(tempfile.mkstemp, ".bundle", "upload-", spool_dir)
    os.close(fd)
    return Path(name)


async def _spool(
    installer: Installer,
    chunks: AsyncIterator[bytes],
    out: BinaryIO,
    source: str,
    declared_bytes: int | None,
    free: int,
) -> None:
    """Write the upload to ``out``, checking the head (container, manifest, signatures) as
    soon as it has arrived, before the model files are written."""
    limit = installer.limits.max_archive_bytes
    head = bytearray()
    verified = False
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        _check_quota(size, declared_bytes, limit, free)
        if not verified:
            head += chunk
            verified = await asyncio.to_thread(
                installer.check_upload_head, bytes(head), source, complete=False
            )
            if verified:
                head = bytearray()
        await asyncio.to_thread(out.write, chunk)
    if not verified:
        await asyncio.to_thread(installer.check_upload_head, bytes(head), source, complete=True)


def _check_quota(size: int, declared: int | None, limit: int, free: int) -> None:
    if declared is not None and size > declared:
        raise LimitExceededError(f"upload is longer than the {declared} bytes it declared")
    if size > limit or (declared is not None and declared > limit):
        raise LimitExceededError(
            f"bundle of {max(size, declared or 0)} bytes exceeds the limit of {limit} bytes"
        )
    if 2 * max(size, declared or 0) + DISK_RESERVE_BYTES > free:
        raise LimitExceededError(
            f"not enough disk space for a bundle of {max(size, declared or 0)} bytes: it is "
            f"spooled and staged (twice its size) and {DISK_RESERVE_BYTES} bytes stay free; "
            f"{free} bytes are free"
        )
