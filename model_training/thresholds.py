"""Decision thresholds chosen on the validation fold by a named rule, and what they give.

A target is flagged when its (calibrated) probability reaches its decision threshold. ``ecglab
evaluate`` chooses that threshold per target on the **validation fold** only (issue 15: the test
fold is for reporting, never for choosing) with one of these rules, records the rule in
``metrics.json`` and ``ecglab export`` writes it into the manifest (``threshold_rule``):

* ``youden``: maximise sensitivity + specificity − 1 (Youden's J);
* ``sensitivity=X``: the highest threshold whose sensitivity is at least X (the most specific
  rule that still catches the requested share of abnormal values);
* ``ppv=X``: the lowest threshold whose PPV is at least X (the most sensitive rule whose alerts
  are right at least that often); unreachable when no threshold gets there;
* ``f1``: maximise F1 of the positive class.

``sens:X`` (the spelling of earlier versions) is accepted and means ``sensitivity=X``;
:func:`canonical_rule` rewrites it. Candidates are the observed probabilities ("positive when
p ≥ t"); ties go to the higher threshold (fewer alerts). These are the semantics of the site-side
``ecglab recalibrate`` too (``cds_service.recalibrate.choose_threshold``), so a threshold
re-derived on a site's outcomes means the same as the exported one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fhir_mappings.manifest import THRESHOLD_RULE_PATTERN
from model_training.metrics import roc_curve

_LEGACY_SENS = re.compile(r"^sens:(0(\.\d+)?|1(\.0+)?)$")
RULE_NAMES = ("youden", "sensitivity=X", "ppv=X", "f1")


def canonical_rule(rule: str) -> str:
    """``rule`` in the manifest's spelling (``sens:0.8`` → ``sensitivity=0.8``); ValueError if unknown."""
    text = rule.strip()
    legacy = _LEGACY_SENS.match(text)
    if legacy:
        text = f"sensitivity={legacy.group(1)}"
    if not re.match(THRESHOLD_RULE_PATTERN, text):
        raise ValueError(
            f"unknown threshold rule {rule!r}; expected one of {', '.join(RULE_NAMES)} with 0 <= X <= 1"
        )
    return text


def validate_threshold_rule(rule: str) -> str:
    """Return ``rule`` unchanged if :func:`canonical_rule` accepts it, else raise ValueError."""
    canonical_rule(rule)
    return rule


def parse_rule(rule: str) -> tuple[str, float | None]:
    """``('youden', None)``, ``('f1', None)``, ``('sensitivity', 0.8)`` or ``('ppv', 0.3)``."""
    text = canonical_rule(rule)
    if "=" not in text:
        return text, None
    name, value = text.split("=", 1)
    return name, float(value)


def choose_threshold(
    y_true: NDArray[np.floating], y_prob: NDArray[np.floating], rule: str = "youden"
) -> float:
    """The threshold ``rule`` picks on the non-NaN entries (positive when ``prob >= t``).

    Returns NaN when the target has only one class, or when ``ppv=X`` is reached by no threshold,
    so the caller can apply (and record) a documented fallback.
    """
    name, wanted = parse_rule(rule)
    fpr, tpr, thresholds = roc_curve(y_true, y_prob)
    if len(thresholds) < 2 or not (np.isfinite(tpr[1:]).all() and np.isfinite(fpr[1:]).all()):
        return float("nan")
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # drop the "nobody positive" point
    y = np.asarray(y_true, dtype=np.float64)
    n_pos = float(np.nansum(y))
    n_neg = float((~np.isnan(y)).sum()) - n_pos
    tp, fp = tpr * n_pos, fpr * n_neg
    if name == "youden":
        best = int(np.argmax(tpr - fpr))  # argmax keeps the first: the highest threshold of ties
    elif name == "f1":
        best = int(np.argmax(2 * tp / (2 * tp + fp + (n_pos - tp))))
    elif name == "sensitivity":
        assert wanted is not None
        best = int(np.flatnonzero(tpr >= wanted - 1e-12)[0])
    else:
        assert wanted is not None
        with np.errstate(invalid="ignore", divide="ignore"):
            ppv = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), np.nan)
        reached = np.flatnonzero(np.nan_to_num(ppv, nan=-1.0) >= wanted - 1e-12)
        if reached.size == 0:
            return float("nan")
        best = int(reached[np.argmax(tpr[reached])])  # the most sensitive; ties: the higher threshold
    return float(thresholds[best])


@dataclass(frozen=True)
class OperatingPoint:
    """What "positive when p ≥ threshold" gives on labelled data (NaN when undefined)."""

    sensitivity: float
    specificity: float
    ppv: float
    npv: float


def operating_point(
    y_true: NDArray[np.floating], y_prob: NDArray[np.floating], threshold: float
) -> OperatingPoint:
    """Sensitivity, specificity, PPV and NPV of ``threshold`` on the non-NaN entries."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    valid = ~np.isnan(y)
    positive, flagged = y[valid] > 0.5, p[valid] >= threshold
    tp = float((flagged & positive).sum())
    fp = float((flagged & ~positive).sum())
    fn = float((~flagged & positive).sum())
    tn = float((~flagged & ~positive).sum())

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else math.nan

    return OperatingPoint(ratio(tp, tp + fn), ratio(tn, tn + fp), ratio(tp, tp + fp), ratio(tn, tn + fn))


#: Decision threshold used when the validation fold has one class only for a target.
FALLBACK_THRESHOLD = 0.5


def choose_thresholds(
    y_true: NDArray[np.floating], y_prob: NDArray[np.floating], targets: Sequence[str], rule: str
) -> dict[str, tuple[float, str]]:
    """Per target (column): the threshold ``rule`` picks on the validation fold and where it came from.

    The source is the canonical rule, or a recorded fallback: :data:`FALLBACK_THRESHOLD` when the
    fold has one class only, Youden's J when a ``ppv=X`` rule is reached by no threshold.
    """
    canonical = canonical_rule(rule)
    chosen: dict[str, tuple[float, str]] = {}
    for j, target in enumerate(targets):
        t = choose_threshold(y_true[:, j], y_prob[:, j], canonical)
        source = canonical
        if not math.isfinite(t) and canonical.startswith("ppv="):
            t = choose_threshold(y_true[:, j], y_prob[:, j], "youden")
            source = f"fallback: youden ({canonical} not reached on the val fold)"
        if not math.isfinite(t):
            t, source = FALLBACK_THRESHOLD, "fallback: one class in val fold"
        chosen[target] = (min(1.0, max(0.0, t)), source)
    return chosen
