"""Patient binding: ``context.patientId`` decides whose data a hook call may use.

:func:`cds_service.features.bind_to_patient` (``PatientData.bound_to``) and the ECG selection drop
every resource that names another patient, also when the Patient resource is ``null``; the
warning counts what was dropped by type and never names an id.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from cds_service.ecg.select import names_other_patient
from cds_service.features import NoEcgError, PatientData, bind_to_patient, extract_model_inputs
from fhir_mappings import load_mappings
from model_training.seed_fhir import Carrier, Recording, ecg_resources

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
PID = "p1"
OTHER = "p2-other"
NAMES = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")


@pytest.fixture(scope="module")
def mappings() -> Any:
    return load_mappings()


def _ecg(mappings: Any, pid: str, rid: str, minutes_ago: int = 10) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    t = np.arange(5000) / 500.0
    digital = np.rint(np.sin(2 * np.pi * 1.1 * t)[:, None] * rng.uniform(200, 900, 12)).astype(np.int16)
    [resource] = ecg_resources(
        Carrier("observation", "sampled"),
        Recording(digital, 1.0, 500.0, NAMES, "rec"),
        None,
        pid,
        NOW - timedelta(minutes=minutes_ago),
        mappings,
    )
    resource["id"] = rid
    return resource


def _heart_rate(pid: str, value: float, rid: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": (NOW - timedelta(minutes=12)).isoformat(),
        "valueQuantity": {
            "value": value,
            "unit": "/min",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


@pytest.mark.parametrize(
    ("subject", "other"),
    [
        ({"reference": "Patient/p1"}, False),
        ({"reference": "Patient/p1/_history/3"}, False),
        ({"reference": "https://ehr.example.org/fhir/R4/Patient/p1"}, False),
        ({"reference": "https://ehr.example.org/fhir/Patient/p1/_history/2"}, False),
        ({"identifier": {"system": "urn:mrn", "value": "123"}}, False),
        (None, False),
        ({"reference": "Patient/p10"}, True),
        ({"reference": "Patient/P1"}, True),
        ({"reference": "patient/p1"}, True),
        ({"reference": "https://ehr.example.org/fhir/Patient/p2"}, True),
        ({"reference": "urn:uuid:0d3a8e2e-7c1b-4f7e-9c51-1d0f0f0f0f0f"}, True),
        ({"reference": "#p1"}, True),
        ({"reference": "Group/p1"}, True),
        ({"reference": "Patient/p1?x=1"}, True),
        ({"reference": "Patient/p1 "}, False),
        ({"reference": 17}, True),
        ("Patient/p1", True),
    ],
)
def test_subject_reference_forms(subject: Any, other: bool) -> None:
    """Relative, versioned and absolute references to Patient/p1 bind; anything else names someone else."""
    resource: dict[str, Any] = {"resourceType": "Observation"}
    if subject is not None:
        resource["subject"] = subject
    assert names_other_patient(resource, PID) is other


def test_patient_field_is_read_when_there_is_no_subject() -> None:
    """Resources that name their patient in ``patient`` (not ``subject``) are bound the same way."""
    assert names_other_patient({"patient": {"reference": "Patient/p1"}}, PID) is False
    assert names_other_patient({"patient": {"reference": "Patient/x"}}, PID) is True


def test_bound_data_holds_only_the_context_patients_resources(
    mappings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Another patient's Patient, ECG, vitals, lab results and orders are dropped; counted, never named."""
    order = {
        "resourceType": "ServiceRequest",
        "id": "sr-secret-9",
        "subject": {"reference": f"Patient/{OTHER}"},
    }
    data = PatientData(
        patient={"resourceType": "Patient", "id": OTHER},
        observations=[_heart_rate(PID, 70, "hr-1"), _heart_rate(OTHER, 140, "hr-secret-2")],
        ecgs=[_ecg(mappings, PID, "ecg-1"), _ecg(mappings, OTHER, "ecg-secret-3")],
        lab_results=[{**_heart_rate(OTHER, 5, "lab-secret-4"), "id": "lab-secret-4"}],
        service_requests=[order],
    )
    with caplog.at_level(logging.WARNING, logger="cds_service"):
        bound = data.bound_to(PID)
    assert bound.patient is None and bound.patient_id == PID
    assert [r["id"] for r in bound.observations] == ["hr-1"]
    assert [r["id"] for r in bound.ecgs] == ["ecg-1"]
    assert bound.lab_results == [] and bound.service_requests == []
    assert "ignored 5 resource(s)" in caplog.text
    assert "secret" not in caplog.text and OTHER not in caplog.text
    assert data.observations[1]["id"] == "hr-secret-2", "the original is not changed"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cds_service"):
        again = bind_to_patient(bound, PID)
    assert again == bound and "ignored" not in caplog.text


def test_context_patient_binds_even_when_the_patient_resource_is_null(mappings: Any) -> None:
    """patient = null: another patient's ECG and vitals are still ignored (no Patient to compare with)."""
    theirs = PatientData(
        patient=None, observations=[_heart_rate(OTHER, 140, "hr")], ecgs=[_ecg(mappings, OTHER, "ecg")]
    )
    with pytest.raises(NoEcgError):
        extract_model_inputs(theirs.bound_to(PID), mappings=mappings, now=NOW)
    mixed = PatientData(
        patient=None,
        observations=[_heart_rate(OTHER, 140, "hr")],
        ecgs=[_ecg(mappings, OTHER, "newer", minutes_ago=5), _ecg(mappings, PID, "mine", minutes_ago=30)],
        patient_id=PID,
    )
    inputs = extract_model_inputs(mixed, mappings=mappings, now=NOW)
    assert inputs.ecg.reference == "Observation/mine"
    assert inputs.metadata["heart_rate"] is None


def test_a_patient_resource_of_another_patient_gives_no_demographics(mappings: Any) -> None:
    """A Patient whose id is not the context id contributes nothing (sex and age stay missing)."""
    data = PatientData(
        patient={"resourceType": "Patient", "id": OTHER, "gender": "male", "birthDate": "1960-01-01"},
        ecgs=[_ecg(mappings, PID, "ecg")],
        patient_id=PID,
    )
    inputs = extract_model_inputs(data, mappings=mappings, now=NOW)
    assert inputs.metadata["sex"] is None and inputs.metadata["age"] is None
    own = PatientData(
        patient={"resourceType": "Patient", "id": PID, "gender": "male", "birthDate": "1960-01-01"},
        ecgs=[_ecg(mappings, PID, "ecg")],
        patient_id=PID,
    )
    assert extract_model_inputs(own, mappings=mappings, now=NOW).metadata["sex"] == 1.0


def test_gathered_data_is_bound_to_the_context_patient(mappings: Any) -> None:
    """gather_patient_data returns data bound to ``patientId``: another patient's prefetched ECG is gone."""
    from cds_service.fetch import gather_patient_data
    from cds_service.prefetch import build_queries

    queries = build_queries(mappings)
    prefetched = {query.key: [] for query in queries}
    prefetched["ecgObservations"] = [_ecg(mappings, OTHER, "theirs"), _ecg(mappings, PID, "mine", 20)]
    data = gather_patient_data(queries, PID, now=NOW, prefetched=prefetched)
    assert data.patient_id == PID
    assert [ecg["id"] for ecg in data.ecgs] == ["mine"]


def test_a_hook_call_with_a_null_patient_and_another_patients_ecg_gets_no_card(make_app: Any) -> None:
    """HTTP: prefetch ``patient: null`` and only another patient's recent ECG → 200, no cards, model not run."""
    from tests.service_fixtures import clinical_record, hook_request, positive_runtime, prefetch_from

    runtime = positive_runtime()
    client = make_app(runtime=runtime, auth=False, issuers="").test_client()
    prefetch = prefetch_from(clinical_record(pid=OTHER))
    prefetch["patient"] = None
    body = hook_request("patient-view", prefetch=prefetch, pid=PID)
    response = client.post("/cds-services/ecglab-patient-view", json=body)
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"cards": []}
    assert runtime.seen == []
    own = prefetch_from(clinical_record(pid=PID))
    own["patient"] = None
    response = client.post(
        "/cds-services/ecglab-patient-view", json=hook_request("patient-view", prefetch=own, pid=PID)
    )
    assert response.get_json()["cards"], "the patient's own ECG still gives cards"
