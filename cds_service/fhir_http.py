"""HTTP under the FHIR client: pooled connections per FHIR server, and bodies read under hard caps.

**Pooled connections** (:class:`FhirConnections`). Opening a TCP (and TLS) connection per hook call
cost about 30 ms; the app keeps one :class:`httpx.Client` per FHIR server base URL (and transport)
in each worker process, at most :data:`MAX_SERVERS` of them (the least recently used one is closed
once nobody holds it), and :class:`~cds_service.fhir_client.FhirClient` borrows it for one call
(:meth:`FhirConnections.lease`). A pooled client carries **nothing of a call**: no default
headers, no auth, and a cookie jar that refuses every cookie, so neither a bearer token nor a
session cookie set for one patient's call can reach another's; the token travels on each request
(:class:`~cds_service.fhir_client.FhirClient` passes it per request). Redirects are never followed.

**Bounded bodies** (:func:`read_body`). Every FHIR answer (reads, search pages, attachments) is
streamed and abandoned as soon as it exceeds its byte cap, whatever ``Content-Length`` says, and
the caller's deadline bounds the whole body (a server dripping a byte at a time cannot hold a
thread). **Content-Encoding**: the client asks for ``gzip, deflate`` (:data:`ACCEPT_ENCODING`)
and inflates them itself from the raw stream (httpx's transparent decoding has no cap), with a
running cap on the inflated size (the same byte cap) and on the inflation ratio
(:data:`MAX_INFLATE_RATIO`, enforced once :data:`RATIO_FLOOR_BYTES` are out): a gzip bomb costs
at most the cap in memory and stops at the first chunk that crosses either bound. Any other
encoding (``br``, ``zstd``, a chain of several) is refused (:class:`BodyUndecodable`) rather
than guessed at.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from fhir_mappings.errors import EcglabError

__all__ = [
    "ACCEPT_ENCODING",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "MAX_INFLATE_RATIO",
    "MAX_SERVERS",
    "RATIO_FLOOR_BYTES",
    "BodyDeadline",
    "BodyTooLarge",
    "BodyUndecodable",
    "FhirConnections",
    "Lease",
    "new_http_client",
    "read_body",
]

ACCEPT_ENCODING = "gzip, deflate"
"""The ``Accept-Encoding`` of every FHIR request: the encodings :func:`read_body` inflates."""

DEFAULT_MAX_RESPONSE_BYTES: int = 32 * 1024 * 1024
"""Largest FHIR answer (a read or one search page, after inflating) unless the caller says otherwise."""

MAX_INFLATE_RATIO: float = 200.0
"""Most inflated bytes per received byte (a zip bomb inflates about 1000:1; FHIR JSON 5 to 20:1)."""

RATIO_FLOOR_BYTES: int = 1024 * 1024
"""The ratio cap applies once this many bytes are inflated (a small, very regular body may exceed it)."""

MAX_SERVERS: int = 16
"""FHIR server base URLs (with their transport) a :class:`FhirConnections` keeps clients for."""

DEFAULT_TIMEOUT_S: float = 0.5
"""Default timeout of a pooled client; every request passes its own, cut to the call's deadline."""


class BodyTooLarge(EcglabError):
    """The body (declared, received or inflated) exceeds its byte cap or the inflation ratio cap."""


class BodyUndecodable(EcglabError):
    """The body's ``Content-Encoding`` is not one the client asked for, or its compressed data is corrupt."""


class BodyDeadline(EcglabError):
    """The body was still arriving at the caller's deadline."""


def _no_cookies() -> CookieJar:
    """A cookie jar that stores and sends nothing (a pooled client serves many patients and tokens)."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def new_http_client(transport: httpx.BaseTransport | None, *, max_workers: int = 8) -> httpx.Client:
    """An :class:`httpx.Client` holding no call state: no headers, no auth, no cookies, no redirects.

    ``max_workers`` is the number of requests expected in flight at once (sizes the pool).
    """
    return httpx.Client(
        timeout=httpx.Timeout(DEFAULT_TIMEOUT_S),
        follow_redirects=False,
        transport=transport,
        cookies=_no_cookies(),
        limits=httpx.Limits(max_connections=4 * max_workers, max_keepalive_connections=2 * max_workers),
    )


# -- bounded bodies ------------------------------------------------------------------------------------


class _Inflater:
    """Inflates one gzip or deflate stream with a running output cap and a ratio cap."""

    def __init__(self, encoding: str, cap: int) -> None:
        self.encoding = encoding
        self.cap = cap
        self.received = 0
        self.inflated = 0
        self._raw_deflate = False
        self._stream = self._new()
        self._started = False

    def _new(self) -> zlib._Decompress:
        if self.encoding == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return zlib.decompressobj(-zlib.MAX_WBITS if self._raw_deflate else zlib.MAX_WBITS)

    def feed(self, chunk: bytes) -> list[bytes]:
        """The inflated bytes of ``chunk`` (raises :class:`BodyTooLarge` past a cap)."""
        self.received += len(chunk)
        out: list[bytes] = []
        data = chunk
        while data:
            try:
                piece = self._stream.decompress(data, self.cap - self.inflated + 1)
            except zlib.error as exc:
                if self.encoding == "deflate" and not self._started and not self._raw_deflate:
                    # RFC 9110 "deflate" is the zlib format; some servers send raw deflate instead.
                    self._raw_deflate = True
                    self._stream = self._new()
                    continue
                raise BodyUndecodable(f"{self.encoding} data is corrupt") from exc
            self._started = self._started or self.received >= 2
            self._count(piece)
            out.append(piece)
            if self._stream.eof:
                data = self._stream.unused_data
                if data and self.encoding == "gzip":
                    self._stream = self._new()  # a multi-member gzip stream
                    continue
                if data:
                    raise BodyUndecodable("data after the end of the deflate stream")
                break
            data = self._stream.unconsumed_tail
        return out

    def finish(self) -> bytes:
        """What is left in the inflater; refuses a stream that ended early."""
        tail = self._stream.flush()
        self._count(tail)
        if self.received and not self._stream.eof:
            raise BodyUndecodable(f"{self.encoding} data ends before its end marker")
        return tail

    def _count(self, piece: bytes) -> None:
        self.inflated += len(piece)
        if self.inflated > self.cap:
            raise BodyTooLarge(f"inflates to more than {self.cap} bytes")
        if self.inflated > RATIO_FLOOR_BYTES and self.inflated > MAX_INFLATE_RATIO * max(self.received, 1):
            raise BodyTooLarge(f"inflates more than {MAX_INFLATE_RATIO:g} times its size")


def _encoding(response: httpx.Response) -> str:
    """The body's one content coding: ``identity``, ``gzip`` or ``deflate`` (else :class:`BodyUndecodable`)."""
    value = response.headers.get("content-encoding", "").strip().lower()
    if value in ("", "identity"):
        return "identity"
    if value in ("gzip", "x-gzip"):
        return "gzip"
    if value == "deflate":
        return "deflate"
    raise BodyUndecodable("the answer's Content-Encoding is not gzip or deflate")


def read_body(response: httpx.Response, cap: int, *, deadline: float | None = None) -> bytes:
    """The body of a streamed ``response``, inflated, read while it stays within ``cap`` bytes.

    ``cap`` bounds the declared ``Content-Length``, the bytes received and the inflated bytes;
    ``deadline`` (a :func:`time.monotonic` instant) the time until the last chunk.

    Raises:
        BodyTooLarge: a cap (size or inflation ratio) was crossed; reading stopped there.
        BodyUndecodable: an encoding the client did not ask for, or corrupt compressed data.
        BodyDeadline: the body was still arriving at ``deadline``.
    """
    encoding = _encoding(response)
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise BodyTooLarge(f"declares {int(declared)} bytes, over {cap}")
    if response.is_stream_consumed:
        # Built in memory, not received (``httpx.MockTransport`` with ``content=``): httpx has
        # decoded it already; only its size is left to check.
        if len(response.content) > cap:
            raise BodyTooLarge(f"exceeds {cap} bytes")
        return response.content
    inflater = _Inflater(encoding, cap) if encoding != "identity" else None
    chunks: list[bytes] = []
    received = 0
    for chunk in response.iter_raw():
        # The read timeout bounds each read, not the whole body: a server that drips a byte at a
        # time would hold this thread forever. The deadline bounds the total.
        if deadline is not None and time.monotonic() > deadline:
            raise BodyDeadline("the body was still arriving at the deadline")
        received += len(chunk)
        if received > cap:
            raise BodyTooLarge(f"exceeds {cap} bytes")
        chunks.extend(inflater.feed(chunk) if inflater is not None else (chunk,))
    if inflater is not None:
        chunks.append(inflater.finish())
    return b"".join(chunks)


# -- pooled connections ----------------------------------------------------------------------------------


@dataclass
class _Entry:
    """A pooled client, how many calls hold it, and whether the pool has let go of it."""

    client: httpx.Client
    leases: int = 0
    evicted: bool = False


@dataclass
class Lease:
    """One borrowing of a pooled client; :meth:`release` it when the call is done (idempotent)."""

    client: httpx.Client
    _pool: FhirConnections = field(repr=False)
    _entry: _Entry = field(repr=False)
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        """Give the client back to its pool (closed now if the pool evicted it meanwhile)."""
        if not self._released:
            self._released = True
            self._pool._release(self._entry)


class FhirConnections:
    """One pooled :class:`httpx.Client` per FHIR server base URL (and transport), for one worker process.

    Owned by the app (:class:`cds_service.app.ServiceState` closes it). Thread-safe. At most
    ``max_servers`` clients are kept: a new server evicts the least recently used one, which is
    closed as soon as no call holds it. After :meth:`close`, a lease gets a client of its own that
    its release closes (a call racing the shutdown still completes).
    """

    def __init__(self, *, max_servers: int = MAX_SERVERS, max_workers: int = 8) -> None:
        if max_servers < 1:
            raise ValueError("max_servers must be at least 1")
        self.max_servers = max_servers
        self.max_workers = max_workers
        self._entries: OrderedDict[tuple[str, httpx.BaseTransport | None], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def lease(self, base_url: str, transport: httpx.BaseTransport | None = None) -> Lease:
        """The pooled client of ``base_url`` (a normalised FHIR base) and ``transport``, made on first use."""
        key = (base_url, transport)
        doomed: list[httpx.Client] = []
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry(new_http_client(transport, max_workers=self.max_workers))
                if self._closed:
                    entry.evicted = True
                else:
                    self._entries[key] = entry
                while len(self._entries) > self.max_servers:
                    _, old = self._entries.popitem(last=False)
                    old.evicted = True
                    if old.leases == 0:
                        doomed.append(old.client)
            else:
                self._entries.move_to_end(key)
            entry.leases += 1
        for client in doomed:
            client.close()
        return Lease(entry.client, self, entry)

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.leases -= 1
            close = entry.evicted and entry.leases == 0
        if close:
            entry.client.close()

    def close(self) -> None:
        """Close every pooled client nobody holds; held ones close when released (idempotent)."""
        with self._lock:
            self._closed = True
            entries = list(self._entries.values())
            self._entries.clear()
            idle = []
            for entry in entries:
                entry.evicted = True
                if entry.leases == 0:
                    idle.append(entry.client)
        for client in idle:
            client.close()
