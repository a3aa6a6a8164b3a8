"""GE MUSE ``RestingECG`` XML exports → :class:`EcgRecording` (the rhythm waveform's leads).

Each ``LeadData`` holds ``WaveFormData``: base64 of little-endian int16 samples, scaled by
``LeadAmplitudeUnitsPerBit`` in ``LeadAmplitudeUnits``; the rate is ``SampleBase ×
10^SampleExponent``. MUSE stores I, II and V1–V6; the limb leads III, aVR, aVL and aVF are derived
later, by :mod:`cds_service.ecg.canonical`, like for every format.

**Safe XML.** The document is parsed with ``defusedxml`` whatever its encoding (UTF-8, Latin-1,
UTF-16 with or without a BOM or a truthful declaration), with nesting depth and element count
capped (:func:`~cds_service.ecg.readers.common.parse_xml_external_dtd`). Real exports carry an
external ``<!DOCTYPE RestingECG SYSTEM "restecg.dtd">``; that declaration is dropped unread (the
DTD is never fetched); any other DTD, and every entity, is refused (``unsafe_xml``).

**Bounded work.** Lead count (``ReadLimits.max_leads``), rate (``SampleBase`` within the accepted
rates, ``SampleExponent`` within ±:data:`MAX_EXPONENT`, so no huge power is computed) and the
amplitude per bit (:data:`~cds_service.ecg.readers.common.MAX_SCALE`) are checked before use; each
lead's base64 size is checked against the sample, second and total-sample limits *before* it is
decoded, and a stated ``LeadByteCountTotal`` or ``LeadSampleCountTotal`` must match what is
decoded.
"""

from __future__ import annotations

import re

import numpy as np

from cds_service.ecg.readers._vendor_xml import head_text
from cds_service.ecg.readers.common import (
    MAX_SCALE,
    b64_size,
    b64decode,
    bounded_float,
    bounded_int,
    build_recording,
    check_counts,
    check_fs,
    parse_xml_external_dtd,
)
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

FORMAT = "muse-xml"
"""This reader's format name (``EcgRecording.source_format``, ``ecg.yaml`` attachment formats)."""

UNIT_FACTORS: dict[str, float] = {"MICROVOLTS": 1e-3, "MILLIVOLTS": 1.0}
"""``LeadAmplitudeUnits`` → factor to mV."""

MAX_EXPONENT: int = 6
"""Largest magnitude of ``SampleExponent`` (real exports state 0)."""

_ROOT = re.compile(r"<RestingECG[\s>/]")


def sniff(data: bytes) -> bool:
    """Whether ``data`` is XML whose root element is MUSE's ``RestingECG`` (any encoding, UTF-16 too)."""
    head = head_text(data).lstrip("\ufeff \t\r\n")
    return head.startswith("<") and _ROOT.search(head) is not None


def read(data: bytes, limits: ReadLimits) -> EcgRecording:
    """Decode the ``Rhythm`` waveform of a MUSE document.

    Raises:
        EcgRejected: ``unsafe_xml``, ``unreadable``, ``no_waveform``, ``unknown_units``,
            ``non_numeric``, ``wrong_length``, ``bad_fs``, ``bad_shape``, ``too_long``.
    """
    root = parse_xml_external_dtd(data, "MUSE XML")
    rhythm = next(
        (w for w in root.iter("Waveform") if (w.findtext("WaveformType") or "").strip().lower() == "rhythm"),
        None,
    )
    if rhythm is None:
        raise EcgRejected("no_waveform", "MUSE XML has no Waveform with WaveformType Rhythm")
    base = bounded_float(rhythm.findtext("SampleBase"), "MUSE SampleBase", low=0, high=1e12, reason="bad_fs")
    exponent = bounded_int(
        rhythm.findtext("SampleExponent") or "0",
        "MUSE SampleExponent",
        low=-MAX_EXPONENT,
        high=MAX_EXPONENT,
        reason="bad_fs",
        low_reason="bad_fs",
    )
    fs = check_fs(base * 10.0**exponent)
    columns: list[np.ndarray] = []
    names: list[str] = []
    units: list[str] = []
    for lead in rhythm.iter("LeadData"):
        name = (lead.findtext("LeadID") or "").strip()[:32]
        where = f"MUSE lead {name or len(names) + 1}"
        text = lead.findtext("WaveFormData") or ""
        check_counts(len(columns) + 1, b64_size(text) // 2, fs, limits, where)
        unit = (lead.findtext("LeadAmplitudeUnits") or "").strip().upper()
        if unit not in UNIT_FACTORS:
            raise EcgRejected(
                "unknown_units", f"{where}: LeadAmplitudeUnits {unit[:32]!r} is not MICROVOLTS/MILLIVOLTS"
            )
        per_bit = bounded_float(
            lead.findtext("LeadAmplitudeUnitsPerBit"),
            f"{where} LeadAmplitudeUnitsPerBit",
            low=-MAX_SCALE,
            high=MAX_SCALE,
            reason="non_numeric",
        )
        raw = b64decode(text, where)
        if len(raw) % 2:
            raise EcgRejected("unreadable", f"{where}: odd number of bytes for int16 samples")
        _check_stated(lead.findtext("LeadByteCountTotal"), len(raw), f"{where} LeadByteCountTotal")
        _check_stated(lead.findtext("LeadSampleCountTotal"), len(raw) // 2, f"{where} LeadSampleCountTotal")
        columns.append(np.frombuffer(raw, dtype="<i2").astype(np.float64) * per_bit * UNIT_FACTORS[unit])
        names.append(name)
        units.append(unit)
    if not columns:
        raise EcgRejected("no_waveform", "MUSE Rhythm waveform has no LeadData")
    device = (root.findtext("TestDemographics/AcquisitionDevice") or "").strip()[:128] or None
    software = (root.findtext("TestDemographics/AcquisitionSoftwareVersion") or "").strip()[:128] or None
    return build_recording(
        columns, fs, names, limits, source_format=FORMAT, source_units=units, device=device, software=software
    )


def _check_stated(stated: str | None, actual: int, what: str) -> None:
    """A count the file states (when it states one) must be what was decoded.

    Raises:
        EcgRejected: ``unreadable`` for a count that is not a number or differs.
    """
    if stated is None or not stated.strip():
        return
    expected = bounded_int(
        stated.strip(), what, low=0, high=2**31, reason="unreadable", low_reason="unreadable"
    )
    if expected != actual:
        raise EcgRejected("unreadable", f"{what} is {expected}, the data holds {actual}")
