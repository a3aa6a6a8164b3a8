"""DICOM 12-lead / General ECG Waveform objects (PS3.3 A.34) → :class:`EcgRecording`, with pydicom.

Takes the rhythm multiplex group: the one labelled ``RHYTHM`` if any, else the one with the most
samples (median beats are short templates, not a recording). Samples are scaled by channel
sensitivity × correction factor + baseline and converted to mV from each channel's sensitivity
unit (UCUM). Leads are named from the channel source code (MDC or SCP-ECG,
:data:`DICOM_LEAD_CODES`), else its code meaning (e.g. ``"Lead I"``). pydicom is imported lazily:
service start-up does not pay for it until the first DICOM arrives (or ``preload``).

**Bounded decoding.** pydicom parses the element structure; the waveform itself is decoded here,
not by pydicom's ``waveform_array``, so every number that drives work is range-checked first:
the multiplex groups (at most :data:`MAX_GROUPS`), channels (``ReadLimits.max_leads`` and equal to
the channel definitions), samples and seconds (:func:`~.common.check_counts`), the rate, bits
allocated with the sample interpretation (:data:`SAMPLE_DTYPES`), the data length against what is
declared, and each channel's sensitivity, correction factor (:data:`~.common.MAX_SCALE`) and
baseline (:data:`~.common.MAX_OFFSET`). The top-level data set may hold at most
:data:`MAX_ELEMENTS` elements (checked while parsing: pure-Python parsing costs microseconds per
element, so a file of millions of empty elements would cost seconds); elements nested in
undefined-length sequences are parsed by pydicom without a hook and are bounded only by the file
size and the decode deadline of :mod:`cds_service.ecg.isolation`.

**Deflated transfer syntax.** pydicom inflates a *Deflated Explicit VR Little Endian* data set
with one unbounded ``zlib.decompress`` of the rest of the file. This reader therefore reads the
file meta group itself, inflates the data set with :func:`~.common.inflate_raw` (running byte and
ratio caps of ``ReadLimits``) and hands pydicom an *Explicit VR Little Endian* file with the same
meta information; pydicom never sees the deflated bytes. Other deflated transfer syntaxes (JPIP
Referenced Deflate) are refused as ``unreadable``.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from cds_service.ecg.readers.common import (
    MAX_OFFSET,
    MAX_SCALE,
    bounded_float,
    bounded_int,
    build_recording,
    check_counts,
    check_fs,
    inflate_raw,
    volt_factor,
)
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

FORMAT = "dicom"
"""This reader's format name (``EcgRecording.source_format``, ``ecg.yaml`` attachment formats)."""

MAX_GROUPS: int = 16
"""Most multiplex groups a waveform object may hold (real ECGs: rhythm and median beat)."""

MAX_ELEMENTS: int = 20_000
"""Most top-level data elements accepted (real ECG objects hold a few hundred)."""

SAMPLE_DTYPES: dict[tuple[int, str], str] = {
    (8, "SB"): "i1",
    (8, "UB"): "u1",
    (16, "SS"): "i2",
    (16, "US"): "u2",
    (32, "SL"): "i4",
    (32, "UL"): "u4",
    (64, "SV"): "i8",
    (64, "UV"): "u8",
}
"""(WaveformBitsAllocated, WaveformSampleInterpretation) → numpy sample type (byte order added).

Companded 8-bit samples (``MB`` µ-law, ``AB`` A-law) are not read: taken as plain bytes they would
give wrong amplitudes."""

_PREAMBLE = 132  # 128-byte preamble + "DICM"

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
    return len(data) >= _PREAMBLE and data[128:_PREAMBLE] == b"DICM"


def read(data: bytes, limits: ReadLimits) -> EcgRecording:
    """Decode a DICOM ECG waveform object.

    Raises:
        EcgRejected: ``unreadable`` (not DICOM, malformed or truncated elements, too many
            elements), ``attachment_too_large`` (a deflated data set inflating past the limits),
            ``no_waveform``, ``unknown_units``, ``bad_fs``, ``bad_shape``, ``too_long``.
    """
    from pydicom.filereader import read_partial

    if sniff(data):
        data = _inflated(data, limits)
    try:  # pydicom parses and converts lazily: any access may meet a malformed element
        ds = read_partial(io.BytesIO(data), stop_when=_element_budget())
        groups = list(ds.get("WaveformSequence") or [])
        if not groups:
            raise EcgRejected("no_waveform", "DICOM file has no WaveformSequence")
        if len(groups) > MAX_GROUPS:
            raise EcgRejected(
                "unreadable", f"DICOM file has {len(groups)} multiplex groups, more than {MAX_GROUPS}"
            )
        index = _rhythm_group(groups)
        little_endian = ds.original_encoding[1] is not False
        samples, channels, fs = _group_samples(groups[index], index, limits, little_endian)
        names: list[str] = []
        units: list[str] = []
        for c, channel in enumerate(channels):
            unit_codes = channel.get("ChannelSensitivityUnitsSequence") or []
            unit = str(unit_codes[0].get("CodeValue", "")) if unit_codes else None
            samples[:, c] *= volt_factor(unit, f"DICOM channel {c + 1}")
            names.append(_lead_name(channel, c))
            units.append(unit or "")
        device = _text(ds, "Manufacturer", "ManufacturerModelName")
        software = _text(ds, "SoftwareVersions")
    except _pydicom_errors() as exc:
        raise EcgRejected("unreadable", f"not a readable DICOM ECG ({type(exc).__name__}: {exc})") from exc
    return build_recording(
        list(samples.T),
        fs,
        names,
        limits,
        source_format=FORMAT,
        source_units=units,
        device=device,
        software=software,
    )


def _pydicom_errors() -> tuple[type[BaseException], ...]:
    """What pydicom raises on malformed or truncated bytes (it has no single error type)."""
    from pydicom.errors import BytesLengthException, InvalidDicomError

    return (
        InvalidDicomError,
        BytesLengthException,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        OverflowError,
        NotImplementedError,  # pydicom's answer to a transfer syntax or VR it cannot decode
        RecursionError,
        struct.error,
    )


def _element_budget() -> Any:
    """A pydicom ``stop_when`` callback refusing a data set of more than :data:`MAX_ELEMENTS` elements."""
    seen = [0]

    def stop_when(tag: Any, vr: str | None, length: int) -> bool:
        seen[0] += 1
        if seen[0] > MAX_ELEMENTS:
            raise EcgRejected("unreadable", f"DICOM data set holds more than {MAX_ELEMENTS} elements")
        return False

    return stop_when


def _inflated(data: bytes, limits: ReadLimits) -> bytes:
    """``data`` unchanged, or for the deflated transfer syntax the same file inflated under caps.

    Raises:
        EcgRejected: ``unreadable`` (bad meta group, unsupported deflated syntax),
            ``attachment_too_large``.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    stream = io.BytesIO(data)
    stream.seek(_PREAMBLE)
    try:
        meta = read_dataset(stream, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
        syntax = UID(str(meta.get("TransferSyntaxUID", "")))
        deflated = syntax.is_deflated
    except _pydicom_errors() as exc:
        raise EcgRejected("unreadable", f"DICOM file meta information is malformed ({exc})") from exc
    if not deflated:
        return data
    if syntax != DeflatedExplicitVRLittleEndian:
        raise EcgRejected("unreadable", f"DICOM transfer syntax {syntax} is not supported")
    dataset = inflate_raw(data[stream.tell() :], limits, "DICOM deflated data set")
    try:
        file_meta = FileMetaDataset(meta)
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out = DicomBytesIO()
        out.write(data[:_PREAMBLE])
        write_file_meta_info(out, file_meta, enforce_standard=False)
    except _pydicom_errors() as exc:
        raise EcgRejected("unreadable", f"DICOM file meta information is malformed ({exc})") from exc
    out.write(dataset)
    return bytes(out.getvalue())


def _group_samples(
    group: Any, index: int, limits: ReadLimits, little_endian: bool
) -> tuple[npt.NDArray[np.float64], list[Any], float]:
    """The (T, C) samples of one multiplex group in sensitivity units, its channels and rate.

    Every stated number is checked before the samples are touched (see the module docstring).
    """
    where = f"DICOM waveform group {index}"
    channels = list(group.get("ChannelDefinitionSequence") or [])
    n_channels = bounded_int(
        group.get("NumberOfWaveformChannels"), f"{where} channel count", low=1, high=limits.max_leads
    )
    if n_channels != len(channels):
        raise EcgRejected("bad_shape", f"{where} declares {n_channels} channels but defines {len(channels)}")
    n_samples = bounded_int(
        group.get("NumberOfWaveformSamples"), f"{where} sample count", low=1, high=limits.max_samples
    )
    fs = check_fs(bounded_float(group.get("SamplingFrequency"), f"{where} rate", low=0, high=1e12))
    check_counts(n_channels, n_samples, fs, limits, where)
    bits = bounded_int(group.get("WaveformBitsAllocated"), f"{where} bits allocated", low=1, high=64)
    interpretation = str(group.get("WaveformSampleInterpretation", "")).strip()
    dtype = SAMPLE_DTYPES.get((bits, interpretation))
    if dtype is None:
        raise EcgRejected(
            "unreadable", f"{where}: {bits}-bit {interpretation[:8]!r} samples are not supported"
        )
    raw = group.get("WaveformData")
    count = n_samples * n_channels
    if not isinstance(raw, bytes) or len(raw) < count * bits // 8:
        raise EcgRejected("unreadable", f"{where} holds fewer sample bytes than it declares")
    order = "<" if little_endian or bits == 8 else ">"
    samples = np.frombuffer(raw, dtype=order + dtype, count=count).reshape(n_samples, n_channels)
    scaled = samples.astype(np.float64)
    for c, channel in enumerate(channels):
        what = f"{where} channel {c + 1}"
        sensitivity = bounded_float(
            channel.get("ChannelSensitivity", 1.0), f"{what} sensitivity", low=-MAX_SCALE, high=MAX_SCALE
        )
        correction = bounded_float(
            channel.get("ChannelSensitivityCorrectionFactor", 1.0),
            f"{what} correction factor",
            low=-MAX_SCALE,
            high=MAX_SCALE,
        )
        baseline = bounded_float(
            channel.get("ChannelBaseline", 0.0), f"{what} baseline", low=-MAX_OFFSET, high=MAX_OFFSET
        )
        scaled[:, c] = scaled[:, c] * sensitivity * correction + baseline
    return scaled, channels, fs


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
    except (TypeError, ValueError, OverflowError):
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
            return meaning[:64]
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
            parts.append(text.strip()[:128])
    return " ".join(parts) or None
