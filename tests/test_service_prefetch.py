"""Prefetch templates and the prefetch-state table (cdshooks.md §4, HAPI auto-prefetch rules)."""

from __future__ import annotations

from typing import Any

import pytest

from cds_service.fhir_client import build_queries as client_queries
from cds_service.prefetch import (
    MAX_TEMPLATE_CHARS,
    PrefetchQuery,
    assemble,
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


def test_templates_mirror_the_fhir_client_queries() -> None:
    """§4 "Prefetched data MUST be equivalent to what our own call would return": same resources and codes."""
    from datetime import UTC, datetime

    def codes_by_type(queries: Any) -> dict[str, set[str]]:
        """Codes asked for, per resource type, systems dropped."""
        out: dict[str, set[str]] = {}
        for query in queries:
            params = dict(query.params)
            tokens = params.get("code") or params.get("type") or ""
            out.setdefault(query.resource_type, set()).update(
                t.split("|")[-1] for t in tokens.split(",") if t
            )
        return out

    ours = codes_by_type(q for q in QUERIES if not q.read)
    theirs = codes_by_type(client_queries(MAPPINGS, "p", datetime.now(UTC)))
    assert ours == theirs


def test_templates_bind_the_patient_id_as_a_parameter_value() -> None:
    """Fallback queries substitute context.patientId into parameter values (URL-encoded by httpx)."""
    vitals = next(q for q in QUERIES if q.key == "vitals")
    assert ("subject", "Patient/a.b-1") in vitals.bind("a.b-1")
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
