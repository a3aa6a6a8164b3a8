"""A controllable fake FHIR upstream on loopback: a real HTTP server in a thread, faults on demand.

The reliability suites need a FHIR server that misbehaves the way real ones do, over real sockets
(``httpx.MockTransport`` never times out, never resets a connection and never trickles bytes).
:class:`FakeUpstream` is a ``ThreadingHTTPServer`` on ``127.0.0.1`` whose behaviour is switched by
its :attr:`~FakeUpstream.mode` between requests:

==================  ======================================================================
mode                what every request gets
==================  ======================================================================
``ok``              a working FHIR server over :attr:`~FakeUpstream.resources` (the
                    :class:`tests.service_fixtures.MockFhir` rules: reads, ``subject`` and
                    ``code``/``type`` filtered searches)
``refusing``        the TCP connection is reset (``SO_LINGER`` 0) without an answer
``slow``            an answer only after :attr:`~FakeUpstream.delay_s` (beyond any budget)
``trickle``         status and headers at once, then one body byte every 50 ms for
                    :attr:`~FakeUpstream.delay_s`: each read succeeds, the whole never ends
``http_401`` ...    that status (401, 403, 404, 500) with an OperationOutcome
``malformed_json``  200 ``application/fhir+json`` whose body is cut off mid-JSON
``wrong_types``     reads answer an Observation; searches answer Bundles of Practitioners,
                    Medications and Patients instead of the type asked for
``huge_attachment`` searches find one DocumentReference whose attachment URL points at
                    ``Binary/huge``: 50 MB generated on the fly and streamed without a
                    Content-Length (``huge_declared``: the same, with the length declared;
                    ``trickle_attachment``: the attachment trickles as in ``trickle``)
``endless_next``    every search page is a Bundle with the record's entries and a ``next``
                    link to the following page, forever
==================  ======================================================================

"Down" (nothing listening) is not a mode of a running server: :func:`closed_port_url` gives a
loopback URL whose port was just released, so connecting is refused by the kernel.

Every request is recorded (:attr:`~FakeUpstream.requests`), and the bytes written for the huge
attachment are counted (:attr:`~FakeUpstream.attachment_bytes_sent`), so tests can show that the
service stopped reading early. The server's own request log is silenced: it would print the
patient id of every URL on the terminal.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx

from tests.service_fixtures import PATIENT_ID, MockFhir, bundle, iso

FHIR_JSON = "application/fhir+json"
HUGE_ATTACHMENT_BYTES = 50 * 1024 * 1024
CHUNK = 64 * 1024
TRICKLE_INTERVAL_S = 0.05
MODES = (
    "ok",
    "refusing",
    "slow",
    "trickle",
    "http_401",
    "http_403",
    "http_404",
    "http_500",
    "malformed_json",
    "wrong_types",
    "huge_attachment",
    "huge_declared",
    "trickle_attachment",
    "endless_next",
)


@dataclass(frozen=True)
class SeenRequest:
    """One request the fake upstream received: path, query pairs and headers (lower-case names)."""

    path: str
    query: tuple[tuple[str, str], ...]
    headers: Mapping[str, str]


def closed_port_url() -> str:
    """A loopback FHIR base URL on which nothing listens (the port was bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    return f"http://127.0.0.1:{port}/fhir"


def huge_document_reference(base_url: str, pid: str = PATIENT_ID) -> dict[str, Any]:
    """A recent ECG DocumentReference whose DICOM attachment lives at ``{base_url}/Binary/huge``."""
    return {
        "resourceType": "DocumentReference",
        "id": "ecg-huge",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "11524-6"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "date": iso(datetime.now(UTC) - timedelta(minutes=5)),
        "content": [{"attachment": {"contentType": "application/dicom", "url": f"{base_url}/Binary/huge"}}],
    }


class _Server(ThreadingHTTPServer):
    """A threading HTTP server with a deep listen backlog.

    The default backlog of 5 overflows when a hook call opens its eight parallel searches while
    other handler threads are busy; the kernel then drops the SYN and the client retries after a
    second, which would look like a slow server.
    """

    request_queue_size = 128
    daemon_threads = True


class FakeUpstream:
    """The fake FHIR server; see the module docstring. Use as a context manager or call :meth:`stop`."""

    def __init__(self, resources: list[dict[str, Any]] | None = None, *, delay_s: float = 3.0) -> None:
        self.resources: list[dict[str, Any]] = list(resources or [])
        self.mode = "ok"
        self.delay_s = delay_s
        self.requests: list[SeenRequest] = []
        self.attachment_bytes_sent = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            """Dispatches every GET to :meth:`FakeUpstream._answer`."""

            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                """Record the request, then behave as the current mode says."""
                upstream._answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                """Silenced: the default writes every URL (patient ids included) to stderr."""

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self.base_url = f"http://127.0.0.1:{self.port}/fhir"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-upstream", daemon=True)
        self._thread.start()

    # -- lifecycle ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Wake every sleeping handler, stop serving and release the port."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextmanager
    def switched(self, mode: str) -> Iterator[FakeUpstream]:
        """Run a block with ``mode`` active, then return to ``ok`` (and forget the recorded requests)."""
        if mode not in MODES:
            raise ValueError(f"unknown fake upstream mode {mode!r}; known: {MODES}")
        self.mode, self.requests, self.attachment_bytes_sent = mode, [], 0
        try:
            yield self
        finally:
            self.mode = "ok"

    # -- request handling ---------------------------------------------------------------------------
    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        """Record one request and answer it according to :attr:`mode`."""
        parts = urlsplit(handler.path)
        seen = SeenRequest(
            parts.path,
            tuple(parse_qsl(parts.query)),
            {k.lower(): v for k, v in handler.headers.items()},
        )
        with self._lock:
            self.requests.append(seen)
        mode = self.mode
        try:
            if mode == "refusing":
                self._reset(handler)
            elif mode == "slow":
                if not self._stopping.wait(self.delay_s):
                    self._send_json(handler, *self._ok_response(handler))
            elif mode == "trickle":
                self._trickle(handler)
            elif mode.startswith("http_"):
                status = int(mode.removeprefix("http_"))
                outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "x"}]}
                self._send_json(handler, status, outcome)
            elif mode == "malformed_json":
                self._send_raw(
                    handler, 200, b'{"resourceType": "Bundle", "type": "searchset", "entry": [{"res'
                )
            elif mode == "wrong_types":
                self._send_json(handler, 200, self._wrong_types(seen))
            elif mode in ("huge_attachment", "huge_declared", "trickle_attachment"):
                self._huge(
                    handler, seen, declared=mode == "huge_declared", trickle=mode == "trickle_attachment"
                )
            elif mode == "endless_next":
                self._send_json(handler, 200, self._endless(seen))
            else:
                self._send_json(handler, *self._ok_response(handler))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on us: exactly what several modes are testing

    def _ok_response(self, handler: BaseHTTPRequestHandler) -> tuple[int, Any]:
        """The answer of a working FHIR server (MockFhir's rules over :attr:`resources`)."""
        response = MockFhir(self.resources).handle(httpx.Request("GET", f"http://upstream{handler.path}"))
        return response.status_code, response.json()

    def _wrong_types(self, seen: SeenRequest) -> dict[str, Any]:
        """A read answers an Observation, a search a Bundle of unrelated resource types."""
        if "/Patient/" in seen.path:
            return {"resourceType": "Observation", "id": "not-a-patient", "status": "final"}
        return bundle(
            {"resourceType": "Practitioner", "id": "pr-1"},
            {"resourceType": "Medication", "id": "med-1"},
            {"resourceType": "Patient", "id": "someone-else"},
        )

    def _endless(self, seen: SeenRequest) -> dict[str, Any]:
        """Page N of a search that never ends: the ok answer's entries plus a ``next`` link."""
        query = dict(seen.query)
        page = int(query.get("page", "1"))
        first = MockFhir(self.resources).handle(httpx.Request("GET", f"http://upstream{seen.path}"))
        body = first.json()
        if body.get("resourceType") != "Bundle":
            return body  # a read: answered normally
        query["page"] = str(page + 1)
        body["link"] = [
            {
                "relation": "next",
                "url": f"{self.base_url.rsplit('/fhir', 1)[0]}{seen.path}?{urlencode(query)}",
            }
        ]
        return body

    def _huge(
        self, handler: BaseHTTPRequestHandler, seen: SeenRequest, *, declared: bool, trickle: bool
    ) -> None:
        """Searches find the huge DocumentReference; ``Binary/huge`` streams 50 MB of zeros (or trickles)."""
        if seen.path.endswith("/Binary/huge") and trickle:
            self._trickle(handler, content_type="application/dicom", head=b"DICM")
            return
        if seen.path.endswith("/Binary/huge"):
            handler.send_response(200)
            handler.send_header("Content-Type", "application/dicom")
            if declared:
                handler.send_header("Content-Length", str(HUGE_ATTACHMENT_BYTES))
            handler.end_headers()
            chunk = b"\0" * CHUNK
            while self.attachment_bytes_sent < HUGE_ATTACHMENT_BYTES and not self._stopping.is_set():
                handler.wfile.write(chunk)
                with self._lock:
                    self.attachment_bytes_sent += CHUNK
            return
        if "/Patient/" in seen.path:
            self._send_json(handler, *self._ok_response(handler))
        elif seen.path.endswith("/DocumentReference"):
            self._send_json(handler, 200, bundle(huge_document_reference(self.base_url)))
        else:
            self._send_json(handler, 200, bundle())

    def _trickle(
        self,
        handler: BaseHTTPRequestHandler,
        *,
        content_type: str = FHIR_JSON,
        head: bytes = b'{"resourceType": "Bundle", "type": "searchset", "entry": [',
    ) -> None:
        """Headers and ``head`` at once, then one more byte every :data:`TRICKLE_INTERVAL_S`."""
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.end_headers()
        handler.wfile.write(head)
        handler.wfile.flush()
        until = time.monotonic() + self.delay_s
        while time.monotonic() < until and not self._stopping.wait(TRICKLE_INTERVAL_S):
            handler.wfile.write(b" ")
            handler.wfile.flush()

    @staticmethod
    def _reset(handler: BaseHTTPRequestHandler) -> None:
        """Abort the connection with a TCP reset instead of an answer."""
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.close_connection = True
        handler.connection.close()

    @staticmethod
    def _send_json(handler: BaseHTTPRequestHandler, status: int, body: Any) -> None:
        """Send ``body`` as a FHIR JSON answer with ``status``."""
        FakeUpstream._send_raw(handler, status, json.dumps(body).encode())

    @staticmethod
    def _send_raw(handler: BaseHTTPRequestHandler, status: int, payload: bytes) -> None:
        """Send ``payload`` as ``application/fhir+json`` with its length."""
        handler.send_response(status)
        handler.send_header("Content-Type", FHIR_JSON)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)
