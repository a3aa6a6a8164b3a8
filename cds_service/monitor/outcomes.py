"""From audited predictions and later lab results to one observed outcome per (call, target).

This is the training labels' rule (method §2.4, :mod:`model_training.labels`) applied to the
site's own data, so that a realised AUROC means the same as the test-fold AUROC on the card:

* a lab value's class is ``low`` when below the lab's low threshold, ``high`` when above its high
  threshold (strict), else ``normal``; the thresholds are the manifest labels' ``value_threshold``
  (falling back to ``fhir_mappings``' published threshold when a label has none);
* ``est``: the result closest in time to the ECG within ±60 min (ties: the earlier, then the lower
  value); the outcome is 1 when its class is the target's direction, else 0;
* ``monN``: the results in [ECG, ECG + N min] (ends inclusive); 1 when any has the target's
  direction, else 0; *no outcome* when the window holds both a low and a high value;
* no result in the window, or a window that has not closed yet when the monitor runs: no outcome
  (the prediction still counts for the alert rate).

Subgroups are derived from the audited model inputs: sex from the encoded ``sex`` category, age
band from ``age`` (:data:`AGE_BAND_EDGES`, the contract's bands in ``fhir_mappings.subgroups``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cds_service.audit import AuditRecord
from fhir_mappings import Mappings
from fhir_mappings.manifest import Manifest
from fhir_mappings.subgroups import age_band

EST_WINDOW_MIN = 60


@dataclass(frozen=True)
class LabResult:
    """One lab value read from FHIR: whose (keyed hash), which lab, when, how much (lab's unit)."""

    patient_key: str
    lab_key: str
    time: datetime
    value: float


@dataclass(frozen=True)
class TargetRule:
    """What decides one target's outcome: its lab, direction, task and horizon."""

    target: str
    lab_key: str
    direction: str
    task: str
    horizon_min: int


@dataclass(frozen=True)
class Thresholds:
    """A lab's abnormality thresholds in its unit (``None`` = that side is not a target)."""

    low: float | None
    high: float | None

    def classify(self, value: float) -> str:
        """``'low'``, ``'high'`` or ``'normal'`` (strict comparisons, as in training)."""
        if self.low is not None and value < self.low:
            return "low"
        if self.high is not None and value > self.high:
            return "high"
        return "normal"


@dataclass(frozen=True)
class OutcomeRow:
    """One (audited call, target) pair: what the model said and what happened."""

    audit_id: int
    target: str
    lab_key: str
    task: str
    probability: float
    threshold: float
    outcome: int | None
    sex: str | None
    age_band: str | None
    mode: str


def target_rules(manifest: Manifest) -> dict[str, TargetRule]:
    """The rule of every manifest target that has a FHIR lab (``lab_key``)."""
    return {
        label.target: TargetRule(label.target, label.lab_key, label.direction, label.task, label.horizon_min)
        for label in manifest.labels
        if label.lab_key
    }


def lab_thresholds(manifest: Manifest, mappings: Mappings) -> dict[str, Thresholds]:
    """Low/high thresholds per lab key from the manifest labels, else the published threshold."""
    found: dict[str, dict[str, float]] = {}
    for label in manifest.labels:
        if label.lab_key and label.value_threshold is not None:
            found.setdefault(label.lab_key, {})[label.direction] = float(label.value_threshold)
    for label in manifest.labels:
        if not label.lab_key or label.direction in found.get(label.lab_key, {}):
            continue
        spec = mappings.lab(label.lab_key)
        published = spec.paper_threshold if spec is not None else None
        if published is not None and published.direction == label.direction:
            found.setdefault(label.lab_key, {})[label.direction] = float(published.value)
    return {lab: Thresholds(sides.get("low"), sides.get("high")) for lab, sides in found.items()}


def window_end(rule: TargetRule, ecg_time: datetime) -> datetime:
    """When the target's window closes: ECG + 60 min for ``est``, ECG + horizon for ``monN``."""
    minutes = EST_WINDOW_MIN if rule.task == "est" else rule.horizon_min
    return ecg_time + timedelta(minutes=minutes)


def outcome(
    rule: TargetRule, ecg_time: datetime, results: Sequence[LabResult], thresholds: Thresholds
) -> int | None:
    """The target's observed outcome (1, 0) from the patient's results of its lab, or ``None``.

    ``results`` must be sorted by time (as :class:`ResultIndex` keeps them).
    """
    times = [r.time for r in results]
    if rule.task == "est":
        span = timedelta(minutes=EST_WINDOW_MIN)
        lo, hi = bisect.bisect_left(times, ecg_time - span), bisect.bisect_right(times, ecg_time + span)
        window = results[lo:hi]
        if not window:
            return None
        closest = min(window, key=lambda r: (abs((r.time - ecg_time).total_seconds()), r.time, r.value))
        return int(thresholds.classify(closest.value) == rule.direction)
    lo = bisect.bisect_left(times, ecg_time)
    hi = bisect.bisect_right(times, ecg_time + timedelta(minutes=rule.horizon_min))
    classes = {thresholds.classify(r.value) for r in results[lo:hi]}
    if not classes or {"low", "high"} <= classes:
        return None
    return int(rule.direction in classes)


class ResultIndex:
    """Lab results grouped by (patient key, lab key), each group sorted by time."""

    def __init__(self, results: Iterable[LabResult]) -> None:
        groups: dict[tuple[str, str], list[LabResult]] = {}
        for result in results:
            groups.setdefault((result.patient_key, result.lab_key), []).append(result)
        self._groups = {key: sorted(group, key=lambda r: (r.time, r.value)) for key, group in groups.items()}

    def get(self, patient_key: str, lab_key: str) -> list[LabResult]:
        """The patient's results of one lab, oldest first (empty when none)."""
        return self._groups.get((patient_key, lab_key), [])

    def __len__(self) -> int:
        return sum(len(group) for group in self._groups.values())


def subgroup_labels(record: AuditRecord, sex_categories: Sequence[str]) -> tuple[str | None, str | None]:
    """(sex, age band) of an audited call from the model inputs it recorded."""
    sex_code = record.features.get("sex")
    sex = None
    if sex_code is not None and math.isfinite(sex_code):
        index = round(sex_code)
        sex = sex_categories[index] if 0 <= index < len(sex_categories) else None
    return sex, age_band(record.features.get("age"))


def join_outcomes(
    records: Iterable[AuditRecord],
    index: ResultIndex,
    rules: Mapping[str, TargetRule],
    thresholds: Mapping[str, Thresholds],
    sex_categories: Sequence[str],
    *,
    as_of: datetime,
    counts: dict[str, int],
) -> list[OutcomeRow]:
    """One :class:`OutcomeRow` per audited (call, target); ``counts`` gains the skip reasons."""
    rows: list[OutcomeRow] = []
    for record in records:
        if record.id is None:
            raise ValueError("join_outcomes needs stored audit records (with ids)")
        if record.ecg_time is None:
            counts["calls_without_ecg_time"] = counts.get("calls_without_ecg_time", 0) + 1
            continue
        sex, band = subgroup_labels(record, sex_categories)
        for target, score in record.predictions.items():
            rule = rules.get(target)
            if rule is None or rule.lab_key not in thresholds:
                counts["predictions_without_lab_rule"] = counts.get("predictions_without_lab_rule", 0) + 1
                continue
            observed: int | None
            if window_end(rule, record.ecg_time) > as_of:
                counts["predictions_window_open"] = counts.get("predictions_window_open", 0) + 1
                observed = None
            else:
                observed = outcome(
                    rule,
                    record.ecg_time,
                    index.get(record.patient_key, rule.lab_key),
                    thresholds[rule.lab_key],
                )
            rows.append(
                OutcomeRow(
                    audit_id=record.id,
                    target=target,
                    lab_key=rule.lab_key,
                    task=rule.task,
                    probability=float(score.probability),
                    threshold=float(score.threshold),
                    outcome=observed,
                    sex=sex,
                    age_band=band,
                    mode=record.mode,
                )
            )
    return rows
