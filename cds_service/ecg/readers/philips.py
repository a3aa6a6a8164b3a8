"""Philips resting ECG XML (SierraECG 1.03, PhilipsECG 1.04 / 1.04.01 / 1.04.02) → :class:`EcgRecording`.

PageWriter and IntelliSpace ECG export ``<restingecgdata>`` documents, UTF-8 or UTF-16 with or
without a byte order mark (and with declarations that do not always match; see
:mod:`._vendor_xml`). The rhythm is ``<parsedwaveforms>``: base64 of XLI-compressed leads
(:mod:`._vendor_xli`), or of plain little-endian 16-bit samples, or space-separated numbers.

* Rate: ``parsedwaveforms@samplespersecond`` (1.04) or ``signalcharacteristics/samplingrate``.
* Length: ``durationperchannel`` in milliseconds.
* Leads: ``leadlabels`` (1.04); 1.03 names them by acquisition type (``STD-12``, ``10-WIRE``: the
  standard 12 in the order I, II, III, aVR, aVL, aVF, V1–V6). Other 1.03 acquisition types do not
  name their channels and are refused rather than guessed.
* Amplitude: ``resolution`` / ``signalresolution`` µV per count, after subtracting ``signaloffset``.
* XLI stores III, aVR, aVL and aVF as residuals from I and II; they are rebuilt here (III = II − I −
  r, aVR = −r − ⌊(I+II)/2⌋, aVL = ⌊(I−III)/2⌋ − r, aVF = ⌊(II+III)/2⌋ − r) whenever the first six
  labels are the standard limb leads.
* PageWriter strips end with a flat stretch and a 1 mV calibration pulse identical on every lead;
  that tail is dropped (with a warning) so the model never reads it as ECG.

The device is ``dataacquisition/machine`` and the software the version part of its
``detaildescription`` (``Philips Medical Products:860315:A.07.04.03``). Patient fields are never read.
"""

from __future__ import annotations

from datetime import datetime
from xml.etree import ElementTree

import numpy as np
import numpy.typing as npt

from cds_service.ecg.readers import _vendor_xli
from cds_service.ecg.readers._vendor_signal import (
    check_declared,
    check_size,
    clean_text,
    make_recording,
    number,
)
from cds_service.ecg.readers._vendor_xml import head_text, local, parse_xml, text_of
from cds_service.ecg.readers.common import b64decode
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits
from fhir_mappings.signal_spec import MAX_FS, MIN_FS

FORMAT: str = "philips-xml"
"""The ``source_format`` of recordings this reader returns."""

VERSIONS: frozenset[str] = frozenset({"1.03", "1.04", "1.04.01", "1.04.02"})
"""Document versions whose layout this reader knows."""

STANDARD_12: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
"""Channel order of 1.03 files acquired as ``STD-12`` or ``10-WIRE``."""

NAMED_ACQUISITIONS: frozenset[str] = frozenset({"STD-12", "10-WIRE"})

MIN_RESOLUTION_UV: float = 0.01
MAX_RESOLUTION_UV: float = 1000.0
"""Accepted µV per count; ECG carts store 1–10 µV per count."""

MAX_COUNT: int = 1 << 20
"""Largest magnitude of a plain-text sample count (ADCs deliver 16 to 24 bits)."""

MIN_CALIBRATION_S: float = 0.05
"""Shortest all-leads-identical tail treated as the device's calibration segment."""

MAX_DURATION_MS: float = 1e12
"""Largest ``durationperchannel`` parsed at all (no overflow); :class:`ReadLimits` then applies its limit."""


def sniff(data: bytes) -> bool:
    """Whether ``data`` looks like a Philips ``<restingecgdata>`` document (cheap, never raises)."""
    try:
        return "<restingecgdata" in head_text(data)
    except Exception:  # sniffing must never fail, whatever the bytes
        return False


def _find(root: ElementTree.Element, path: str) -> ElementTree.Element | None:
    """``root.find`` of a slash-separated path of local names, in any namespace."""
    return root.find("/".join(f"{{*}}{part}" for part in path.split("/")))


def _first(*values: str | None) -> str | None:
    """The first value that is not ``None`` or blank."""
    return next((v for v in values if v is not None and v.strip()), None)


def _labels(waves: ElementTree.Element, signal: ElementTree.Element | None) -> tuple[str, ...]:
    """Lead names: ``leadlabels`` (1.04) or the acquisition type's standard order (1.03)."""
    declared = waves.get("leadlabels")
    if declared is not None and declared.split():
        names = declared.split()
        stated = waves.get("numberofleads")
        count = len(names)
        if stated is not None:
            count = int(number(stated, "Philips numberofleads", low=1, high=len(names), integer=True))
        return tuple(names[:count])
    acquisition = text_of(_find(signal, "acquisitiontype")) if signal is not None else None
    if acquisition not in NAMED_ACQUISITIONS:
        raise EcgRejected(
            "unreadable", f"Philips XML: acquisition type {acquisition!r} does not name its leads"
        )
    allocated = text_of(_find(signal, "numberchannelsallocated")) if signal is not None else None
    count = int(
        number(allocated, "Philips numberchannelsallocated", low=1, high=len(STANDARD_12), integer=True)
    )
    return STANDARD_12[:count]


def _rebuild_limb_leads(leads: list[npt.NDArray[np.int32]]) -> None:
    """Turn XLI's stored III, aVR, aVL and aVF residuals into the leads themselves (in place)."""
    lead_i, lead_ii = leads[0], leads[1]
    leads[2] = lead_ii - lead_i - leads[2]
    lead_iii = leads[2]
    leads[3] = -leads[3] - np.floor_divide(lead_i + lead_ii, 2)
    leads[4] = np.floor_divide(lead_i - lead_iii, 2) - leads[4]
    leads[5] = np.floor_divide(lead_ii + lead_iii, 2) - leads[5]


def _counts(
    waves: ElementTree.Element, n_leads: int, n_samples: int, signed: bool, limits: ReadLimits
) -> tuple[list[npt.NDArray[np.int32]], bool]:
    """Decode the waveform payload into per-lead counts; the flag says whether it was XLI."""
    encoding = (waves.get("dataencoding") or "Base64").strip()
    method = _first(waves.get("compression"), waves.get("compressmethod"))
    compressed = (waves.get("compressflag") or "True").strip().lower() != "false" and method is not None
    text = waves.text or ""
    if compressed:
        if (method or "").upper() != "XLI" or encoding != "Base64":
            raise EcgRejected(
                "unreadable", f"Philips XML: compression {method!r} with {encoding!r} is not supported"
            )
        chunks = _vendor_xli.decode(b64decode(text, "Philips parsedwaveforms"), n_leads, n_samples, limits)
        return [c.astype(np.int32) for c in chunks], True
    needed = n_leads * n_samples
    if encoding == "Base64":
        raw = b64decode(text, "Philips parsedwaveforms")
        if len(raw) < 2 * needed:
            raise EcgRejected("unreadable", f"Philips XML: {len(raw)} waveform bytes, {2 * needed} declared")
        values = np.frombuffer(raw, dtype="<i2" if signed else "<u2", count=needed).astype(np.int32)
    elif encoding == "Plain":
        try:
            parsed = np.fromstring(text, dtype=np.float64, sep=" ")
        except ValueError as exc:
            raise EcgRejected(
                "non_numeric", "Philips XML: plain waveform holds a value that is not a number"
            ) from exc
        if parsed.size < needed or not (np.abs(parsed[:needed]) <= MAX_COUNT).all():
            raise EcgRejected(
                "unreadable",
                f"Philips XML: {parsed.size} plain counts within ±{MAX_COUNT}, {needed} declared",
            )
        values = np.rint(parsed[:needed]).astype(np.int32)
    else:
        raise EcgRejected("unreadable", f"Philips XML: waveform encoding {encoding!r} is not supported")
    return [values[k * n_samples : (k + 1) * n_samples] for k in range(n_leads)], False


def _trim_calibration(
    signal_mv: npt.NDArray[np.float32], fs: float
) -> tuple[npt.NDArray[np.float32], str | None]:
    """Drop the trailing segment in which every lead holds the same value (Philips' 1 mV pulse).

    PageWriter strips end with a flat stretch and a 200 ms, 1 mV calibration pulse on all leads at
    once. No recorded ECG keeps all leads exactly equal for :data:`MIN_CALIBRATION_S`, so such a
    tail is the device's, not the patient's, and would reach the model as a square wave.
    """
    if signal_mv.shape[1] < 2:
        return signal_mv, None
    differs = np.any(signal_mv != signal_mv[:, :1], axis=1)
    end = int(np.flatnonzero(differs)[-1]) + 1 if differs.any() else 0
    tail = signal_mv.shape[0] - end
    if end == 0 or tail < MIN_CALIBRATION_S * fs:
        return signal_mv, None
    return signal_mv[:end], f"dropped the last {tail / fs:.2f} s, identical on all leads (calibration pulse)"


def _acquired_at(acquisition: ElementTree.Element | None) -> datetime | None:
    """``dataacquisition@date`` and ``@time`` as a naive local datetime, when both parse."""
    if acquisition is None:
        return None
    try:
        return datetime.fromisoformat(f"{acquisition.get('date', '')}T{acquisition.get('time', '')}")
    except ValueError:
        return None


def read(data: bytes, limits: ReadLimits) -> EcgRecording:
    """Read a Philips SierraECG / PhilipsECG XML resting ECG.

    Raises:
        EcgRejected: ``unsafe_xml``, ``unreadable``, ``no_waveform``, ``bad_fs``, ``too_long``,
            ``unknown_units``, ``implausible_amplitude``, ``attachment_too_large``, ...
    """
    check_size(data, limits, FORMAT)
    root = parse_xml(data, "Philips XML")
    if local(root.tag) != "restingecgdata":
        raise EcgRejected("unreadable", f"Philips XML: root element is {local(root.tag)!r}")
    version = text_of(_find(root, "documentinfo/documentversion"))
    if version not in VERSIONS:
        raise EcgRejected("unreadable", f"Philips XML: document version {version!r} is not supported")
    waves = root.find(".//{*}parsedwaveforms")
    if waves is None:
        raise EcgRejected("no_waveform", "Philips XML holds no <parsedwaveforms>")
    acquisition = _find(root, "dataacquisition")
    signal = _find(root, "dataacquisition/signalcharacteristics")

    def stated(attribute: str, *elements: str) -> str | None:
        nested = [text_of(_find(signal, e)) for e in elements] if signal is not None else []
        return _first(waves.get(attribute), *nested)

    fs = number(
        stated("samplespersecond", "samplingrate"),
        "Philips sampling rate",
        low=MIN_FS,
        high=MAX_FS,
        reason="bad_fs",
    )
    duration_ms = number(
        waves.get("durationperchannel"),
        "Philips durationperchannel",
        low=1.0,
        high=MAX_DURATION_MS,
        reason="bad_shape",
    )
    n_samples = round(duration_ms * fs / 1000.0)
    names = _labels(waves, signal)
    check_declared(len(names), n_samples, fs, limits, FORMAT)
    resolution_text = stated("resolution", "resolution", "signalresolution")
    if resolution_text is None:
        raise EcgRejected("unknown_units", "Philips XML states no signal resolution (µV per count)")
    resolution_uv = number(
        resolution_text,
        "Philips resolution",
        low=MIN_RESOLUTION_UV,
        high=MAX_RESOLUTION_UV,
        reason="implausible_amplitude",
    )
    offset = number(
        stated("signaloffset", "signaloffset") or "0",
        "Philips signaloffset",
        low=-65536,
        high=65536,
        integer=True,
    )
    signed = (stated("signalsigned", "signalsigned") or "True").strip().lower() != "false"

    leads, xli = _counts(waves, len(names), n_samples, signed, limits)
    if xli and len(names) >= 6 and names[:6] == STANDARD_12[:6]:
        _rebuild_limb_leads(leads)
    signal_mv = np.empty((n_samples, len(names)), dtype=np.float32)
    for column, counts in enumerate(leads):
        signal_mv[:, column] = (counts - offset) * (resolution_uv / 1000.0)
    signal_mv, trimmed = _trim_calibration(signal_mv, fs)

    machine = _find(root, "dataacquisition/machine")
    description = (machine.get("detaildescription") or "").split(":") if machine is not None else []
    return make_recording(
        signal_mv,
        fs,
        names,
        ("uV",) * len(names),
        source_format=FORMAT,
        limits=limits,
        device=clean_text(text_of(machine)),
        software=clean_text(description[2]) if len(description) == 3 else None,
        recorded_at=_acquired_at(acquisition),
        warnings=(trimmed,) if trimmed else (),
    )
