"""Card text: ids and references from the EHR never inject Markdown or HTML (issue 14, "Card text").

Hook calls go through ``POST /cds-services/{id}`` with a prefetch whose ECG and vital-sign
Observations carry hostile ids (Markdown links, HTML, newlines with headings, 300 characters, …):
the card's Markdown ``detail`` and its draft ``ServiceRequest`` must omit every such reference —
never echo it, escaped or not — while the rest of the card stands, and well-formed ids keep
showing. Context ids the request parser already drops (``encounterId``, ``userId``) are checked
through HTTP too, and once more against :func:`cds_service.cards.build_cards` directly, since the
card builder must not rely on its caller for this.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from flask import Flask

from cds_service.cards import CardContext, ModelFacts, build_cards, safe_reference
from cds_service.features import EcgRecord, ModelInputs, PatientData
from cds_service.settings import Settings
from fhir_mappings import load_mappings
from tests.service_fixtures import (
    FakeRuntime,
    assert_schema_valid,
    clinical_record,
    hook_request,
    prediction,
    prefetch_from,
    vital,
)

DEV = {"auth": False, "issuers": ""}
ORDER_SELECT = "/cds-services/ecglab-order-select"

#: Ids an EHR (or whoever controls its data) might put on a resource, each shown here by a marker
#: that must never reach a card.
HOSTILE_IDS: dict[str, str] = {
    "markdown link": "[click here](https://evil.example.com/phish)",
    "markdown image": "![x](https://evil.example.com/t.gif)",
    "html": "<img src=x onerror=alert(1)>",
    "script": "<script>alert('ecg')</script>",
    "newlines and heading": "ecg-1\n\n# Order potassium STAT\n- [ok](javascript:alert(1))",
    "emphasis": "**urgent**_now_",
    "table pipe": "a|b|c",
    "backticks": "`code`",
    "300 characters": "e" * 300,
    "only dots": "..",
    "slash inside": "ecg/../../Patient/other",
    "space": "ecg 1",
    "right-to-left mark": "ecg\u202e1",
}


def hostile_record(ecg_id: str, vital_id: str) -> dict[str, list[dict[str, Any]]]:
    """The standard record with a height (so BMI is computed) and the ECG and weight ids replaced."""
    record = clinical_record()
    taken = datetime.now(UTC) - timedelta(minutes=10)
    record["vitals"].append(vital("8302-2", 170, "cm", taken - timedelta(days=2), "ht-1"))
    record["ecgObservations"][0]["id"] = ecg_id
    for resource in record["vitals"]:
        if resource["id"] == "wt-1":
            resource["id"] = vital_id
    return record


def card_of(app: Flask, body: dict[str, Any]) -> dict[str, Any]:
    """POST an order-select call and return its one card (schema-checked)."""
    response = app.test_client().post(ORDER_SELECT, json=body)
    assert response.status_code == 200, response.get_json()
    payload = response.get_json()
    assert_schema_valid("serviceResponse", payload)
    [card] = payload["cards"]
    return dict(card)


def order_of(card: dict[str, Any]) -> dict[str, Any]:
    """The draft ServiceRequest of a card's suggestion."""
    return dict(card["suggestions"][0]["actions"][0]["resource"])


@pytest.fixture
def app(make_app: Any) -> Flask:
    """Auth off, a model that flags NT-proBNP."""
    return make_app(runtime=FakeRuntime([prediction("ntprobnp", 0.95)]), **DEV)


def test_well_formed_ids_are_shown(app: Flask) -> None:
    """Control: with ordinary ids the detail names its sources and the order links the ECG."""
    card = card_of(app, hook_request("order-select", prefetch=prefetch_from(hostile_record("ecg-1", "wt-1"))))
    assert "(Observation/ecg-1)" in card["detail"]
    assert "(computed from Observation/wt-1 and Observation/ht-1)" in card["detail"]
    assert "Body weight: 71.5 kg (Observation/wt-1)" in card["detail"]
    order = order_of(card)
    assert order["reasonReference"] == [{"reference": "Observation/ecg-1", "display": "12-lead ECG"}]
    assert order["encounter"] == {"reference": "Encounter/enc-001"}
    assert order["requester"] == {"reference": "Practitioner/prac-001"}


@pytest.mark.parametrize("case", list(HOSTILE_IDS))
def test_hostile_resource_ids_are_omitted_not_echoed(app: Flask, case: str) -> None:
    """A hostile ECG or weight id: the card stands, but no reference to it appears anywhere in it."""
    hostile = HOSTILE_IDS[case]
    card = card_of(
        app, hook_request("order-select", prefetch=prefetch_from(hostile_record(hostile, hostile)))
    )
    detail, text = card["detail"], json.dumps(card, ensure_ascii=False)
    assert hostile not in text and "evil.example.com" not in text
    assert "onerror" not in text and "<script" not in text and "Order potassium" not in text
    ecg_line = next(line for line in detail.splitlines() if "12-lead ECG recorded" in line)
    assert ecg_line.endswith("UTC"), "the ECG line keeps its date and drops the reference"
    assert "- Body weight: 71.5 kg\n" in detail, "the value stays, its source is left out"
    assert "- Body mass index: 24.7 kg/m²\n" in detail, "a computed value naming a hostile source drops it"
    assert "(Observation/ht-1)" in detail, "well-formed neighbours still show"
    assert "reasonReference" not in order_of(card)


def test_an_epic_length_id_is_kept(app: Flask) -> None:
    """Ids longer than FHIR's 64 characters (Epic) but within the service's 256 still show."""
    long_id = "e" + "1" * 120
    card = card_of(app, hook_request("order-select", prefetch=prefetch_from(hostile_record(long_id, "wt-1"))))
    assert f"(Observation/{long_id})" in card["detail"]
    assert order_of(card)["reasonReference"][0]["reference"] == f"Observation/{long_id}"


@pytest.mark.parametrize("case", ["markdown link", "newlines and heading", "300 characters", "html"])
def test_hostile_context_ids_never_reach_the_order(app: Flask, case: str) -> None:
    """``encounterId`` and ``userId`` with hostile text: no encounter, no requester, nothing echoed."""
    hostile = HOSTILE_IDS[case]
    body = hook_request(
        "order-select",
        prefetch=prefetch_from(hostile_record("ecg-1", "wt-1")),
        encounter_id=hostile,
        user_id=f"Practitioner/{hostile}",
    )
    card = card_of(app, body)
    order = order_of(card)
    assert "encounter" not in order and "requester" not in order
    assert hostile not in json.dumps(card, ensure_ascii=False)


# -- the card builder on its own ---------------------------------------------------------------------------------

MAPPINGS = load_mappings()
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def built(ctx_ids: dict[str, Any], ecg_reference: str, sources: dict[str, str]) -> dict[str, Any]:
    """One card from build_cards with the given context ids, ECG reference and input sources."""
    ecg = EcgRecord(
        signal=np.zeros((1000, 12), dtype=np.float32),
        fs=100.0,
        lead_names=tuple(MAPPINGS.ecg.lead_order),
        recorded_at=NOW - timedelta(minutes=20),
        reference=ecg_reference,
        carrier="observation",
    )
    metadata: dict[str, float | None] = {f.key: None for f in MAPPINGS.features}
    metadata.update({"heart_rate": 112.0, "sex": 1.0})
    ctx = CardContext(
        service_id="ecglab-order-select",
        hook_instance="hi-1",
        patient_id=ctx_ids.get("patient", "pat-1"),
        encounter_id=ctx_ids.get("encounter"),
        user_ref=ctx_ids.get("user"),
        draft_orders=[],
        now=NOW,
    )
    [card] = build_cards(
        [prediction("ntprobnp", 0.95)],
        inputs=ModelInputs(ecg=ecg, metadata=metadata, sources=sources),
        data=PatientData(patient=None),
        ctx=ctx,
        mappings=MAPPINGS,
        settings=Settings.from_mapping({"auth": False}),
        model=ModelFacts("ecglab", "1.2.3", False),
    )
    return card.card


@pytest.mark.parametrize("case", list(HOSTILE_IDS))
def test_build_cards_omits_every_hostile_id_itself(case: str) -> None:
    """Defence in depth: patient, encounter, user, ECG and source ids checked by the builder, not only the parser."""
    hostile = HOSTILE_IDS[case]
    card = built(
        {"patient": hostile, "encounter": hostile, "user": f"Practitioner/{hostile}"},
        f"Observation/{hostile}",
        {"heart_rate": f"Observation/{hostile}", "sex": f"Patient/{hostile}"},
    )
    assert hostile not in json.dumps(card, ensure_ascii=False)
    order = order_of(card)
    assert not {"subject", "encounter", "requester", "reasonReference"} & set(order)
    assert "- Heart rate: 112.0 /min\n" in card["detail"]
    assert "- Sex: male (Patient record)" in card["detail"], "a Patient source is named without its id"


def test_build_cards_keeps_well_formed_ids() -> None:
    """Control for the test above: the same slots with ordinary ids are all filled."""
    card = built(
        {"patient": "pat-1", "encounter": "enc-1", "user": "PractitionerRole/r-1"},
        "Media/ecg-77",
        {"heart_rate": "Observation/hr-9"},
    )
    order = order_of(card)
    assert order["subject"] == {"reference": "Patient/pat-1"}
    assert order["encounter"] == {"reference": "Encounter/enc-1"}
    assert order["requester"] == {"reference": "PractitionerRole/r-1"}
    assert order["reasonReference"][0]["reference"] == "Media/ecg-77"
    assert "(Media/ecg-77)" in card["detail"] and "(Observation/hr-9)" in card["detail"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Observation/ecg-1", True),
        ("DocumentReference/a.b-c", True),
        ("observation/ecg-1", False),
        ("Observation/", False),
        ("Observation", False),
        ("Obs ervation/x", False),
        ("Observation/a/b", False),
        ("https://fhir.example.org/Observation/1", False),
        ("?/ecg-1", False),
        (None, False),
        (42, False),
    ],
)
def test_reference_shapes(value: Any, expected: bool) -> None:
    """Only relative ``Type/id`` references with a FHIR type name and a FHIR id are shown."""
    assert (safe_reference(value) is not None) is expected
