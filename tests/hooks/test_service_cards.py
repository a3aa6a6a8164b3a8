"""Predictions → lab-recommendation cards (cdshooks.md §0.6 and §5; brief "Cards").

These call :func:`cds_service.cards.build_cards` directly with hand-made predictions and inputs,
so each rule is pinned without the HTTP layer; every card is also validated against the schema's
``serviceResponse`` definition. The rules of issue 15 ("what a card claims must be true") are pinned
here too: claims anchored to the ECG's time and stated only while their window is open, in clock
time with the ECG's age; forecasts never worded as "turning" abnormal; "calibrated" and the test
fold's AUROC stated only as the manifest backs them; the card gate on the validation fold's CI.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest

from cds_service import cards as cards_module
from cds_service.cards import (
    CardContext,
    ModelFacts,
    TargetFacts,
    Timeline,
    build_cards,
    ecg_zone,
    pick_indicator,
    summary_text,
    topic_code,
    validated,
)
from cds_service.features import EcgRecord, ModelInputs, PatientData
from cds_service.settings import Settings, parse_indicator_map
from fhir_mappings import load_mappings
from fhir_mappings.manifest import LabelSpec
from fhir_mappings.tasks import TASKS
from tests.service_fixtures import PATIENT_ID, assert_schema_valid, lab_order, lab_result, prediction

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MAPPINGS = load_mappings()


def inputs(age: timedelta = timedelta(minutes=20)) -> ModelInputs:
    """ModelInputs with an ECG from Media/ecg-77 ``age`` before NOW, sex, age and heart rate present."""
    ecg = EcgRecord(
        signal=np.zeros((1000, 12), dtype=np.float32),
        fs=100.0,
        lead_names=tuple(MAPPINGS.ecg.lead_order),
        recorded_at=NOW - age,
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
    ecg_age: timedelta = timedelta(minutes=20),
    model: ModelFacts | None = None,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Build the cards for ``predictions`` (ECG ``ecg_age`` old at NOW) and validate them against the schema."""
    built = build_cards(
        predictions,
        inputs=inputs(ecg_age),
        data=data or PatientData(patient=None),
        ctx=ctx or context(),
        mappings=MAPPINGS,
        settings=Settings.from_mapping({"auth": False, **settings}),
        model=model or ModelFacts("ecglab", "1.2.3", synthetic),
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
    ("task", "claim"),
    [
        (
            "est",
            "likely abnormally high around the time of the ECG (10:40–12:40 UTC; ECG at 11:40, 20 min ago)",
        ),
        (
            "mon30",
            "likely abnormally high at least once between 11:40 and 12:10 UTC (ECG at 11:40, 20 min ago)",
        ),
        (
            "mon60",
            "likely abnormally high at least once between 11:40 and 12:40 UTC (ECG at 11:40, 20 min ago)",
        ),
        (
            "mon120",
            "likely abnormally high at least once between 11:40 and 13:40 UTC (ECG at 11:40, 20 min ago)",
        ),
    ],
)
def test_summary_names_the_test_and_its_claim_in_clock_time(task: str, claim: str) -> None:
    """§5 and issue 15: the summary names the test and the claim's window in clock time with the ECG's age."""
    [card] = cards_for([prediction("hemoglobin", 0.9, task=task)])
    assert card["summary"] == f"Consider Hemoglobin: {claim}"
    assert len(card["summary"]) < 140


def test_summary_shortens_long_test_names_to_fit() -> None:
    """§5 "Emit ≤ 139 characters" even for a very long display name: the compact claim, the name cut."""
    timeline = Timeline(NOW - timedelta(minutes=20), NOW)
    text = summary_text("X" * 300, prediction("ntprobnp", 0.9, task="mon120"), timeline, synthetic=True)
    assert len(text) <= 139
    assert text.startswith("[DEMO] Consider XXX") and "…: " in text
    assert text.endswith("likely abnormally high at least once by 13:40 UTC (ECG 20 min ago)")


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
    """Brief: detail gives probability, threshold, claim window, the inputs with their sources, and the model version."""
    [card] = cards_for([prediction("ntprobnp", 0.83, threshold=0.41, task="mon60")])
    detail = card["detail"]
    assert "0.83" in detail and "0.41" in detail
    assert "| high (> 100 pg/mL), already or within the next 60 min | 11:40–12:40 |" in detail
    assert "- 12-lead ECG recorded 2026-03-01 11:40 UTC (Media/ecg-77)" in detail
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
    """Only targets whose AUROC CI lower bound exceeds ECGLAB_MIN_AUROC (0.70) are recommended (an old
    manifest with only the test fold's bound is gated on it)."""
    weak = replace(prediction("potassium", 0.9, threshold=0.5), auroc=0.62, auroc_ci_low=0.55)
    strong = replace(prediction("ntprobnp", 0.9, threshold=0.5), auroc=0.93, auroc_ci_low=0.88)
    unknown = prediction("hemoglobin", 0.9, threshold=0.5)  # no CI in the manifest: trusted
    cards = cards_for([weak, strong, unknown])
    labs = {c["extension"]["org.ecglab.prediction"]["labKey"] for c in cards}
    assert labs == {"ntprobnp", "hemoglobin"}
    assert len(cards_for([weak], min_auroc=0.0)) == 1  # 0 turns the filter off
    assert cards_for([weak], min_auroc=0.5)  # 0.55 > 0.5


# -- issue 15: what a card claims must be true ---------------------------------------------------------

EXT = "org.ecglab.prediction"


def every_claim(lab_key: str = "potassium", direction: str = "high") -> list[Any]:
    """The lab's estimate and its three forecasts, every one above its decision threshold."""
    return [prediction(lab_key, 0.9, task=task, direction=direction) for task in TASKS]


def test_a_5_hour_old_ecg_gives_no_card() -> None:
    """Every claim of a 5-hour-old ECG is about the past (the longest window ends 120 min after it)."""
    assert cards_for(every_claim(), ecg_age=timedelta(hours=5)) == []


def test_an_ecg_100_min_old_gives_only_the_mon120_claim() -> None:
    """100 min after the ECG only the 120-min forecast's window is open: the card states that claim alone."""
    [card] = cards_for(every_claim(), ecg_age=timedelta(minutes=100))
    assert card["extension"][EXT]["horizons"] == [120]
    assert card["extension"][EXT]["claimWindow"] == {
        "start": "2026-03-01T10:20:00Z",
        "end": "2026-03-01T12:20:00Z",
    }
    assert card["summary"] == (
        "Consider Potassium: likely abnormally high at least once between 10:20 and 12:20 UTC "
        "(ECG at 10:20, 100 min ago)"
    )
    detail = card["detail"]
    assert "already or within the next 120 min | 10:20–12:20 |" in detail
    assert "around the ECG |" not in detail and "next 30 min" not in detail and "next 60 min" not in detail


@pytest.mark.parametrize(
    ("age_min", "open_horizons"),
    [
        (0, [0, 30, 60, 120]),
        (30, [0, 30, 60, 120]),
        (31, [0, 60, 120]),
        (60, [0, 60, 120]),
        (61, [120]),
        (120, [120]),
    ],
)
def test_a_claim_is_stated_only_while_its_window_is_open(age_min: int, open_horizons: list[int]) -> None:
    """Windows are inclusive (est: ECG ± 60 min; monN: ECG to ECG + N min); the lead is the most urgent open one."""
    [card] = cards_for(every_claim(), ecg_age=timedelta(minutes=age_min))
    assert card["extension"][EXT]["horizons"] == open_horizons
    lead_is_estimate = open_horizons[0] == 0
    assert ("around the time of the ECG" in card["summary"]) == lead_is_estimate
    assert cards_for(every_claim(), ecg_age=timedelta(minutes=121)) == []


def test_the_window_text_uses_clock_times_and_the_ecg_age() -> None:
    """Clock time on the ECG's own offset (else UTC, said so), the day when not today, and the ECG's age."""
    media = {"resourceType": "Media", "id": "ecg-77", "createdDateTime": "2026-03-01T13:40:00+02:00"}
    data = PatientData(patient=None, ecgs=[media])
    [card] = cards_for([prediction("hemoglobin", 0.9, task="mon120")], data=data)
    assert card["summary"] == (
        "Consider Hemoglobin: likely abnormally high at least once between 13:40 and 15:40 (ECG at 13:40, 20 min ago)"
    )
    assert "- 12-lead ECG recorded 2026-03-01 13:40 (UTC+02:00) (Media/ecg-77)" in card["detail"]

    late = Timeline(datetime(2026, 2, 28, 23, 50, tzinfo=UTC), datetime(2026, 3, 1, 0, 30, tzinfo=UTC))
    estimate = summary_text(
        "Sodium", prediction("sodium", 0.9, task="est", direction="low"), late, synthetic=False
    )
    assert estimate == (
        "Consider Sodium: likely abnormally low around the time of the ECG "
        "(28 Feb 22:50–00:50 UTC; ECG at 28 Feb 23:50, 40 min ago)"
    )
    forecast = summary_text("Sodium", prediction("sodium", 0.9, task="mon120"), late, synthetic=False)
    assert "at least once between 28 Feb 23:50 and 01:50 UTC (ECG at 28 Feb 23:50, 40 min ago)" in forecast
    skewed = Timeline(NOW + timedelta(minutes=2), NOW)  # an ECG stamped ahead of our clock
    assert summary_text("Sodium", prediction("sodium", 0.9, task="mon30"), skewed, synthetic=False).endswith(
        "(ECG at 12:02, just now)"
    )


def test_the_ecg_clock_is_the_offset_its_fhir_time_was_written_in() -> None:
    """The zone is read back from the very time string the ECG was dated by; no offset or no match → UTC."""
    at = datetime(2026, 3, 1, 11, 40, tzinfo=UTC)
    media = {"resourceType": "Media", "id": "ecg-77", "createdDateTime": "2026-03-01T13:40:00+02:00"}
    assert ecg_zone([media], "Media/ecg-77", at).utcoffset(None) == timedelta(hours=2)
    observation = {
        "resourceType": "Observation",
        "id": "o",
        "effectivePeriod": {"start": "2026-03-01T06:40:00-05:00"},
    }
    assert ecg_zone([observation], "Observation/o", at).utcoffset(None) == timedelta(hours=-5)
    for resources, ref in (
        ([{**media, "createdDateTime": "2026-03-01T11:40:00"}], "Media/ecg-77"),  # no offset: UTC
        ([media], "Media/other"),  # another resource
        ([{**media, "createdDateTime": "2026-03-01T13:41:00+02:00"}], "Media/ecg-77"),  # another instant
    ):
        assert ecg_zone(resources, ref, at).utcoffset(None) == timedelta(0)


TIMELINES = {
    "today, UTC": Timeline(NOW - timedelta(minutes=20), NOW),
    "across midnight, 120 min": Timeline(
        datetime(2026, 2, 28, 23, 0, tzinfo=UTC), datetime(2026, 3, 1, 1, 0, tzinfo=UTC)
    ),
    "own offset, across midnight": Timeline(
        datetime(2026, 2, 28, 18, 5, tzinfo=UTC),
        datetime(2026, 2, 28, 19, 4, tzinfo=UTC),
        timezone(timedelta(hours=5, minutes=30)),
    ),
}


@pytest.mark.parametrize("when", list(TIMELINES))
def test_summaries_fit_140_characters_for_every_lab(when: str) -> None:
    """CDS Hooks: summary < 140 characters, for every lab of labs.yaml, every task and direction, with
    [DEMO], the day and "UTC" in the text; no name of labs.yaml needs shortening."""
    timeline = TIMELINES[when]
    assert MAPPINGS.labs
    for lab in MAPPINGS.labs:
        for task in TASKS:
            for direction in ("high", "low"):
                text = summary_text(
                    lab.display,
                    prediction(lab.key, 0.9, task=task, direction=direction),
                    timeline,
                    synthetic=True,
                )
                assert len(text) <= 139, text
                assert text.startswith(f"[DEMO] Consider {lab.display}: likely abnormally {direction}"), text


def test_no_turn_abnormal_anywhere_in_card_text() -> None:
    """A monitoring label is positive when the lab is already abnormal: forecasts say "already or within"."""
    for direction in ("high", "low"):
        for task in TASKS:
            [card] = cards_for(
                [prediction("troponin_t", 0.9, task=task, direction=direction)], synthetic=True
            )
            text = json.dumps(card, ensure_ascii=False)
            assert not re.search(r"\bturn(s|ing)? abnormal", text, re.IGNORECASE), text
            if task != "est":
                assert "already or within the next" in card["detail"]
                assert "at least once" in card["summary"]


def labelled(prediction_: Any, **fields: Any) -> TargetFacts:
    """The TargetFacts of a manifest label for ``prediction_``'s target with ``fields``."""
    label = LabelSpec.model_validate(
        {
            "target": prediction_.target,
            "label": prediction_.label,
            "lab_key": prediction_.lab_key,
            "order_code": None,
            "direction": prediction_.direction,
            "task": prediction_.task,
            "horizon_min": prediction_.horizon_min,
            "value_threshold": prediction_.value_threshold,
            "unit": prediction_.unit,
            "decision_threshold": prediction_.decision_threshold,
            "threshold_rule": "youden",
            **fields,
        }
    )
    return TargetFacts.from_label(label)


def test_cards_say_calibrated_and_report_the_test_fold_auroc_only_as_the_manifest_does() -> None:
    """The probability is "calibrated" only with a real calibration map; the AUROC shown is the test fold's with its CI."""
    p = prediction("ntprobnp", 0.9, task="mon30")
    figures = {"auroc": 0.87, "ci_low": 0.84, "ci_high": 0.9, "auroc_fold": "test", "threshold_fold": "val"}
    platt = labelled(p, calibration={"method": "platt", "params": {"a": 1.0, "b": 0.0}}, **figures)
    identity = labelled(p, calibration={"method": "identity"}, **figures)
    assert platt.calibrated and not identity.calibrated and not labelled(p).calibrated

    [card] = cards_for([p], model=ModelFacts("ecglab", "1.2.3", False, {p.target: platt}))
    detail = card["detail"]
    assert (
        "calibrated probability 0.90, above the decision threshold 0.50 chosen on the validation fold"
        in detail
    )
    assert "Test-fold AUROC 0.87 (95 % CI 0.84–0.90)" in detail
    assert "| 0.90 | 0.50 | 0.87 (95 % CI 0.84–0.90) |" in detail and "AUROC (test fold)" in detail
    assert card["extension"][EXT]["calibrated"] is True

    [raw] = cards_for([p], model=ModelFacts("ecglab", "1.2.3", False, {p.target: identity}))
    assert "calibrated probability" not in raw["detail"]
    assert "model score 0.90 (uncalibrated, not a probability)" in raw["detail"]
    assert "| 0.90 (uncalibrated) |" in raw["detail"] and raw["extension"][EXT]["calibrated"] is False


def test_gate_uses_the_validation_fold_ci() -> None:
    """ECGLAB_MIN_AUROC is compared with the validation fold's CI lower bound, never the test fold's."""
    base = prediction("potassium", 0.9)
    val_strong = replace(base, auroc_ci_low=0.55, auroc_val_ci_low=0.78)
    val_weak = replace(base, auroc_ci_low=0.88, auroc_val_ci_low=0.62)
    assert validated(val_strong, 0.7) and not validated(val_weak, 0.7)
    assert len(cards_for([val_strong])) == 1
    assert cards_for([val_weak]) == []


def test_gate_on_an_old_manifest_uses_the_test_fold_and_logs_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A manifest without validation figures keeps its test-fold gate, and the log says so once per process."""
    old = replace(prediction("potassium", 0.9), auroc_ci_low=0.75)
    cards_module._log_test_fold_gate.cache_clear()
    with caplog.at_level(logging.WARNING, logger="cds_service.cards"):
        assert validated(old, 0.7) and not validated(old, 0.8)
        assert validated(replace(old, auroc_val_ci_low=0.9), 0.7)
    assert sum("test-fold" in r.getMessage() for r in caplog.records) == 1
    cards_module._log_test_fold_gate.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cds_service.cards"):
        validated(replace(old, auroc_val_ci_low=0.9), 0.7)
    assert not caplog.records
