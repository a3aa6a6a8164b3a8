"""Model predictions → CDS Hooks cards that recommend lab tests (pure functions, no I/O).

One card per lab (cdshooks.md §0.6, §5): the estimate ("abnormal now") and the forecasts ("within
30/60/120 min") of the same lab are merged, and a card appears only when at least one of them
passes the manifest's decision threshold. Each card

* has a ``summary`` under 140 characters naming the test and when it is likely abnormal;
* takes its ``indicator`` from the lab's severity and the probability (``ECGLAB_INDICATOR_MAP``);
* explains itself in Markdown ``detail``: probability, threshold, horizon, the inputs the model
  used (values and the FHIR resources that supplied them), the model version, and, for a model
  trained on synthetic data, a plain warning that it is a demo not for clinical use;
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
bound in the manifest; 0.70 by default, the paper's criterion) never give cards. Labs are skipped when
ordering them would be redundant: already among the draft orders of the
order-select/order-sign context, already ordered (an active/on-hold/draft ServiceRequest with the
lab's order code or one of its result codes), or resulted within ``ECGLAB_RECENT_RESULT_MIN``.
At most ``ECGLAB_MAX_CARDS`` cards are returned, the most urgent first (soonest horizon, then lab
severity, then probability).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from cds_service.fhir_values import parse_fhir_datetime
from cds_service.hook_request import FHIR_ID
from cds_service.settings import IndicatorRule, Settings
from fhir_mappings import Coding, LabSpec, Mappings

if TYPE_CHECKING:  # runtime imports would pull numpy/scipy into this pure module for nothing
    from cds_service.features import ModelInputs, PatientData
    from cds_service.inference import TargetPrediction

log = logging.getLogger(__name__)

SUMMARY_LIMIT = 139
CARD_EXTENSION = "org.ecglab.prediction"
LAB_CATEGORY = {"system": "http://snomed.info/sct", "code": "108252007", "display": "Laboratory procedure"}
SEVERITY_RANK = {"critical": 0, "warning": 1, "info": 2}
ORDER_STATUSES = frozenset({"active", "on-hold", "draft"})
IGNORED_RESULT_STATUSES = frozenset({"cancelled", "entered-in-error"})
REQUESTER_TYPES = frozenset({"Practitioner", "PractitionerRole"})
RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
COMPUTED_FROM = re.compile(r"computed from (\S+) and (\S+)")
OVERRIDE_REASONS = (
    ("already-ordered", "Already ordered or recently resulted"),
    ("not-indicated", "Not clinically indicated"),
    ("disagree-model", "Disagree with the model estimate"),
    ("patient-declined", "Patient declined"),
)
DEMO_WARNING = (
    "**Demo model — not for clinical use.** This model was trained on synthetic data; "
    "its probabilities carry no clinical meaning."
)


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


@dataclass(frozen=True)
class ModelFacts:
    """The runtime facts a card states: model name/version and whether it was trained on synthetic data."""

    name: str
    version: str
    synthetic: bool


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
    """All predictions of one lab that passed their decision threshold."""

    lab: LabSpec
    passing: list[TargetPrediction] = field(default_factory=list)

    @property
    def lead(self) -> TargetPrediction:
        """The most urgent passing prediction: soonest horizon, then highest probability."""
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


# -- ids from the EHR ------------------------------------------------------------------------------------


def safe_id(value: object) -> str | None:
    """``value`` when it is a FHIR id (:data:`FHIR_ID`), else ``None`` (to be omitted, not echoed)."""
    return value if isinstance(value, str) and FHIR_ID.fullmatch(value) else None


def safe_reference(value: object, types: frozenset[str] | None = None) -> str | None:
    """``value`` when it is a relative ``Type/id`` reference (of one of ``types`` if given), else ``None``."""
    if not isinstance(value, str):
        return None
    kind, slash, rid = value.partition("/")
    if not slash or not RESOURCE_TYPE.fullmatch(kind) or safe_id(rid) is None:
        return None
    return value if types is None or kind in types else None


def _source_note(source: str | None) -> str:
    """`` (Type/id)`` naming where an input came from, `` (Patient record)``, or ``""`` when not safe to show."""
    if not source:
        return ""
    if source == "Patient" or source.startswith("Patient/"):
        return " (Patient record)"
    if safe_reference(source) is not None:
        return f" ({source})"
    computed = COMPUTED_FROM.fullmatch(source)
    if computed and all(safe_reference(part) is not None for part in computed.groups()):
        return f" ({source})"
    return ""


# -- wording --------------------------------------------------------------------------------------------


def _when(horizon_min: int) -> str:
    """``now`` for the estimate, ``within N min`` for a forecast horizon."""
    return "now" if horizon_min == 0 else f"within {horizon_min} min"


def _direction_word(direction: str) -> str:
    """``high`` or ``low``."""
    return "high" if direction == "high" else "low"


def summary_text(display: str, lead: TargetPrediction, *, synthetic: bool) -> str:
    """``Consider <test>: likely abnormally high now`` (≤ 139 chars; the test name is shortened if needed)."""
    prefix = "[DEMO] " if synthetic else ""
    verb = "likely abnormally" if lead.horizon_min == 0 else "likely to turn abnormally"
    tail = f": {verb} {_direction_word(lead.direction)} {_when(lead.horizon_min)} (ECG model)"
    room = SUMMARY_LIMIT - len(prefix) - len("Consider ") - len(tail)
    name = display if len(display) <= room else display[: max(room - 1, 1)].rstrip() + "…"
    return f"{prefix}Consider {name}{tail}"


def pick_indicator(rules: Sequence[IndicatorRule], severity: str, probability: float) -> str:
    """The first rule matching the lab's severity and the probability decides; ``info`` if none does."""
    for rule in rules:
        if rule.matches(severity, probability):
            return rule.indicator
    return "info"


#: UCUM units as clinicians read them (anything else is shown as written).
READABLE_UNITS = {"a": "years", "[degF]": "°F", "mm[Hg]": "mmHg", "kg/m2": "kg/m²", "/min": "/min"}


def _fmt_value(value: float, unit: str | None) -> str:
    """A feature value with its unit as a clinician reads it (age in whole years)."""
    number = f"{value:.0f}" if unit == "a" or abs(value) >= 1000 else f"{value:.1f}"
    return f"{number} {READABLE_UNITS.get(unit or '', unit or '')}".rstrip()


def _describe_inputs(inputs: ModelInputs, mappings: Mappings) -> list[str]:
    """One Markdown bullet per model input: value (or 'missing, imputed') and the resource it came from."""
    lines = []
    for spec in mappings.features:
        value = inputs.metadata.get(spec.key)
        origin = _source_note(inputs.sources.get(spec.key))
        if value is None:
            lines.append(f"- {spec.display}: missing, imputed by the model")
            continue
        if spec.kind == "categorical" and spec.categories:
            index = round(value)
            shown = spec.categories[index] if 0 <= index < len(spec.categories) else str(value)
        else:
            shown = _fmt_value(float(value), spec.unit)
        lines.append(f"- {spec.display}: {shown}{origin}")
    return lines


def detail_text(finding: LabFinding, inputs: ModelInputs, mappings: Mappings, model: ModelFacts) -> str:
    """The card's Markdown explanation: what, how sure, from which inputs, which model."""
    lab = finding.lab
    lead = finding.lead
    parts = []
    if model.synthetic:
        parts.append(DEMO_WARNING)
    parts.append(
        f"The ECG model estimates that **{lab.display}** is likely abnormally "
        f"**{_direction_word(lead.direction)}** {_when(lead.horizon_min)}: probability "
        f"{lead.probability:.2f}, above the decision threshold {lead.decision_threshold:.2f}."
    )
    rows = ["| When | Abnormal | Probability | Threshold | AUROC |", "|---|---|---|---|---|"]
    for p in sorted(finding.passing, key=lambda p: (p.horizon_min, p.direction)):
        limit = ""
        if p.value_threshold is not None:
            sign = ">" if p.direction == "high" else "<"
            limit = f" ({sign} {p.value_threshold:g} {p.unit or ''})".rstrip()
        auroc = f"{p.auroc:.2f}" if p.auroc is not None else "n/a"
        rows.append(
            f"| {_when(p.horizon_min)} | {_direction_word(p.direction)}{limit} | {p.probability:.2f} | "
            f"{p.decision_threshold:.2f} | {auroc} |"
        )
    parts.append("\n".join(rows))
    ecg = inputs.ecg
    recorded = ecg.recorded_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    ecg_ref = safe_reference(ecg.reference)
    ecg_line = f"- 12-lead ECG recorded {recorded}" + (f" ({ecg_ref})" if ecg_ref else "")
    inputs_md = [ecg_line, *_describe_inputs(inputs, mappings)]
    parts.append("**Inputs the model used:**\n" + "\n".join(inputs_md))
    parts.append(
        f"Model: {model.name} {model.version}. Decision support only: confirm the indication clinically "
        "before ordering."
    )
    return "\n\n".join(parts)


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


def validated(prediction: TargetPrediction, min_auroc: float) -> bool:
    """Whether a target's discrimination is demonstrated: its validation-fold AUROC's 95 % CI lower
    bound (from the manifest; the test fold only chooses nothing) exceeds ``min_auroc`` — the
    paper's criterion for a lab it "predicts". See ``TargetPrediction.gate_auroc_ci_low``.

    A target the manifest gives no CI for is trusted (nothing to check against).
    """
    bound = prediction.gate_auroc_ci_low
    return min_auroc <= 0.0 or bound is None or bound > min_auroc


def findings(
    predictions: Iterable[TargetPrediction], mappings: Mappings, min_auroc: float = 0.0
) -> list[LabFinding]:
    """Group passing predictions by lab (predictions of labs absent from the mappings are skipped).

    A prediction passes when its probability reaches its decision threshold and its target is
    :func:`validated`.
    """
    by_lab: dict[str, LabFinding] = {}
    for p in predictions:
        if p.probability < p.decision_threshold or not validated(p, min_auroc):
            continue
        lab = _lab_for(p, mappings)
        if lab is None:
            log.warning("prediction %s names a lab missing from fhir_mappings; no card", p.target)
            continue
        by_lab.setdefault(lab.key, LabFinding(lab)).passing.append(p)
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
    kept: list[LabFinding] = []
    for finding in findings(predictions, mappings, settings.min_auroc):
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
    return [_card(f, inputs, ctx, mappings, settings, model, new_uuid) for f in kept[: settings.max_cards]]


def _card(
    finding: LabFinding,
    inputs: ModelInputs,
    ctx: CardContext,
    mappings: Mappings,
    settings: Settings,
    model: ModelFacts,
    new_uuid: Callable[[], str],
) -> BuiltCard:
    """Assemble one card (and the facts recorded for feedback) for a lab finding."""
    lab = finding.lab
    lead = finding.lead
    code = topic_code(lab.key)
    indicator = pick_indicator(settings.indicator_map, lab.severity, finding.probability)
    card_uuid, suggestion_uuid = new_uuid(), new_uuid()
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
        "summary": summary_text(lab.display, lead, synthetic=model.synthetic),
        "indicator": indicator,
        "detail": detail_text(finding, inputs, mappings, model),
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
