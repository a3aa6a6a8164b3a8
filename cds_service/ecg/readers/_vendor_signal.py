"""Bounds, number parsing and the plausibility check shared by the Philips, HL7 aECG, SCP and EDF readers.

Every number a vendor file states that drives work (a rate, a sample or lead count, a gain, a
section length) passes through :func:`number` or :func:`check_declared` before it is used, so a
hostile header fails fast instead of allocating or looping. Decoders report their running output to
:func:`~cds_service.ecg.readers.common.check_inflated`, the byte and ratio cap of :class:`~cds_service.ecg.record.ReadLimits`.
:func:`make_recording` builds the :class:`~cds_service.ecg.record.EcgRecording` and applies
:func:`check_plausible`: a lead that after scaling to mV looks like raw ADC counts, volts or a flat
line is refused (``implausible_amplitude``) rather than handed to the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import numpy.typing as npt

from cds_service.ecg.readers.common import check_counts, check_fs
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

MAX_MEDIAN_ABS_MV: float = 50.0
"""A lead whose median absolute value exceeds this is raw ADC counts or carries an offset."""

MAX_SPREAD_MV: float = 100.0
"""A lead whose 99th percentile deviation from its median exceeds this is not in mV (counts)."""

MIN_RANGE_MV: float = 0.01
"""A lead whose peak-to-peak range is below this (10 µV) is flat, or volts labelled as mV."""

_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,3})?")
_INTEGER = re.compile(r"[+-]?\d{1,12}")


def check_size(data: bytes, limits: ReadLimits, what: str) -> None:
    """Refuse a file larger than ``limits.max_bytes`` before parsing it (``attachment_too_large``)."""
    if len(data) > limits.max_bytes:
        raise EcgRejected(
            "attachment_too_large", f"{what}: {len(data)} bytes, more than the limit of {limits.max_bytes}"
        )


def number(
    text: str | None, what: str, *, low: float, high: float, reason: str = "unreadable", integer: bool = False
) -> float:
    """Parse a decimal (or integer) a file states, and check it lies in ``[low, high]``.

    Only plain decimal notation is accepted: no ``nan``, ``inf``, hexadecimal or ``1_000`` (which
    Python's ``float`` would take), and at most three exponent digits, so nothing overflows.

    Raises:
        EcgRejected: ``unreadable`` when missing or not a number; ``reason`` when out of range.
    """
    if text is None or not text.strip():
        raise EcgRejected("unreadable", f"{what} is not stated")
    stripped = text.strip()
    if not (_INTEGER if integer else _DECIMAL).fullmatch(stripped):
        raise EcgRejected("unreadable", f"{what} is not a number: {stripped[:32]!r}")
    value = float(stripped)
    if not math.isfinite(value) or not low <= value <= high:
        raise EcgRejected(reason, f"{what} is {stripped[:32]}, outside [{low:g}, {high:g}]")
    return value


def check_declared(n_leads: int, n_samples: int, fs: float, limits: ReadLimits, what: str) -> float:
    """Check declared lead and sample counts and the rate before decoding; returns the rate.

    Besides the per-lead and per-second limits, the whole decoded signal (float32) must fit in
    ``limits.max_unpacked_bytes``: a header claiming 64 leads at 20 kHz for 60 s would pass each
    single limit but ask for 300 MB.

    Raises:
        EcgRejected: ``bad_fs``, ``bad_shape`` (no leads or samples) or ``too_long``.
    """
    rate = check_fs(fs)
    if n_leads < 1 or n_samples < 1:
        raise EcgRejected("bad_shape", f"{what} declares {n_leads} leads of {n_samples} samples")
    check_counts(n_leads, n_samples, rate, limits, what)
    if n_leads * n_samples * 4 > limits.max_unpacked_bytes:
        raise EcgRejected(
            "too_long",
            f"{what} declares {n_leads} × {n_samples} samples, more than "
            f"{limits.max_unpacked_bytes} bytes decoded",
        )
    return rate


def check_plausible(signal: npt.NDArray[np.float32], names: Sequence[str]) -> None:
    """Refuse leads whose mV values cannot be a surface ECG.

    Raw ADC counts read as mV have a median absolute value or a spread of hundreds; volts read as
    mV (or a disconnected lead) stay within a few µV. Either would reach the model as a confident
    but meaningless input, so the whole recording is refused.

    Raises:
        EcgRejected: ``non_finite`` for a lead without finite samples, ``implausible_amplitude``.
    """
    for column, name in enumerate(names):
        lead = np.asarray(signal[:, column], dtype=np.float64)
        if not np.isfinite(lead).all():
            raise EcgRejected("non_finite", f"lead {name} has samples that are not finite numbers")
        median = float(np.median(lead))
        low, high = float(lead.min()), float(lead.max())
        if high - low < MIN_RANGE_MV:
            raise EcgRejected(
                "implausible_amplitude",
                f"lead {name} spans {high - low:.3g} mV: flat, or volts stated as mV",
            )
        median_abs = float(np.median(np.abs(lead)))
        spread = float(np.percentile(np.abs(lead - median), 99))
        if median_abs > MAX_MEDIAN_ABS_MV or spread > MAX_SPREAD_MV:
            raise EcgRejected(
                "implausible_amplitude",
                f"lead {name} has a median magnitude of {median_abs:.3g} mV and a spread of "
                f"{spread:.3g} mV: raw ADC counts or a wrong unit, not millivolts",
            )


def make_recording(
    signal: npt.NDArray[np.float32],
    fs: float,
    names: Sequence[str],
    units: Sequence[str],
    *,
    source_format: str,
    limits: ReadLimits,
    device: str | None = None,
    software: str | None = None,
    recorded_at: datetime | None = None,
    warnings: Sequence[str] = (),
) -> EcgRecording:
    """Check a decoded (T, C) mV signal and wrap it as an :class:`EcgRecording`.

    Raises:
        EcgRejected: ``bad_shape``, ``bad_fs``, ``too_long``, ``non_finite``,
            ``implausible_amplitude``.
    """
    if signal.ndim != 2 or signal.shape[1] != len(names) or signal.shape[0] == 0:
        raise EcgRejected("bad_shape", f"{source_format}: signal {signal.shape} for {len(names)} leads")
    rate = check_declared(signal.shape[1], signal.shape[0], fs, limits, source_format)
    check_plausible(signal, names)
    return EcgRecording(
        signal=np.ascontiguousarray(signal, dtype=np.float32),
        fs=rate,
        lead_names=tuple(names),
        source_units=tuple(units),
        source_format=source_format,
        device=device or None,
        software=software or None,
        recorded_at=recorded_at,
        warnings=tuple(warnings),
    )


def clean_text(value: str | None, limit: int = 120) -> str | None:
    """A device or software string trimmed to one line of printable characters, or ``None``."""
    if value is None:
        return None
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in value[: limit * 4]).split())
    return text[:limit] or None
