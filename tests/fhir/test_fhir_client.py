"""The FHIR client against ``httpx.MockTransport``: headers, paging, origin rules, errors, logging;
and the data path on top of it (``cds_service.fetch``): every missing prefetch key read with its
bound query, concurrently, within the deadline.

Each test pins one rule of ``cds_service.fhir_client`` (module docstring); CDS Hooks 2.0 §"FHIR
Resource Access" for the bearer token, FHIR R4 §3.1.0 (RESTful API: search paging via
``Bundle.link[next]``, ``Accept: application/fhir+json``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import gzip
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from cds_service.fetch import MissingData, fetch_keys, gather_patient_data
from cds_service.fhir_client import (
    FhirClient,
    FhirConnectionError,
    FhirError,
    FhirForbidden,
    FhirMalformed,
    FhirNotFound,
    FhirServerError,
    FhirTimeout,
    FhirTooLarge,
    FhirUnauthorized,
)
from cds_service.prefetch import build_queries
from fhir_mappings import load_mappings
from fhir_mappings.errors import InputError

BASE = "https://ehr.example.org/fhir"
TOKEN = "s3cr3t-T0KEN-value"
PATIENT = "pat-XYZ123"

Handler = Callable[[httpx.Request], httpx.Response]


def _json(body: Any, status: int = 200, **headers: str) -> httpx.Response:
    return httpx.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/fhir+json", **headers},
    )


def _bundle(resources: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    links = [{"relation": "self", "url": f"{BASE}/Observation"}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }


def _client(handler: Handler, **kw: Any) -> FhirClient:
    return FhirClient(BASE, kw.pop("token", TOKEN), transport=httpx.MockTransport(handler), **kw)


def _obs(i: int) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": f"o{i}", "status": "final"}


# --------------------------------------------------------------------------- headers


def test_bearer_token_and_fhir_json_accept_are_sent() -> None:
    """Every request carries ``Authorization: Bearer <fhirAuthorization.access_token>`` and Accept fhir+json."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _json({"resourceType": "Patient", "id": PATIENT})

    with _client(handler) as client:
        assert client.read("Patient", PATIENT)["id"] == PATIENT
    assert seen[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert seen[0].headers["accept"] == "application/fhir+json"
    assert seen[0].url == httpx.URL(f"{BASE}/Patient/{PATIENT}")


def test_no_authorization_header_without_token() -> None:
    """Without fhirAuthorization no Authorization header is sent (open sandbox servers)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _json({"resourceType": "Patient", "id": PATIENT})

    with _client(handler, token=None) as client:
        client.read("Patient", PATIENT)
    assert "authorization" not in seen[0].headers


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, FhirUnauthorized),
        (403, FhirForbidden),
        (404, FhirNotFound),
        (410, FhirNotFound),
        (500, FhirServerError),
        (503, FhirServerError),
        (400, FhirError),
    ],
)
def test_http_status_maps_to_error_class(status: int, error: type[FhirError]) -> None:
    """HTTP errors map to the documented tree and keep the status and the response."""

    def handler(request: httpx.Request) -> httpx.Response:
        return _json(
            {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "x"}]}, status
        )

    with _client(handler) as client, pytest.raises(error) as info:
        client.read("Patient", PATIENT)
    assert type(info.value) is error
    assert info.value.status == status and info.value.response is not None
    assert PATIENT not in str(info.value)


@pytest.mark.parametrize(
    ("response", "what"),
    [
        (httpx.Response(200, content=b"<html>login</html>"), "not JSON"),
        (_json({"resourceType": "Observation", "id": "x"}), "wrong resourceType"),
        (_json([1, 2, 3]), "not an object"),
    ],
    ids=["html", "wrong-type", "array"],
)
def test_malformed_body_is_fhir_malformed(response: httpx.Response, what: str) -> None:
    """A body that is not JSON, or not the resource type asked for, raises FhirMalformed."""
    with _client(lambda request: response) as client, pytest.raises(FhirMalformed):
        client.read("Patient", PATIENT)


def test_search_answer_that_is_not_a_bundle_is_malformed() -> None:
    """A search must answer with a Bundle."""
    with (
        _client(lambda r: _json({"resourceType": "Patient", "id": "x"})) as client,
        pytest.raises(FhirMalformed),
    ):
        client.search("Observation", [("code", "8867-4")])


@pytest.mark.parametrize(
    ("exception", "error"),
    [
        (httpx.ReadTimeout("slow"), FhirTimeout),
        (httpx.ConnectTimeout("slow"), FhirTimeout),
        (httpx.ConnectError("refused"), FhirConnectionError),
    ],
)
def test_transport_failures_map_to_timeout_or_connection_error(
    exception: Exception, error: type[FhirError]
) -> None:
    """Timeouts → FhirTimeout; refused/DNS/TLS → FhirConnectionError (status None)."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise exception

    with _client(handler) as client, pytest.raises(error) as info:
        client.read("Patient", PATIENT)
    assert info.value.status is None


def test_redirects_are_never_followed() -> None:
    """A 3xx (even to the same server) is an error; the Location is never requested (no token leak)."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"location": "https://evil.example.com/steal"})

    with _client(handler) as client, pytest.raises(FhirError) as info:
        client.read("Patient", PATIENT)
    assert info.value.status == 302
    assert seen == [f"{BASE}/Patient/{PATIENT}"]


def test_invalid_ids_are_refused_before_any_request() -> None:
    """A patient id that is not a FHIR id (path tricks) raises InputError without a request."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    with _client(handler) as client:
        for bad in ("../Observation", "a/b", "x" * 257, "", "id?x=1"):
            with pytest.raises(InputError):
                client.read("Patient", bad)
        with pytest.raises(InputError):
            client.read("patient; DROP", "p1")


def test_long_epic_style_ids_are_accepted() -> None:
    """Epic ids exceed FHIR's 64 characters (cdshooks.md §0); up to 256 id characters pass."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json={"resourceType": "Patient", "id": "e" * 100})

    with _client(handler) as client:
        client.read("Patient", "e" * 100)
    assert seen and seen[0].endswith("/Patient/" + "e" * 100)


def test_base_url_must_be_http() -> None:
    """The FHIR base must be an absolute http(s) URL."""
    with pytest.raises(InputError):
        FhirClient("ftp://ehr.example.org/fhir")


def test_deadline_already_passed_sends_nothing() -> None:
    """When the hook's deadline has passed the request is not sent: FhirTimeout."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    with _client(handler) as client, pytest.raises(FhirTimeout):
        client.read("Patient", PATIENT, deadline=time.monotonic() - 0.01)


# --------------------------------------------------------------------------- paging


def test_search_follows_next_links_under_the_base() -> None:
    """Paging: Bundle.link[next] (relative or absolute, under the base path) is followed."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        page = request.url.params.get("page", "1")
        if page == "1":
            return _json(_bundle([_obs(1), _obs(2)], f"{BASE}/Observation?page=2"))
        if page == "2":
            return _json(_bundle([_obs(3)], "Observation?page=3"))
        return _json(_bundle([_obs(2), _obs(4)]))  # o2 again: deduplicated

    with _client(handler) as client:
        found = client.search("Observation", [("subject", f"Patient/{PATIENT}")])
    assert [r["id"] for r in found] == ["o1", "o2", "o3", "o4"]
    assert len(seen) == 3


def test_search_stops_at_max_pages() -> None:
    """Paging stops after ``max_pages`` pages even if the server offers more."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        n = int(request.url.params.get("page", "1"))
        seen.append(str(n))
        return _json(_bundle([_obs(n)], f"{BASE}/Observation?page={n + 1}"))

    with _client(handler, max_pages=2) as client:
        found = client.search("Observation", [])
    assert [r["id"] for r in found] == ["o1", "o2"] and seen == ["1", "2"]


OUTSIDE_THE_BASE = {
    "other host": "https://evil.example.com/fhir/Observation?page=2",
    "other scheme": "http://ehr.example.org/fhir/Observation?page=2",
    "other port": "https://ehr.example.org:8443/fhir/Observation?page=2",
    "other path": "https://ehr.example.org/admin/Observation?page=2",
    "path sharing the prefix's letters": "https://ehr.example.org/fhir-admin/Observation?page=2",
    "root-relative": "/Observation?page=2",
    "relative upwards": "../admin/Observation?page=2",
    "literal dot segments out": "https://ehr.example.org/fhir/../admin/Observation",
    "encoded dot-dot": "https://ehr.example.org/fhir/%2e%2e/admin/Observation",
    "mixed-case encoded dot-dot": "https://ehr.example.org/fhir/.%2E/admin/Observation",
    "encoded dot": "https://ehr.example.org/fhir/%2E/Observation",
    "encoded slash": "https://ehr.example.org/fhir/..%2fadmin/Observation",
    "encoded backslash": "https://ehr.example.org/fhir/..%5Cadmin/Observation",
    "backslash": "https://ehr.example.org/fhir/..\\admin/Observation",
    "user info": "https://user:pw@ehr.example.org/fhir/Observation?page=2",
    "protocol-relative": "//evil.example.com/fhir/Observation",
}
"""Next links and attachment URLs the token must never be sent to (base: https://ehr.example.org/fhir)."""


@pytest.mark.parametrize("case", list(OUTSIDE_THE_BASE))
def test_search_never_follows_next_link_outside_the_base(case: str, caplog: pytest.LogCaptureFixture) -> None:
    """A next link outside the fhirServer base path is not requested (the bearer token would go there)."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return _json(_bundle([_obs(1)], OUTSIDE_THE_BASE[case]))

    with caplog.at_level(logging.WARNING, logger="cds_service.fhir_client"), _client(handler) as client:
        assert [r["id"] for r in client.search("Observation", [])] == ["o1"]
    assert seen == [f"{BASE}/Observation"]
    assert "outside the FHIR server's base" in caplog.text


@pytest.mark.parametrize(
    "url",
    [
        "Binary/1",
        f"{BASE}/Binary/1",
        f"{BASE}/./Binary/1",
        f"{BASE}/x/../Binary/1",
        "https://EHR.example.org:443/fhir/Binary/1",
        f"{BASE}/Observation?page=2&_getpages=..%2F..",  # the query is the server's, not a path
        BASE,
    ],
)
def test_urls_under_the_base_are_in_scope(url: str) -> None:
    """Relative references, default ports, host case and resolvable dot segments stay in scope."""
    with _client(lambda r: _json({})) as client:
        target = client.scoped(url)
    assert target is not None and str(target).startswith(BASE)
    assert ".." not in target.path


def test_scope_of_a_base_at_the_server_root_is_the_whole_origin() -> None:
    with FhirClient("https://ehr.example.org/") as client:
        assert client.base_url == "https://ehr.example.org"
        assert str(client.scoped("Binary/1")) == "https://ehr.example.org/Binary/1"
        assert client.scoped("https://ehr.example.org/any/Binary/1") is not None
        assert client.scoped("https://ehr.example.org/%2e%2e/Binary/1") is None
        assert client.scoped("https://ehr.example.org:444/Binary/1") is None


@pytest.mark.parametrize(
    "base",
    [
        "https://ehr.example.org/fhir/%2e%2e/admin",
        "https://u:p@ehr.example.org/fhir",
        "ftp://ehr.example.org/",
    ],
)
def test_a_base_url_with_encoded_dots_or_credentials_is_refused(base: str) -> None:
    with pytest.raises(InputError, match="base URL"):
        FhirClient(base)


def test_next_pages_continues_a_prefetched_bundle_within_the_page_cap() -> None:
    """A prefetched Bundle's next link is fetched with the token; paging continues up to ``pages``."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        n = int(request.url.params["page"])
        return _json(_bundle([_obs(n), _obs(1)], f"{BASE}/Observation?page={n + 1}"))

    with _client(handler) as client:
        found = client.next_pages("Observation", f"{BASE}/Observation?page=2", pages=2)
    assert [r["id"] for r in found] == ["o2", "o1", "o3"]
    assert [r.url.params["page"] for r in seen] == ["2", "3"]
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in seen)
    with _client(handler) as client:
        assert client.next_pages("Observation", f"{BASE}/Observation?page=2", pages=0) == []
    assert len(seen) == 2


@pytest.mark.parametrize("case", list(OUTSIDE_THE_BASE))
def test_next_pages_never_requests_a_link_outside_the_base(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no request expected, got one to {request.url}")

    with caplog.at_level(logging.WARNING, logger="cds_service.fhir_client"), _client(handler) as client:
        assert client.next_pages("Observation", OUTSIDE_THE_BASE[case], pages=3) == []
    assert "outside the FHIR server's base" in caplog.text
    assert "evil" not in caplog.text and "admin" not in caplog.text  # no URL in the log


def test_search_returns_only_matches_of_the_asked_type() -> None:
    """Included resources and OperationOutcome warnings in a searchset are not results."""
    bundle = _bundle([_obs(1)])
    bundle["entry"] += [
        {"resource": {"resourceType": "Patient", "id": "p"}, "search": {"mode": "include"}},
        {"resource": {"resourceType": "OperationOutcome", "issue": []}, "search": {"mode": "outcome"}},
        {"resource": _obs(2)},  # no search.mode: a match
    ]
    with _client(lambda r: _json(bundle)) as client:
        assert [r["id"] for r in client.search("Observation", [])] == ["o1", "o2"]


# --------------------------------------------------------------------------- binaries


def test_get_binary_decodes_binary_resource_and_resolves_relative_url() -> None:
    """``Binary/1`` resolves against the base; a Binary JSON answer is base64-decoded."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return _json(
            {
                "resourceType": "Binary",
                "contentType": "application/zip",
                "data": base64.b64encode(b"PK\x03\x04").decode(),
            }
        )

    with _client(handler) as client:
        assert client.get_binary("Binary/1", 100) == b"PK\x03\x04"
    assert seen == [f"{BASE}/Binary/1"]


def test_get_binary_accepts_raw_bytes() -> None:
    """A server that answers with the raw content type (not JSON) gives the bytes as they are."""
    raw = httpx.Response(200, content=b"\x00DICM", headers={"content-type": "application/dicom"})
    with _client(lambda r: raw) as client:
        assert client.get_binary(f"{BASE}/Binary/2", 100) == b"\x00DICM"


@pytest.mark.parametrize("case", [*OUTSIDE_THE_BASE, "other host's Binary"])
def test_get_binary_refuses_urls_outside_the_base(case: str) -> None:
    """Attachment URLs and Binary references outside the fhirServer base path are never fetched."""
    url = OUTSIDE_THE_BASE.get(case, "https://cdn.example.net/fhir/Binary/1")

    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    with _client(handler) as client, pytest.raises(FhirError, match="outside the FHIR server's base"):
        client.get_binary(url, 100)


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, content=b"x" * 500, headers={"content-type": "application/zip"}),
        _json({"resourceType": "Binary", "data": base64.b64encode(b"y" * 150).decode()}),
    ],
    ids=["raw", "binary-json"],
)
def test_get_binary_enforces_the_size_limit(response: httpx.Response) -> None:
    """More than ``max_bytes`` (raw or decoded) raises FhirTooLarge (reason attachment_too_large)."""
    with _client(lambda r: response) as client, pytest.raises(FhirTooLarge) as info:
        client.get_binary("Binary/3", 100)
    assert info.value.reason == "attachment_too_large"


def test_get_binary_bad_base64_is_malformed() -> None:
    """Binary.data that is not base64 → FhirMalformed."""
    with (
        _client(lambda r: _json({"resourceType": "Binary", "data": "!!not base64!!"})) as client,
        pytest.raises(FhirMalformed),
    ):
        client.get_binary("Binary/4", 100)


# --------------------------------------------------------------------------- the data path (cds_service.fetch)


@pytest.fixture(scope="module")
def mappings() -> Any:
    return load_mappings()


NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def _routing_handler(requests: list[httpx.Request], barrier: threading.Barrier | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if barrier is not None:
            barrier.wait()
        kind = request.url.path.rsplit("/", 2)
        if kind[-2] == "Patient":
            return _json({"resourceType": "Patient", "id": kind[-1], "gender": "female"})
        return _json(_bundle([]))

    return handler


def _by_query(requests: list[httpx.Request]) -> dict[tuple[str, ...], httpx.Request]:
    """Requests keyed by (path tail, code/type token list) so a test can pick one search."""
    return {
        (r.url.path.rsplit("/", 1)[-1], r.url.params.get("code") or r.url.params.get("type") or ""): r
        for r in requests
    }


def test_nothing_prefetched_fetches_every_key_with_its_bound_query(mappings: Any) -> None:
    """One read and one search per prefetch key, each exactly its query bound at ``now`` (date filter included)."""
    queries = build_queries(mappings)
    requests: list[httpx.Request] = []
    with _client(_routing_handler(requests)) as client:
        data = gather_patient_data(queries, PATIENT, now=NOW, client=client)
    assert data.patient == {"resourceType": "Patient", "id": PATIENT, "gender": "female"}
    assert len(requests) == len(queries)
    sent = sorted((r.url.path.rsplit("/", 1)[-1], tuple(r.url.params.multi_items())) for r in requests)
    expected = sorted(
        (PATIENT, ()) if q.read else (q.resource_type, tuple(q.bind(PATIENT, NOW))) for q in queries
    )
    assert sent == expected
    allowed = {"subject", "code", "type", "date", "created", "status", "_sort", "_count"}
    for request in requests:
        if not request.url.path.endswith(f"Patient/{PATIENT}"):
            assert request.url.params["subject"] == f"Patient/{PATIENT}"
            assert set(request.url.params.keys()) <= allowed
    searches = _by_query(requests)
    vitals = next(r for key, r in searches.items() if key[0] == "Observation" and "8867-4" in key[1])
    assert {"http://loinc.org|8867-4", "http://loinc.org|29463-7"} <= set(
        vitals.url.params["code"].split(",")
    )
    # one search for vital signs and biometrics: now − 120 min (ECG max age) − 30 days (widest window)
    assert vitals.url.params["date"] == "ge2025-05-02T10:00:00Z"
    ecg = next(r for key, r in searches.items() if key[0] == "Observation" and "11524-6" in key[1])
    assert ecg.url.params["date"] == "ge2025-06-01T10:00:00Z"
    media = next(r for r in requests if r.url.path.endswith("/Media"))
    assert media.url.params["created"] == "ge2025-06-01T10:00:00Z"
    labs = next(r for key, r in searches.items() if key[0] == "Observation" and "33762-6" in key[1])
    assert labs.url.params["date"] == "ge2025-05-25T12:00:00Z"
    orders = next(r for r in requests if r.url.path.endswith("/ServiceRequest"))
    assert orders.url.params["status"] == "active,draft" and "date" not in orders.url.params


def test_prefetched_keys_are_not_fetched_and_land_where_fetched_ones_would(mappings: Any) -> None:
    """Only the missing keys are read; prefetched and fetched resources merge into one PatientData."""
    queries = build_queries(mappings)
    requests: list[httpx.Request] = []
    prefetched = {q.key: [] for q in queries if q.key not in ("patient", "labs")}
    prefetched["ecgObservations"] = [_obs(9)]
    with _client(_routing_handler(requests)) as client:
        data = gather_patient_data(queries, PATIENT, now=NOW, prefetched=prefetched, client=client)
    labs = next(q for q in queries if q.key == "labs")
    assert sorted(str(r.url) for r in requests) == sorted(
        [
            f"{BASE}/Patient/{PATIENT}",
            str(httpx.URL(f"{BASE}/Observation", params=labs.bind(PATIENT, NOW))),
        ]
    )
    assert data.patient is not None and data.ecgs == [_obs(9)]


def test_missing_keys_without_a_client_are_refused(mappings: Any) -> None:
    """No FHIR client and a key missing: MissingData names the keys (the hook answers 412 before this)."""
    with pytest.raises(MissingData) as info:
        gather_patient_data(build_queries(mappings), PATIENT, now=NOW, prefetched={"patient": []})
    assert "labs" in info.value.keys and "patient" not in info.value.keys


def test_missing_keys_are_fetched_concurrently_on_the_given_executor(mappings: Any) -> None:
    """All of one call's requests are in flight at once on the caller's pool (a barrier of all of them opens)."""
    queries = build_queries(mappings)
    requests: list[httpx.Request] = []
    barrier = threading.Barrier(len(queries), timeout=5)
    with (
        concurrent.futures.ThreadPoolExecutor(len(queries), thread_name_prefix="test-fhir") as pool,
        _client(_routing_handler(requests, barrier), max_workers=len(queries)) as client,
    ):
        fetch_keys(client, queries, [q.key for q in queries], PATIENT, now=NOW, executor=pool)
    assert len(requests) == len(queries) and not barrier.broken


def test_unknown_patient_is_not_found(mappings: Any) -> None:
    """The Patient read answers 404: FhirNotFound (the hook answers 412)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if "/Patient/" in request.url.path:
            return _json({"resourceType": "OperationOutcome", "issue": []}, 404)
        return _json(_bundle([]))

    with _client(handler) as client, pytest.raises(FhirNotFound):
        gather_patient_data(build_queries(mappings), PATIENT, now=NOW, client=client)


def test_a_patient_id_that_is_not_a_fhir_id_is_refused_before_any_request(mappings: Any) -> None:
    """An id that would change the request path is an InputError, and nothing is sent."""
    requests: list[httpx.Request] = []
    with _client(_routing_handler(requests)) as client, pytest.raises(InputError):
        gather_patient_data(build_queries(mappings), "../Practitioner/x", now=NOW, client=client)
    assert requests == []


def test_fetch_respects_the_deadline(mappings: Any) -> None:
    """A slow server: the fetch gives up at the deadline with FhirTimeout."""

    def handler(request: httpx.Request) -> httpx.Response:
        time.sleep(0.6)
        return _json(_bundle([]))

    started = time.monotonic()
    with _client(handler) as client, pytest.raises(FhirTimeout):
        gather_patient_data(
            build_queries(mappings), PATIENT, now=NOW, client=client, deadline=time.monotonic() + 0.15
        )
    assert time.monotonic() - started < 0.5


def test_logs_never_contain_patient_id_or_token(mappings: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Privacy: at DEBUG, no log record names the patient id or the token; httpx loggers stay at WARNING."""
    caplog.set_level(logging.DEBUG)
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if "/Patient/" in request.url.path:
            return _json({"resourceType": "Patient", "id": PATIENT})
        if request.url.path.endswith("/Binary/b1"):
            return _json({}, 500)
        return _json(_bundle([_obs(1)], f"https://evil.example.com/fhir/x?patient={PATIENT}"))

    with _client(handler) as client:
        gather_patient_data(build_queries(mappings), PATIENT, now=NOW, client=client)
        with pytest.raises(FhirServerError) as info:
            client.get_binary("Binary/b1", 10)
    assert requests and PATIENT in str(requests[0].url)  # the id really was in the URLs
    assert caplog.records, "expected debug log lines"
    for record in caplog.records:
        text = record.getMessage()
        assert PATIENT not in text and TOKEN not in text, text
    assert PATIENT not in str(info.value) and TOKEN not in str(info.value)
    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
    assert logging.getLogger("httpcore").getEffectiveLevel() >= logging.WARNING
    assert TOKEN not in repr(client)


def test_binary_loader_is_bound_to_the_limit() -> None:
    """``binary_loader(max_bytes)`` is the url → bytes callback extract_model_inputs expects."""
    raw = httpx.Response(200, content=b"z" * 20, headers={"content-type": "application/zip"})
    with _client(lambda r: raw) as client:
        assert client.binary_loader(20)("Binary/5") == b"z" * 20
        with pytest.raises(FhirTooLarge):
            client.binary_loader(10)("Binary/5")


# --------------------------------------------------------------------------- pooled connections, bounded bodies
#
# Over real sockets: a loopback HTTP/1.1 server that keeps connections open, counts the TCP
# connections it accepts, records every request's headers and counts the body bytes it sent.

BOMB_MB = 1024  # what the gzip bomb inflates to: 1 GiB of zeros, about 1 MB on the wire


class LoopbackFhir:
    """A keep-alive FHIR server on ``127.0.0.1``; ``answer(path)`` gives (status, headers, body chunks)."""

    def __init__(self, answer: Callable[[str], tuple[int, dict[str, str], Any]]) -> None:
        import http.server

        self.connections = 0
        self.requests: list[dict[str, str]] = []
        self.sent = 0
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server.connections += 1

            def do_GET(self) -> None:
                with server._lock:
                    server.requests.append({k.lower(): v for k, v in self.headers.items()})
                status, headers, chunks = answer(self.path)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if isinstance(chunks, bytes):
                    if "Content-Length" not in headers:  # a declared length may lie
                        self.send_header("Content-Length", str(len(chunks)))
                    self.end_headers()
                    self.wfile.write(chunks)
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for chunk in chunks:
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                        with server._lock:
                            server.sent += len(chunk)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                """Silenced: it would print every URL, patient ids included."""

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/fhir"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def loopback() -> Any:
    """A factory of :class:`LoopbackFhir` servers, all stopped after the test."""
    servers: list[LoopbackFhir] = []

    def start(answer: Callable[[str], tuple[int, dict[str, str], Any]]) -> LoopbackFhir:
        servers.append(LoopbackFhir(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def patient_answer(path: str) -> tuple[int, dict[str, str], Any]:
    """Every read is the Patient it names, with a session cookie that must never travel further."""
    pid = path.rsplit("/", 1)[-1]
    body = json.dumps({"resourceType": "Patient", "id": pid}).encode()
    return 200, {"Content-Type": "application/fhir+json", "Set-Cookie": f"session={pid}; Path=/"}, body


def test_pooled_connection_is_reused_across_calls_with_each_calls_own_token(loopback: Any) -> None:
    """Two calls for two patients borrow one pooled client: one TCP connection, each request with its
    own call's bearer token and no cookie from the other call; the pooled client holds neither."""
    from cds_service.fhir_http import FhirConnections

    server = loopback(patient_answer)
    pool = FhirConnections()
    for pid, token in (("pat-a", "token-of-call-a"), ("pat-b", "token-of-call-b")):
        with FhirClient(server.base_url, token, connections=pool) as client:
            assert client.read("Patient", pid)["id"] == pid
    assert server.connections == 1
    assert [r["authorization"] for r in server.requests] == [
        "Bearer token-of-call-a",
        "Bearer token-of-call-b",
    ]
    assert all("cookie" not in r for r in server.requests)
    lease = pool.lease(FhirClient(server.base_url).base_url)
    assert "authorization" not in lease.client.headers and not list(lease.client.cookies.jar)
    lease.release()
    pool.close()


def test_own_clients_open_a_connection_per_call(loopback: Any) -> None:
    """Without the pool every FhirClient opens its own connection (what the pool saves, ~30 ms each)."""
    server = loopback(patient_answer)
    for pid in ("pat-a", "pat-b"):
        with FhirClient(server.base_url, "t") as client:
            client.read("Patient", pid)
    assert server.connections == 2


def test_hook_calls_share_the_pooled_connections_of_their_fhir_server(loopback: Any, make_app) -> None:
    """Through the service: sequential hook calls on one fhirServer share the pooled connections (fewer
    connections in all than calls, where an own client per call opens one at least), and each call's
    requests carry that call's fhirAuthorization token only."""
    from tests.service_fixtures import FakeRuntime, hook_request

    def answer(path: str) -> tuple[int, dict[str, str], Any]:
        if "/Patient/" in path:
            return patient_answer(path.split("?", 1)[0])
        body = json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": []}).encode()
        return 200, {"Content-Type": "application/fhir+json"}, body

    server = loopback(answer)
    app = make_app(runtime=FakeRuntime(), auth=False, issuers="", dev_fhir_servers=server.base_url)
    app.extensions["ecglab"].pipeline.deps.fhir_transport = None  # real sockets, not the mock
    client = app.test_client()
    calls = 8
    for call in range(calls):
        body = hook_request("patient-view", fhir_server=server.base_url, token=f"token-of-call-{call}")
        assert client.post("/cds-services/ecglab-patient-view", json=body).status_code == 200
    per_call = len(server.requests) // calls
    assert len(server.requests) == calls * per_call and per_call < calls
    assert server.connections <= per_call, "each call opened connections of its own"
    tokens = [r["authorization"] for r in server.requests]
    assert tokens == [f"Bearer token-of-call-{call}" for call in range(calls) for _ in range(per_call)]


def test_the_pool_keeps_a_bounded_number_of_servers_and_closes_evicted_clients_when_free() -> None:
    """At most ``max_servers`` clients; the least recently used one is closed once no call holds it."""
    from cds_service.fhir_http import FhirConnections

    pool = FhirConnections(max_servers=2)
    held = pool.lease("https://a.example.org/fhir")
    for base in ("https://b.example.org/fhir", "https://c.example.org/fhir"):
        pool.lease(base).release()
    assert len(pool) == 2 and not held.client.is_closed  # evicted, still in use
    held.release()
    assert held.client.is_closed
    idle = pool.lease("https://c.example.org/fhir")
    idle.release()
    pool.close()
    assert idle.client.is_closed and len(pool) == 0


def _bomb(encoding: str, inflated_mb: int = BOMB_MB) -> Any:
    """Compressed zeros, generated while sent: ``inflated_mb`` MiB once inflated."""
    wbits = {"gzip": 16 + 15, "deflate": 15}[encoding]
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = bytes(1024 * 1024)
    for _ in range(inflated_mb):
        out = packer.compress(block)
        if out:
            yield out
    yield packer.flush()


CALLS: dict[str, Callable[[FhirClient], Any]] = {
    "read": lambda client: client.read("Patient", "p1"),
    "search": lambda client: client.search("Observation", [("subject", "Patient/p1")]),
    "binary": lambda client: client.get_binary("Binary/1", 8 * 1024 * 1024),
}


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("call", list(CALLS))
def test_a_compression_bomb_is_abandoned_at_the_cap(loopback: Any, encoding: str, call: str) -> None:
    """Issue 14: a 1 GiB gzip/deflate bomb (about 1 MB on the wire) stops at the ratio or byte cap,
    after a small part of it was sent, with bounded memory, for reads, searches and attachments."""
    import tracemalloc

    server = loopback(
        lambda path: (
            200,
            {"Content-Type": "application/fhir+json", "Content-Encoding": encoding},
            _bomb(encoding),
        )
    )
    tracemalloc.start()
    try:
        with (
            FhirClient(server.base_url, "t", timeout=5.0, max_response_bytes=16 * 1024 * 1024) as client,
            pytest.raises(FhirTooLarge),
        ):
            CALLS[call](client)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB while inflating"
    assert server.sent < 1024 * 1024 // 4, f"{server.sent} bytes were sent before the client stopped"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
def test_gzip_and_deflate_answers_are_inflated(loopback: Any, encoding: str) -> None:
    """An ordinary compressed answer reads as its JSON; ``Accept-Encoding: gzip, deflate`` was asked."""
    document = json.dumps({"resourceType": "Patient", "id": "p1", "note": "x" * 5000}).encode()
    wbits = {"gzip": 31, "deflate": 15, "raw-deflate": -15}[encoding]
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    body = packer.compress(document) + packer.flush()
    header = "deflate" if "deflate" in encoding else "gzip"
    server = loopback(
        lambda path: (200, {"Content-Type": "application/fhir+json", "Content-Encoding": header}, body)
    )
    with FhirClient(server.base_url, "t") as client:
        assert client.read("Patient", "p1")["note"] == "x" * 5000
    assert server.requests[0]["accept-encoding"] == "gzip, deflate"


@pytest.mark.parametrize("header", ["br", "zstd", "gzip, gzip", "compress"])
def test_an_encoding_that_was_not_asked_for_is_refused(loopback: Any, header: str) -> None:
    """Only gzip and deflate are inflated; anything else is FhirMalformed, never guessed at."""
    body = json.dumps({"resourceType": "Patient", "id": "p1"}).encode()
    server = loopback(
        lambda path: (200, {"Content-Type": "application/fhir+json", "Content-Encoding": header}, body)
    )
    with FhirClient(server.base_url, "t") as client, pytest.raises(FhirMalformed):
        client.read("Patient", "p1")


def test_corrupt_or_truncated_compressed_data_is_malformed(loopback: Any) -> None:
    """A gzip stream that is cut short or corrupt is FhirMalformed."""
    whole = gzip.compress(json.dumps({"resourceType": "Patient", "id": "p1"}).encode())
    bodies = iter([whole[: len(whole) // 2], b"\x1f\x8b" + b"\xff" * 40])
    server = loopback(
        lambda path: (
            200,
            {"Content-Type": "application/fhir+json", "Content-Encoding": "gzip"},
            next(bodies),
        )
    )
    with FhirClient(server.base_url, "t") as client:
        for _ in range(2):
            with pytest.raises(FhirMalformed):
                client.read("Patient", "p1")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_search_page_over_the_cap_is_abandoned_while_streaming(loopback: Any, declared: bool) -> None:
    """Issue 14: reads and search pages are capped like attachments, declared length or not."""
    size = 64 * 1024 * 1024
    head = b'{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"id":"'

    def answer(path: str) -> tuple[int, dict[str, str], Any]:
        if declared:
            return 200, {"Content-Type": "application/fhir+json", "Content-Length": str(size)}, b""
        return (
            200,
            {"Content-Type": "application/fhir+json"},
            (head + b"x" * 65536 for _ in range(size // 65536)),
        )

    server = loopback(answer)
    with (
        FhirClient(server.base_url, "t", max_response_bytes=1024 * 1024) as client,
        pytest.raises(FhirTooLarge),
    ):
        client.search("Observation", [])
    assert server.sent < size // 4
