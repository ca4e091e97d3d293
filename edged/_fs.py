"""Durable file-system steps: atomic replace, fsync of files and directories.

Every step reports itself to an optional ``Checkpoint`` callback after it completes. Production
passes none; the crash tests pass one that SIGKILLs the process at the k-th step, which is how
they prove a crash between any two steps leaves a usable store.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

Checkpoint = Callable[[str], None]


def no_checkpoint(label: str) -> None:
    """The production checkpoint: does nothing."""


def fsync_dir(path: Path, checkpoint: Checkpoint = no_checkpoint) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    checkpoint(f"fsync dir {path.name}")


def fsync_file(path: Path, checkpoint: Checkpoint = no_checkpoint) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    checkpoint(f"fsync {path.name}")


def atomic_write(
    path: Path, data: bytes, mode: int = 0o644, checkpoint: Checkpoint = no_checkpoint
) -> None:
    """Write temp beside ``path``, fsync it, ``os.replace`` it over ``path``, fsync the dir.

    A crash at any point leaves the old content or the new one, plus at most a hidden
    ``.<name>.tmp-*`` file that ``remove_temp_files`` cleans up.
    """
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            checkpoint(f"write {tmp.name}")
            os.fsync(f.fileno())
        checkpoint(f"fsync {tmp.name}")
        os.replace(tmp, path)
        checkpoint(f"replace {path.name}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent, checkpoint)


def is_temp_file(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def remove_temp_files(directory: Path) -> list[str]:
    """Remove ``atomic_write`` leftovers in ``directory``; returns their names."""
    removed: list[str] = []
    if not directory.is_dir():
        return removed
    for child in directory.iterdir():
        if is_temp_file(child.name) and not child.is_dir():
            child.unlink(missing_ok=True)
            removed.append(child.name)
    return removed


def rename_durably(src: Path, dst: Path, checkpoint: Checkpoint = no_checkpoint) -> None:
    """``os.rename`` that refuses to replace ``dst`` and fsyncs both parent directories."""
    if dst.exists():
        raise FileExistsError(dst)
    os.rename(src, dst)
    checkpoint(f"rename {src.name} -> {dst.parent.name}/{dst.name}")
    fsync_dir(dst.parent, checkpoint)
    if src.parent != dst.parent:
        fsync_dir(src.parent, checkpoint)


def discard_dir(path: Path, trash: Path, checkpoint: Checkpoint = no_checkpoint) -> None:
    """Remove a directory tree so that a crash never leaves half of it in place.

    The tree is first renamed into ``trash`` (atomic), then deleted; ``recover`` empties
    ``trash`` after a crash.
    """
    if not path.exists():
        return
    trash.mkdir(parents=True, exist_ok=True)
    target = trash / f"{path.name}-{secrets.token_hex(6)}"
    os.rename(path, target)
    checkpoint(f"trash {path.name}")
    fsync_dir(path.parent, checkpoint)
    shutil.rmtree(target, ignore_errors=True)
    checkpoint(f"rmtree {path.name}")


def empty_dir(path: Path) -> list[str]:
    """Delete everything inside ``path`` (used for staging and trash); returns the names."""
    removed: list[str] = []
    if not path.is_dir():
        return removed
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(child.name)
    return removed


def create_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the first byte (a private key is never readable by
    others, not even briefly), write and fsync it; ``FileExistsError`` if it exists: a key or
    certificate is never replaced by accident. Parent directories are created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
