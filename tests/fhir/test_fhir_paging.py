"""Paging of prefetched and fetched Bundles (issue 16): an active order or a recent result on page 2
suppresses the card like one on page 1; ``next`` links outside the ``fhirServer`` base path are
never requested, so the token never leaves it; the page limit and the call's budget bound paging.

End to end through the Flask app (``tests/service_fixtures.py``) with a fake upstream that answers
every host and records each request with its headers, so a request to a foreign host would show.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from cds_service.fetch import gather_patient_data
from cds_service.fhir_client import FhirClient
from cds_service.prefetch import build_queries, decode_prefetch
from fhir_mappings import load_mappings
from tests.service_fixtures import (
    EHR_FHIR,
    FHIR_TOKEN,
    PATIENT_ID,
    bundle,
    clinical_record,
    hook_request,
    lab_order,
    lab_result,
    positive_runtime,
    prefetch_from,
)

DEV = {"auth": False, "issuers": "", "dev_fhir_servers": EHR_FHIR}
NTPROBNP_CARD = "ECGLABNTPROBNP"
PAGE_2 = f"{EHR_FHIR}/ServiceRequest?_getpages=token-1&_offset=100"


class PagedUpstream:
    """A FHIR server double behind ``httpx.MockTransport`` that answers any URL from ``pages``.

    ``pages`` maps a full URL to the Bundle served there, else ``route(request)`` decides (404 when
    it gives ``None``); every request (any host, port or path) is recorded with its headers.
    ``delay_s`` delays the URLs in ``slow``.
    """

    def __init__(
        self,
        pages: dict[str, dict[str, Any]],
        *,
        route: Callable[[httpx.Request], dict[str, Any] | None] | None = None,
        slow: set[str] | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.pages = pages
        self.route = route
        self.slow = slow or set()
        self.delay_s = delay_s
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        """Record the request, then answer it from ``pages`` or ``route``."""
        self.requests.append(request)
        url = str(request.url)
        if url in self.slow:
            time.sleep(self.delay_s)
        page = self.pages.get(url) or (self.route(request) if self.route else None)
        if page is None:
            return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})
        return httpx.Response(200, json=page, headers={"content-type": "application/fhir+json"})

    def urls(self) -> list[str]:
        return [str(r.url) for r in self.requests]


def with_next(value: dict[str, Any], next_url: str | None) -> dict[str, Any]:
    """``value`` (a searchset Bundle) with a ``next`` link to ``next_url``."""
    if next_url is not None:
        value["link"] = [{"relation": "next", "url": next_url}]
    return value


def topics(response: Any) -> list[str]:
    assert response.status_code == 200, response.get_json()
    return [card["source"]["topic"]["code"] for card in response.get_json()["cards"]]


def post(client: Any, body: dict[str, Any]) -> Any:
    return client.post("/cds-services/ecglab-patient-view", json=body)


def first_page_prefetch(key: str, next_url: str | None, first: list[dict[str, Any]] | None = None) -> Any:
    """A full prefetch of the clinical record whose ``key`` Bundle is cut after ``first``."""
    prefetch = prefetch_from(clinical_record())
    prefetch[key] = with_next(bundle(*(first or [])), next_url)
    return prefetch


# -- page 2 counts like page 1 --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["page 1", "page 2", "nowhere"])
def test_an_active_order_on_any_prefetched_page_suppresses_the_card(make_app, where: str) -> None:
    """The orders Bundle's next link is followed with the token: an order on page 2 counts."""
    order = lab_order("ntprobnp", "sr-1")
    upstream = PagedUpstream({PAGE_2: bundle(order) if where == "page 2" else bundle()})
    client = make_app(runtime=positive_runtime(), fhir=upstream, **DEV).test_client()
    prefetch = first_page_prefetch("orders", PAGE_2, [order] if where == "page 1" else [])
    cards = topics(
        post(client, hook_request("patient-view", prefetch=prefetch, fhir_server=EHR_FHIR, token=FHIR_TOKEN))
    )
    assert cards == ([] if where != "nowhere" else [NTPROBNP_CARD])
    assert upstream.urls() == [PAGE_2]
    assert upstream.requests[0].headers["authorization"] == f"Bearer {FHIR_TOKEN}"


def test_a_recent_result_on_prefetched_page_2_suppresses_the_card(make_app) -> None:
    """The labs Bundle is continued the same way: a result 30 min ago on page 2 suppresses the card."""
    next_url = f"{EHR_FHIR}/Observation?_getpages=labs-1&_offset=100"
    result = lab_result("ntprobnp", datetime.now(UTC) - timedelta(minutes=30), "lab-1")
    upstream = PagedUpstream({next_url: bundle(result)})
    client = make_app(runtime=positive_runtime(), fhir=upstream, **DEV).test_client()
    prefetch = first_page_prefetch("labs", next_url)
    body = hook_request("patient-view", prefetch=prefetch, fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    assert topics(post(client, body)) == []
    assert upstream.urls() == [next_url]


def test_a_fetched_search_follows_its_next_link_too(make_app) -> None:
    """Orders not prefetched: the service's own search pages on, and page 2's order counts."""
    order = lab_order("ntprobnp", "sr-9")

    def route(request: httpx.Request) -> dict[str, Any]:
        if request.url.params.get("page") == "2":
            return bundle(order)
        return with_next(bundle(), f"{EHR_FHIR}/ServiceRequest?page=2")

    upstream = PagedUpstream({}, route=route)
    client = make_app(runtime=positive_runtime(), fhir=upstream, **DEV).test_client()
    prefetch = prefetch_from(clinical_record())
    del prefetch["orders"]
    body = hook_request("patient-view", prefetch=prefetch, fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    assert topics(post(client, body)) == []
    assert [r.url.params.get("page") for r in upstream.requests] == [None, "2"]


def test_without_fhir_access_the_first_page_is_used_and_logged(
    make_app, caplog: pytest.LogCaptureFixture
) -> None:
    """No fhirServer/token: nothing is requested, page 1 is the answer, and the cut is logged."""
    upstream = PagedUpstream({PAGE_2: bundle(lab_order("ntprobnp", "sr-1"))})
    client = make_app(runtime=positive_runtime(), fhir=upstream, **DEV).test_client()
    with caplog.at_level(logging.INFO, logger="cds_service.fetch"):
        cards = topics(
            post(client, hook_request("patient-view", prefetch=first_page_prefetch("orders", PAGE_2)))
        )
    assert cards == [NTPROBNP_CARD] and upstream.requests == []
    assert "prefetched orders: more pages exist but there is no FHIR access" in caplog.text
    assert "_getpages" not in caplog.text and PATIENT_ID not in caplog.text


# -- scope: the token stays under the fhirServer base path -------------------------------------------------


@pytest.mark.parametrize(
    "next_url",
    [
        "https://evil.example.net/r4/ServiceRequest?page=2",  # another host
        "https://fhir.example.org:8443/r4/ServiceRequest?page=2",  # another port
        "http://fhir.example.org/r4/ServiceRequest?page=2",  # another scheme
        "https://fhir.example.org/r5/ServiceRequest?page=2",  # another path prefix
        "https://fhir.example.org/r4-admin/ServiceRequest?page=2",  # the prefix's letters, not its path
        "https://fhir.example.org/r4/../admin/ServiceRequest?page=2",
        "https://fhir.example.org/r4/%2e%2e/admin/ServiceRequest?page=2",
        "https://fhir.example.org/r4/..%2Fadmin/ServiceRequest?page=2",
    ],
)
def test_a_next_link_outside_the_base_is_not_fetched_and_no_token_leaves(
    make_app, next_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = PagedUpstream({next_url: bundle(lab_order("ntprobnp", "sr-1"))})
    client = make_app(runtime=positive_runtime(), fhir=upstream, **DEV).test_client()
    body = hook_request(
        "patient-view",
        prefetch=first_page_prefetch("orders", next_url),
        fhir_server=EHR_FHIR,
        token=FHIR_TOKEN,
    )
    with caplog.at_level(logging.WARNING, logger="cds_service.fhir_client"):
        cards = topics(post(client, body))
    assert upstream.requests == []  # no request anywhere, so no Authorization header anywhere
    assert cards == [NTPROBNP_CARD]  # the first page is the answer
    assert "outside the FHIR server's base" in caplog.text
    assert FHIR_TOKEN not in caplog.text


# -- caps ------------------------------------------------------------------------------------------------


def test_paging_stops_at_the_page_limit_counting_the_prefetched_page(make_app) -> None:
    """FhirClient's max_pages (3) counts the prefetched page: pages 2 and 3 are read, never 4."""
    urls = [f"{EHR_FHIR}/ServiceRequest?_getpages=t&page={n}" for n in range(2, 7)]
    pages = {
        url: with_next(bundle(), following) for url, following in zip(urls, [*urls[1:], None], strict=True)
    }
    pages[urls[2]] = bundle(lab_order("ntprobnp", "sr-4"))  # page 4: beyond the limit
    upstream = PagedUpstream(pages)
    client = make_app(runtime=positive_runtime(), fhir=upstream, **DEV).test_client()
    body = hook_request(
        "patient-view",
        prefetch=first_page_prefetch("orders", urls[0]),
        fhir_server=EHR_FHIR,
        token=FHIR_TOKEN,
    )
    assert topics(post(client, body)) == [NTPROBNP_CARD]
    assert upstream.urls() == urls[:2]


def test_a_slow_next_page_is_bounded_by_the_budget(make_app) -> None:
    """Page 2 never answers in time: the call answers within its budget with no cards, page 3 unread."""
    page_3 = f"{EHR_FHIR}/ServiceRequest?page=3"
    upstream = PagedUpstream(
        {PAGE_2: with_next(bundle(), page_3), page_3: bundle()}, slow={PAGE_2}, delay_s=1.5
    )
    client = make_app(runtime=positive_runtime(), fhir=upstream, budget_ms=400, **DEV).test_client()
    body = hook_request(
        "patient-view", prefetch=first_page_prefetch("orders", PAGE_2), fhir_server=EHR_FHIR, token=FHIR_TOKEN
    )
    started = time.monotonic()
    cards = topics(post(client, body))
    elapsed = time.monotonic() - started
    assert cards == [] and elapsed < 1.2, elapsed
    assert upstream.urls() == [PAGE_2]


# -- the fetcher on its own ---------------------------------------------------------------------------------


QUERIES = build_queries(load_mappings())


def test_continued_pages_are_merged_without_duplicates_and_run_concurrently_with_missing_keys() -> None:
    """A continued page repeating a page-1 entry adds it once; missing keys and continuations overlap."""
    order_1, order_2 = lab_order("ntprobnp", "sr-1"), lab_order("potassium", "sr-2")
    barrier = threading.Barrier(2, timeout=5)

    def handle(request: httpx.Request) -> httpx.Response:
        barrier.wait()  # both requests are in flight at once, or this times out
        if str(request.url) == PAGE_2:
            return httpx.Response(200, json=bundle(order_1, order_2))
        return httpx.Response(200, json=bundle())

    prefetch = {key: value for key, value in prefetch_from(clinical_record()).items() if key != "labs"}
    prefetch["orders"] = with_next(bundle(order_1), PAGE_2)
    decoded = decode_prefetch(prefetch, QUERIES)
    with FhirClient(EHR_FHIR, FHIR_TOKEN, transport=httpx.MockTransport(handle)) as fhir:
        data = gather_patient_data(
            QUERIES, PATIENT_ID, now=datetime.now(UTC), prefetched=decoded.resources, client=fhir
        )
    assert [r["id"] for r in data.service_requests] == ["sr-1", "sr-2"]


def test_a_page_limit_of_one_reads_only_the_prefetched_page(caplog: pytest.LogCaptureFixture) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    decoded = decode_prefetch(first_page_prefetch("orders", PAGE_2, [lab_order("ntprobnp", "sr-1")]), QUERIES)
    with (
        caplog.at_level(logging.INFO, logger="cds_service.fetch"),
        FhirClient(EHR_FHIR, FHIR_TOKEN, max_pages=1, transport=httpx.MockTransport(handle)) as fhir,
    ):
        data = gather_patient_data(
            QUERIES, PATIENT_ID, now=datetime.now(UTC), prefetched=decoded.resources, client=fhir
        )
    assert [r["id"] for r in data.service_requests] == ["sr-1"]
    assert "the page limit is 1" in caplog.text
