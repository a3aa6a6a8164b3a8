"""Lead names → the model's 12 leads: the one place that decides which column is which lead.

Every path to the model goes through here: the service's ECG selection (one
:class:`EcgRecording` from any reader, :func:`to_model_leads`) and training's batch preparation
(:func:`plan_leads` inside :func:`cds_service.ecg.prepare.prepare_ecg_batch`). Rules:

1. **By name, never by position**, through :func:`fhir_mappings.leads.canonical_lead` (case,
   blanks, ``Lead``/``MDC_ECG_LEAD_`` prefixes, aliases). An inverted lead (``-aVR``, Cabrera
   display) is multiplied by -1 and used as aVR. Right-sided and posterior leads (V3R, V4R,
   V7–V9) are never taken for V1–V6; leads the model does not use are ignored.
2. **One column per lead.** An upright lead wins over an inverted copy of it; otherwise two
   columns naming the same lead (both upright, or both inverted) are ``duplicate_leads``.
3. **Derived limb leads.** III, aVR, aVL and aVF, when absent, are computed exactly from I and II
   (:data:`LIMB_WEIGHTS`: Einthoven III = II − I; Goldberger aVR = −(I + II)/2, aVL = I − II/2,
   aVF = II − I/2). Devices that store 8 leads (GE MUSE, many SCP-ECG files) need this; a lead the
   file does hold is kept as recorded.
4. **Complete or rejected.** A precordial lead (or I/II) that is missing cannot be derived:
   ``missing_leads`` names what is missing and what the file has.

Every failure is an :class:`EcgRejected` with a reason of :data:`~cds_service.ecg.record.REASONS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from cds_service.ecg.record import EcgRecording, EcgRejected
from fhir_mappings.leads import canonical_lead
from fhir_mappings.signal_spec import MIN_DURATION_S, MODEL_LEADS

__all__ = [
    "LIMB_WEIGHTS",
    "MAX_MISSING_FRACTION",
    "LeadPlan",
    "derive_limb_leads",
    "gather",
    "plan_leads",
    "to_model_leads",
]

LIMB_WEIGHTS: dict[str, dict[str, float]] = {
    "III": {"I": -1.0, "II": 1.0},
    "aVR": {"I": -0.5, "II": -0.5},
    "aVL": {"I": 1.0, "II": -0.5},
    "aVF": {"I": -0.5, "II": 1.0},
}
"""Limb leads as weighted sums of I and II (Einthoven, Goldberger); the weights are exact in binary."""

MAX_MISSING_FRACTION: float = 0.2
"""A lead with more than this fraction of missing samples is rejected (``too_many_missing``).

Interpolating across a few dropped samples is harmless; interpolating over a fifth of the strip
would hand the model invented signal."""


@dataclass(frozen=True)
class LeadPlan:
    """Where each model lead comes from, in :data:`MODEL_LEADS` order.

    ``columns[i]`` is the input column of model lead ``i`` and ``signs[i]`` the factor applied to
    it; for a derived lead (named in ``derived``) the column is -1 and the sign 1.0.
    """

    columns: tuple[int, ...]
    signs: tuple[float, ...]
    derived: tuple[str, ...]

    @property
    def inverted(self) -> bool:
        """Whether some lead is taken from an inverted column."""
        return any(sign != 1.0 for sign in self.signs)


def plan_leads(lead_names: Sequence[str], aliases: Mapping[str, Sequence[str]] | None = None) -> LeadPlan:
    """Map input column names to the model leads (rules 1–4 of the module docstring).

    Args:
        lead_names: one name per input column, as the source spells it.
        aliases: optional model lead → other names (``ecg.yaml``'s ``lead_aliases``).

    Raises:
        EcgRejected: ``duplicate_leads`` or ``missing_leads``.
    """
    found: dict[str, tuple[int, float]] = {}
    for column, name in enumerate(lead_names):
        match = canonical_lead(str(name), aliases)
        if match is None:
            continue
        if match.lead in found:
            other, other_sign = found[match.lead]
            if other_sign == match.sign:
                raise EcgRejected(
                    "duplicate_leads",
                    f"ECG leads {lead_names[other]!r} and {name!r} both resolve to lead {match.lead}",
                )
            if match.sign < other_sign:
                continue  # keep the upright recording of the lead
        found[match.lead] = (column, match.sign)
    derived = tuple(
        lead
        for lead, weights in LIMB_WEIGHTS.items()
        if lead not in found and all(s in found for s in weights)
    )
    missing = [lead for lead in MODEL_LEADS if lead not in found and lead not in derived]
    if missing:
        raise EcgRejected(
            "missing_leads",
            f"ECG lacks lead(s) {', '.join(missing)} (has {', '.join(map(str, lead_names)) or 'none'})",
        )
    return LeadPlan(
        columns=tuple(found[lead][0] if lead in found else -1 for lead in MODEL_LEADS),
        signs=tuple(found[lead][1] if lead in found else 1.0 for lead in MODEL_LEADS),
        derived=derived,
    )


def gather(signals: npt.NDArray[np.generic], plan: LeadPlan) -> npt.NDArray[np.float64]:
    """The model leads of ``signals`` (..., T, C) as float64 (..., T, 12), signs applied.

    Derived leads are left at 0.0: fill them with :func:`derive_limb_leads` once the measured
    leads are final (after interpolating missing samples, so the derivation stays exact).
    """
    columns = np.array([max(column, 0) for column in plan.columns], dtype=np.intp)
    out = signals[..., columns].astype(np.float64)
    for lead in plan.derived:
        out[..., MODEL_LEADS.index(lead)] = 0.0
    if plan.inverted:
        out *= np.asarray(plan.signs, dtype=np.float64)
    return out


def derive_limb_leads(batch: npt.NDArray[np.float64], leads: Sequence[str]) -> None:
    """Fill ``leads`` of ``batch`` (..., T, 12, model order) in place from its leads I and II."""
    first, second = batch[..., MODEL_LEADS.index("I")], batch[..., MODEL_LEADS.index("II")]
    sources = {"I": first, "II": second}
    for lead in leads:
        weights = LIMB_WEIGHTS[lead]
        target = MODEL_LEADS.index(lead)
        batch[..., target] = sum((w * sources[s] for s, w in weights.items()), np.zeros_like(first))


def to_model_leads(
    recording: EcgRecording,
    aliases: Mapping[str, Sequence[str]] | None = None,
    *,
    min_duration_s: float = MIN_DURATION_S,
) -> EcgRecording:
    """The recording with exactly the 12 model leads, in :data:`MODEL_LEADS` order, at its own rate.

    Names are resolved (signs applied), absent limb leads derived from I and II, completeness and
    duration checked, and each lead's share of missing samples (NaN) bounded.

    Raises:
        EcgRejected: ``duplicate_leads``, ``missing_leads``, ``too_short``, ``too_many_missing``.
    """
    plan = plan_leads(recording.lead_names, aliases)
    if recording.duration_s < min_duration_s:
        raise EcgRejected(
            "too_short", f"ECG lasts {recording.duration_s:.2f} s, less than the {min_duration_s:g} s minimum"
        )
    signal = gather(recording.signal, plan)
    derive_limb_leads(signal, plan.derived)
    missing_fraction = (~np.isfinite(signal)).mean(axis=0)
    worst = int(np.argmax(missing_fraction))
    if missing_fraction[worst] > MAX_MISSING_FRACTION:
        raise EcgRejected(
            "too_many_missing",
            f"lead {MODEL_LEADS[worst]} misses {missing_fraction[worst]:.0%} of its samples"
            f" (limit {MAX_MISSING_FRACTION:.0%})",
        )
    notes = [f"{lead} derived from I and II" for lead in plan.derived]
    inverted = [i for i, sign in enumerate(plan.signs) if sign < 0]
    notes += [
        f"{MODEL_LEADS[i]} taken inverted from {recording.lead_names[plan.columns[i]]!r}" for i in inverted
    ]
    units = recording.source_units
    return replace(
        recording,
        signal=np.ascontiguousarray(signal, dtype=np.float32),
        lead_names=MODEL_LEADS,
        source_units=tuple(units[c] if 0 <= c < len(units) else "" for c in plan.columns) if units else (),
        warnings=(*recording.warnings, *notes),
    )
