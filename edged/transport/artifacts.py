"""Bundle downloads over HTTP(S) from artifact mirrors, into the same resumable partial as the
MQTT chunks (``download.PartialDownload``).

The signed ``deploy`` names one or more URLs of the content-addressed file ``<sha256>.bundle``.
The device asks each mirror, in order, for the byte ranges of the chunks it still lacks (HTTP
``Range``, chunk-aligned, at most ``mqtt.artifact_request_bytes`` per request) and checks every
chunk against its signed hash before it is written: a mirror that serves other bytes is
dropped for this deployment and the next one is asked; one that is down or cut the transfer is
asked again after the others, with backoff, until no new chunk arrived for
``mqtt.download_stall_timeout_s``. The server needs no trust: only TLS, for privacy and to
keep a stranger from wasting the device's bandwidth.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from edged._backoff import Backoff
from edged._compat import TIMEOUT_ERRORS
from edged.config import MqttConfig
from edged.errors import (
    ArtifactUnavailableError,
    ChunkHashMismatchError,
    DownloadStalledError,
    TlsSetupError,
)
from edged.transport.protocol import Deployment

log = logging.getLogger(__name__)

CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
# HTTP answers after which a mirror is not asked again for this deployment (anything else,
# e.g. 5xx or 429, is a passing fault: asked again after the others).
_REFUSALS = frozenset({400, 401, 403, 404, 405, 410, 416})

ChunkStored = Callable[[bool], Awaitable[None]]  # argument: the download is complete


class ChunkSink(Protocol):
    """Where verified chunks go: the daemon's on-disk ``PartialDownload``, or the fleet
    simulator's in-memory one. ``store_chunk`` checks the chunk against its signed hash."""

    @property
    def deployment(self) -> Deployment: ...

    @property
    def complete(self) -> bool: ...

    @property
    def missing(self) -> list[int]: ...

    @property
    def have(self) -> set[int]: ...

    def store_chunk(self, index: int, data: bytes) -> bool: ...


def artifact_ssl_context(m: MqttConfig) -> ssl.SSLContext:
    """TLS for the artifact servers: the system trust store, or ``mqtt.artifact_ca_file``;
    the device's own certificate when ``mqtt.artifact_client_cert``. Blocks: reads files."""
    try:
        context = ssl.create_default_context(
            cafile=None if m.artifact_ca_file is None else str(m.artifact_ca_file)
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if m.artifact_client_cert:
            if m.cert_file is None or m.key_file is None:
                raise TlsSetupError(
                    "mqtt.artifact_client_cert needs mqtt.cert_file and mqtt.key_file"
                )
            context.load_cert_chain(str(m.cert_file), str(m.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"artifact TLS files unusable: {exc}") from exc
    return context


class _MirrorRefused(Exception):
    """This mirror cannot serve the artifact (for this deployment)."""


@dataclass
class HttpFetch:
    """One deployment's download from its mirrors."""

    download: ChunkSink
    urls: Sequence[str]
    ssl_context: ssl.SSLContext
    stall_s: float
    request_bytes: int
    on_stored: ChunkStored
    fetched: int = 0  # chunks stored by this attempt
    refused: dict[str, str] = field(default_factory=dict)  # mirror -> why it was dropped
    last_chunk_at: float = field(default_factory=time.monotonic)
    _preferred: int = 0  # index of the mirror that served last

    async def run(self) -> int:
        """Fetch every missing chunk; the number fetched. Raises ``ArtifactUnavailableError``
        when every mirror was dropped, ``DownloadStalledError`` when none served a chunk for
        ``stall_s``."""
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(self.stall_s, 30.0), sock_read=self.stall_s
        )
        backoff = Backoff(0.1, 5.0)
        connector = aiohttp.TCPConnector(limit=1, ssl=self.ssl_context)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            while not self._complete():
                before = self.fetched
                for url in self._mirrors():
                    try:
                        await self._fetch_from(session, url)
                    except _MirrorRefused as exc:
                        log.warning("artifact mirror %s dropped: %s", url, exc)
                        self.refused[url] = str(exc)
                        continue
                    except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
                        log.info("artifact mirror %s: %s; trying the next", url, _describe(exc))
                        continue
                    except TIMEOUT_ERRORS:
                        log.info("artifact mirror %s: no data for %gs", url, self.stall_s)
                        continue
                    if self._complete():
                        break
                if self._complete():
                    break
                if len(self.refused) == len(set(self.urls)):
                    raise ArtifactUnavailableError(
                        "no mirror can serve the bundle: "
                        + "; ".join(f"{u}: {why}" for u, why in self.refused.items())
                    )
                if self.fetched > before:
                    backoff.reset()
                idle = time.monotonic() - self.last_chunk_at
                if idle >= self.stall_s:
                    raise DownloadStalledError(
                        f"no chunk from any mirror for {self.stall_s:g}s "
                        f"({len(self.download.have)} of {self.download.deployment.chunk_count} "
                        "on disk); the partial is kept"
                    )
                await asyncio.sleep(min(backoff.next_delay_s(), self.stall_s - idle))
        return self.fetched

    def _complete(self) -> bool:
        return self.download.complete

    def _mirrors(self) -> list[str]:
        ordered = list(self.urls[self._preferred :]) + list(self.urls[: self._preferred])
        return [u for u in dict.fromkeys(ordered) if u not in self.refused]

    async def _fetch_from(self, session: aiohttp.ClientSession, url: str) -> None:
        for first, last in _runs(self.download.missing, self._chunks_per_request):
            d = self.download.deployment
            start = d.chunk_span(first)[0]
            end_offset, end_length = d.chunk_span(last)
            end = end_offset + end_length - 1
            headers = {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
            async with session.get(url, headers=headers, allow_redirects=True) as response:
                skip = self._check_response(response, start, end)
                while skip > 0:  # a server that ignores Range sends the file from byte 0
                    skip -= len(await response.content.readexactly(min(skip, 1 << 20)))
                for index in range(first, last + 1):
                    length = d.chunk_span(index)[1]
                    data = await response.content.readexactly(length)
                    try:
                        stored = await asyncio.to_thread(self.download.store_chunk, index, data)
                    except ChunkHashMismatchError as exc:
                        raise _MirrorRefused(f"served wrong bytes: {exc}") from exc
                    if stored:
                        self.fetched += 1
                        self.last_chunk_at = time.monotonic()
                        self._preferred = list(self.urls).index(url)
                    await self.on_stored(self.download.complete)

    @property
    def _chunks_per_request(self) -> int:
        return max(1, self.request_bytes // self.download.deployment.chunk_size)

    def _check_response(self, response: aiohttp.ClientResponse, start: int, end: int) -> int:
        """Bytes to skip before ``start``; raises for an answer that cannot serve the range."""
        size = self.download.deployment.size
        if response.status in _REFUSALS:
            raise _MirrorRefused(f"HTTP {response.status} {response.reason or ''}".strip())
        if response.status == 200:
            if response.content_length is not None and response.content_length != size:
                raise _MirrorRefused(
                    f"sends {response.content_length} bytes, the signed size is {size}"
                )
            return start
        if response.status != 206:
            raise aiohttp.ClientResponseError(
                response.request_info, (), status=response.status, message="unexpected status"
            )
        match = CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
        if match is None or int(match.group(1)) != start or int(match.group(2)) < end:
            raise _MirrorRefused(
                f"answered bytes={start}-{end} with Content-Range "
                f"{response.headers.get('Content-Range')!r}"
            )
        if match.group(3) != "*" and int(match.group(3)) != size:
            raise _MirrorRefused(f"its file is {match.group(3)} bytes, the signed size is {size}")
        return 0


def _runs(indices: Sequence[int], most: int) -> Iterator[tuple[int, int]]:
    """Consecutive ``indices`` as ``(first, last)`` runs of at most ``most`` chunks."""
    first = previous = -2
    for index in indices:
        if index == previous + 1 and index - first < most:
            previous = index
            continue
        if first >= 0:
            yield first, previous
        first = previous = index
    if first >= 0:
        yield first, previous


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return f"transfer cut after {len(exc.partial)} of {exc.expected} bytes of a chunk"
    return f"{type(exc).__name__}: {exc}"
