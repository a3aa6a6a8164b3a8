"""Metadata encoding: raw feature values → the network's ``cat`` and ``cont`` inputs.

Training (:mod:`model_training.data`), export parity checks and the service's runtime all call
:func:`encode_metadata` with the manifest's :class:`~fhir_mappings.manifest.MetadataSpec`, so the
imputation medians, the category clipping and the missingness-indicator columns cannot drift
between the two sides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fhir_mappings.manifest import MetadataSpec


def encode_metadata(
    values: Mapping[str, Sequence[float | None] | np.ndarray], spec: MetadataSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Encode raw feature columns into the network's ``cat`` and ``cont`` inputs.

    ``values`` maps each feature key to a column (NaN or ``None`` = missing), in canonical units.
    Missing values take the training-fold median (categorical medians rounded to a valid code);
    each feature listed in ``spec.missing_indicators`` adds a 1.0/0.0 column after the continuous
    block, in the listed order. Returns ``cat`` int64 (N, n_cat) and ``cont`` float32
    (N, n_cont + n_indicators). Training and serving both call this, so they cannot drift.
    """
    keys = [c.key for c in spec.categorical] + list(spec.continuous)
    missing_keys = [k for k in keys if k not in values]
    if missing_keys:
        raise KeyError(f"metadata lacks features {missing_keys}")
    columns = {key: _as_float_column(values[key]) for key in keys}
    n = len(next(iter(columns.values()))) if columns else 0
    missing = {key: ~np.isfinite(col) for key, col in columns.items()}
    cat = np.empty((n, len(spec.categorical)), dtype=np.int64)
    for j, feature in enumerate(spec.categorical):
        fill = float(np.clip(np.rint(spec.medians[feature.key]), 0, len(feature.categories) - 1))
        col = np.where(missing[feature.key], fill, columns[feature.key])
        cat[:, j] = np.clip(np.rint(col), 0, len(feature.categories) - 1).astype(np.int64)
    cont = np.empty((n, len(spec.continuous) + len(spec.missing_indicators)), dtype=np.float32)
    for j, key in enumerate(spec.continuous):
        cont[:, j] = np.where(missing[key], spec.medians[key], columns[key])
    offset = len(spec.continuous)
    for j, key in enumerate(spec.missing_indicators):
        cont[:, offset + j] = missing[key].astype(np.float32)
    return cat, cont


def _as_float_column(column: Sequence[float | None] | np.ndarray) -> np.ndarray:
    """A float64 column with ``None`` turned into NaN."""
    if isinstance(column, np.ndarray):
        return column.astype(np.float64, copy=False)
    return np.array([np.nan if v is None else v for v in column], dtype=np.float64)
