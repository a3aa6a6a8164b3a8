"""The CDS Hooks endpoints end to end: discovery, hook calls, data access, errors, budget, CORS.

Each test pins one rule of ``../shared/docs/cdshooks.md`` (section cited in the docstring) on the
Flask app built by ``create_app`` with a fake model runtime, the real ``fhir_mappings`` and
feature extraction, and an in-memory FHIR server (``httpx.MockTransport``). Every emitted
discovery document and hook response is validated against the shared CDS Hooks 2.0 JSON Schema.
The data-path tests pin that a missing key is fetched with the same query (date filter from the
injected clock included) whatever else was prefetched, and that prefetched and fetched data reach
the model identically.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cds_service.prefetch import LAB_LOOKBACK
from tests.service_fixtures import (
    EHR_FHIR,
    EHR_ISS,
    FHIR_TOKEN,
    PATIENT_ID,
    FakeRuntime,
    MockFhir,
    ServiceEnv,
    assert_precondition_failed,
    assert_schema_valid,
    bundle,
    clinical_record,
    ecg_observation,
    hook_request,
    iso,
    lab_result,
    load_sample,
    positive_runtime,
    prefetch_from,
)

SERVICE_OF_HOOK = {
    "patient-view": "ecglab-patient-view",
    "order-select": "ecglab-order-select",
    "order-sign": "ecglab-order-sign",
}
DEV = {"auth": False, "issuers": "", "dev_fhir_servers": EHR_FHIR}


def post_hook(client: Any, body: Any, hook: str = "patient-view", **kwargs: Any) -> Any:
    """POST ``body`` to the service of ``hook``."""
    return client.post(f"/cds-services/{SERVICE_OF_HOOK[hook]}", json=body, **kwargs)


def all_fhir_resources(record: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every resource of a clinical record, for the mock FHIR server."""
    return [r for resources in record.values() for r in resources]


# -- discovery (§2) ----------------------------------------------------------------------------------------


def test_discovery_lists_one_service_per_hook_with_prefetch(make_app, service_env: ServiceEnv) -> None:
    """§2/§0.2: GET /cds-services lists patient-view, order-select and order-sign services; schema-valid."""
    client = make_app().test_client()
    response = client.get("/cds-services", headers=service_env.bearer("/cds-services"))
    assert response.status_code == 200
    document = response.get_json()
    assert_schema_valid("discoveryResponse", document)
    assert {s["hook"]: s["id"] for s in document["services"]} == SERVICE_OF_HOOK
    for service in document["services"]:
        assert set(service["prefetch"]) >= {"patient", "vitals", "ecgObservations", "labs", "orders"}


def test_discovery_templates_use_mapping_codes_and_short_urls(make_app, service_env: ServiceEnv) -> None:
    """§4: templates are 2.0-subset reads/searches on the patient, built from fhir_mappings, < 2 KB."""
    client = make_app().test_client()
    prefetch = client.get("/cds-services", headers=service_env.bearer("/cds-services")).get_json()[
        "services"
    ][0]["prefetch"]
    assert prefetch["patient"] == "Patient/{{context.patientId}}"
    assert "8867-4" in prefetch["vitals"] and "85354-9" in prefetch["vitals"]  # heart rate, BP panel
    assert "11524-6" in prefetch["ecgObservations"]
    assert "33762-6" in prefetch["labs"] and "33762-6" in prefetch["orders"]  # NT-proBNP
    for template in prefetch.values():
        assert "{{context.patientId}}" in template
        assert len(template) < 2000
        assert "sort:desc" not in template and "today()" not in template


# -- hook calls with prefetch (§3, §4) ------------------------------------------------------------------------


@pytest.mark.parametrize("hook", list(SERVICE_OF_HOOK))
def test_full_prefetch_answers_cards_without_fhir_calls(make_app, hook: str) -> None:
    """§0.3.1: every key prefetched → no FHIR call; the model sees the prefetched ECG and vitals."""
    runtime, fhir = positive_runtime(), MockFhir([])
    client = make_app(runtime=runtime, fhir=fhir, **DEV).test_client()
    body = hook_request(
        hook, prefetch=prefetch_from(clinical_record()), fhir_server=EHR_FHIR, token=FHIR_TOKEN
    )
    response = post_hook(client, body, hook)
    assert response.status_code == 200, response.get_json()
    assert_schema_valid("serviceResponse", response.get_json())
    assert [c["source"]["topic"]["code"] for c in response.get_json()["cards"]] == ["ECGLABNTPROBNP"]
    assert fhir.requests == []
    inputs = runtime.seen[0]
    assert inputs.ecg.reference == "Observation/ecg-1"
    assert inputs.metadata["heart_rate"] == pytest.approx(88)


@pytest.mark.parametrize("hook", list(SERVICE_OF_HOOK))
def test_partial_prefetch_fetches_only_missing_keys(make_app, hook: str) -> None:
    """§0.3.2: absent keys are fetched with the fhirAuthorization token; present keys are not re-queried."""
    record = clinical_record()
    prefetch = prefetch_from(record)
    del prefetch["labs"], prefetch["orders"]
    fhir = MockFhir(all_fhir_resources(record))
    client = make_app(runtime=positive_runtime(), fhir=fhir, **DEV).test_client()
    response = post_hook(
        client, hook_request(hook, prefetch=prefetch, fhir_server=EHR_FHIR, token=FHIR_TOKEN), hook
    )
    assert response.status_code == 200
    assert sorted(fhir.paths()) == ["Observation", "ServiceRequest"]
    assert all(r.headers["Authorization"] == f"Bearer {FHIR_TOKEN}" for r in fhir.requests)


# -- one data path: the same queries, one clock (issue 13) ---------------------------------------------------

CLOCK = datetime.now(UTC).replace(microsecond=0)
"""The pipeline's injected "now" in the data-path tests (the record's ECG is 10 min before it)."""


def clocked_app(make_app: Any, fhir: MockFhir, runtime: FakeRuntime, now: datetime = CLOCK) -> Any:
    """An app (auth off) whose pipeline clock always reads ``now``."""
    app = make_app(runtime=runtime, fhir=fhir, **DEV)
    app.extensions["ecglab"].pipeline.deps.clock = lambda: now
    return app


def bound_urls(now: datetime) -> dict[str, str]:
    """Per prefetch key, the URL the service must request for it: its query bound at ``now``."""
    from cds_service.prefetch import build_queries
    from fhir_mappings import load_mappings

    return {
        q.key: f"{EHR_FHIR}/Patient/{PATIENT_ID}"
        if q.read
        else str(httpx.URL(f"{EHR_FHIR}/{q.resource_type}", params=q.bind(PATIENT_ID, now)))
        for q in build_queries(load_mappings())
    }


def test_a_missing_key_is_fetched_with_the_same_query_whatever_else_was_prefetched(make_app) -> None:
    """Nothing prefetched, or every key but one: that key's request is identical (date filter included)."""
    record = clinical_record(CLOCK)
    fhir = MockFhir(all_fhir_resources(record))
    client = clocked_app(make_app, fhir, positive_runtime()).test_client()
    response = post_hook(client, hook_request("patient-view", fhir_server=EHR_FHIR, token=FHIR_TOKEN))
    assert response.status_code == 200, response.get_json()
    everything = sorted(str(r.url) for r in fhir.requests)
    expected = bound_urls(CLOCK)
    assert everything == sorted(expected.values())
    for key, url in expected.items():
        fhir.requests.clear()
        prefetch = prefetch_from(record)
        del prefetch[key]
        body = hook_request("patient-view", prefetch=prefetch, fhir_server=EHR_FHIR, token=FHIR_TOKEN)
        assert post_hook(client, body).status_code == 200, key
        assert [str(r.url) for r in fhir.requests] == [url], key
        assert url in everything


def test_self_fetched_date_filters_follow_the_injected_clock(make_app) -> None:
    """The date filters come from the pipeline's clock, not the wall clock: move the clock, they move."""
    for at in (datetime(2031, 3, 4, 5, 6, tzinfo=UTC), datetime(2031, 3, 4, 8, 36, tzinfo=UTC)):
        fhir = MockFhir(all_fhir_resources(clinical_record(at)))
        client = clocked_app(make_app, fhir, positive_runtime(), now=at).test_client()
        post_hook(client, hook_request("patient-view", fhir_server=EHR_FHIR, token=FHIR_TOKEN))
        assert sorted(str(r.url) for r in fhir.requests) == sorted(bound_urls(at).values())
        media = next(r for r in fhir.requests if r.url.path.endswith("/Media"))
        labs = next(r for r in fhir.requests if "33762-6" in r.url.params.get("code", "").split(","))
        assert media.url.params["created"] == "ge" + iso(at - timedelta(minutes=120))  # ecg.max_age_minutes
        assert labs.url.params["date"] == "ge" + iso(at - LAB_LOOKBACK)


def test_full_prefetch_and_full_fetch_give_identical_model_inputs(make_app) -> None:
    """The same patient data reaches the model identically, whether the EHR prefetched it or the service fetched it."""
    record = clinical_record(CLOCK)
    runtime = positive_runtime()
    fhir = MockFhir(all_fhir_resources(record))
    client = clocked_app(make_app, fhir, runtime).test_client()
    assert post_hook(client, hook_request("patient-view", prefetch=prefetch_from(record))).status_code == 200
    assert fhir.requests == []
    body = hook_request("patient-view", fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    assert post_hook(client, body).status_code == 200
    assert len(fhir.requests) == 7
    prefetched, fetched = runtime.seen
    assert prefetched.metadata == fetched.metadata and prefetched.sources == fetched.sources
    assert vars(prefetched.ecg).keys() == vars(fetched.ecg).keys()
    for name, value in vars(prefetched.ecg).items():
        other = getattr(fetched.ecg, name)
        assert np.array_equal(value, other) if isinstance(value, np.ndarray) else value == other, name


@pytest.mark.parametrize("hook", list(SERVICE_OF_HOOK))
def test_null_prefetch_means_queried_nothing_found(make_app, hook: str) -> None:
    """§4 table: a null value means "queried, nothing found": no re-query, no 412."""
    prefetch = prefetch_from(clinical_record())
    for key in ("labs", "orders", "ecgMedia", "ecgDocuments"):
        prefetch[key] = None
    fhir = MockFhir([])
    client = make_app(runtime=positive_runtime(), fhir=fhir, **DEV).test_client()
    response = post_hook(client, hook_request(hook, prefetch=prefetch), hook)  # no token at all
    assert response.status_code == 200
    assert len(response.get_json()["cards"]) == 1
    assert fhir.requests == []


@pytest.mark.parametrize("hook", list(SERVICE_OF_HOOK))
def test_operationoutcome_prefetch_is_fetched_again_with_token(make_app, hook: str) -> None:
    """§4 table: an OperationOutcome value is an error → treated as absent and fetched via the API."""
    record = clinical_record()
    prefetch = prefetch_from(record)
    prefetch["vitals"] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "timeout"}],
    }
    fhir = MockFhir(all_fhir_resources(record))
    runtime = positive_runtime()
    client = make_app(runtime=runtime, fhir=fhir, **DEV).test_client()
    response = post_hook(
        client, hook_request(hook, prefetch=prefetch, fhir_server=EHR_FHIR, token=FHIR_TOKEN), hook
    )
    assert response.status_code == 200
    assert fhir.paths() == ["Observation"]
    assert "8867-4" in str(fhir.requests[0].url)
    assert runtime.seen[0].metadata["heart_rate"] == pytest.approx(88)


def test_operationoutcome_prefetch_without_token_is_412(make_app) -> None:
    """§0.3.3: an OperationOutcome key with no way to query FHIR → 412 with an OperationOutcome."""
    body = load_sample("project/request.patient-view.prefetch-operationoutcome.json")
    del body["fhirAuthorization"]
    client = make_app(**DEV).test_client()
    assert_precondition_failed(post_hook(client, body))


def test_epic_no_results_bundle_is_an_empty_answer(make_app) -> None:
    """§4 table (Epic): a Bundle whose only entry is a warning OperationOutcome means no results, not an error."""
    no_results = load_sample("clients/epic.request.patient-view.tutorial.trimmed.json")["prefetch"][
        "conditions"
    ]
    prefetch = prefetch_from(clinical_record())
    prefetch["labs"] = no_results
    prefetch["orders"] = no_results
    client = make_app(runtime=positive_runtime(), **DEV).test_client()
    response = post_hook(client, hook_request("patient-view", prefetch=prefetch))
    assert response.status_code == 200
    assert len(response.get_json()["cards"]) == 1


def test_bundle_with_error_outcome_counts_as_missing(make_app) -> None:
    """§4 table: a Bundle carrying an error-severity OperationOutcome is a failed query → 412 without a token."""
    prefetch = prefetch_from(clinical_record())
    prefetch["labs"] = bundle(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}
    )
    client = make_app(**DEV).test_client()
    assert_precondition_failed(
        post_hook(client, hook_request("patient-view", prefetch=prefetch)), naming=["labs"]
    )


@pytest.mark.parametrize("hook", ["patient-view", "order-sign"])
def test_no_prefetch_with_token_reads_the_fhir_server(make_app, hook: str) -> None:
    """§10 "no prefetch with a token, using a mocked FHIR server": the service fetches everything itself."""
    fhir = MockFhir(all_fhir_resources(clinical_record()))
    runtime = positive_runtime()
    client = make_app(runtime=runtime, fhir=fhir, **DEV).test_client()
    response = post_hook(client, hook_request(hook, fhir_server=EHR_FHIR, token=FHIR_TOKEN), hook)
    assert response.status_code == 200, response.get_json()
    assert_schema_valid("serviceResponse", response.get_json())
    assert len(response.get_json()["cards"]) == 1
    assert f"Patient/{PATIENT_ID}" in fhir.paths()
    assert runtime.seen[0].ecg.reference == "Observation/ecg-1"


def test_fhir_authorization_with_only_an_access_token_is_enough(make_app) -> None:
    """Cerner-style fhirAuthorization without expires_in/scope/subject still lets the service fetch."""
    fhir = MockFhir(all_fhir_resources(clinical_record()))
    client = make_app(runtime=positive_runtime(), fhir=fhir, **DEV).test_client()
    body = hook_request("patient-view", fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    body["fhirAuthorization"] = {"access_token": FHIR_TOKEN, "token_type": "Bearer"}
    response = post_hook(client, body, "patient-view")
    assert response.status_code == 200, response.get_json()
    assert len(response.get_json()["cards"]) == 1
    assert f"Patient/{PATIENT_ID}" in fhir.paths()


def test_no_prefetch_without_token_is_412_operationoutcome(make_app) -> None:
    """§4 412 rule + §7: required data neither prefetched nor obtainable → 412, OperationOutcome body."""
    body = load_sample("project/request.patient-view.labs-null-ecg-missing-no-token.json")
    client = make_app(**DEV).test_client()
    outcome = assert_precondition_failed(post_hook(client, body), naming=["ecgObservations"])
    assert "labs," not in outcome["issue"][0]["diagnostics"]  # labs was null: satisfied


def test_fhir_server_refusing_the_token_is_412(make_app) -> None:
    """§4 412 rule: a FHIR server that answers 401 means the data cannot be obtained → 412."""
    client = make_app(fhir=MockFhir([], status=401), **DEV).test_client()
    response = post_hook(client, hook_request("patient-view", fhir_server=EHR_FHIR, token=FHIR_TOKEN))
    assert_precondition_failed(response, naming=["FhirUnauthorized"])


# -- vendor and spec fixtures (§0.7, §3) ---------------------------------------------------------------------


FIXTURE_REQUESTS = [
    "spec/request.patient-view.json",
    "spec/request.order-select.r4.json",
    "spec/request.order-sign.r4.json",
    "clients/epic.request.patient-view.tutorial.trimmed.json",
    "clients/epic.request.order-select.connectathon-2021.trimmed.json",
    "clients/sandbox.request.order-select.pama-servicerequest.json",
    "project/request.order-select.lab-servicerequest.full-prefetch.json",
    "project/request.order-sign.no-prefetch-with-token.json",
    "project/request.patient-view.prefetch-operationoutcome.json",
]


@pytest.mark.parametrize("name", FIXTURE_REQUESTS)
def test_spec_epic_and_sandbox_requests_are_accepted(make_app, name: str) -> None:
    """§0.7: vendor quirks (long Epic ids, no draftOrders.type, Epic scopes, extensions) are never a 400.

    Without our prefetch keys the answer is 412 and, the fixtures' fhirServer not being allowed
    (auth off → loopback only), no outbound call is made; with our keys added it is 200 with cards.
    """
    body = load_sample(name)
    fhir = MockFhir([])
    client = make_app(runtime=positive_runtime(), fhir=fhir, auth=False, issuers="").test_client()
    first = post_hook(client, body, body["hook"])
    assert first.status_code == 412, first.get_json()
    assert fhir.requests == []
    pid = body["context"]["patientId"]
    body["prefetch"] = {**body.get("prefetch", {}), **prefetch_from(clinical_record(pid=pid))}
    second = post_hook(client, body, body["hook"])
    assert second.status_code == 200, second.get_json()
    assert_schema_valid("serviceResponse", second.get_json())
    assert len(second.get_json()["cards"]) == 1


def test_unknown_fields_are_accepted(make_app) -> None:
    """§0.7: unknown top-level and context fields and vendor extensions never cause a rejection."""
    body = hook_request("patient-view", prefetch=prefetch_from(clinical_record()))
    body["somethingNew"] = {"a": 1}
    body["extension"] = {"com.example.vendor": {"x": [1, 2]}}
    body["context"]["futureField"] = "value"
    client = make_app(runtime=positive_runtime(), **DEV).test_client()
    assert post_hook(client, body).status_code == 200


# -- malformed requests (§7) --------------------------------------------------------------------------------


def _without(key: str) -> dict[str, Any]:
    """A patient-view request lacking the top-level field ``key``."""
    body = hook_request("patient-view")
    del body[key]
    return body


def _context(**changes: Any) -> dict[str, Any]:
    """An order-sign request with context fields changed (``None`` removes a field)."""
    body = hook_request("order-sign")
    body["context"].update(changes)
    for key, value in changes.items():
        if value is None:
            del body["context"][key]
    return body


BAD_REQUESTS = {
    "not json": b"{not json",
    "json array": b"[1, 2]",
    "missing hook": _without("hook"),
    "missing hookInstance": _without("hookInstance"),
    "missing context": _without("context"),
    "context not an object": {**hook_request("patient-view"), "context": "x"},
    "wrong hook for the service": hook_request("order-select"),
    "missing patientId": _context(patientId=None),
    "patientId is a path": _context(patientId="../Observation"),
    "draftOrders not a Bundle": _context(draftOrders=["ServiceRequest/1"]),
    "prefetch not an object": {**hook_request("patient-view"), "prefetch": ["x"]},
    "fhirServer not a URL": {**hook_request("patient-view"), "fhirServer": "not a url"},
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_malformed_requests_are_400_operationoutcome(make_app, case: str) -> None:
    """§7: malformed body (non-JSON, missing hook/hookInstance/context, wrong hook, bad ids) → 400 + OperationOutcome."""
    payload = BAD_REQUESTS[case]
    client = make_app(**DEV).test_client()
    url = (
        "/cds-services/ecglab-order-sign"
        if case in ("missing patientId", "patientId is a path", "draftOrders not a Bundle")
        else "/cds-services/ecglab-patient-view"
    )
    if isinstance(payload, bytes):
        response = client.post(url, data=payload, content_type="application/json")
    else:
        response = client.post(url, json=payload)
    assert response.status_code == 400
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert response.get_json()["issue"][0]["details"]["text"]


@pytest.mark.parametrize("path", ["/cds-services/no-such-service", "/cds-services/no-such-service/feedback"])
def test_unknown_service_is_404_operationoutcome(make_app, path: str) -> None:
    """§7: unknown service id → 404 with an OperationOutcome."""
    response = make_app(**DEV).test_client().post(path, json=hook_request("patient-view"))
    assert response.status_code == 404
    assert response.get_json()["resourceType"] == "OperationOutcome"


# -- no ECG, rejected ECG (brief: no cards, not an error) -----------------------------------------------------


def test_no_ecg_answers_no_cards_and_logs(make_app, caplog: pytest.LogCaptureFixture) -> None:
    """No ECG at all → 200 {"cards": []} and a log line; the model is not called."""
    prefetch = prefetch_from(clinical_record())
    prefetch["ecgObservations"] = bundle()
    runtime = positive_runtime()
    client = make_app(runtime=runtime, **DEV).test_client()
    with caplog.at_level(logging.INFO):
        response = post_hook(client, hook_request("patient-view", prefetch=prefetch))
    assert (response.status_code, response.get_json()) == (200, {"cards": []})
    assert runtime.seen == []
    assert "no usable ECG" in caplog.text


def test_too_old_ecg_answers_no_cards(make_app) -> None:
    """An ECG older than ecg.max_age_minutes is not predicted from → 200 with no cards."""
    prefetch = prefetch_from(clinical_record())
    prefetch["ecgObservations"] = bundle(ecg_observation(recorded_at=datetime.now(UTC) - timedelta(days=3)))
    client = make_app(runtime=positive_runtime(), **DEV).test_client()
    response = post_hook(client, hook_request("patient-view", prefetch=prefetch))
    assert (response.status_code, response.get_json()) == (200, {"cards": []})


def test_rejected_ecg_answers_no_cards_and_logs_reason(make_app, caplog: pytest.LogCaptureFixture) -> None:
    """A malformed ECG (3 of 12 leads) → 200 with no cards and a log line naming the reason."""
    prefetch = prefetch_from(clinical_record())
    prefetch["ecgObservations"] = bundle(
        ecg_observation(recorded_at=datetime.now(UTC) - timedelta(minutes=5), leads=3)
    )
    client = make_app(runtime=positive_runtime(), **DEV).test_client()
    with caplog.at_level(logging.INFO):
        response = post_hook(client, hook_request("patient-view", prefetch=prefetch))
    assert (response.status_code, response.get_json()) == (200, {"cards": []})
    assert "ECG rejected (reason=missing_leads)" in caplog.text


# -- budget and failures (§0.4, §7) ------------------------------------------------------------------------


def test_slow_model_past_the_budget_answers_no_cards(make_app, caplog: pytest.LogCaptureFixture) -> None:
    """§0.4: past ECGLAB_BUDGET_MS the call answers {"cards": []} (and logs it) instead of waiting."""
    client = make_app(runtime=positive_runtime(sleep_s=0.6), budget_ms=150, **DEV).test_client()
    body = hook_request("patient-view", prefetch=prefetch_from(clinical_record()))
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        response = post_hook(client, body)
    elapsed = time.perf_counter() - started
    assert (response.status_code, response.get_json()) == (200, {"cards": []})
    assert elapsed < 0.5
    assert "time budget of 150 ms exceeded" in caplog.text


def test_slow_fhir_server_past_the_budget_answers_no_cards(make_app) -> None:
    """§0.4: FHIR fetches share the budget (deadline passed to the client) → no cards when it runs out."""
    fhir = MockFhir(all_fhir_resources(clinical_record()), delay_s=0.3)
    client = make_app(runtime=positive_runtime(), fhir=fhir, budget_ms=120, **DEV).test_client()
    started = time.perf_counter()
    response = post_hook(client, hook_request("patient-view", fhir_server=EHR_FHIR, token=FHIR_TOKEN))
    assert (response.status_code, response.get_json()) == (200, {"cards": []})
    assert time.perf_counter() - started < 0.45


def test_model_failure_is_logged_500_without_stack_trace(make_app, caplog: pytest.LogCaptureFixture) -> None:
    """§7 / house style 9.4: a model failure is a logged 500 with an OperationOutcome, no stack trace in the body."""
    runtime = FakeRuntime(raises=RuntimeError("onnx exploded at node 42"))
    client = make_app(runtime=runtime, **DEV).test_client()
    with caplog.at_level(logging.ERROR):
        response = post_hook(client, hook_request("patient-view", prefetch=prefetch_from(clinical_record())))
    assert response.status_code == 500
    assert response.get_json()["resourceType"] == "OperationOutcome"
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and "exploded" not in text
    assert "onnx exploded at node 42" in caplog.text


def test_fail_quiet_turns_a_failure_into_no_cards(make_app, caplog: pytest.LogCaptureFixture) -> None:
    """ECGLAB_FAIL_QUIET=on: the same failure answers 200 {"cards": []} and is still logged."""
    runtime = FakeRuntime(raises=RuntimeError("onnx exploded at node 42"))
    client = make_app(runtime=runtime, fail_quiet=True, **DEV).test_client()
    with caplog.at_level(logging.ERROR):
        response = post_hook(client, hook_request("patient-view", prefetch=prefetch_from(clinical_record())))
    assert (response.status_code, response.get_json()) == (200, {"cards": []})
    assert "FAIL_QUIET" in caplog.text and "onnx exploded" in caplog.text


# -- SSRF (brief: only the fhirServer origins allowed for the caller) ---------------------------------------


@pytest.mark.parametrize(
    "server",
    ["https://evil.example.com/fhir", "https://fhir.example.org.evil.net/r4", "http://fhir.example.org/r4"],
)
def test_fhir_server_not_allowed_for_issuer_gets_no_call(
    make_app, service_env: ServiceEnv, server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A fhirServer outside the issuer's fhir_servers: no outbound call, a log line, 412 (data unobtainable)."""
    fhir = MockFhir(all_fhir_resources(clinical_record()))
    client = make_app(fhir=fhir).test_client()
    path = "/cds-services/ecglab-patient-view"
    with caplog.at_level(logging.WARNING):
        response = post_hook(
            client,
            hook_request("patient-view", fhir_server=server, token=FHIR_TOKEN),
            headers=service_env.bearer(path),
        )
    assert response.status_code == 412
    assert fhir.requests == []
    assert "is not allowed for iss=" + EHR_ISS in caplog.text


def test_fhir_server_allowed_for_issuer_is_called(make_app, service_env: ServiceEnv) -> None:
    """The issuer's own fhir_servers entry is queried (same token path as above, allowed origin)."""
    fhir = MockFhir(all_fhir_resources(clinical_record()))
    client = make_app(runtime=positive_runtime(), fhir=fhir).test_client()
    path = "/cds-services/ecglab-patient-view"
    response = post_hook(
        client,
        hook_request("patient-view", fhir_server=EHR_FHIR, token=FHIR_TOKEN),
        headers=service_env.bearer(path),
    )
    assert response.status_code == 200
    assert fhir.requests


def test_auth_off_allows_only_loopback_fhir_servers_by_default(make_app) -> None:
    """Auth off without ECGLAB_DEV_FHIR_SERVERS: only loopback fhirServers are contacted."""
    fhir = MockFhir(all_fhir_resources(clinical_record()))
    client = make_app(runtime=positive_runtime(), fhir=fhir, auth=False, issuers="").test_client()
    remote = post_hook(client, hook_request("patient-view", fhir_server=EHR_FHIR, token=FHIR_TOKEN))
    assert remote.status_code == 412 and fhir.requests == []
    local = post_hook(
        client, hook_request("patient-view", fhir_server="http://127.0.0.1:8091/fhir", token=FHIR_TOKEN)
    )
    assert local.status_code == 200 and fhir.requests


# -- CORS (§8) ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/cds-services", "/cds-services/ecglab-order-select", "/cds-services/ecglab-order-select/feedback"],
)
def test_cors_preflight_needs_no_jwt(make_app, path: str) -> None:
    """§8 CORS: OPTIONS is answered without a JWT, allowing Authorization/Content-Type and GET/POST/OPTIONS."""
    client = make_app(cors_origins="*").test_client()  # auth on: '*' is allowed
    response = client.options(
        path,
        headers={"Origin": "https://sandbox.cds-hooks.org", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"},
    )  # fmt: skip
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    assert "Content-Type" in response.headers["Access-Control-Allow-Headers"]
    assert set(re.split(r",\s*", response.headers["Access-Control-Allow-Methods"])) == {
        "GET",
        "POST",
        "OPTIONS",
    }


def test_cors_origins_can_be_restricted(make_app) -> None:
    """§8 "In production, restrict origins": a listed origin is echoed, any other gets no CORS header."""
    client = make_app(cors_origins="https://ehr.example.org", **DEV).test_client()
    allowed = client.options("/cds-services", headers={"Origin": "https://ehr.example.org"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://ehr.example.org"
    assert "Origin" in allowed.headers["Vary"]
    other = client.get("/cds-services", headers={"Origin": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_cors_headers_also_on_errors(make_app) -> None:
    """hapi-fhir-jpaserver-starter #717 lesson: CORS headers on POST answers too, including 401s."""
    response = make_app(cors_origins="*").test_client().post("/cds-services/ecglab-patient-view", json={})
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == "*"


# -- health and metrics -----------------------------------------------------------------------------------------


def test_healthz_reports_model_and_database(make_app) -> None:
    """/healthz is 200 with the model version when the model and database are usable, else 503."""
    from sqlalchemy import create_engine

    app = make_app(**DEV)
    client = app.test_client()
    ok = client.get("/healthz")
    assert ok.status_code == 200
    assert ok.get_json()["model"]["version"] == "9.9.9-test"
    app.extensions["ecglab"].engine = create_engine(
        "postgresql+psycopg://nobody@/none?host=/nonexistent-socket-dir"
    )
    down = client.get("/healthz")
    assert down.status_code == 503
    assert down.get_json()["database"] == "unreachable"


def test_metrics_count_requests_and_cards(make_app) -> None:
    """/metrics exposes requests by service and status, latency histograms and cards emitted."""
    client = make_app(runtime=positive_runtime(), **DEV).test_client()
    post_hook(client, hook_request("patient-view", prefetch=prefetch_from(clinical_record())))
    text = client.get("/metrics").get_data(as_text=True)
    assert re.search(
        r'ecglab_requests_total\{endpoint="service",service="ecglab-patient-view",status="200"\} [1-9]', text
    )
    assert 'ecglab_cards_total{lab="ntprobnp",service="ecglab-patient-view"}' in text
    assert "ecglab_request_seconds_bucket" in text and "ecglab_inference_seconds_count" in text


def test_issued_cards_are_recorded_for_feedback(make_app) -> None:
    """Each emitted card's uuid, lab and probability is stored, so feedback can be joined back."""
    from sqlalchemy import select

    from cds_service.db import IssuedCard

    app = make_app(runtime=positive_runtime(), **DEV)
    card = post_hook(
        app.test_client(), hook_request("patient-view", prefetch=prefetch_from(clinical_record()))
    ).get_json()["cards"][0]
    with app.extensions["ecglab"].engine.connect() as conn:
        row = conn.execute(select(IssuedCard).where(IssuedCard.card_uuid == card["uuid"])).one()
    assert (row.lab_key, row.probability, row.model_version) == (
        "ntprobnp",
        pytest.approx(0.91),
        "9.9.9-test",
    )


# -- logging (§0.8) -------------------------------------------------------------------------------------------


def test_tokens_and_patient_ids_never_logged(
    make_app, service_env: ServiceEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """§0.8: JWTs, fhirAuthorization tokens and patient identifiers never reach the log; hookInstance, iss, jti do."""
    record = clinical_record()
    prefetch = prefetch_from(record)
    del prefetch["labs"]
    fhir = MockFhir([*all_fhir_resources(record), lab_result("potassium", datetime.now(UTC), "k-1")])
    client = make_app(runtime=positive_runtime(), fhir=fhir).test_client()
    path = "/cds-services/ecglab-patient-view"
    headers = service_env.bearer(path)
    jwt_text = headers["Authorization"].split()[1]
    body = hook_request("patient-view", prefetch=prefetch, fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    with caplog.at_level(logging.DEBUG):
        assert post_hook(client, body, headers=headers).status_code == 200
        assert post_hook(client, body, headers=headers).status_code == 401  # replay: logged rejection
        no_fhir = hook_request("patient-view", fhir_server="https://evil.example.com", token=FHIR_TOKEN)
        post_hook(client, no_fhir, headers=service_env.bearer(path))
    text = caplog.text + " ".join(str(r.args) for r in caplog.records)
    for secret in (jwt_text, jwt_text.split(".")[2], FHIR_TOKEN, PATIENT_ID):
        assert secret not in text
    assert f"hookInstance={body['hookInstance']}" in text
    assert f"iss={EHR_ISS}" in text and "jti=" in text


def test_real_model_runtime_on_a_toy_onnx_model_answers_cards(tmp_path: Path) -> None:
    """Integration: create_app loads ModelRuntime from ECGLAB_MODEL_DIR and feeds it the extracted inputs.

    The toy ONNX graph (tests/onnx_fixtures.py) has three targets and decision threshold 0, so
    each of its labs must come back as one schema-valid card, all marked as a demo model.
    """
    from cds_service.app import create_app
    from tests.onnx_fixtures import build_toy_model_dir

    build_toy_model_dir(tmp_path / "models", version="0.0.5", decision_threshold=0.0)
    app = create_app(
        {
            "auth": False,
            "model_dir": str(tmp_path / "models"),
            "database_url": f"sqlite:///{tmp_path / 'a.sqlite3'}",
        }
    )
    response = post_hook(
        app.test_client(), hook_request("patient-view", prefetch=prefetch_from(clinical_record()))
    )
    assert response.status_code == 200
    assert_schema_valid("serviceResponse", response.get_json())
    cards = response.get_json()["cards"]
    assert [c["source"]["topic"]["code"] for c in cards] == [
        "ECGLABNTPROBNP",
        "ECGLABHEMOGLOBIN",
        "ECGLABPOTASSIUM",
    ]
    assert all(c["summary"].startswith("[DEMO]") for c in cards)
    app.extensions["ecglab"].close()
