"""DICOM 12-lead / General ECG Waveform objects (PS3.3 A.34) → :class:`EcgRecording`, with pydicom.

Takes the rhythm multiplex group: the one labelled ``RHYTHM`` if any, else the one with the most
samples (median beats are short templates, not a recording). Samples are scaled by channel
sensitivity × correction factor + baseline (pydicom's ``waveform_array``) and converted to mV
from each channel's sensitivity unit (UCUM). Leads are named from the channel source code (MDC or
SCP-ECG, :data:`DICOM_LEAD_CODES`), else its code meaning (e.g. ``"Lead I"``). pydicom is imported
lazily: service start-up does not pay for it until the first DICOM arrives (or ``preload``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from cds_service.ecg.readers.common import build_recording, check_counts, volt_factor
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

FORMAT = "dicom"
"""This reader's format name (``EcgRecording.source_format``, ``ecg.yaml`` attachment formats)."""

_LIMB_CODES: tuple[tuple[int, str], ...] = (
    (1, "I"),
    (2, "II"),
    (61, "III"),
    (62, "aVR"),
    (63, "aVL"),
    (64, "aVF"),
)

DICOM_LEAD_CODES: dict[str, str] = {
    **{f"{scheme}{n}": lead for scheme in ("2:", "5.6.3-9-") for n, lead in _LIMB_CODES},
    **{f"{scheme}{n + 2}": f"V{n}" for scheme in ("2:", "5.6.3-9-") for n in range(1, 7)},
}
"""DICOM channel source codes (CID 3001: MDC ``2:n`` and SCP-ECG ``5.6.3-9-n``) → lead name."""


def sniff(data: bytes) -> bool:
    """Whether ``data`` is a DICOM Part 10 file (128-byte preamble, then ``DICM``)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def read(data: bytes, limits: ReadLimits) -> EcgRecording:
    """Decode a DICOM ECG waveform object.

    Raises:
        EcgRejected: ``unreadable`` (not DICOM, malformed group), ``no_waveform``,
            ``unknown_units``, ``bad_fs``, ``bad_shape``, ``too_long``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        groups = list(ds.get("WaveformSequence") or [])
    except (InvalidDicomError, EOFError, ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EcgRejected("unreadable", f"not a readable DICOM file ({exc})") from exc
    if not groups:
        raise EcgRejected("no_waveform", "DICOM file has no WaveformSequence")
    index = _rhythm_group(groups)
    group = groups[index]
    try:
        channels = list(group.ChannelDefinitionSequence)
        n_samples = int(group.get("NumberOfWaveformSamples", 0))
        fs = float(group.SamplingFrequency)
    except (AttributeError, ValueError, TypeError, KeyError) as exc:
        raise EcgRejected("unreadable", f"DICOM waveform group {index} is malformed ({exc})") from exc
    check_counts(len(channels), n_samples, fs, limits, "DICOM waveform")
    try:
        samples = np.asarray(ds.waveform_array(index), dtype=np.float64)  # (T, C) in sensitivity units
    except (AttributeError, ValueError, TypeError, KeyError) as exc:
        raise EcgRejected("unreadable", f"DICOM waveform group {index} is malformed ({exc})") from exc
    if samples.ndim != 2 or samples.shape[1] != len(channels):
        raise EcgRejected(
            "bad_shape", f"DICOM waveform has {samples.shape} samples for {len(channels)} channels"
        )
    names: list[str] = []
    units: list[str] = []
    for c, channel in enumerate(channels):
        unit_codes = channel.get("ChannelSensitivityUnitsSequence") or []
        unit = str(unit_codes[0].get("CodeValue", "")) if unit_codes else None
        samples[:, c] *= volt_factor(unit, f"DICOM channel {c + 1}")
        names.append(_lead_name(channel, c))
        units.append(unit or "")
    return build_recording(
        list(samples.T),
        fs,
        names,
        limits,
        source_format=FORMAT,
        source_units=units,
        device=_text(ds, "Manufacturer", "ManufacturerModelName"),
        software=_text(ds, "SoftwareVersions"),
    )


def _rhythm_group(groups: list[Any]) -> int:
    """Index of the ``RHYTHM`` multiplex group, else of the group with the most samples."""
    labels = [str(g.get("MultiplexGroupLabel", "")).strip().upper() for g in groups]
    if "RHYTHM" in labels:
        return labels.index("RHYTHM")
    return max(range(len(groups)), key=lambda i: _int(groups[i].get("NumberOfWaveformSamples", 0)))


def _int(value: Any) -> int:
    """``value`` as an int, 0 when it is none."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _lead_name(channel: Any, index: int) -> str:
    """A channel's lead name: known source code first, then code meaning, else ``channel N``."""
    sources = channel.get("ChannelSourceSequence") or []
    if sources:
        code = str(sources[0].get("CodeValue", "")).strip()
        if code in DICOM_LEAD_CODES:
            return DICOM_LEAD_CODES[code]
        meaning = str(sources[0].get("CodeMeaning", "")).strip()
        if meaning:
            return meaning
    return f"channel {index + 1}"


def _text(ds: Any, *keywords: str) -> str | None:
    """The non-empty values of ``keywords`` joined by a blank, or ``None``."""
    parts = []
    for keyword in keywords:
        value = ds.get(keyword)
        if value is None:
            continue
        multi = isinstance(value, Sequence) and not isinstance(value, str)
        text = " ".join(str(v) for v in value) if multi else str(value)
        if text.strip():
            parts.append(text.strip())
    return " ".join(parts) or None
