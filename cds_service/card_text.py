"""What a card says: time-anchored claims in clock time, honest performance figures, the Markdown detail.

Every target of the model is anchored to the ECG's time, not to the time a card is asked for
(:mod:`fhir_mappings.tasks`): the estimate (``est``) is the lab value closest to the ECG within
±60 min, a forecast (``monN``) is "at least one abnormal value between the ECG and N min after it",
already abnormal at the ECG included. So a card states each claim with its window in clock time
and the ECG's age, e.g. "likely abnormally high at least once between 14:05 and 16:05 (ECG at
14:05, 12 min ago)" or "likely abnormally high around the time of the ECG (13:05–15:05; ECG at
14:05, 12 min ago)", and :class:`Timeline` says which claims are still open (a claim whose window
has fully passed is about the past and is not stated at all). A forecast is never worded as the
lab "turning" abnormal: the label is positive when it is already abnormal too.

Clock times are shown in the ECG's own UTC offset when its FHIR time carried one, else in UTC
(then marked "UTC"), as ``HH:MM``, with the day (``28 Feb 23:05``) when it is not today there.

Numbers are stated for what they are: the probability is called "calibrated" only when the
manifest carries a calibration for that target (else it is a model score, not a probability);
the AUROC shown is the test fold's with its 95 % CI, the honest estimate, since thresholds and the
card gate were chosen on the validation fold (:class:`TargetFacts`).

Ids that come from the EHR (``Type/id`` of the ECG and of the input resources) are checked before
they reach Markdown (:func:`safe_id`, :func:`safe_reference`); anything else is omitted, never
echoed. All other text comes from the contract package or the model manifest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING

from cds_service.hook_request import FHIR_ID
from fhir_mappings import Mappings
from fhir_mappings.tasks import task_window

if TYPE_CHECKING:  # runtime imports would pull numpy into this pure module for nothing
    from cds_service.features import ModelInputs
    from cds_service.inference import TargetPrediction
    from fhir_mappings.manifest import LabelSpec, Manifest

SUMMARY_LIMIT = 139
"""Longest ``summary`` (CDS Hooks: under 140 characters)."""

DEMO_WARNING = (
    "**Demo model — not for clinical use.** This model was trained on synthetic data; "
    "its probabilities carry no clinical meaning."
)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
COMPUTED_FROM = re.compile(r"computed from (\S+) and (\S+)")
FOLD_NAMES = {"val": "validation", "test": "test", "local": "this site's data"}

#: UCUM units as clinicians read them (anything else is shown as written).
READABLE_UNITS = {"a": "years", "[degF]": "°F", "mm[Hg]": "mmHg", "kg/m2": "kg/m²", "/min": "/min"}


# -- facts about the model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetFacts:
    """What the manifest says about one target's numbers.

    ``auroc``/``ci_low``/``ci_high`` are the fold ``auroc_fold`` names (the test fold; manifests
    written before it was recorded reported the test fold too). ``calibrated`` is true only for a
    real calibration map (an ``identity`` map is a target the fit could not calibrate).
    """

    calibrated: bool = False
    auroc: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    auroc_fold: str = "test"
    threshold_fold: str | None = None

    @classmethod
    def from_label(cls, label: LabelSpec) -> TargetFacts:
        """The facts of one manifest label."""
        calibration = label.calibration
        return cls(
            calibrated=calibration is not None and calibration.method != "identity",
            auroc=label.auroc,
            ci_low=label.ci_low,
            ci_high=label.ci_high,
            auroc_fold=label.auroc_fold or "test",
            threshold_fold=label.threshold_fold,
        )


@dataclass(frozen=True)
class ModelFacts:
    """The runtime facts a card states: model name/version, synthetic or not, and per-target facts.

    ``targets`` maps target names to :class:`TargetFacts`; a target it lacks (a test double without
    a manifest) is described from its prediction alone: uncalibrated, AUROC without CI bounds.
    """

    name: str
    version: str
    synthetic: bool
    targets: Mapping[str, TargetFacts] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: Manifest | None, *, version: str, synthetic: bool) -> ModelFacts:
        """Facts of the served model; ``manifest`` may be ``None`` (a runtime double)."""
        if manifest is None:
            return cls("ecglab", version, synthetic)
        targets = {label.target: TargetFacts.from_label(label) for label in manifest.labels}
        return cls(str(manifest.name), version, synthetic, targets)

    def facts(self, prediction: TargetPrediction) -> TargetFacts:
        """The manifest's facts of ``prediction``'s target, else what the prediction itself carries."""
        known = self.targets.get(prediction.target)
        if known is not None:
            return known
        return TargetFacts(auroc=prediction.auroc, ci_low=prediction.auroc_ci_low)


# -- time -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """The ECG's time, the time of the call and the clock both are shown in (all aware)."""

    ecg_time: datetime
    now: datetime
    zone: tzinfo = UTC

    def window(self, task: str) -> tuple[datetime, datetime]:
        """``task``'s claim window in time: ``(start, end)``, both inclusive."""
        start, end = task_window(task)
        return self.ecg_time + start, self.ecg_time + end

    def is_open(self, task: str) -> bool:
        """Whether ``task``'s window has not fully passed at ``now`` (a claim about the present or future)."""
        return self.now <= self.window(task)[1]

    @property
    def utc(self) -> bool:
        """Whether the clock shown is UTC (then the text says so)."""
        return self.ecg_time.astimezone(self.zone).utcoffset() == timedelta(0)

    def clock(self, moment: datetime) -> str:
        """``HH:MM`` on the shown clock, prefixed with the day (``28 Feb``) when it is not today there."""
        local = moment.astimezone(self.zone)
        hm = local.strftime("%H:%M")
        if local.date() == self.now.astimezone(self.zone).date():
            return hm
        return f"{local.day} {MONTHS[local.month - 1]} {hm}"

    def age(self) -> str:
        """How long ago the ECG was recorded: ``12 min ago`` (``just now`` under a minute or ahead)."""
        minutes = int((self.now - self.ecg_time).total_seconds() // 60)
        return f"{minutes} min ago" if minutes >= 1 else "just now"

    def zone_note(self) -> str:
        """`` UTC`` when the clock is UTC, else nothing (the ECG's own local clock)."""
        return " UTC" if self.utc else ""

    def stamp(self) -> str:
        """The ECG's full date and time on the shown clock: ``2026-03-01 14:05 UTC`` or ``… (UTC+02:00)``."""
        local = self.ecg_time.astimezone(self.zone)
        if self.utc:
            return local.strftime("%Y-%m-%d %H:%M UTC")
        offset = local.strftime("%z")
        return local.strftime("%Y-%m-%d %H:%M") + f" (UTC{offset[:3]}:{offset[3:]})"


# -- claims -------------------------------------------------------------------------------------------


def direction_word(direction: str) -> str:
    """``high`` or ``low``."""
    return "high" if direction == "high" else "low"


def claim_text(direction: str, task: str, timeline: Timeline, *, compact: bool = False) -> str:
    """The claim in plain words with its window in clock time and the ECG's age.

    ``compact`` is the shorter form a summary falls back to when the full one does not fit.
    """
    start, end = (timeline.clock(t) for t in timeline.window(task))
    zone = timeline.zone_note()
    ecg = f"ECG at {timeline.clock(timeline.ecg_time)}, {timeline.age()}"
    word = direction_word(direction)
    if task == "est":
        if compact:
            return f"likely abnormally {word} around the ECG time ({start}–{end}{zone}; ECG {timeline.age()})"
        return f"likely abnormally {word} around the time of the ECG ({start}–{end}{zone}; {ecg})"
    if compact:
        return f"likely abnormally {word} at least once by {end}{zone} (ECG {timeline.age()})"
    return f"likely abnormally {word} at least once between {start} and {end}{zone} ({ecg})"


def summary_text(display: str, lead: TargetPrediction, timeline: Timeline, *, synthetic: bool) -> str:
    """``Consider <test>: <claim>`` in at most :data:`SUMMARY_LIMIT` characters.

    The full claim when it fits, else its compact form; only when even that does not fit is the
    test name shortened (no name in ``labs.yaml`` needs it).
    """
    prefix = ("[DEMO] " if synthetic else "") + "Consider "
    for compact in (False, True):
        text = f"{prefix}{display}: {claim_text(lead.direction, lead.task, timeline, compact=compact)}"
        if len(text) <= SUMMARY_LIMIT:
            return text
    tail = ": " + claim_text(lead.direction, lead.task, timeline, compact=True)
    room = SUMMARY_LIMIT - len(prefix) - len(tail)
    name = display[: max(room - 1, 1)].rstrip() + "…"
    return f"{prefix}{name}{tail}"[:SUMMARY_LIMIT]


def _claim_row_label(p: TargetPrediction) -> str:
    """A table row's claim: ``high (> 5 mmol/L), around the ECG`` or ``…, already or within the next 30 min``."""
    limit = ""
    if p.value_threshold is not None:
        sign = ">" if p.direction == "high" else "<"
        unit = f" {p.unit}" if p.unit else ""
        limit = f" ({sign} {p.value_threshold:g}{unit})"
    when = "around the ECG" if p.task == "est" else f"already or within the next {p.horizon_min} min"
    return f"{direction_word(p.direction)}{limit}, {when}"


def _probability_phrase(p: TargetPrediction, facts: TargetFacts) -> str:
    """``calibrated probability 0.86`` or ``model score 0.86 (uncalibrated, not a probability)``."""
    if facts.calibrated:
        return f"calibrated probability {p.probability:.2f}"
    return f"model score {p.probability:.2f} (uncalibrated, not a probability)"


def auroc_text(facts: TargetFacts) -> str:
    """``0.87 (95 % CI 0.84–0.90)``, the AUROC alone when a bound is missing, ``n/a`` without one."""
    if facts.auroc is None:
        return "n/a"
    if facts.ci_low is None or facts.ci_high is None:
        return f"{facts.auroc:.2f}"
    return f"{facts.auroc:.2f} (95 % CI {facts.ci_low:.2f}–{facts.ci_high:.2f})"


def _fold(name: str | None) -> str:
    """A fold's readable name (``validation``, ``test``, ``this site's data``)."""
    return FOLD_NAMES.get(name or "", name or "")


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


# -- the detail -------------------------------------------------------------------------------------------


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


def _lead_paragraph(display: str, lead: TargetPrediction, facts: TargetFacts, timeline: Timeline) -> str:
    """The claim, how sure, against which threshold, and how well the target is discriminated."""
    claim = claim_text(lead.direction, lead.task, timeline).replace(
        f"abnormally {direction_word(lead.direction)}", f"abnormally **{direction_word(lead.direction)}**", 1
    )
    chosen = f" chosen on the {_fold(facts.threshold_fold)}" if facts.threshold_fold else ""
    if facts.threshold_fold in ("val", "test"):
        chosen += " fold"
    auroc = auroc_text(facts)
    how_well = ""
    if facts.auroc is not None:
        how_well = f" {_fold(facts.auroc_fold).capitalize()}-fold AUROC {auroc}"
        if facts.auroc_fold == "test":  # held out from every choice: the honest estimate
            how_well += ", the honest estimate of how well the model ranks patients for this target"
        how_well += "."
    return (
        f"The ECG model estimates that **{display}** is {claim}: "
        f"{_probability_phrase(lead, facts)}, above the decision threshold {lead.decision_threshold:.2f}"
        f"{chosen}.{how_well}"
    )


ANCHOR_NOTE = (
    "Every claim is about the time of the ECG, not the time of this call: the estimate is the value "
    "closest to the ECG within ±60 min; a forecast means at least one abnormal value between the ECG "
    "and the end of its window (already abnormal at the ECG counts). Claims whose window has passed "
    "are not shown."
)


def detail_text(
    display: str,
    claims: Sequence[TargetPrediction],
    lead: TargetPrediction,
    inputs: ModelInputs,
    mappings: Mappings,
    model: ModelFacts,
    timeline: Timeline,
) -> str:
    """The card's Markdown explanation: the open claims, how sure, from which inputs, which model."""
    parts = [DEMO_WARNING] if model.synthetic else []
    lead_facts = model.facts(lead)
    parts.append(_lead_paragraph(display, lead, lead_facts, timeline))
    parts.append(ANCHOR_NOTE)
    fold = _fold(lead_facts.auroc_fold)
    rows = [
        f"| Claim | Window{timeline.zone_note()} | Probability | Threshold | AUROC ({fold} fold) |",
        "|---|---|---|---|---|",
    ]
    for p in sorted(claims, key=lambda p: (p.horizon_min, p.direction)):
        facts = model.facts(p)
        start, end = (timeline.clock(t) for t in timeline.window(p.task))
        probability = f"{p.probability:.2f}" + ("" if facts.calibrated else " (uncalibrated)")
        rows.append(
            f"| {_claim_row_label(p)} | {start}–{end} | {probability} | "
            f"{p.decision_threshold:.2f} | {auroc_text(facts)} |"
        )
    parts.append("\n".join(rows))
    ecg_ref = safe_reference(inputs.ecg.reference)
    ecg_line = f"- 12-lead ECG recorded {timeline.stamp()}" + (f" ({ecg_ref})" if ecg_ref else "")
    parts.append("**Inputs the model used:**\n" + "\n".join([ecg_line, *_describe_inputs(inputs, mappings)]))
    parts.append(
        f"Model: {model.name} {model.version}. Decision support only: confirm the indication clinically "
        "before ordering."
    )
    return "\n\n".join(parts)
