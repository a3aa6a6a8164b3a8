"""Predictions → lab-recommendation cards (cdshooks.md §0.6 and §5; brief "Cards").

These call :func:`cds_service.cards.build_cards` directly with hand-made predictions and inputs,
so each rule is pinned without the HTTP layer; every card is also validated against the schema's
``serviceResponse`` definition.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from cds_service.cards import CardContext, ModelFacts, build_cards, pick_indicator, summary_text, topic_code
from cds_service.features import EcgRecord, ModelInputs, PatientData
from cds_service.settings import Settings, parse_indicator_map
from fhir_mappings import load_mappings
from tests.service_fixtures import PATIENT_ID, assert_schema_valid, lab_order, lab_result, prediction

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MAPPINGS = load_mappings()


def inputs() -> ModelInputs:
    """ModelInputs with an ECG from Media/ecg-77, sex, age and heart rate present, the rest missing."""
    ecg = EcgRecord(
        signal=np.zeros((1000, 12), dtype=np.float32),
        fs=100.0,
        lead_names=tuple(MAPPINGS.ecg.lead_order),
        recorded_at=NOW - timedelta(minutes=20),
        reference="Media/ecg-77",
        carrier="media",
    )
    metadata: dict[str, float | None] = {f.key: None for f in MAPPINGS.features}
    metadata.update({"sex": 1.0, "age": 67.4, "heart_rate": 112.0})
    sources = {
        "sex": f"Patient/{PATIENT_ID}",
        "age": f"Patient/{PATIENT_ID}",
        "heart_rate": "Observation/hr-9",
    }
    return ModelInputs(ecg=ecg, metadata=metadata, sources=sources)


def context(
    *, drafts: list[dict[str, Any]] | None = None, user: str | None = "Practitioner/p-1"
) -> CardContext:
    """A CardContext for an order-select call by a practitioner, with optional draft orders."""
    return CardContext(
        service_id="ecglab-order-select",
        hook_instance="hi-1",
        patient_id=PATIENT_ID,
        encounter_id="enc-5",
        user_ref=user,
        draft_orders=drafts or [],
        now=NOW,
    )


def cards_for(
    predictions: list[Any],
    *,
    data: PatientData | None = None,
    ctx: CardContext | None = None,
    synthetic: bool = False,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Build the cards for ``predictions`` and validate them against the schema."""
    built = build_cards(
        predictions,
        inputs=inputs(),
        data=data or PatientData(patient=None),
        ctx=ctx or context(),
        mappings=MAPPINGS,
        settings=Settings.from_mapping({"auth": False, **settings}),
        model=ModelFacts("ecglab", "1.2.3", synthetic),
    )
    cards = [b.card for b in built]
    assert_schema_valid("serviceResponse", {"cards": cards})
    return cards


def test_one_card_per_lab_merges_estimate_and_forecasts() -> None:
    """Brief: the estimate and the 30/60/120 min forecasts of one lab make one card."""
    [card] = cards_for(
        [
            prediction("ntprobnp", 0.8, task="est"),
            prediction("ntprobnp", 0.7, task="mon30"),
            prediction("ntprobnp", 0.9, task="mon120"),
        ]
    )
    assert card["extension"]["org.ecglab.prediction"]["horizons"] == [0, 30, 120]
    assert card["detail"].count("| high") == 3


def test_no_card_below_the_decision_threshold() -> None:
    """Brief: a card only where the probability passes the manifest's decision threshold."""
    cards = cards_for(
        [prediction("ntprobnp", 0.49, threshold=0.5), prediction("sodium", 0.1, threshold=0.05)]
    )
    assert [c["source"]["topic"]["code"] for c in cards] == ["ECGLABSODIUM"]
    assert cards_for([prediction("ntprobnp", 0.5, threshold=0.5)]) != []  # "passes" includes equality


@pytest.mark.parametrize(
    ("task", "phrase"),
    [
        ("est", "likely abnormally high now"),
        ("mon30", "within 30 min"),
        ("mon60", "within 60 min"),
        ("mon120", "within 120 min"),
    ],
)
def test_summary_names_the_test_and_when(task: str, phrase: str) -> None:
    """§5: summary < 140 chars naming the test and whether it is abnormal now or within 30/60/120 min."""
    [card] = cards_for([prediction("hemoglobin", 0.9, task=task)])
    assert card["summary"].startswith("Consider Hemoglobin")
    assert phrase in card["summary"]
    assert len(card["summary"]) < 140


def test_summary_shortens_long_test_names_to_fit() -> None:
    """§5 "Emit ≤ 139 characters" even for a very long display name."""
    text = summary_text("X" * 300, prediction("ntprobnp", 0.9, task="mon120"), synthetic=True)
    assert len(text) <= 139
    assert text.startswith("[DEMO] Consider XXX") and text.endswith("within 120 min (ECG model)")


def test_indicator_follows_the_severity_and_probability_map() -> None:
    """Brief: indicator by probability and lab severity, configurable (first matching rule wins)."""
    default = Settings.from_mapping({"auth": False}).indicator_map
    assert pick_indicator(default, "critical", 0.85) == "warning"
    assert pick_indicator(default, "critical", 0.6) == "info"
    assert pick_indicator(default, "info", 0.99) == "info"
    custom = parse_indicator_map("critical>=0.9:critical;*>=0.5:warning;*>=0:info")
    assert pick_indicator(custom, "critical", 0.95) == "critical"
    assert pick_indicator(custom, "info", 0.6) == "warning"
    [card] = cards_for([prediction("potassium", 0.95)], indicator_map="critical>=0.9:critical;*>=0:info")
    assert card["indicator"] == "critical"


def test_topic_code_is_static_and_alphanumeric() -> None:
    """§0.6 (Epic): source.topic.code is alphanumeric, ≤ 100 chars and the same for every card of a lab."""
    first = cards_for([prediction("troponin_t", 0.9)])[0]["source"]["topic"]
    second = cards_for([prediction("troponin_t", 0.6, task="mon60")])[0]["source"]["topic"]
    assert first == second
    assert first["code"] == "ECGLABTROPONINT"
    for lab in MAPPINGS.labs:
        assert re.fullmatch(r"[A-Za-z0-9]{1,100}", topic_code(lab.key))
    assert len({topic_code(lab.key) for lab in MAPPINGS.labs}) == len(MAPPINGS.labs)


def test_cards_and_suggestions_carry_unique_uuids_and_any_selection() -> None:
    """§0.6: uuid on cards and suggestions (feedback needs them) and selectionBehavior "any"."""
    cards = cards_for([prediction("ntprobnp", 0.9), prediction("hemoglobin", 0.9)])
    uuids = [c["uuid"] for c in cards] + [s["uuid"] for c in cards for s in c["suggestions"]]
    assert len(set(uuids)) == 4
    assert {c["selectionBehavior"] for c in cards} == {"any"}
    assert all(o["display"] for c in cards for o in c["overrideReasons"])


def test_suggestion_creates_one_draft_service_request() -> None:
    """§5: one create action with a draft ServiceRequest: LOINC order code, subject, encounter, ECG as reason."""
    [card] = cards_for([prediction("ntprobnp", 0.9)], order_intent="order")
    [suggestion] = card["suggestions"]
    [action] = suggestion["actions"]
    order = action["resource"]
    assert action["type"] == "create"
    assert (order["resourceType"], order["status"], order["intent"]) == ("ServiceRequest", "draft", "order")
    assert order["code"]["coding"] == [
        {
            "system": "http://loinc.org",
            "code": "33762-6",
            "display": MAPPINGS.lab("ntprobnp").order_code.display,
        }
    ]
    assert order["subject"] == {"reference": f"Patient/{PATIENT_ID}"}
    assert order["encounter"] == {"reference": "Encounter/enc-5"}
    assert order["reasonReference"][0]["reference"] == "Media/ecg-77"
    assert order["requester"] == {"reference": "Practitioner/p-1"}


def test_requester_only_for_practitioner_users() -> None:
    """The draft order names the user as requester only when the user is a Practitioner(Role)."""
    [card] = cards_for([prediction("ntprobnp", 0.9)], ctx=context(user="Patient/p-9"))
    assert "requester" not in card["suggestions"][0]["actions"][0]["resource"]


def test_detail_explains_probability_threshold_inputs_and_model() -> None:
    """Brief: detail gives probability, threshold, horizon, the inputs with their sources, and the model version."""
    [card] = cards_for([prediction("ntprobnp", 0.83, threshold=0.41, task="mon60")])
    detail = card["detail"]
    assert "0.83" in detail and "0.41" in detail and "within 60 min" in detail
    assert "Heart rate: 112.0 /min (Observation/hr-9)" in detail
    assert "Age: 67 years (Patient record)" in detail
    assert "Body temperature: missing" in detail
    assert "Media/ecg-77" in detail and "ecglab 1.2.3" in detail
    assert "not for clinical use" not in detail


def test_synthetic_model_cards_say_demo_not_for_clinical_use() -> None:
    """Brief: when the manifest says synthetic, the card plainly warns it is a demo model."""
    [card] = cards_for([prediction("ntprobnp", 0.9)], synthetic=True)
    assert card["detail"].startswith("**Demo model — not for clinical use.**")
    assert card["summary"].startswith("[DEMO]")


def test_no_card_for_a_test_among_the_draft_orders() -> None:
    """§3 handling note: read every draft ServiceRequest; a test already pending gets no card."""
    drafts = [lab_order("ntprobnp", "draft-1", status="draft")]
    cards = cards_for(
        [prediction("ntprobnp", 0.9), prediction("hemoglobin", 0.9)], ctx=context(drafts=drafts)
    )
    assert [c["source"]["topic"]["code"] for c in cards] == ["ECGLABHEMOGLOBIN"]


def test_no_card_for_a_test_already_ordered() -> None:
    """Brief: an active ServiceRequest with the lab's order code or a result code suppresses the card."""
    data = PatientData(patient=None, service_requests=[lab_order("potassium", "sr-1", status="active")])
    assert cards_for([prediction("potassium", 0.9)], data=data) == []
    completed = PatientData(
        patient=None, service_requests=[lab_order("potassium", "sr-2", status="completed")]
    )
    assert len(cards_for([prediction("potassium", 0.9)], data=completed)) == 1


def test_no_card_for_a_test_resulted_within_the_recent_window() -> None:
    """Brief: a result within ECGLAB_RECENT_RESULT_MIN suppresses the card; older results do not."""
    recent = PatientData(
        patient=None, lab_results=[lab_result("sodium", NOW - timedelta(minutes=90), "na-1")]
    )
    old = PatientData(patient=None, lab_results=[lab_result("sodium", NOW - timedelta(hours=30), "na-2")])
    entered_in_error = PatientData(
        patient=None,
        lab_results=[lab_result("sodium", NOW - timedelta(minutes=5), "na-3", status="entered-in-error")],
    )
    assert cards_for([prediction("sodium", 0.9)], data=recent) == []
    assert len(cards_for([prediction("sodium", 0.9)], data=old)) == 1
    assert len(cards_for([prediction("sodium", 0.9)], data=entered_in_error)) == 1
    assert len(cards_for([prediction("sodium", 0.9)], data=recent, recent_result_min=60)) == 1


def test_most_urgent_cards_first_up_to_the_maximum() -> None:
    """Brief: at most ECGLAB_MAX_CARDS cards, the most urgent first (soonest horizon, then severity)."""
    predictions = [
        prediction("ck", 0.99, task="mon120"),  # info, latest
        prediction("tsh", 0.95, task="est"),  # info, now
        prediction("potassium", 0.7, task="est"),  # critical, now
        prediction("hemoglobin", 0.9, task="mon30"),  # warning, 30 min
    ]
    codes = [c["source"]["topic"]["code"] for c in cards_for(predictions, max_cards=3)]
    assert codes == ["ECGLABPOTASSIUM", "ECGLABTSH", "ECGLABHEMOGLOBIN"]


def test_targets_without_demonstrated_auroc_give_no_card() -> None:
    """Only targets whose test AUROC CI lower bound exceeds ECGLAB_MIN_AUROC (0.70) are recommended."""
    from dataclasses import replace

    weak = replace(prediction("potassium", 0.9, threshold=0.5), auroc=0.62, auroc_ci_low=0.55)
    strong = replace(prediction("ntprobnp", 0.9, threshold=0.5), auroc=0.93, auroc_ci_low=0.88)
    unknown = prediction("hemoglobin", 0.9, threshold=0.5)  # no CI in the manifest: trusted
    cards = cards_for([weak, strong, unknown])
    labs = {c["extension"]["org.ecglab.prediction"]["labKey"] for c in cards}
    assert labs == {"ntprobnp", "hemoglobin"}
    assert len(cards_for([weak], min_auroc=0.0)) == 1  # 0 turns the filter off
    assert cards_for([weak], min_auroc=0.5)  # 0.55 > 0.5
