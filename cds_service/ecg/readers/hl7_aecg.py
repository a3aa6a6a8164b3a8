"""HL7 annotated ECG (``urn:hl7-org:v3`` ``AnnotatedECG``, FDA aECG) → :class:`EcgRecording`.

An aECG holds one or more ``series``; the rhythm series (code ``RHYTHM``, or no code) is read, and
representative beats (``REPRESENTATIVE_BEAT`` series and every ``derivedSeries``) are not: a median
beat is not a rhythm strip. In the series' first ``sequenceSet``:

* the time sequence (``TIME_RELATIVE`` / ``TIME_ABSOLUTE``) gives the sampling period as its
  ``increment`` (s, ms or us); an explicit list of sample times is refused;
* each lead sequence (``MDC_ECG_LEAD_*`` or another code) is an ``SLIST_PQ``: sample ``k`` is
  ``origin + scale × digits[k]``, with ``origin`` and ``scale`` in their own voltage units.

Lead names are the file's codes (``MDC_ECG_LEAD_V3R`` stays ``MDC_ECG_LEAD_V3R``). Device and software
come from the series' ``manufacturedSeriesDevice``; the time from ``effectiveTime/low``.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from xml.etree import ElementTree

import numpy as np
import numpy.typing as npt

from cds_service.ecg.readers._vendor_signal import (
    check_declared,
    check_size,
    clean_text,
    make_recording,
    number,
)
from cds_service.ecg.readers._vendor_xml import head_text, local, parse_xml, text_of
from cds_service.ecg.readers.common import volt_factor
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

FORMAT: str = "hl7-aecg"
"""The ``source_format`` of recordings this reader returns."""

NS: str = "urn:hl7-org:v3"
XSI_TYPE: str = "{http://www.w3.org/2001/XMLSchema-instance}type"

TIME_UNITS: dict[str, float] = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
"""UCUM time units of the sampling increment → seconds."""

MAX_SCALE: float = 1e9
"""Largest ``scale`` or ``origin`` magnitude parsed (in the file's unit) before the mV checks."""

_TS = re.compile(r"(\d{4})(\d{2})(\d{2})(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?\d*([+-]\d{4})?")


def sniff(data: bytes) -> bool:
    """Whether ``data`` looks like an HL7 v3 ``AnnotatedECG`` document (cheap, never raises)."""
    try:
        head = head_text(data)
        return "AnnotatedECG" in head and NS in head
    except Exception:  # sniffing must never fail, whatever the bytes
        return False


def _q(path: str) -> str:
    """An ElementTree path of HL7 v3 local names."""
    return "/".join(f"{{{NS}}}{part}" for part in path.split("/"))


def _code(element: ElementTree.Element) -> str | None:
    """The ``code@code`` of ``element``."""
    code = element.find(_q("code"))
    return None if code is None else code.get("code")


def _timestamp(value: str | None) -> datetime | None:
    """An HL7 TS (``YYYYMMDDHHMMSS.fff±ZZZZ``) as a datetime, or ``None`` when it does not parse."""
    match = _TS.fullmatch(value.strip()) if value else None
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        tz = None
        if zone:
            offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5]))
            tz = timezone(-offset if zone[0] == "-" else offset)
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")),
            tzinfo=tz,
        )
    except ValueError:
        return None


def _rhythm_series(root: ElementTree.Element) -> ElementTree.Element:
    """The first series that is not representative beats."""
    for series in root.iterfind(_q("component/series")):
        if _code(series) in (None, "RHYTHM"):
            return series
    raise EcgRejected("no_waveform", "HL7 aECG holds no rhythm series (only representative beats, or none)")


def _fs(sequence: ElementTree.Element) -> float:
    """The sampling rate from a time sequence's ``increment``."""
    increment = sequence.find(_q("value/increment"))
    if increment is None:
        raise EcgRejected("bad_fs", "HL7 aECG time sequence lists sample times instead of an increment")
    unit = increment.get("unit", "s")
    if unit not in TIME_UNITS:
        raise EcgRejected(
            "bad_fs", f"HL7 aECG sampling increment unit {unit!r} is not one of {sorted(TIME_UNITS)}"
        )
    period = number(
        increment.get("value"), "HL7 aECG sampling increment", low=1e-9, high=1e6, reason="bad_fs"
    )
    fs = 1.0 / (period * TIME_UNITS[unit])
    return float(round(fs)) if abs(fs - round(fs)) < 1e-6 * fs else fs


def _lead(sequence: ElementTree.Element, name: str) -> tuple[npt.NDArray[np.float64], str]:
    """One lead's samples in mV and the unit its scale states."""
    value = sequence.find(_q("value"))
    if value is None:
        raise EcgRejected("no_waveform", f"HL7 aECG lead {name} has no value")
    scale = value.find(_q("scale"))
    if scale is None:
        raise EcgRejected("unknown_units", f"HL7 aECG lead {name} states no scale")
    unit = scale.get("unit", "")
    factor = volt_factor(unit, f"HL7 aECG lead {name} scale")
    step = number(
        scale.get("value"),
        f"HL7 aECG lead {name} scale",
        low=-MAX_SCALE,
        high=MAX_SCALE,
        reason="implausible_amplitude",
    )
    origin = value.find(_q("origin"))
    offset_mv = 0.0
    if origin is not None:
        origin_factor = volt_factor(origin.get("unit", unit), f"HL7 aECG lead {name} origin")
        offset_mv = origin_factor * number(
            origin.get("value"),
            f"HL7 aECG lead {name} origin",
            low=-MAX_SCALE,
            high=MAX_SCALE,
            reason="implausible_amplitude",
        )
    text = text_of(value.find(_q("digits")))
    if text is None:
        raise EcgRejected("no_waveform", f"HL7 aECG lead {name} has no digits")
    try:
        digits = np.fromstring(text, dtype=np.float64, sep=" ")
    except ValueError as exc:
        raise EcgRejected("non_numeric", f"HL7 aECG lead {name} holds a value that is not a number") from exc
    if not np.isfinite(digits).all():
        raise EcgRejected("non_numeric", f"HL7 aECG lead {name} holds a value that is not a finite number")
    return offset_mv + digits * (step * factor), unit


def _device(series: ElementTree.Element) -> tuple[str | None, str | None]:
    """Manufacturer and model, and software name, of the series' device when stated."""
    author = series.find(_q("author/seriesAuthor"))
    if author is None:
        return None, None
    device = author.find(_q("manufacturedSeriesDevice"))
    maker = text_of(author.find(_q("manufacturerOrganization/name")))
    model = text_of(device.find(_q("manufacturerModelName"))) if device is not None else None
    software = text_of(device.find(_q("softwareName"))) if device is not None else None
    return clean_text(" ".join(p for p in (maker, model) if p)), clean_text(software)


def read(data: bytes, limits: ReadLimits) -> EcgRecording:
    """Read the rhythm waveform of an HL7 aECG document.

    Raises:
        EcgRejected: ``unsafe_xml``, ``unreadable``, ``no_waveform``, ``bad_fs``, ``unknown_units``,
            ``non_numeric``, ``wrong_length``, ``too_long``, ``implausible_amplitude``, ...
    """
    check_size(data, limits, FORMAT)
    root = parse_xml(data, "HL7 aECG")
    if root.tag != f"{{{NS}}}AnnotatedECG":
        raise EcgRejected("unreadable", f"HL7 aECG: root element is {local(root.tag)!r}, not AnnotatedECG")
    series = _rhythm_series(root)
    sets = series.findall(_q("component/sequenceSet"))
    if not sets:
        raise EcgRejected("no_waveform", "HL7 aECG rhythm series has no sequenceSet")
    warnings = [f"read the first of {len(sets)} rhythm sequence sets"] if len(sets) > 1 else []
    fs: float | None = None
    start: datetime | None = None
    names: list[str] = []
    columns: list[npt.NDArray[np.float64]] = []
    units: list[str] = []
    for sequence in sets[0].iterfind(_q("component/sequence")):
        code = _code(sequence) or ""
        if code.startswith("TIME_"):
            fs = _fs(sequence)
            if code == "TIME_ABSOLUTE":
                head = sequence.find(_q("value/head"))
                start = _timestamp(head.get("value") if head is not None else None)
            continue
        if len(names) >= limits.max_leads:
            raise EcgRejected("too_long", f"HL7 aECG holds more than {limits.max_leads} leads")
        name = code or f"lead {len(names) + 1}"
        samples, unit = _lead(sequence, name)
        if columns and samples.size != columns[0].size:
            raise EcgRejected(
                "wrong_length", f"HL7 aECG lead {name} has {samples.size} samples, not {columns[0].size}"
            )
        names.append(name)
        columns.append(samples)
        units.append(unit)
    if fs is None:
        raise EcgRejected("bad_fs", "HL7 aECG rhythm sequence set has no time sequence")
    if not columns:
        raise EcgRejected("no_waveform", "HL7 aECG rhythm sequence set has no lead sequences")
    check_declared(len(columns), columns[0].size, fs, limits, FORMAT)
    if start is None:
        low = root.find(_q("effectiveTime/low"))
        start = _timestamp(low.get("value") if low is not None else None)
    device, software = _device(series)
    return make_recording(
        np.stack(columns, axis=1).astype(np.float32),
        fs,
        names,
        units,
        source_format=FORMAT,
        limits=limits,
        device=device,
        software=software,
        recorded_at=start,
        warnings=warnings,
    )
