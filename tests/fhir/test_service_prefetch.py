"""Prefetch templates, their date filters, and the prefetch-state table (cdshooks.md §4, HAPI auto-prefetch rules)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from cds_service.patient_data import assemble
from cds_service.prefetch import (
    LAB_LOOKBACK,
    MAX_TEMPLATE_CHARS,
    DateFilter,
    PrefetchQuery,
    build_queries,
    code_param,
    decode_prefetch,
    decode_value,
)
from fhir_mappings import Coding, load_mappings
from tests.service_fixtures import bundle, lab_order, patient

MAPPINGS = load_mappings()
QUERIES = build_queries(MAPPINGS)
LABS = next(q for q in QUERIES if q.key == "labs")
PATIENT = next(q for q in QUERIES if q.key == "patient")
OBSERVATION = {"resourceType": "Observation", "id": "o-1"}
ERROR = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
WARNING = {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "processing"}]}

STATES: dict[str, tuple[Any, list[dict[str, Any]] | None]] = {
    "null: queried, nothing found": (None, []),
    "searchset Bundle": (bundle(OBSERVATION), [OBSERVATION]),
    "empty Bundle": (bundle(), []),
    "OperationOutcome: client error": (ERROR, None),
    "Bundle with an error OperationOutcome": (bundle(OBSERVATION, ERROR), None),
    "Bundle with only a warning OperationOutcome (Epic no results)": (bundle(WARNING), []),
    "Bundle mixing other resource types": (
        bundle(OBSERVATION, {"resourceType": "Patient", "id": "p"}),
        [OBSERVATION],
    ),
    "a bare resource of the right type": (OBSERVATION, [OBSERVATION]),
    "a resource of another type": ({"resourceType": "Condition"}, None),
    "a string (spec example 'user': '123')": ("123", None),
    "an OperationOutcome without issues": ({"resourceType": "OperationOutcome"}, None),
}


@pytest.mark.parametrize("state", list(STATES))
def test_prefetch_value_states(state: str) -> None:
    """§4 table: null = nothing found; OperationOutcome (or an error one in a Bundle) = missing; others parsed."""
    value, expected = STATES[state]
    resources, problem = decode_value(value, LABS)
    assert resources == expected
    assert (problem is None) == (expected is not None)


def test_absent_keys_are_missing_and_present_keys_are_kept() -> None:
    """§4: a key the client did not send is "not satisfied"; null and Bundles are answers."""
    decoded = decode_prefetch({"patient": patient(), "labs": None, "vitals": ERROR}, QUERIES)
    assert decoded.resources == {"patient": [patient()], "labs": []}
    assert set(decoded.missing) == {q.key for q in QUERIES} - {"patient", "labs"}
    assert decoded.notes == {"vitals": "OperationOutcome"}


def test_patient_read_may_arrive_as_a_bundle() -> None:
    """A client that satisfied the Patient read with a search Bundle is still understood."""
    assert decode_value(bundle(patient()), PATIENT) == ([patient()], None)


def test_assemble_routes_each_key_to_its_patient_data_field() -> None:
    """Prefetch keys map onto PatientData: vitals → observations, the three ECG carriers → ecgs, …"""
    media = {"resourceType": "Media", "id": "m-1"}
    order = lab_order("ntprobnp", "sr-1")
    data = assemble(
        {"patient": [patient()], "ecgObservations": [OBSERVATION], "ecgMedia": [media], "orders": [order]},
        QUERIES,
    )
    assert data.patient == patient()
    assert data.ecgs == [OBSERVATION, media]
    assert (data.service_requests, data.observations, data.lab_results) == ([order], [], [])


KEYS = ["patient", "vitals", "ecgObservations", "ecgMedia", "ecgDocuments", "labs", "orders"]
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def test_the_seven_keys_in_discovery_order() -> None:
    """EHRs and the shared samples rely on the key names: seven keys, always in this order."""
    assert [q.key for q in QUERIES] == KEYS
    rendered = {q.key: q.template() for q in QUERIES}
    assert rendered["patient"] == "Patient/{{context.patientId}}"
    assert rendered["ecgMedia"] == "Media?subject=Patient/{{context.patientId}}&_sort=-created&_count=5"
    assert rendered["orders"].startswith(
        "ServiceRequest?subject=Patient/{{context.patientId}}&status=active,draft&code="
    )


def test_a_template_is_the_bound_query_without_its_date_filter() -> None:
    """One set of queries: the template an EHR runs is exactly what the service binds, minus the date filter."""
    searches = [q for q in QUERIES if not q.read]
    assert searches
    for query in searches:
        template_params = query.template().split("?", 1)[1].split("&")
        bound = query.bind("{{context.patientId}}", None)
        assert template_params == [f"{name}={value}" for name, value in bound], query.key
        dated = query.bind("{{context.patientId}}", NOW)
        assert [p for p in dated if query.since is None or p[0] != query.since.param] == bound, query.key
        if query.since is not None:
            assert f"&{query.since.param}=" not in query.template(), query.key


def test_date_filters_follow_fhir_mappings_windows() -> None:
    """ECGs back to ecg.max_age_minutes; vitals/biometrics that minus the widest feature window; labs LAB_LOOKBACK."""
    ecg_age = timedelta(minutes=MAPPINGS.ecg.max_age_minutes)
    widest = max(f.window.before_min for f in MAPPINGS.features if f.window is not None)
    by_key = {q.key: q.since for q in QUERIES}
    assert by_key == {
        "patient": None,
        "vitals": DateFilter("date", ecg_age + timedelta(minutes=widest)),
        "ecgObservations": DateFilter("date", ecg_age),
        "ecgMedia": DateFilter("created", ecg_age),
        "ecgDocuments": DateFilter("date", ecg_age),
        "labs": DateFilter("date", LAB_LOOKBACK),
        "orders": None,
    }


def test_the_date_filter_is_computed_from_the_given_clock() -> None:
    """A bound query's date filter moves with ``now`` (UTC, ``Z``), placed before ``_sort``/``_count``."""
    ecg = next(q for q in QUERIES if q.key == "ecgObservations")
    age = timedelta(minutes=MAPPINGS.ecg.max_age_minutes)
    assert ecg.bind("p1", NOW)[2:] == [
        ("date", "ge" + (NOW - age).strftime("%Y-%m-%dT%H:%M:%SZ")),
        ("_sort", "-date"),
        ("_count", "5"),
    ]
    later = NOW + timedelta(hours=5, minutes=7)
    assert ("date", "ge" + (later - age).strftime("%Y-%m-%dT%H:%M:%SZ")) in ecg.bind("p1", later)
    if age == timedelta(minutes=120):  # the shipped ecg.yaml: the literal instants, written out
        assert ("date", "ge2025-06-01T15:07:00Z") in ecg.bind("p1", later)
    in_berlin = later.astimezone(ZoneInfo("Europe/Berlin"))
    assert ecg.bind("p1", in_berlin) == ecg.bind("p1", later)
    labs = LABS.bind("p1", NOW)
    assert ("date", "ge2025-05-25T12:00:00Z") in labs
    media = next(q for q in QUERIES if q.key == "ecgMedia")
    assert ("created", "ge" + (NOW - age).strftime("%Y-%m-%dT%H:%M:%SZ")) in media.bind("p1", NOW)
    orders = next(q for q in QUERIES if q.key == "orders")
    assert orders.bind("p1", NOW) == orders.bind("p1", None)


def test_templates_bind_the_patient_id_as_a_parameter_value() -> None:
    """Fallback queries substitute context.patientId into parameter values (URL-encoded by httpx)."""
    vitals = next(q for q in QUERIES if q.key == "vitals")
    assert ("subject", "Patient/a.b-1") in vitals.bind("a.b-1", NOW)
    assert PATIENT.template() == "Patient/{{context.patientId}}"
    assert all(len(q.template()) <= MAX_TEMPLATE_CHARS for q in QUERIES)


def test_long_code_lists_fall_back_to_bare_codes() -> None:
    """URL lengths stay sane: system|code tokens when they fit, bare codes when they would not."""
    codings = [Coding(system="urn:example:codes", code=f"c{n}", display="x") for n in range(100)]
    assert (
        code_param(codings[:3], budget=1000)
        == "urn:example:codes|c0,urn:example:codes|c1,urn:example:codes|c2"
    )
    assert code_param(codings, budget=1000).startswith("c0,c1,c2,")


def test_a_query_is_a_read_or_a_search() -> None:
    """Templates render as an instance read or a type search with & separated parameters."""
    query = PrefetchQuery(
        "x", "ecgs", "Media", (("subject", "Patient/{{context.patientId}}"), ("_count", "5"))
    )
    assert query.template() == "Media?subject=Patient/{{context.patientId}}&_count=5"


# -- Bundles cut after their first page --------------------------------------------------------------------


def paged(resources: list[dict[str, Any]], next_url: str | None) -> dict[str, Any]:
    """A searchset Bundle of ``resources`` with a ``next`` link when ``next_url`` is given."""
    value = bundle(*resources)
    value["link"] = [{"relation": "self", "url": "https://ehr.example.org/fhir/X?page=1"}]
    if next_url is not None:
        value["link"].append({"relation": "next", "url": next_url})
    return value


def test_a_bundle_with_a_next_link_is_an_answer_that_keeps_its_link() -> None:
    """The first page satisfies the key; its next link is kept for the fetcher to continue."""
    page_two = "https://ehr.example.org/fhir/ServiceRequest?_getpages=abc&_offset=100"
    order = lab_order("ntprobnp", "sr-1")
    decoded = decode_prefetch(
        {"patient": patient(), "orders": paged([order], page_two), "labs": paged([OBSERVATION], None)},
        QUERIES,
    )
    assert decoded.resources == {"patient": [patient()], "orders": [order], "labs": [OBSERVATION]}
    assert decoded.next_pages == decoded.resources.next_pages == {"orders": page_two}
    assert "orders" not in decoded.missing


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (paged([OBSERVATION], "  "), "a blank next link"),
        ({**paged([OBSERVATION], None), "link": [{"relation": "next"}]}, "a next link without url"),
        ({**paged([OBSERVATION], None), "link": {"relation": "next", "url": "x"}}, "link not a list"),
        ({**paged([ERROR], "https://ehr.example.org/fhir/Observation?page=2")}, "an error outcome"),
        (None, "null"),
    ],
)
def test_no_next_page_is_kept_for_unusable_links_or_values(value: Any, why: str) -> None:
    decoded = decode_prefetch({"labs": value}, QUERIES)
    assert decoded.next_pages == {}, why


def test_the_patient_read_never_pages() -> None:
    """A Patient read answered as a Bundle with a next link: the read is complete, nothing to follow."""
    decoded = decode_prefetch(
        {"patient": paged([patient()], "https://ehr.example.org/fhir/Patient?p=2")}, QUERIES
    )
    assert decoded.resources == {"patient": [patient()]} and decoded.next_pages == {}
