"""Uploads to the daemon, checked as they arrive: the real installer fed chunk by chunk."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import pytest

from edged.bundle.build import make_manifest
from edged.bundle.install import Installer
from edged.bundle.keys import Signature, keyid_of
from edged.bundle.limits import BundleLimits
from edged.bundle.upload import receive_upload, upload_source
from edged.errors import InstallBusyError, LimitExceededError
from tests.bundle.helpers import (
    DEVICE,
    NOW,
    World,
    log_entries,
    member_offsets,
    pack,
    source_files,
    spec,
)

CHUNK = 4096


class Feed:
    """An upload body in chunks; counts how many the receiver asked for."""

    def __init__(self, data: bytes, chunk: int = CHUNK, hold: asyncio.Event | None = None):
        self.chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        self.taken = 0
        self.hold = hold
        self.started = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.chunks:
            self.taken += 1
            self.started.set()
            if self.hold is not None and self.taken == 2:
                await self.hold.wait()
            yield piece


def test_a_compressed_upload_is_refused_from_its_first_block(world: World) -> None:
    before = world.snapshot()
    data = gzip.compress(bytes(1 << 20)) + bytes(8 << 20)  # the rest never needs to arrive
    feed = Feed(data)
    result = asyncio.run(receive_upload(world.installer(), feed.__aiter__(), "big.bundle", None))
    assert (result.outcome, result.error, result.source) == (
        "rejected",
        "CompressedArchiveError",
        "big.bundle",
    )
    assert feed.taken == 1
    assert log_entries(world.state)[-1]["source"] == "big.bundle"
    assert not list((world.state / "uploads").iterdir())
    world.assert_unchanged(before)


def test_a_badly_signed_upload_is_refused_before_its_model_files_arrive(world: World) -> None:
    files = source_files(world.sources, 2)
    forged = Signature(keyid_of(world.keys.signers[0].public_key()), bytes(64))
    data = pack(make_manifest(spec(2), files).to_json(), files, [], extra_signatures=[forged])
    first_model_file = member_offsets(data)[2][1]  # the header after the one signature
    feed = Feed(data)
    result = asyncio.run(receive_upload(world.installer(), feed.__aiter__(), "x.bundle", None))
    assert result.error == "BadSignatureError"
    assert feed.taken * CHUNK <= first_model_file + 2 * CHUNK
    assert feed.taken < len(feed.chunks)


def test_an_upload_without_enough_signatures_is_judged_whole(world: World) -> None:
    """Too few signatures up front may be a signature entry misplaced further on, which the
    install of the whole upload reports as a malformed archive."""
    feed = Feed(world.bundle(2, keys=[world.keys.outsider]))
    result = asyncio.run(receive_upload(world.installer(), feed.__aiter__(), "x.bundle", None))
    assert (result.error, feed.taken) == ("UnknownKeyError", len(feed.chunks))


def test_a_good_upload_installs_under_the_name_the_client_sent(world: World) -> None:
    feed = Feed(world.bundle(2))
    source = upload_source("../../mlp-2 (final).bundle")
    result = asyncio.run(receive_upload(world.installer(), feed.__aiter__(), source, None))
    assert (result.outcome, result.source) == ("installed", "mlp-2__final_.bundle")
    world.assert_serves(2)


def test_a_second_upload_while_one_is_in_progress_is_refused(world: World) -> None:
    installer = world.installer()

    async def scenario() -> None:
        hold = asyncio.Event()
        first = Feed(world.bundle(2), hold=hold)
        running = asyncio.ensure_future(
            receive_upload(installer, first.__aiter__(), "first.bundle", None)
        )
        await asyncio.wait_for(first.started.wait(), 30)
        with pytest.raises(InstallBusyError):
            await receive_upload(installer, Feed(world.bundle(3)).__aiter__(), "second", None)
        hold.set()
        assert (await asyncio.wait_for(running, 60)).outcome == "installed"

    asyncio.run(scenario())
    world.assert_serves(2)


def test_uploads_over_the_size_limit_are_refused_before_reading(world: World) -> None:
    installer = Installer(
        world.state,
        world.target,
        DEVICE,
        clock=lambda: NOW,
        limits=BundleLimits(max_archive_bytes=10_000),
    )
    feed = Feed(bytes(20_000))
    with pytest.raises(LimitExceededError, match="limit of 10000"):
        asyncio.run(receive_upload(installer, feed.__aiter__(), "x", 20_000))
    assert feed.taken == 0
    feed = Feed(world.bundle(2))  # no length declared: refused once it passes the limit
    with pytest.raises(LimitExceededError):
        asyncio.run(receive_upload(installer, feed.__aiter__(), "x", None))
    assert feed.taken == 10_000 // CHUNK + 1


def test_uploads_beyond_the_free_disk_space_are_refused(world: World) -> None:
    from edged.bundle.upload import free_bytes

    free = free_bytes(world.state)
    limits = BundleLimits(max_archive_bytes=2**50, max_file_bytes=2**50)
    installer = Installer(world.state, world.target, DEVICE, clock=lambda: NOW, limits=limits)
    feed = Feed(b"")
    with pytest.raises(LimitExceededError, match="not enough disk space"):
        asyncio.run(receive_upload(installer, feed.__aiter__(), "x", free // 2))
    assert feed.taken == 0


def test_a_spool_that_cannot_be_written_is_a_store_error(world: World) -> None:
    from edged.errors import StoreError

    (world.state / "uploads").write_bytes(b"not a directory")
    with pytest.raises(StoreError, match="cannot spool the upload of x.bundle"):
        asyncio.run(receive_upload(world.installer(), Feed(b"x").__aiter__(), "x.bundle", 1))
