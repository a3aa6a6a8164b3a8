"""A small, strict FHIR R4 REST client for one hook call's data: plain httpx, plain dicts.

Why our own client: none of the Python FHIR clients uses httpx, and the service needs exactly
three things from a server, each with a hard time budget (a CDS hook has about 500 ms):
``read``, ``search`` (with paging) and fetching an ECG attachment from a ``Binary``.

Rules the client enforces, whatever the server does:

* **Headers.** ``Accept: application/fhir+json`` and ``Accept-Encoding: gzip, deflate`` always;
  ``Authorization: Bearer <token>`` when the hook passed ``fhirAuthorization``. The headers go on
  each request; the token is never stored on the HTTP client, which may be a pooled one serving
  other calls (:class:`cds_service.fhir_http.FhirConnections`, ``connections=``).
* **Size.** Every answer is streamed and abandoned past its cap: reads and search pages at
  ``max_response_bytes`` (the app passes ``ECGLAB_MAX_BODY_MB``, the bound of a prefetch carrying
  the same data), attachments at the caller's limit. gzip/deflate bodies are inflated under the
  same cap and an inflation-ratio cap (:func:`cds_service.fhir_http.read_body`).
* **Time.** One timeout for connect, read, write and pool wait (``timeout``), further cut to what
  is left of the caller's ``deadline`` (a :func:`time.monotonic` value). The client is
  thread-safe: :mod:`cds_service.fetch` runs one hook's queries on it concurrently.
* **Scope.** The token goes only to URLs under the ``fhirServer`` base (:meth:`FhirClient.scoped`):
  same scheme, host and port, and a path equal to the base path or below it once literal dot
  segments are resolved (RFC 3986 §5.2.4). A URL with percent-encoded dot segments (``%2e%2e``),
  an encoded ``/`` or ``\\`` (``%2f``, ``%5c``), a backslash, or user info is refused, since a
  server may decode those into a path outside the base. ``Bundle.link[next]`` (fetched or
  prefetched), attachment URLs and ``Binary`` references outside the base are not fetched.
  Redirects are never followed (``follow_redirects=False``; a 3xx is an error).
* **Paging.** A search follows ``next`` links up to ``max_pages`` pages in all;
  :meth:`FhirClient.next_pages` continues a prefetched Bundle the same way (the prefetched page
  counts as the first). Every page is bounded by the caller's ``deadline``.
* **Queries are the caller's.** The client runs the reads and searches it is given; the one set
  of queries (portable parameters only: ``subject=Patient/X``, ``code=system|code,…`` lists,
  ``date=ge…``, ``_sort``, ``_count``) is :mod:`cds_service.prefetch`.
* **Privacy.** Log lines and error messages name the interaction ("search Observation"), never a
  URL, a patient id or the token; the ``httpx``/``httpcore`` loggers (which log full URLs at
  INFO) are set to WARNING when this module is imported.

Errors (httpx style, each carries ``status`` and ``response`` when there was one)::

    FhirError                  any failure talking to the FHIR server
    ├── FhirUnauthorized       401: token missing, expired or rejected
    ├── FhirForbidden          403: token lacks the scope
    ├── FhirNotFound           404 / 410: the resource does not exist (e.g. unknown patient)
    ├── FhirTimeout            no answer within the timeout or the hook's deadline
    ├── FhirServerError        5xx
    ├── FhirMalformed          body is not JSON, or not the resourceType asked for
    ├── FhirConnectionError    cannot connect (refused, DNS, TLS)
    └── FhirTooLarge           an answer exceeds its byte cap or inflation ratio (``reason``
                               attachment_too_large, what an ECG attachment is rejected with)

Other refusals (a redirect, an attachment URL outside the base, another 4xx) raise plain
:class:`FhirError`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote

import httpx

from cds_service.fhir_http import (
    ACCEPT_ENCODING,
    DEFAULT_MAX_RESPONSE_BYTES,
    BodyDeadline,
    BodyTooLarge,
    BodyUndecodable,
    FhirConnections,
    Lease,
    new_http_client,
    read_body,
)
from cds_service.fhir_values import media_type
from cds_service.observability import protect_library_loggers
from fhir_mappings.errors import EcglabError, InputError

log = logging.getLogger(__name__)
# httpx logs every request line, URL and query (patient ids) included, at INFO: keep it quiet, and
# should anyone turn it on, cut the URLs down to their origin.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)
protect_library_loggers()

FHIR_JSON = "application/fhir+json"
"""MIME type asked for and sent."""

DEFAULT_TIMEOUT_S: float = 0.5
"""Connect/read/write/pool timeout: the whole CDS hook has about 500 ms."""

DEFAULT_MAX_PAGES: int = 3
"""Pages of one search followed at most (``Bundle.link[next]``)."""

# FHIR R4 caps ids at 64 characters, but Epic hands out longer ones (cdshooks.md §0): accept up to
# 256 of the id alphabet, which still keeps ids from changing the request path.
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,256}")
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class FhirError(EcglabError):
    """A failure talking to the FHIR server; ``status`` and ``response`` when there was an answer."""

    def __init__(
        self, message: str, *, status: int | None = None, response: httpx.Response | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.response = response


class FhirUnauthorized(FhirError):
    """HTTP 401: the token is missing, expired or not accepted."""


class FhirForbidden(FhirError):
    """HTTP 403: the token does not grant access to this data."""


class FhirNotFound(FhirError):
    """HTTP 404 or 410: the resource does not exist (or no longer)."""


class FhirTimeout(FhirError):
    """No answer within the timeout or before the caller's deadline."""


class FhirServerError(FhirError):
    """HTTP 5xx: the server failed."""


class FhirMalformed(FhirError):
    """The body is not JSON, or not the FHIR resource type that was asked for."""


class FhirConnectionError(FhirError):
    """The server cannot be reached (connection refused, DNS, TLS)."""


class FhirTooLarge(FhirError):
    """An answer is larger than allowed (or inflates too far); ``reason`` is the ECG rejection reason."""

    reason = "attachment_too_large"


_STATUS_ERRORS: dict[int, type[FhirError]] = {
    401: FhirUnauthorized,
    403: FhirForbidden,
    404: FhirNotFound,
    410: FhirNotFound,
}


class FhirClient:
    """FHIR R4 client bound to one server base URL and (optionally) one bearer token.

    Use as a context manager or call :meth:`close`. Safe to share between threads.

    Args:
        base_url: the FHIR base, e.g. ``https://ehr.example.org/fhir`` (the hook's ``fhirServer``).
        access_token: bearer token from ``fhirAuthorization``; never logged, sent on each request
            and never stored on the HTTP client.
        timeout: seconds for each of connect, read, write and pool wait.
        max_pages: search pages followed at most.
        transport: an httpx transport (tests pass :class:`httpx.MockTransport`).
        max_workers: requests expected in flight at once (sizes an own connection pool).
        max_response_bytes: the cap of a read or one search page (after inflating).
        connections: the app's pooled clients; the client borrows the one of its base and
            transport and gives it back on :meth:`close`. ``None``: an own client, closed then.
    """

    def __init__(
        self,
        base_url: str,
        access_token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_pages: int = DEFAULT_MAX_PAGES,
        transport: httpx.BaseTransport | None = None,
        max_workers: int = 8,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        connections: FhirConnections | None = None,
    ) -> None:
        base = _normalised_base(base_url)
        if max_pages < 1:
            raise InputError(f"max_pages must be at least 1, got {max_pages}")
        self.base_url = str(base)
        self.timeout = float(timeout)
        self.max_pages = int(max_pages)
        self.max_response_bytes = int(max_response_bytes)
        self._base = base
        self._headers = {"Accept": FHIR_JSON, "Accept-Encoding": ACCEPT_ENCODING}
        if access_token:
            self._headers["Authorization"] = f"Bearer {access_token}"
        self._lease: Lease | None = None
        if connections is not None:
            self._lease = connections.lease(self.base_url, transport)
            self._http = self._lease.client
        else:
            self._http = new_http_client(transport, max_workers=max_workers)

    def __repr__(self) -> str:
        return f"FhirClient({self.base_url!r}, timeout={self.timeout}, max_pages={self.max_pages})"

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Give a pooled HTTP client back, or close the own one (idempotent)."""
        if self._lease is not None:
            self._lease.release()
        else:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ REST interactions

    def read(self, resource_type: str, rid: str, *, deadline: float | None = None) -> dict[str, Any]:
        """``GET [base]/{resource_type}/{rid}``: the resource, checked to be of that type.

        Raises:
            InputError: ``resource_type`` or ``rid`` is not a valid FHIR type / id.
            FhirError: a subclass per failure (see the module docstring).
        """
        _check_type(resource_type)
        check_id(rid, f"{resource_type} id")
        what = f"read {resource_type}"
        response, body = self._get(f"{self.base_url}/{resource_type}/{rid}", None, what, deadline)
        return _parse_json(body, response, resource_type, what)

    def search(
        self, resource_type: str, params: list[tuple[str, str]], *, deadline: float | None = None
    ) -> list[dict[str, Any]]:
        """``GET [base]/{resource_type}?params``: the matching resources of every page followed.

        Only entries with ``search.mode`` ``match`` (or none) of the asked type are returned
        (included resources and OperationOutcome warnings are dropped; duplicates across pages
        too). ``Bundle.link[next]`` is followed while it stays under the base, up to
        ``max_pages`` pages in all.
        """
        _check_type(resource_type)
        return self._pages(
            resource_type, f"{self.base_url}/{resource_type}", list(params), self.max_pages, deadline
        )

    def next_pages(
        self, resource_type: str, next_url: str, *, pages: int, deadline: float | None = None
    ) -> list[dict[str, Any]]:
        """The matching resources of at most ``pages`` pages from a Bundle's ``next`` link on.

        For a prefetched searchset Bundle that the EHR cut after its first page: the link is
        fetched only when it lies under the base (:meth:`scoped`; otherwise nothing is sent, the
        refusal is logged and the answer is empty), then paging continues as in :meth:`search`.
        """
        _check_type(resource_type)
        if pages < 1:
            return []
        target = self.scoped(next_url)
        if target is None:
            log.warning(
                "FHIR search %s: the prefetched next-page link is outside the FHIR server's base; not followed",
                resource_type,
            )
            return []
        return self._pages(resource_type, str(target), None, pages, deadline)

    def get_binary(self, url: str, max_bytes: int, *, deadline: float | None = None) -> bytes:
        """Fetch an attachment (``Binary/123`` or an absolute URL on this server) as raw bytes.

        Asks for ``application/fhir+json``: a ``Binary`` resource answer is base64-decoded from
        ``data``; any other content type is taken as the raw bytes. The body is streamed and
        abandoned as soon as it exceeds the limit (base64 and JSON overhead allowed for).

        Raises:
            FhirTooLarge: more than ``max_bytes`` (declared, received or inflated).
            FhirError: off-origin URL, HTTP error, malformed ``Binary``.
        """
        what = "read Binary"
        scoped = self.scoped(url)
        if scoped is None:
            raise FhirError(f"{what}: attachment URL is outside the FHIR server's base; not fetched")

        def cap(response: httpx.Response) -> int:
            return max_bytes * 4 // 3 + 65536 if _is_json(response) else max_bytes

        response, body = self._get(str(scoped), None, what, deadline, cap=cap)
        if not _is_json(response):
            return body
        binary = _parse_json(body, response, "Binary", what)
        try:
            data = base64.b64decode(str(binary.get("data") or ""), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FhirMalformed(
                f"{what}: Binary.data is not base64", status=response.status_code, response=response
            ) from exc
        if len(data) > max_bytes:
            raise FhirTooLarge(
                f"{what}: attachment is {len(data)} bytes, over {max_bytes}", status=response.status_code
            )
        return data

    def binary_loader(self, max_bytes: int, *, deadline: float | None = None) -> Callable[[str], bytes]:
        """A ``url → bytes`` callback for :func:`cds_service.features.extract_model_inputs`."""

        def load(url: str) -> bytes:
            return self.get_binary(url, max_bytes, deadline=deadline)

        return load

    # ------------------------------------------------------------------ internals

    def _timeout(self, deadline: float | None, what: str) -> httpx.Timeout:
        """The configured timeout, cut to what is left before ``deadline``."""
        seconds = self.timeout
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FhirTimeout(f"{what}: the deadline passed before the request was sent")
            seconds = min(seconds, left)
        return httpx.Timeout(seconds)

    def _get(
        self,
        url: str,
        params: list[tuple[str, str]] | None,
        what: str,
        deadline: float | None,
        *,
        cap: Callable[[httpx.Response], int] | None = None,
    ) -> tuple[httpx.Response, bytes]:
        """One streamed GET with error mapping: the answer and its body, read within the cap.

        ``cap`` chooses the byte cap from the answer's headers (default: ``max_response_bytes``).
        Logs the interaction name, status, size and time only.
        """
        timeout = self._timeout(deadline, what)
        started = time.perf_counter()
        query = tuple(params) if params else None
        try:
            with self._http.stream(
                "GET", url, params=query, headers=self._headers, timeout=timeout
            ) as response:
                _raise_for_status(response, what)
                limit = cap(response) if cap is not None else self.max_response_bytes
                try:
                    body = read_body(response, limit, deadline=deadline)
                except BodyTooLarge as exc:
                    raise FhirTooLarge(f"{what}: the answer {exc}", status=response.status_code) from None
                except BodyUndecodable as exc:
                    raise FhirMalformed(f"{what}: {exc}", status=response.status_code) from None
                except BodyDeadline as exc:
                    raise FhirTimeout(f"{what}: {exc}") from None
        except httpx.TimeoutException as exc:
            raise FhirTimeout(f"{what}: no answer within {timeout.read:.2f} s") from exc
        except httpx.TransportError as exc:
            raise FhirConnectionError(f"{what}: cannot reach the FHIR server ({type(exc).__name__})") from exc
        log.debug(
            "FHIR %s -> %d, %d bytes in %.0f ms",
            what,
            response.status_code,
            len(body),
            1000 * (time.perf_counter() - started),
        )
        return response, body

    def scoped(self, url: str) -> httpx.URL | None:
        """``url`` (absolute, or relative to the base) resolved, when it lies under the base; else ``None``.

        This is the one test every URL passes before a request carries the token (module
        docstring, "Scope"): same scheme, host and port as the base; no user info; no backslash,
        encoded ``/``/``\\`` or encoded dot segment in the path; and the path, with literal dot
        segments resolved, equal to the base path or below it. A relative reference resolves
        below the base (``Binary/1`` → ``[base]/Binary/1``); ``../x`` or ``/x`` leaves it.
        """
        try:
            target = httpx.URL(self.base_url + "/").join(url)
        except (httpx.InvalidURL, ValueError, TypeError):
            return None
        if _origin(target) != _origin(self._base) or target.userinfo:
            return None
        path = _checked_path(target)
        base_path = self._base.path.rstrip("/")
        if path is None or not (path == base_path or path.startswith(base_path + "/")):
            return None
        return target

    def _pages(
        self,
        resource_type: str,
        url: str,
        query: list[tuple[str, str]] | None,
        max_pages: int,
        deadline: float | None,
    ) -> list[dict[str, Any]]:
        """Matching entries of up to ``max_pages`` searchset pages from ``url`` on (deduplicated by id)."""
        what = f"search {resource_type}"
        next_url: str | None = url
        found: dict[str, dict[str, Any]] = {}
        pages = 0
        while next_url is not None and pages < max_pages:
            response, body = self._get(next_url, query, what, deadline)
            bundle = _parse_json(body, response, "Bundle", what)
            pages += 1
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                mode = (entry.get("search") or {}).get("mode", "match") if isinstance(entry, dict) else None
                if (
                    mode != "match"
                    or not isinstance(resource, dict)
                    or resource.get("resourceType") != resource_type
                ):
                    continue
                key = str(resource.get("id") or f"#{len(found)}")
                found.setdefault(key, resource)
            next_url, query = self._next_page(bundle, response, what), None
        if next_url is not None:
            log.info("FHIR %s: stopped after %d page(s), the page limit", what, pages)
        return list(found.values())

    def _next_page(self, bundle: dict[str, Any], response: httpx.Response, what: str) -> str | None:
        """The ``next`` link of a searchset when it stays under the base, else ``None`` (logged)."""
        link = next_link(bundle)
        if link is None:
            return None
        try:
            absolute = str(response.url.join(link))
        except (httpx.InvalidURL, ValueError):
            absolute = ""
        target = self.scoped(absolute) if absolute else None
        if target is None:
            log.warning("FHIR %s: next-page link is outside the FHIR server's base; paging stopped", what)
            return None
        return str(target)


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    """(scheme, host, port) with the scheme's default port filled in."""
    return (url.scheme, url.host.lower(), url.port or _DEFAULT_PORTS.get(url.scheme, 0))


_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)


def _checked_path(url: httpx.URL) -> str | None:
    """The decoded path of ``url``, or ``None`` when a server could read it as another path.

    Refused: a backslash, an encoded ``/`` or ``\\``, and any segment that decodes to ``.`` or
    ``..`` (literal dot segments are already resolved by :meth:`httpx.URL.join`).
    """
    raw = url.raw_path.split(b"?", 1)[0].decode("ascii", errors="replace")
    if "\\" in raw or _ENCODED_SEPARATOR.search(raw):
        return None
    if any(unquote(segment) in (".", "..") for segment in raw.split("/")):
        return None
    return unquote(raw)


def _normalised_base(base_url: str) -> httpx.URL:
    """The ``fhirServer`` base without a trailing ``/`` (httpx resolves literal dot segments).

    Raises:
        InputError: not an absolute http(s) URL, or one with user info or a path that
            :func:`_checked_path` refuses.
    """
    try:
        base = httpx.URL(base_url.strip().rstrip("/"))
    except (httpx.InvalidURL, ValueError, TypeError):
        base = httpx.URL("")
    if base.scheme not in _DEFAULT_PORTS or not base.host or base.userinfo or _checked_path(base) is None:
        raise InputError(f"FHIR base URL {base_url!r} must be an absolute http(s) URL without dot segments")
    return base


def next_link(bundle: Mapping[str, Any]) -> str | None:
    """The ``url`` of a Bundle's first ``link`` with ``relation`` ``next``, if it has one."""
    links = bundle.get("link")
    for link in links if isinstance(links, list) else []:
        if isinstance(link, Mapping) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return str(link["url"])
    return None


def check_id(value: str, what: str) -> None:
    """Refuse ids that are not FHIR ids (they would change the request path): :class:`InputError`."""
    if not isinstance(value, str) or not _FHIR_ID.fullmatch(value):
        raise InputError(f"{what} is not a valid FHIR id (1-256 characters of A-Z, a-z, 0-9, '-', '.')")


def _check_type(resource_type: str) -> None:
    """Refuse resource type names that are not FHIR type names."""
    if not _RESOURCE_TYPE.fullmatch(resource_type):
        raise InputError(f"resource type {resource_type!r} is not a FHIR resource type name")


def _raise_for_status(response: httpx.Response, what: str) -> None:
    """Map a non-2xx answer to the error tree (redirects included: they are never followed)."""
    status = response.status_code
    if 200 <= status < 300:
        return
    if 300 <= status < 400:
        raise FhirError(
            f"{what}: server answered with a redirect (HTTP {status}); redirects are not followed",
            status=status,
            response=response,
        )
    error = _STATUS_ERRORS.get(status) or (FhirServerError if status >= 500 else FhirError)
    raise error(f"{what}: HTTP {status}", status=status, response=response)


def _parse_json(body: bytes, response: httpx.Response, resource_type: str, what: str) -> dict[str, Any]:
    """Parse a FHIR JSON body and check its ``resourceType``."""
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        raise FhirMalformed(
            f"{what}: body is not JSON", status=response.status_code, response=response
        ) from exc
    if not isinstance(parsed, dict) or parsed.get("resourceType") != resource_type:
        got = parsed.get("resourceType") if isinstance(parsed, dict) else type(parsed).__name__
        raise FhirMalformed(
            f"{what}: expected a {resource_type}, got {got!r}", status=response.status_code, response=response
        )
    return parsed


def _is_json(response: httpx.Response) -> bool:
    """Whether the answer is JSON (a ``Binary`` resource rather than the attachment's own bytes)."""
    return media_type(response.headers.get("content-type")) in (FHIR_JSON, "application/json")
