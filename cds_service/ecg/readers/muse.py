"""GE MUSE ``RestingECG`` XML exports → :class:`EcgRecording` (the rhythm waveform's leads).

Each ``LeadData`` holds ``WaveFormData``: base64 of little-endian int16 samples, scaled by
``LeadAmplitudeUnitsPerBit`` in ``LeadAmplitudeUnits``; the rate is ``SampleBase ×
10^SampleExponent``. MUSE stores I, II and V1–V6; the limb leads III, aVR, aVL and aVF are derived
later, by :mod:`cds_service.ecg.canonical`, like for every format. Real exports carry an external
``<!DOCTYPE RestingECG SYSTEM "restecg.dtd">`` (never fetched); a document declaring entities is
refused (``unsafe_xml``): no entity-expansion tricks.
"""

from __future__ import annotations

import math
import re
from xml.etree import ElementTree

import numpy as np

from cds_service.ecg.readers.common import b64decode, build_recording
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

FORMAT = "muse-xml"
"""This reader's format name (``EcgRecording.source_format``, ``ecg.yaml`` attachment formats)."""

UNIT_FACTORS: dict[str, float] = {"MICROVOLTS": 1e-3, "MILLIVOLTS": 1.0}
"""``LeadAmplitudeUnits`` → factor to mV."""

_ROOT = re.compile(rb"<RestingECG[\s>/]")
_SNIFF_BYTES = 4096


def sniff(data: bytes) -> bool:
    """Whether ``data`` is XML whose root element is MUSE's ``RestingECG`` (ASCII-compatible encodings)."""
    head = data[:_SNIFF_BYTES].lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"<") and _ROOT.search(head) is not None


def read(data: bytes, limits: ReadLimits) -> EcgRecording:
    """Decode the ``Rhythm`` waveform of a MUSE document.

    Raises:
        EcgRejected: ``unsafe_xml``, ``unreadable``, ``no_waveform``, ``unknown_units``,
            ``non_numeric``, ``wrong_length``, ``bad_fs``, ``too_long``.
    """
    if b"<!ENTITY" in data:
        raise EcgRejected("unsafe_xml", "MUSE XML declares entities; refused")
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise EcgRejected("unreadable", f"MUSE XML is not well-formed ({exc})") from exc
    rhythm = next(
        (w for w in root.iter("Waveform") if (w.findtext("WaveformType") or "").strip().lower() == "rhythm"),
        None,
    )
    if rhythm is None:
        raise EcgRejected("no_waveform", "MUSE XML has no Waveform with WaveformType Rhythm")
    try:
        fs = float(rhythm.findtext("SampleBase") or "nan") * 10 ** int(rhythm.findtext("SampleExponent") or 0)
    except (ValueError, OverflowError) as exc:
        raise EcgRejected("bad_fs", "MUSE SampleBase/SampleExponent are not numbers") from exc
    columns: list[np.ndarray] = []
    names: list[str] = []
    units: list[str] = []
    for lead in rhythm.iter("LeadData"):
        name = (lead.findtext("LeadID") or "").strip()
        where = f"MUSE lead {name or len(names) + 1}"
        raw = b64decode(lead.findtext("WaveFormData") or "", where)
        if len(raw) % 2:
            raise EcgRejected("unreadable", f"{where}: odd number of bytes for int16 samples")
        unit = (lead.findtext("LeadAmplitudeUnits") or "").strip().upper()
        if unit not in UNIT_FACTORS:
            raise EcgRejected(
                "unknown_units", f"{where}: LeadAmplitudeUnits {unit!r} is not MICROVOLTS/MILLIVOLTS"
            )
        try:
            per_bit = float(lead.findtext("LeadAmplitudeUnitsPerBit") or "nan")
        except ValueError as exc:
            raise EcgRejected("non_numeric", f"{where}: LeadAmplitudeUnitsPerBit is not a number") from exc
        if not math.isfinite(per_bit):
            raise EcgRejected("non_numeric", f"{where}: LeadAmplitudeUnitsPerBit is missing")
        columns.append(np.frombuffer(raw, dtype="<i2").astype(np.float64) * per_bit * UNIT_FACTORS[unit])
        names.append(name)
        units.append(unit)
    if not columns:
        raise EcgRejected("no_waveform", "MUSE Rhythm waveform has no LeadData")
    device = (root.findtext("TestDemographics/AcquisitionDevice") or "").strip() or None
    software = (root.findtext("TestDemographics/AcquisitionSoftwareVersion") or "").strip() or None
    return build_recording(
        columns, fs, names, limits, source_format=FORMAT, source_units=units, device=device, software=software
    )
