"""Model predictions → CDS Hooks cards that recommend lab tests (pure functions, no I/O).

One card per lab (cdshooks.md §0.6, §5): the estimate (the value around the ECG's time) and the
forecasts (at least one abnormal value in the 30/60/120 min after the ECG) of the same lab are
merged, and a card appears only when at least one of them passes the manifest's decision threshold
**and its claim window has not fully passed** at the time of the call (the pipeline's clock,
``CardContext.now``): every target is anchored to the ECG's time (:mod:`fhir_mappings.tasks`), so an
ECG 100 min old supports only the 120-min forecast and a 5-hour-old one no claim at all. Each card

* has a ``summary`` under 140 characters naming the test and its most urgent open claim in clock
  time with the ECG's age (wording: :mod:`cds_service.card_text`);
* takes its ``indicator`` from the lab's severity and the probability (``ECGLAB_INDICATOR_MAP``);
* explains itself in Markdown ``detail``: each open claim with its window, the (calibrated, when the
  manifest says so) probability, the threshold, the test-fold AUROC with its CI, the inputs the
  model used (values and the FHIR resources that supplied them), the model version, and, for a
  model trained on synthetic data, a plain warning that it is a demo not for clinical use;
* carries a static alphanumeric ``source.topic.code`` per lab (Epic keys overrides on it);
* offers one suggestion with one ``create`` action: a draft ``ServiceRequest`` for the lab's
  LOINC order code, with the ECG as ``reasonReference``;
* has ``uuid`` on card and suggestion (feedback needs them), ``selectionBehavior: "any"`` (the
  only value Epic supports) and ``overrideReasons`` with displays.

Ids and references that come from the EHR (patient, encounter, user, the ECG's and the input
resources' ``Type/id``) are checked before they reach Markdown ``detail`` or a draft order: an id
must match the FHIR id pattern (``[A-Za-z0-9-.]``, at most 256 characters as for
``context.patientId``, see :data:`cds_service.hook_request.FHIR_ID`), a resource type must be a
FHIR type name, a requester must be ``Practitioner/`` or ``PractitionerRole/`` + id. Anything else
(Markdown, HTML, newlines, 300-character ids) is **omitted, never echoed**: the reference or the
"(source)" note is left out and the rest of the card stands. Every other text on a card comes
from the contract package (lab and feature names) or the model manifest, not from the request.

Targets whose validation-fold AUROC is not demonstrably above ``ECGLAB_MIN_AUROC`` (the CI lower
bound in the manifest; 0.70 by default, the paper's criterion) never give cards; a manifest written
before validation figures were recorded is gated on its test-fold bound, and that is logged once.
Labs are skipped when ordering them would be redundant: already among the draft orders of the
order-select/order-sign context, already ordered (an active/on-hold/draft ServiceRequest with the
lab's order code or one of its result codes), or resulted within ``ECGLAB_RECENT_RESULT_MIN``.
At most ``ECGLAB_MAX_CARDS`` cards are returned, the most urgent first (soonest horizon, then lab
severity, then probability).
"""

from __future__ import annotations

import functools
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any

from cds_service.card_text import (
    ModelFacts,
    TargetFacts,
    Timeline,
    detail_text,
    safe_id,
    safe_reference,
    summary_text,
)
from cds_service.ecg.select import DOCUMENT_TIME, MEDIA_TIME, OBSERVATION_TIME
from cds_service.fhir_values import parse_fhir_datetime
from cds_service.fhir_values import reference as fhir_reference
from cds_service.settings import IndicatorRule, Settings
from fhir_mappings import Coding, LabSpec, Mappings

if TYPE_CHECKING:  # types only: importing the feature and inference modules here would serve nothing
    from cds_service.features import ModelInputs, PatientData
    from cds_service.inference import TargetPrediction

__all__ = [
    "CARD_EXTENSION",
    "BuiltCard",
    "CardContext",
    "LabFinding",
    "ModelFacts",
    "TargetFacts",
    "Timeline",
    "build_cards",
    "ecg_zone",
    "findings",
    "pick_indicator",
    "redundancy",
    "result_time",
    "safe_id",
    "safe_reference",
    "summary_text",
    "topic_code",
    "validated",
]

log = logging.getLogger(__name__)

CARD_EXTENSION = "org.ecglab.prediction"
LAB_CATEGORY = {"system": "http://snomed.info/sct", "code": "108252007", "display": "Laboratory procedure"}
SEVERITY_RANK = {"critical": 0, "warning": 1, "info": 2}
ORDER_STATUSES = frozenset({"active", "on-hold", "draft"})
IGNORED_RESULT_STATUSES = frozenset({"cancelled", "entered-in-error"})
REQUESTER_TYPES = frozenset({"Practitioner", "PractitionerRole"})
OVERRIDE_REASONS = (
    ("already-ordered", "Already ordered or recently resulted"),
    ("not-indicated", "Not clinically indicated"),
    ("disagree-model", "Disagree with the model estimate"),
    ("patient-declined", "Patient declined"),
)
#: Where each ECG carrier keeps its recording time, in the order the ECG selection reads them.
ECG_TIME_PATHS: dict[str, tuple[str, ...]] = {
    "Observation": OBSERVATION_TIME,
    "Media": MEDIA_TIME,
    "DocumentReference": DOCUMENT_TIME,
}


@dataclass(frozen=True)
class CardContext:
    """What the cards need to know about the hook call (ids go into the draft order, never into logs)."""

    service_id: str
    hook_instance: str
    patient_id: str
    encounter_id: str | None
    user_ref: str | None
    draft_orders: Sequence[Mapping[str, Any]]
    now: datetime


@dataclass
class BuiltCard:
    """A card ready to send, with the facts worth recording for feedback analysis."""

    card: dict[str, Any]
    lab_key: str
    topic_code: str
    indicator: str
    direction: str
    horizon_min: int
    probability: float
    decision_threshold: float
    suggestion_uuid: str


@dataclass
class LabFinding:
    """All predictions of one lab that passed their decision threshold and whose claim is still open."""

    lab: LabSpec
    passing: list[TargetPrediction] = field(default_factory=list)

    @property
    def lead(self) -> TargetPrediction:
        """The most urgent open claim: soonest horizon, then highest probability."""
        return min(self.passing, key=lambda p: (p.horizon_min, -p.probability))

    @property
    def probability(self) -> float:
        """The highest passing probability of the lab (drives the indicator)."""
        return float(max(p.probability for p in self.passing))


# -- codes ------------------------------------------------------------------------------------------------


def topic_code(lab_key: str) -> str:
    """Static alphanumeric topic code of a lab (Epic: alphanumeric, ≤ 100 chars, stable)."""
    return ("ECGLAB" + re.sub(r"[^A-Za-z0-9]", "", lab_key).upper())[:100]


def _norm_system(system: str | None) -> str:
    """A code system URI compared case-insensitively and without a trailing slash."""
    return (system or "").strip().rstrip("/").lower()


def _code_keys(codings: Iterable[Coding]) -> set[tuple[str, str]]:
    """(system, code) pairs of ``codings``, systems normalised."""
    return {(_norm_system(getattr(c, "system", None)), str(c.code)) for c in codings}


def _resource_codes(resource: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(system, code) pairs of a resource's ``code.coding``."""
    concept = resource.get("code")
    codings = concept.get("coding") if isinstance(concept, dict) else None
    if not isinstance(codings, list):
        return []
    out = []
    for coding in codings:
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            system = coding.get("system")
            out.append((_norm_system(system if isinstance(system, str) else None), coding["code"]))
    return out


def _status(resource: Mapping[str, Any]) -> str | None:
    """A resource's ``status`` when it is a string (EHR data may put anything there), else ``None``."""
    status = resource.get("status")
    return status if isinstance(status, str) else None


def _matches(resource: Mapping[str, Any], wanted: set[tuple[str, str]]) -> bool:
    """A resource's code matches a wanted (system, code); a coding without system matches on code."""
    wanted_codes = {code for _, code in wanted}
    for system, code in _resource_codes(resource):
        if (system, code) in wanted or (not system and code in wanted_codes):
            return True
    return False


def _lab_codes(lab: LabSpec) -> set[tuple[str, str]]:
    """Every code that identifies a lab: its order code and all its result codes."""
    return _code_keys([lab.order_code, *lab.result_codes])


# -- redundancy rules ---------------------------------------------------------------------------------


def result_time(resource: Mapping[str, Any]) -> datetime | None:
    """When a lab Observation was taken: effectiveDateTime, effectivePeriod.start, effectiveInstant or issued."""
    period = resource.get("effectivePeriod")
    for value in (
        resource.get("effectiveDateTime"),
        resource.get("effectiveInstant"),
        period.get("start") if isinstance(period, dict) else None,
        resource.get("issued"),
    ):
        moment = parse_fhir_datetime(value)
        if moment is not None:
            return moment
    return None


def redundancy(
    lab: LabSpec,
    *,
    draft_orders: Sequence[Mapping[str, Any]],
    service_requests: Sequence[Mapping[str, Any]],
    lab_results: Sequence[Mapping[str, Any]],
    now: datetime,
    recent_min: int,
) -> str | None:
    """Why a card for ``lab`` would be redundant (``draft``/``ordered``/``recent``), or ``None``."""
    codes = _lab_codes(lab)
    for order in draft_orders:
        if order.get("resourceType") == "ServiceRequest" and _matches(order, codes):
            return "draft"
    for order in service_requests:
        if _status(order) in ORDER_STATUSES and _matches(order, codes):
            return "ordered"
    if recent_min > 0:
        since = now - timedelta(minutes=recent_min)
        result_codes = _code_keys(lab.result_codes)
        for result in lab_results:
            if _status(result) in IGNORED_RESULT_STATUSES or not _matches(result, result_codes):
                continue
            taken = result_time(result)
            if taken is not None and taken >= since:
                return "recent"
    return None


# -- the ECG's clock ----------------------------------------------------------------------------------


def _raw_at(resource: Mapping[str, Any], path: str) -> object:
    """The value at a dotted ``path`` of a resource (``None`` where the path does not lead)."""
    node: Any = resource
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def ecg_zone(resources: Iterable[Mapping[str, Any]], reference: str, recorded_at: datetime) -> tzinfo:
    """The UTC offset the ECG's own FHIR time was written in, else UTC.

    The service reads every FHIR time as UTC (:func:`cds_service.fhir_values.parse_fhir_datetime`);
    the card shows clock times in the ECG's offset, so it rereads the time string the ECG
    selection took: the first parsable one on the carrier's time paths of the resource named
    ``reference`` whose instant is ``recorded_at``. A string without an offset (or no match) is UTC.
    """
    for resource in resources:
        if not isinstance(resource, Mapping) or fhir_reference(resource) != reference:
            continue
        for path in ECG_TIME_PATHS.get(str(resource.get("resourceType")), ()):
            raw = _raw_at(resource, path)
            moment = parse_fhir_datetime(raw)
            if moment is None:
                continue
            if moment != recorded_at or not isinstance(raw, str):
                break
            try:
                zone = datetime.fromisoformat(raw.strip()).tzinfo
            except ValueError:  # a partial date: parsed as UTC
                zone = None
            return zone or UTC
    return UTC


def _aware(moment: datetime) -> datetime:
    """``moment`` with a zone (a naive time is UTC, the service's time rule)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def timeline_for(inputs: ModelInputs, data: PatientData, now: datetime) -> Timeline:
    """The ECG's time and the call's time, shown on the ECG's own clock."""
    recorded = _aware(inputs.ecg.recorded_at)
    return Timeline(recorded, _aware(now), ecg_zone(data.ecgs, inputs.ecg.reference, recorded))


def _iso(moment: datetime) -> str:
    """An instant in UTC as FHIR writes it (``2026-03-01T14:05:00Z``)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- indicator ------------------------------------------------------------------------------------------


def pick_indicator(rules: Sequence[IndicatorRule], severity: str, probability: float) -> str:
    """The first rule matching the lab's severity and the probability decides; ``info`` if none does."""
    for rule in rules:
        if rule.matches(severity, probability):
            return rule.indicator
    return "info"


# -- the draft order -----------------------------------------------------------------------------------


def _coding_dict(coding: Coding) -> dict[str, str]:
    """A mappings Coding as a FHIR Coding dict (empty fields omitted)."""
    out = {"system": coding.system, "code": coding.code}
    display = getattr(coding, "display", None)
    if display:
        out["display"] = display
    return {k: v for k, v in out.items() if v}


def draft_order(lab: LabSpec, ctx: CardContext, ecg_reference: str, intent: str) -> dict[str, Any]:
    """The draft ``ServiceRequest`` a card's suggestion creates; references that are not safe are left out."""
    order: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": intent,
        "category": [{"coding": [dict(LAB_CATEGORY)]}],
        "code": {"coding": [_coding_dict(lab.order_code)], "text": lab.display},
    }
    patient_id = safe_id(ctx.patient_id)
    if patient_id is not None:
        order["subject"] = {"reference": f"Patient/{patient_id}"}
    encounter_id = safe_id(ctx.encounter_id)
    if encounter_id is not None:
        order["encounter"] = {"reference": f"Encounter/{encounter_id}"}
    requester = safe_reference(ctx.user_ref, REQUESTER_TYPES)
    if requester is not None:
        order["requester"] = {"reference": requester}
    reason = safe_reference(ecg_reference)
    if reason is not None:
        order["reasonReference"] = [{"reference": reason, "display": "12-lead ECG"}]
    return order


# -- assembly -------------------------------------------------------------------------------------------


def _lab_for(prediction: TargetPrediction, mappings: Mappings) -> LabSpec | None:
    """The mappings' lab of a prediction: by lab key, else by the MIMIC label."""
    lab = mappings.lab(prediction.lab_key) if prediction.lab_key else None
    if lab is None:
        lab = mappings.lab_by_mimic_label(prediction.label)
    return lab


@functools.cache
def _log_test_fold_gate() -> None:
    """Say once per process that the card gate falls back to the test fold (an old manifest)."""
    log.warning(
        "The model manifest has no validation-fold AUROC CI; the card gate (ECGLAB_MIN_AUROC) uses the "
        "test-fold CI it was deployed with. Re-export the model to gate on the validation fold."
    )


def validated(prediction: TargetPrediction, min_auroc: float) -> bool:
    """Whether a target's discrimination is demonstrated: its validation-fold AUROC's 95 % CI lower
    bound (from the manifest; the test fold chooses nothing) exceeds ``min_auroc`` — the paper's
    criterion for a lab it "predicts". See ``TargetPrediction.gate_auroc_ci_low``.

    A manifest written before validation figures were recorded has only the test fold's bound; it
    is used then (the gate the model was deployed with), and that is logged once. A target the
    manifest gives no CI for is trusted (nothing to check against).
    """
    if min_auroc <= 0.0:
        return True
    if prediction.auroc_val_ci_low is None and prediction.auroc_ci_low is not None:
        _log_test_fold_gate()
    bound = prediction.gate_auroc_ci_low
    return bound is None or bound > min_auroc


def findings(
    predictions: Iterable[TargetPrediction],
    mappings: Mappings,
    timeline: Timeline,
    min_auroc: float = 0.0,
) -> list[LabFinding]:
    """Group the open, passing claims by lab (predictions of labs absent from the mappings are skipped).

    A prediction passes when its probability reaches its decision threshold and its target is
    :func:`validated`; it is kept only while its claim window is open at ``timeline.now``. A lab
    whose every passing claim has closed gives no finding (and the log says so).
    """
    by_lab: dict[str, LabFinding] = {}
    closed: set[str] = set()
    for p in predictions:
        if p.probability < p.decision_threshold or not validated(p, min_auroc):
            continue
        lab = _lab_for(p, mappings)
        if lab is None:
            log.warning("prediction %s names a lab missing from fhir_mappings; no card", p.target)
            continue
        if not timeline.is_open(p.task):
            closed.add(lab.key)
            continue
        by_lab.setdefault(lab.key, LabFinding(lab)).passing.append(p)
    for key in sorted(closed - set(by_lab)):
        log.info("no card for %s: every claim window has passed (ECG %s)", key, timeline.age())
    return list(by_lab.values())


def urgency(finding: LabFinding) -> tuple[int, int, float]:
    """Sort key: soonest horizon first, then the more severe lab, then the higher probability."""
    return (finding.lead.horizon_min, SEVERITY_RANK.get(finding.lab.severity, 3), -finding.probability)


def build_cards(
    predictions: Sequence[TargetPrediction],
    *,
    inputs: ModelInputs,
    data: PatientData,
    ctx: CardContext,
    mappings: Mappings,
    settings: Settings,
    model: ModelFacts,
    new_uuid: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> list[BuiltCard]:
    """The response's cards for one hook call, most urgent first, at most ``settings.max_cards``."""
    timeline = timeline_for(inputs, data, ctx.now)
    kept: list[LabFinding] = []
    for finding in findings(predictions, mappings, timeline, settings.min_auroc):
        reason = redundancy(
            finding.lab,
            draft_orders=ctx.draft_orders,
            service_requests=data.service_requests,
            lab_results=data.lab_results,
            now=ctx.now,
            recent_min=settings.recent_result_min,
        )
        if reason is not None:
            log.info("no card for %s: %s", finding.lab.key, reason)
            continue
        kept.append(finding)
    kept.sort(key=urgency)
    return [
        _card(f, inputs, ctx, mappings, settings, model, timeline, new_uuid)
        for f in kept[: settings.max_cards]
    ]


def _card(
    finding: LabFinding,
    inputs: ModelInputs,
    ctx: CardContext,
    mappings: Mappings,
    settings: Settings,
    model: ModelFacts,
    timeline: Timeline,
    new_uuid: Callable[[], str],
) -> BuiltCard:
    """Assemble one card (and the facts recorded for feedback) for a lab finding."""
    lab = finding.lab
    lead = finding.lead
    code = topic_code(lab.key)
    indicator = pick_indicator(settings.indicator_map, lab.severity, finding.probability)
    card_uuid, suggestion_uuid = new_uuid(), new_uuid()
    window = timeline.window(lead.task)
    source: dict[str, Any] = {
        "label": settings.source_label,
        "topic": {
            "system": settings.topic_system,
            "code": code,
            "display": f"Lab recommendation: {lab.display}",
        },
    }
    if settings.source_url:
        source["url"] = settings.source_url
    card: dict[str, Any] = {
        "uuid": card_uuid,
        "summary": summary_text(lab.display, lead, timeline, synthetic=model.synthetic),
        "indicator": indicator,
        "detail": detail_text(lab.display, finding.passing, lead, inputs, mappings, model, timeline),
        "source": source,
        "selectionBehavior": "any",
        "suggestions": [
            {
                "label": f"Order {lab.display}",
                "uuid": suggestion_uuid,
                "isRecommended": True,
                "actions": [
                    {
                        "type": "create",
                        "description": f"Order {lab.display} ({lab.order_code.code})",
                        "resource": draft_order(lab, ctx, inputs.ecg.reference, settings.order_intent),
                    }
                ],
            }
        ],
        "overrideReasons": [
            {"system": settings.override_reason_system, "code": c, "display": d} for c, d in OVERRIDE_REASONS
        ],
        "extension": {
            CARD_EXTENSION: {
                "lab": lab.display,
                "labKey": lab.key,
                "direction": lead.direction,
                "horizons": sorted({p.horizon_min for p in finding.passing}),
                "probability": round(finding.probability, 4),
                "decisionThreshold": round(lead.decision_threshold, 4),
                "calibrated": model.facts(lead).calibrated,
                "ecgTime": _iso(timeline.ecg_time),
                "claimWindow": {"start": _iso(window[0]), "end": _iso(window[1])},
                "modelVersion": model.version,
                "syntheticModel": model.synthetic,
            }
        },
    }
    return BuiltCard(
        card=card,
        lab_key=lab.key,
        topic_code=code,
        indicator=indicator,
        direction=lead.direction,
        horizon_min=lead.horizon_min,
        probability=finding.probability,
        decision_threshold=lead.decision_threshold,
        suggestion_uuid=suggestion_uuid,
    )
