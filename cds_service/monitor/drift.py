"""Input drift: the population stability index of each model input against a reference distribution.

A model validated on one population can silently degrade when the inputs shift (another ECG
cart, a new triage protocol, another patient mix). The monitor compares the distribution of every
audited metadata input (and any ECG summary statistic the audit records) with a reference:

* the training distribution stored in the manifest (``evaluation["input_distribution"]``) when the
  exporter wrote one;
* else a reference file (``--reference``): any ``distribution.json`` written by an earlier
  monitor run (e.g. the first month of shadow mode, frozen as the site's baseline);
* else drift is reported as unavailable.

Distribution format (``ecglab-input-distribution/1``)::

    {"format": "ecglab-input-distribution/1", "n": 1200,
     "features": {"age": {"kind": "continuous", "edges": [35.0, 48.0, …], "fractions": [0.1, …],
                          "missing": 0.0},
                  "sex": {"kind": "categorical", "categories": {"0": 0.47, "1": 0.53}, "missing": 0.0}}}

``edges`` are the interior cut points (deciles of the reference data), so there are
``len(edges) + 1`` value bins; missing values form one more bin. PSI < 0.1 is read as stable,
0.1–0.25 as a moderate shift, above 0.25 as a major shift (the customary bands).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cds_service.monitor.stats import psi
from fhir_mappings.errors import InputError
from fhir_mappings.manifest import Manifest

DISTRIBUTION_FORMAT = "ecglab-input-distribution/1"
MANIFEST_KEY = "input_distribution"
BANDS: tuple[tuple[float, str], ...] = ((0.1, "stable"), (0.25, "moderate"), (math.inf, "major"))


def _column(values: Sequence[float | None]) -> np.ndarray:
    """Values as float64 with ``None`` → NaN."""
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def distribution(
    columns: Mapping[str, Sequence[float | None]], categorical: Collection[str], n_bins: int = 10
) -> dict[str, Any]:
    """The reference-format distribution of ``columns`` (feature key → values, ``None`` = missing)."""
    features: dict[str, Any] = {}
    n = 0
    for key, values in columns.items():
        col = _column(values)
        n = max(n, len(col))
        present = col[np.isfinite(col)]
        missing = float(1.0 - len(present) / len(col)) if len(col) else 0.0
        if key in categorical:
            cats, counts = np.unique(np.rint(present).astype(int), return_counts=True)
            total = max(len(col), 1)
            features[key] = {
                "kind": "categorical",
                "categories": {str(int(c)): float(k / total) for c, k in zip(cats, counts, strict=True)},
                "missing": missing,
            }
            continue
        edges: Any = (
            np.unique(np.quantile(present, np.linspace(0, 1, n_bins + 1)[1:-1])) if len(present) else []
        )
        fractions = _bin_fractions(col, [float(e) for e in edges])
        features[key] = {
            "kind": "continuous",
            "edges": [float(e) for e in edges],
            "fractions": fractions[:-1],
            "missing": fractions[-1],
        }
    return {"format": DISTRIBUTION_FORMAT, "n": n, "features": features}


def _bin_fractions(col: np.ndarray, edges: Sequence[float]) -> list[float]:
    """Fractions per value bin (``len(edges) + 1``) and, last, the missing fraction."""
    if len(col) == 0:
        return [0.0] * (len(edges) + 2)
    finite = np.isfinite(col)
    which = np.searchsorted(np.asarray(edges, dtype=np.float64), col[finite], side="right")
    counts = np.bincount(which, minlength=len(edges) + 1).astype(np.float64)
    return [float(c / len(col)) for c in counts] + [float((~finite).sum() / len(col))]


def _categorical_fractions(col: np.ndarray, categories: Sequence[str]) -> list[float]:
    """Fractions per reference category, then other categories, then missing."""
    if len(col) == 0:
        return [0.0] * (len(categories) + 2)
    finite = np.isfinite(col)
    codes = [str(int(v)) for v in np.rint(col[finite])]
    counts = [sum(1 for c in codes if c == cat) for cat in categories]
    other = len(codes) - sum(counts)
    return [c / len(col) for c in counts] + [other / len(col), float((~finite).sum() / len(col))]


def band(value: float) -> str:
    """'stable', 'moderate' or 'major' for a PSI value."""
    return next(name for limit, name in BANDS if value < limit)


def psi_table(reference: Mapping[str, Any], columns: Mapping[str, Sequence[float | None]]) -> dict[str, Any]:
    """PSI of every feature present in both ``reference`` and ``columns``."""
    out: dict[str, Any] = {}
    for key, spec in (reference.get("features") or {}).items():
        if key not in columns or not isinstance(spec, Mapping):
            continue
        col = _column(columns[key])
        if spec.get("kind") == "categorical":
            categories = list((spec.get("categories") or {}).keys())
            expected = [float(spec["categories"][c]) for c in categories] + [
                0.0,
                float(spec.get("missing", 0.0)),
            ]
            actual = _categorical_fractions(col, categories)
        else:
            edges = [float(e) for e in spec.get("edges") or []]
            expected = [float(f) for f in spec.get("fractions") or []] + [float(spec.get("missing", 0.0))]
            if len(expected) != len(edges) + 2:
                raise InputError(
                    f"reference distribution: feature {key!r} has {len(edges)} edges but {len(expected) - 1} fractions"
                )
            actual = _bin_fractions(col, edges)
        value = psi(np.asarray(expected), np.asarray(actual)) if len(col) else math.nan
        out[key] = {
            "psi": value if math.isfinite(value) else None,
            "band": band(value) if math.isfinite(value) else None,
            "n": len(col),
            "missing_reference": float(spec.get("missing", 0.0)),
            "missing_current": float((~np.isfinite(col)).mean()) if len(col) else None,
        }
    return out


def load_reference(manifest: Manifest, path: Path | None) -> tuple[dict[str, Any] | None, str]:
    """(reference distribution, where it came from): the manifest's, else ``path``, else ``(None, 'unavailable')``."""
    stored = manifest.evaluation.get(MANIFEST_KEY)
    if isinstance(stored, Mapping) and stored.get("format") == DISTRIBUTION_FORMAT:
        return dict(stored), "manifest"
    if path is None:
        return None, "unavailable"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"--reference {path}: not a readable JSON file ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != DISTRIBUTION_FORMAT:
        raise InputError(
            f"--reference {path}: expected format {DISTRIBUTION_FORMAT!r} (a monitor distribution.json)"
        )
    return raw, str(path)
