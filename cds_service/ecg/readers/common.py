"""Helpers every ECG reader shares: unit factors, base64, bounds, and building the record.

A reader decodes its format into per-lead sample vectors and hands them to :func:`build_recording`,
which checks what must hold for every format (equal lengths, a plausible sampling rate, the
:class:`~cds_service.ecg.record.ReadLimits`) and returns the one
:class:`~cds_service.ecg.record.EcgRecording` shape. Every failure is an
:class:`~cds_service.ecg.record.EcgRejected` with a reason code.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits
from fhir_mappings.signal_spec import MAX_FS, MIN_FS

VOLT_FACTORS: dict[str, float] = {"V": 1000.0, "mV": 1.0, "uV": 1e-3, "nV": 1e-6}
"""UCUM voltage unit → factor to mV (the units of ``ecg.yaml``'s ``amplitude_units`` and nV)."""


def volt_factor(unit: str | None, what: str, units: Mapping[str, float] = VOLT_FACTORS) -> float:
    """Factor from ``unit`` to mV.

    Raises:
        EcgRejected: ``unknown_units`` naming ``what`` carried the unit.
    """
    if isinstance(unit, str) and unit.strip() in units:
        return units[unit.strip()]
    raise EcgRejected(
        "unknown_units", f"{what}: unit {unit!r} is not one of the voltage units {sorted(units)}"
    )


def b64decode(text: str, what: str) -> bytes:
    """Decode base64 that may contain line breaks.

    Raises:
        EcgRejected: ``unreadable`` when ``text`` is not base64.
    """
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EcgRejected("unreadable", f"{what}: not valid base64 ({exc})") from exc


def check_counts(n_leads: int, n_samples: int, fs: float | None, limits: ReadLimits, what: str) -> None:
    """Refuse a declared size beyond ``limits`` before any sample is decoded.

    Raises:
        EcgRejected: ``too_long`` for too many leads, samples per lead or seconds.
    """
    if n_leads > limits.max_leads:
        raise EcgRejected("too_long", f"{what} declares {n_leads} leads, more than {limits.max_leads}")
    if n_samples > limits.max_samples:
        raise EcgRejected(
            "too_long", f"{what} declares {n_samples} samples per lead, more than {limits.max_samples}"
        )
    if fs is not None and math.isfinite(fs) and fs > 0 and n_samples / fs > limits.max_seconds:
        raise EcgRejected(
            "too_long", f"{what} lasts {n_samples / fs:.1f} s, longer than {limits.max_seconds:g} s"
        )


def check_fs(fs: float) -> float:
    """``fs`` as a float when it is a finite rate within [MIN_FS, MAX_FS] Hz.

    Raises:
        EcgRejected: ``bad_fs``. A wrong header rate is not harmless: resampling to 100 Hz
            upsamples by 100 / fs, so a strip declared at 0.001 Hz would become gigabytes.
    """
    if not math.isfinite(fs) or not MIN_FS <= fs <= MAX_FS:
        raise EcgRejected(
            "bad_fs", f"ECG sampling rate must be between {MIN_FS:g} and {MAX_FS:g} Hz, got {fs!r}"
        )
    return float(fs)


def build_recording(
    columns: Sequence[npt.ArrayLike],
    fs: float,
    names: Sequence[str],
    limits: ReadLimits,
    *,
    source_format: str,
    source_units: Sequence[str] = (),
    device: str | None = None,
    software: str | None = None,
    warnings: Sequence[str] = (),
) -> EcgRecording:
    """Stack per-lead sample vectors (already in mV) into an :class:`EcgRecording`.

    Raises:
        EcgRejected: ``bad_shape`` (no leads or no samples), ``wrong_length``, ``bad_fs``,
            ``too_long``.
    """
    if not columns:
        raise EcgRejected("bad_shape", "ECG has no leads")
    arrays = [np.asarray(c, dtype=np.float64) for c in columns]
    lengths = {a.shape[0] for a in arrays}
    if len(lengths) != 1:
        raise EcgRejected("wrong_length", f"ECG leads differ in length: {sorted(lengths)} samples")
    rate = check_fs(fs)
    (n_samples,) = lengths
    if n_samples == 0:
        raise EcgRejected("bad_shape", "ECG leads have no samples")
    check_counts(len(arrays), n_samples, rate, limits, source_format)
    return EcgRecording(
        signal=np.stack(arrays, axis=1).astype(np.float32),
        fs=rate,
        lead_names=tuple(str(n) for n in names),
        source_units=tuple(source_units),
        source_format=source_format,
        device=device,
        software=software,
        warnings=tuple(warnings),
    )
