"""FHIR ``Observation.component[].valueSampledData`` (R4 SampledData) → :class:`EcgRecording`.

Unlike the file readers this one reads FHIR JSON, not bytes, so it is not in the format registry
(nothing to sniff): an ECG ``Observation`` carries one component per lead. Value =
``origin.value + factor × datum``; ``period`` is the milliseconds between samples; the markers
``E``, ``L`` and ``U`` become NaN (interpolated later, or rejected when too many). The unit is
``origin.code`` (UCUM; ``unit`` as fallback) and must be a voltage. Components without
``valueSampledData`` (e.g. a heart rate on the same Observation) are skipped; so are components
whose lead the caller's ``lead_of`` cannot name.

Two steps, so the decoding can run in another process (:mod:`cds_service.ecg.isolation`):
:func:`lead_components` names the leads (it needs the caller's ``lead_of``), :func:`read_leads`
decodes the named components (plain data only). :func:`read_components` does both.

**Bounded work.** At most :data:`MAX_COMPONENTS` components; every component's rate is checked
(``bad_fs``) before its data is parsed, and ``factor`` and ``origin.value`` are bounded
(:data:`~.common.MAX_SCALE`, :data:`~.common.MAX_OFFSET`). The ``data`` text is parsed in
chunks of :data:`PARSE_CHUNK_CHARS`, a token may be at most :data:`MAX_TOKEN_CHARS` long, and the
running sample count is held to the per-lead, per-second and total-sample limits
(:func:`~.common.check_counts`), so a huge ``data`` string is refused after one chunk, without
ever holding millions of token strings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from cds_service.ecg.readers.common import (
    MAX_OFFSET,
    MAX_SCALE,
    VOLT_FACTORS,
    bounded_float,
    build_recording,
    check_counts,
    check_fs,
    max_cells,
    volt_factor,
)
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

FORMAT = "sampled-data"
"""This reader's format name (``EcgRecording.source_format``)."""

SAMPLE_MARKERS: frozenset[str] = frozenset({"E", "L", "U"})
"""FHIR ``SampledData.data`` markers: error, below lower limit, above upper limit → NaN."""

MAX_COMPONENTS: int = 1024
"""Most components an ECG Observation may carry (one per lead, plus a few measurements)."""

MAX_TOKEN_CHARS: int = 64
"""Longest accepted sample token (a decimal with 17 significant digits and an exponent fits)."""

PARSE_CHUNK_CHARS: int = 1 << 20
"""Characters of ``data`` split and converted at a time (bounds the transient token strings)."""

LeadComponent = tuple[int, str, Mapping[str, Any]]
"""(component index, lead name as the source spells it, its ``valueSampledData``)."""

_SPACE = re.compile(r"\s")


def lead_components(
    components: Sequence[Mapping[str, Any]], lead_of: Callable[[Mapping[str, Any]], str | None]
) -> list[LeadComponent]:
    """The components that carry ``valueSampledData`` for a lead ``lead_of`` can name.

    Raises:
        EcgRejected: ``too_long`` beyond :data:`MAX_COMPONENTS` components.
    """
    if len(components) > MAX_COMPONENTS:
        raise EcgRejected(
            "too_long", f"Observation has {len(components)} components, more than {MAX_COMPONENTS}"
        )
    found: list[LeadComponent] = []
    for index, component in enumerate(components):
        sampled = component.get("valueSampledData")
        code = component.get("code")
        if not isinstance(sampled, Mapping) or not isinstance(code, Mapping):
            continue
        lead = lead_of(code)
        if lead is not None:
            found.append((index, str(lead), sampled))
    return found


def sample_chars(leads: Sequence[LeadComponent]) -> int:
    """Characters of sample text the components carry (what decoding them costs)."""
    return sum(len(data) for _, _, sampled in leads if isinstance(data := sampled.get("data"), str))


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
        EcgRejected: as :func:`read_leads`, and ``too_long`` for too many components.
    """
    return read_leads(lead_components(components, lead_of), limits, units=units)


def read_leads(
    leads: Sequence[LeadComponent], limits: ReadLimits, *, units: Mapping[str, float] = VOLT_FACTORS
) -> EcgRecording:
    """Decode named ``valueSampledData`` components (:func:`lead_components`) into one recording.

    Raises:
        EcgRejected: ``non_numeric``, ``unknown_units``, ``wrong_length``, ``bad_fs``,
            ``bad_shape`` (no usable component, or ``dimensions`` ≠ 1), ``too_long``.
    """
    columns: list[npt.NDArray[np.float64]] = []
    names: list[str] = []
    stated: list[str] = []
    periods: set[float] = set()
    for index, lead, sampled in leads:
        where = f"component[{index}] ({lead[:32]})"
        dimensions = _number(sampled.get("dimensions", 1), f"{where}: dimensions", 1e6)
        if dimensions != 1:
            raise EcgRejected("bad_shape", f"{where}: dimensions must be 1 (one lead per component)")
        origin = sampled.get("origin")
        if not isinstance(origin, Mapping):
            origin = {}  # no origin, or not an object: no unit either, so unknown_units below
        unit = origin.get("code") or origin.get("unit")
        scale = volt_factor(unit, where, units)
        if "period" not in sampled:
            raise EcgRejected("non_numeric", f"{where}: period is missing")
        period = _number(sampled.get("period"), f"{where}: period", math.inf)
        factor = _number(sampled.get("factor", 1.0), f"{where}: factor", MAX_SCALE)
        offset = _number(origin.get("value", 0.0), f"{where}: origin.value", MAX_OFFSET)
        if period <= 0:
            raise EcgRejected("bad_fs", f"{where}: period must be a positive number of ms, got {period!r}")
        fs = check_fs(1000.0 / period)
        periods.add(period)
        check_counts(len(columns) + 1, 0, None, limits, "Observation")
        parsed = sum(column.shape[0] for column in columns)
        most = min(limits.max_samples, int(limits.max_seconds * fs), max_cells(limits) - parsed)
        samples = _parse_samples(sampled.get("data"), where, most, limits)
        columns.append((offset + factor * samples) * scale)
        names.append(lead)
        stated.append(str(unit))
    if not columns:
        raise EcgRejected("bad_shape", "Observation has no component with valueSampledData for a known lead")
    if len(periods) != 1:
        raise EcgRejected("bad_fs", f"components have different sampling periods: {sorted(periods)} ms")
    return build_recording(
        columns, 1000.0 / periods.pop(), names, limits, source_format=FORMAT, source_units=stated
    )


def _number(value: object, what: str, bound: float) -> float:
    """A JSON number (or its text) within ±``bound``, else ``non_numeric``."""
    if not isinstance(value, int | float | str) or isinstance(value, bool):
        raise EcgRejected("non_numeric", f"{what} must be a number")
    try:
        return bounded_float(value, what, low=-bound, high=bound, reason="non_numeric")
    except EcgRejected as exc:
        raise EcgRejected("non_numeric", str(exc)) from None


def _parse_samples(data: object, where: str, most: int, limits: ReadLimits) -> npt.NDArray[np.float64]:
    """Split ``SampledData.data`` into floats, markers E/L/U as NaN, at most ``most`` of them.

    Raises:
        EcgRejected: ``non_numeric`` for an empty or non-numeric sample, or a token longer than
            :data:`MAX_TOKEN_CHARS`; ``too_long`` past ``most`` samples.
    """
    if not isinstance(data, str) or not data.strip():
        raise EcgRejected("non_numeric", f"{where}: data is empty")
    parts: list[npt.NDArray[np.float64]] = []
    count = 0
    start = 0
    while start < len(data):
        end = min(start + PARSE_CHUNK_CHARS, len(data))
        if end < len(data):  # move the cut to a blank, so no token is split
            blank = _SPACE.search(data, end, end + MAX_TOKEN_CHARS + 1)
            if blank is None:
                raise EcgRejected("non_numeric", f"{where}: a sample token is longer than {MAX_TOKEN_CHARS}")
            end = blank.start()
        tokens = data[start:end].split()
        if count + len(tokens) > most:
            raise EcgRejected(
                "too_long",
                f"{where}: more than {most} samples (limits of {limits.max_seconds:g} s and in all)",
            )
        parts.append(_parse_tokens(tokens, where, count))
        count += len(tokens)
        start = end
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _parse_tokens(tokens: list[str], where: str, first: int) -> npt.NDArray[np.float64]:
    """Floats of ``tokens`` (numbering them from ``first`` in messages); markers → NaN."""
    if any(len(token) > MAX_TOKEN_CHARS for token in tokens):
        raise EcgRejected("non_numeric", f"{where}: a sample token is longer than {MAX_TOKEN_CHARS}")
    markers = np.zeros(len(tokens), dtype=bool)
    try:
        values = np.array(tokens, dtype=np.float64)
    except ValueError:  # markers or a bad token: one by one, for the marker rule and the message
        values = np.empty(len(tokens), dtype=np.float64)
        for i, token in enumerate(tokens):
            if token in SAMPLE_MARKERS:
                markers[i], values[i] = True, np.nan
                continue
            try:
                values[i] = float(token)
            except ValueError:
                raise EcgRejected(
                    "non_numeric", f"{where}: sample {first + i} is {token[:20]!r}, not a number"
                ) from None
    bad = np.flatnonzero(~np.isfinite(values) & ~markers)
    if bad.size:
        i = int(bad[0])
        raise EcgRejected(
            "non_numeric", f"{where}: sample {first + i} is {tokens[i][:20]!r}, not a finite number"
        )
    return values
