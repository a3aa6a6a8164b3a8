"""Calibration in training: one map per target on the validation fold, and the before/after summary.

The focal-loss network ranks well but its outputs are not probabilities (issue 15 measured a median
per-target ECE of 0.18 on the bundled model's test fold). ``ecglab evaluate`` calls
:func:`fit_calibrations` on the **validation fold's** raw, window-averaged probabilities; the maps
are stored in ``metrics.json``, written into the manifest by ``ecglab export`` and applied by
:mod:`fhir_mappings.calibration` wherever the model is run. The test fold is never touched.

The fitting itself (temperature, Platt, isotonic by pool-adjacent-violators, and the choice among
them by cross-validated log-loss) lives in :mod:`fhir_mappings.calibration`, in plain numpy, so
that ``ecglab recalibrate`` in the service fits a site's maps with exactly the same code; its names
are re-exported here for the training side. This module adds what only training needs: the fit of
every column of a label matrix and the ECE/Brier summary ``evaluate`` reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fhir_mappings.calibration import (
    CANDIDATES,
    CV_FOLDS,
    ISOTONIC_MIN_CLASS,
    CalibrationFit,
    cv_log_loss,
    fit_calibration,
    fit_isotonic,
    fit_map,
    fit_platt,
    fit_temperature,
    log_loss,
)

__all__ = [
    "CANDIDATES",
    "CV_FOLDS",
    "ISOTONIC_MIN_CLASS",
    "CalibrationFit",
    "cv_log_loss",
    "fit_calibration",
    "fit_calibrations",
    "fit_isotonic",
    "fit_map",
    "fit_platt",
    "fit_temperature",
    "log_loss",
    "summarise_calibration",
]


def fit_calibrations(
    y_true: NDArray[np.floating],
    y_prob: NDArray[np.floating],
    targets: Sequence[str],
    *,
    method: str = "auto",
    isotonic_min_class: int = ISOTONIC_MIN_CLASS,
    seed: int = 0,
) -> dict[str, CalibrationFit]:
    """:func:`fit_calibration` for every column of (N, K) labels and raw probabilities."""
    y, p = np.asarray(y_true), np.asarray(y_prob)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(targets):
        raise ValueError(f"labels {y.shape}, probabilities {p.shape} and {len(targets)} targets disagree")
    return {
        target: fit_calibration(
            y[:, j], p[:, j], method=method, isotonic_min_class=isotonic_min_class, seed=seed + j
        )
        for j, target in enumerate(targets)
    }


def summarise_calibration(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median and mean ECE and mean Brier score before (``*_raw``) and after calibration over targets.

    ``entries`` are per-target dicts holding ``ece``, ``ece_raw``, ``brier`` and ``brier_raw``
    (``None`` where a target has no labelled case); the ``methods`` count says which maps were used.
    """

    def values(key: str) -> list[float]:
        return [float(e[key]) for e in entries if e.get(key) is not None]

    def stat(key: str, how: Callable[[list[float]], float]) -> float | None:
        found = values(key)
        return float(how(found)) if found else None

    methods: dict[str, int] = {}
    for entry in entries:
        method = str(entry.get("calibration", "identity"))
        methods[method] = methods.get(method, 0) + 1
    return {
        "n_targets": len(entries),
        "ece_median_before": stat("ece_raw", np.median),
        "ece_median_after": stat("ece", np.median),
        "ece_mean_before": stat("ece_raw", np.mean),
        "ece_mean_after": stat("ece", np.mean),
        "brier_mean_before": stat("brier_raw", np.mean),
        "brier_mean_after": stat("brier", np.mean),
        "methods": dict(sorted(methods.items())),
    }
