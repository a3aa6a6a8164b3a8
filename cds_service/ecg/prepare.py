"""ECG preparation shared by training and the service: any 12-lead recording → (1000, 12) float32 mV.

Both ``ecglab preprocess`` (MIMIC-IV-ECG WFDB records) and the CDS service (FHIR ECG resources)
feed the model through this module, so a recording is treated the same way in training and at the
bedside. Only numpy and scipy are used: the service image has no torch or pandas.

Steps (method §2.2, in this order):

1. **Leads by name, never by position** (:mod:`cds_service.ecg.canonical`): each input lead name
   is resolved to a model lead (inverted leads such as ``-aVR`` are multiplied by -1); the output
   columns follow :data:`MODEL_LEADS` (I, II, V1–V6, III, aVR, aVL, aVF). MIMIC stores I, II, III,
   aVR, aVF, aVL, V1–V6; other sources use other orders and spellings ("Lead II",
   "MDC_ECG_LEAD_AVR", "v1").
2. **Linear interpolation of missing samples** per lead (NaN and ±inf; the edges take the nearest
   valid sample). A lead with no finite sample is rejected (reason ``non_finite``). Absent limb
   leads are then derived exactly from I and II.
3. **Clip to ±3 mV** (the reference code's ``clip_amp=3``).
4. **Resample to 100 Hz** with :func:`scipy.signal.resample_poly` using the rational ratio
   ``100 / fs``. *Deviation:* the reference code uses ``resampy`` (a band-limited sinc
   interpolator). Both are anti-aliased band-limited resamplers and agree to within the filter
   ripple on ECG content (< 40 Hz); ``resample_poly`` is in scipy, exact for the rational
   ratios of real ECG devices (500→100 is a clean 1/5 decimation) and adds no dependency.
5. **Take the first 10 s**, or, for a recording between :data:`MIN_DURATION_S` (2.5 s, one model
   window) and 10 s, **edge-pad** it to 10 s. *Deviation:* MIMIC-IV-ECG records are always 10 s,
   so the reference code never pads; the service may meet shorter rhythm strips. Edge padding
   repeats the last sample so no artificial step is introduced; shorter than 2.5 s is rejected
   (reason ``too_short``) because not even one model window would be real signal.

:func:`prepare_ecg_batch` is the vectorised form used by ``ecglab preprocess`` for many records of
the same shape; :func:`prepare_ecg` is that same code with a batch of one, so both give
bit-identical output. Every failure is an :class:`~cds_service.ecg.record.EcgRejected`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np
import numpy.typing as npt
from scipy.signal import resample_poly

from cds_service.ecg.canonical import derive_limb_leads, gather, plan_leads
from cds_service.ecg.record import EcgRejected
from fhir_mappings.signal_spec import (
    CLIP_MV,
    MAX_FS,
    MIN_DURATION_S,
    MIN_FS,
    MODEL_LEADS,
    TARGET_FS,
    TARGET_SAMPLES,
)

__all__ = ["MAX_RATIO_DENOMINATOR", "prepare_ecg", "prepare_ecg_batch", "resample_ratio"]

MAX_RATIO_DENOMINATOR: int = 1000
"""Largest denominator of the resampling ratio ``100 / fs`` (bounds the polyphase filter size)."""


def resample_ratio(fs: float) -> tuple[int, int]:
    """``(up, down)`` with ``up / down`` = ``TARGET_FS / fs`` (denominator ≤ 1000).

    Raises:
        EcgRejected: ``bad_fs`` when ``fs`` is not a finite number within
        [:data:`MIN_FS`, :data:`MAX_FS`] Hz. The lower bound matters beyond plausibility: a
        claimed rate of 0.001 Hz would make the resampler allocate gigabytes for a few samples.
    """
    if not np.isfinite(fs) or not MIN_FS <= fs <= MAX_FS:
        raise EcgRejected(
            "bad_fs", f"ECG sampling rate must be between {MIN_FS:g} and {MAX_FS:g} Hz, got {fs!r}"
        )
    ratio = Fraction(TARGET_FS / float(fs)).limit_denominator(MAX_RATIO_DENOMINATOR)
    if ratio == 0:
        raise EcgRejected("bad_fs", f"ECG sampling rate {fs!r} Hz is too high to resample to {TARGET_FS} Hz")
    return ratio.numerator, ratio.denominator


def _interpolate_missing(batch: np.ndarray) -> None:
    """Replace non-finite samples in place by linear interpolation along time, per record and lead.

    Raises:
        EcgRejected: ``non_finite`` when a lead has no finite sample at all.
    """
    finite = np.isfinite(batch)
    if finite.all():
        return
    n_samples = batch.shape[1]
    t = np.arange(n_samples)
    bad_records, bad_leads = np.nonzero(~finite.all(axis=1))
    for record, lead in zip(bad_records.tolist(), bad_leads.tolist(), strict=True):
        ok = finite[record, :, lead]
        if not ok.any():
            raise EcgRejected("non_finite", f"ECG lead {MODEL_LEADS[lead]} has no finite sample")
        batch[record, ~ok, lead] = np.interp(t[~ok], t[ok], batch[record, ok, lead])


def prepare_ecg_batch(
    signals: npt.ArrayLike,
    fs: float,
    lead_names: Sequence[str],
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> npt.NDArray[np.float32]:
    """Prepare a batch of recordings that share sampling rate, length and lead layout.

    Args:
        signals: (B, T, C) array in mV; column ``c`` is lead ``lead_names[c]``.
        fs: sampling rate in Hz.
        lead_names: names of the C input columns (any order, extra leads ignored).
        aliases: optional model lead → alternative names (see :func:`fhir_mappings.leads.canonical_lead`).

    Returns:
        (B, 1000, 12) float32 mV in :data:`MODEL_LEADS` order at :data:`TARGET_FS`.

    Raises:
        EcgRejected: with ``reason`` ``bad_shape``, ``bad_fs``, ``missing_leads``,
            ``duplicate_leads``, ``non_finite`` or ``too_short``.
    """
    arr = np.asarray(signals)
    if arr.ndim != 3 or arr.shape[1] == 0 or arr.shape[2] != len(lead_names):
        raise EcgRejected(
            "bad_shape",
            f"ECG signal must be (samples, leads) with one column per lead name ({len(lead_names)}),"
            f" got shape {arr.shape[1:]}",
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise EcgRejected("bad_shape", f"ECG signal must be numeric, got dtype {arr.dtype}")
    up, down = resample_ratio(fs)
    n_in = arr.shape[1]
    if n_in / float(fs) < MIN_DURATION_S:
        raise EcgRejected(
            "too_short", f"ECG lasts {n_in / float(fs):.2f} s, shorter than the {MIN_DURATION_S} s minimum"
        )
    plan = plan_leads(lead_names, aliases)
    batch = gather(arr, plan)  # (B, T, 12) float64, model order, signs applied
    _interpolate_missing(batch)
    derive_limb_leads(batch, plan.derived)
    np.clip(batch, -CLIP_MV, CLIP_MV, out=batch)
    if (up, down) != (1, 1):
        batch = resample_poly(batch, up, down, axis=1)  # (B, ceil(T*up/down), 12)
    n_out = batch.shape[1]
    if n_out >= TARGET_SAMPLES:
        batch = batch[:, :TARGET_SAMPLES, :]
    else:
        batch = np.pad(batch, ((0, 0), (0, TARGET_SAMPLES - n_out), (0, 0)), mode="edge")
    return np.ascontiguousarray(batch, dtype=np.float32)


def prepare_ecg(
    signal: npt.ArrayLike,
    fs: float,
    lead_names: Sequence[str],
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> npt.NDArray[np.float32]:
    """Turn one recording into model input: (T, C) mV at ``fs`` Hz → (1000, 12) float32 mV.

    Leads are matched by name, missing samples interpolated, absent limb leads derived, amplitudes
    clipped to ±3 mV, the signal resampled to 100 Hz and cut or edge-padded to 10 s (see the
    module docstring).

    Raises:
        EcgRejected: with ``reason`` ``bad_shape``, ``bad_fs``, ``missing_leads``,
            ``duplicate_leads``, ``non_finite`` or ``too_short``.
    """
    arr = np.asarray(signal)
    if arr.ndim != 2:
        raise EcgRejected("bad_shape", f"ECG signal must be a 2-D (samples, leads) array, got {arr.ndim}-D")
    return prepare_ecg_batch(arr[np.newaxis], fs, lead_names, aliases)[0]
