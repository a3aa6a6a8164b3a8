"""FHIR ``Observation.component[].valueSampledData`` (R4 SampledData) → :class:`EcgRecording`.

Unlike the file readers this one reads FHIR JSON, not bytes, so it is not in the format registry
(nothing to sniff): an ECG ``Observation`` carries one component per lead. Value =
``origin.value + factor × datum``; ``period`` is the milliseconds between samples; the markers
``E``, ``L`` and ``U`` become NaN (interpolated later, or rejected when too many). The unit is
``origin.code`` (UCUM; ``unit`` as fallback) and must be a voltage. Components without
``valueSampledData`` (e.g. a heart rate on the same Observation) are skipped; so are components
whose lead the caller's ``lead_of`` cannot name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cds_service.ecg.readers.common import VOLT_FACTORS, build_recording, check_counts, volt_factor
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

FORMAT = "sampled-data"
"""This reader's format name (``EcgRecording.source_format``)."""

SAMPLE_MARKERS: frozenset[str] = frozenset({"E", "L", "U"})
"""FHIR ``SampledData.data`` markers: error, below lower limit, above upper limit → NaN."""


def read_components(
    components: Sequence[Mapping[str, Any]],
    lead_of: Callable[[Mapping[str, Any]], str | None],
    limits: ReadLimits,
    *,
    units: Mapping[str, float] = VOLT_FACTORS,
) -> EcgRecording:
    """Decode the leads of an Observation's ``component`` list.

    Args:
        components: the Observation's ``component`` list.
        lead_of: the lead name for a component's ``code`` (CodeableConcept), or ``None``. The name
            is returned as the source spells it; :mod:`cds_service.ecg.canonical` resolves it.
        limits: bounds on leads, samples and seconds.
        units: UCUM voltage unit → factor to mV.

    Raises:
        EcgRejected: ``non_numeric``, ``unknown_units``, ``wrong_length``, ``bad_fs``,
            ``bad_shape`` (no usable component, or ``dimensions`` ≠ 1), ``too_long``.
    """
    columns: list[np.ndarray] = []
    names: list[str] = []
    stated: list[str] = []
    periods: set[float] = set()
    for index, component in enumerate(components):
        sampled = component.get("valueSampledData")
        if not isinstance(sampled, Mapping):
            continue
        code = component.get("code")
        lead = lead_of(code) if isinstance(code, Mapping) else None
        if lead is None:
            continue
        where = f"component[{index}] ({lead})"
        try:
            dimensions = int(sampled.get("dimensions", 1))
        except (TypeError, ValueError, OverflowError) as exc:
            raise EcgRejected("non_numeric", f"{where}: dimensions must be a number") from exc
        if dimensions != 1:
            raise EcgRejected("bad_shape", f"{where}: dimensions must be 1 (one lead per component)")
        origin = sampled.get("origin")
        if not isinstance(origin, Mapping):
            origin = {}  # no origin, or not an object: no unit either, so unknown_units below
        unit = origin.get("code") or origin.get("unit")
        scale = volt_factor(unit, where, units)
        try:
            period = float(sampled["period"])
            factor = float(sampled.get("factor", 1.0))
            offset = float(origin.get("value", 0.0))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise EcgRejected("non_numeric", f"{where}: period/factor/origin must be numbers") from exc
        if not math.isfinite(period) or period <= 0:
            raise EcgRejected("bad_fs", f"{where}: period must be a positive number of ms, got {period!r}")
        periods.add(period)
        check_counts(len(columns) + 1, 0, None, limits, "Observation")
        columns.append((offset + factor * _parse_samples(sampled.get("data"), where, limits)) * scale)
        names.append(lead)
        stated.append(str(unit))
    if not columns:
        raise EcgRejected("bad_shape", "Observation has no component with valueSampledData for a known lead")
    if len(periods) != 1:
        raise EcgRejected("bad_fs", f"components have different sampling periods: {sorted(periods)} ms")
    return build_recording(
        columns, 1000.0 / periods.pop(), names, limits, source_format=FORMAT, source_units=stated
    )


def _parse_samples(data: object, where: str, limits: ReadLimits) -> np.ndarray:
    """Split ``SampledData.data`` into floats, markers E/L/U as NaN.

    Raises:
        EcgRejected: ``non_numeric`` for an empty or non-numeric sample, ``too_long`` beyond
            ``limits.max_samples``.
    """
    if not isinstance(data, str) or not data.strip():
        raise EcgRejected("non_numeric", f"{where}: data is empty")
    tokens = data.split()
    check_counts(1, len(tokens), None, limits, where)
    values = np.empty(len(tokens), dtype=np.float64)
    for i, token in enumerate(tokens):
        if token in SAMPLE_MARKERS:
            values[i] = np.nan
            continue
        try:
            values[i] = float(token)
        except ValueError:
            raise EcgRejected("non_numeric", f"{where}: sample {i} is {token[:20]!r}, not a number") from None
        if not math.isfinite(values[i]):
            raise EcgRejected("non_numeric", f"{where}: sample {i} is {token[:20]!r}, not a finite number")
    return values
