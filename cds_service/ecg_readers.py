"""Read a 12-lead ECG from each carrier format into one shape: (signal (T, C) mV, fs, lead names).

A hospital sends the same recording in very different wrappers. This module knows the wrappers,
nothing about the model or about FHIR search:

* **FHIR ``valueSampledData``**: one ``Observation.component`` per lead, samples as
  space-separated numbers (:func:`read_sampled_data`);
* **DICOM** 12-lead / General ECG Waveform objects (:func:`read_dicom`, pydicom);
* **WFDB** records shipped as a zip holding ``.hea`` + ``.dat`` (:func:`read_wfdb_zip`, wfdb);
* **GE MUSE XML** resting ECG exports (:func:`read_muse_xml`): base64 little-endian int16 per lead,
  8 stored leads (I, II, V1–V6); III, aVR, aVL and aVF are derived (Einthoven, Goldberger).

:func:`read_attachment` picks the reader by format name (``fhir_mappings`` maps an attachment's
MIME type to it). :func:`to_model_leads` then names the leads canonically, derives absent limb
leads from I and II (:func:`derive_leads`) and orders them; the
resampling and clipping that the model needs stay in :mod:`cds_service.signal`.

Every failure raises :class:`EcgRejected` with a stable ``reason`` (listed on the class), so the
caller can say why an ECG was not used instead of crashing. The writers (``encode_*``) produce the
same formats; ``ecglab seed-fhir`` and the round-trip tests use them. pydicom and wfdb are imported
lazily: they are slow to import and wfdb pulls in pandas, which service start-up must not.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from xml.etree import ElementTree

import numpy as np
import numpy.typing as npt

from fhir_mappings.errors import EcglabError

SAMPLE_MARKERS: frozenset[str] = frozenset({"E", "L", "U"})
"""FHIR ``SampledData.data`` markers: error, below lower limit, above upper limit → NaN."""

MAX_MISSING_FRACTION: float = 0.2
"""A lead with more than this fraction of missing samples is rejected (``too_many_missing``).

Interpolating across a few dropped samples is harmless; interpolating over a fifth of the strip
would hand the model invented signal."""

MIN_FS_HZ: float = 50.0
MAX_FS_HZ: float = 20_000.0
"""Accepted sampling rates (``bad_fs`` outside). ECG recorders sample at 100 Hz to about 16 kHz.
A rate outside is a wrong ``period``/header, and resampling it to 100 Hz is not harmless: the
upsampling factor is 100 / fs, so a 2.5 s strip declared at 0.001 Hz would be stretched into a
multi-gigabyte array. At 50 Hz or more the resampled signal is at most twice the input."""

VOLT_FACTORS: dict[str, float] = {"V": 1000.0, "mV": 1.0, "uV": 1e-3, "nV": 1e-6}
"""Default unit → factor to mV (UCUM codes); the service passes ``fhir_mappings``' amplitude units."""

MUSE_UNIT_FACTORS: dict[str, float] = {"MICROVOLTS": 1e-3, "MILLIVOLTS": 1.0}
"""GE MUSE ``LeadAmplitudeUnits`` → factor to mV."""

DICOM_LEAD_CODES: dict[str, str] = {
    # MDC codes as DICOM writes them ("2:n"), and the SCP-ECG scheme ("5.6.3-9-n").
    **{
        f"2:{n}": lead
        for n, lead in [(1, "I"), (2, "II"), (61, "III"), (62, "aVR"), (63, "aVL"), (64, "aVF")]
    },
    **{f"2:{n + 2}": f"V{n}" for n in range(1, 7)},
    **{
        f"5.6.3-9-{n}": lead
        for n, lead in [(1, "I"), (2, "II"), (61, "III"), (62, "aVR"), (63, "aVL"), (64, "aVF")]
    },
    **{f"5.6.3-9-{n + 2}": f"V{n}" for n in range(1, 7)},
}
"""DICOM channel source codes (CID 3001) → lead name, used before the free-text code meaning."""

LIMB_WEIGHTS: dict[str, dict[str, float]] = {
    "III": {"I": -1.0, "II": 1.0},
    "aVR": {"I": -0.5, "II": -0.5},
    "aVL": {"I": 1.0, "II": -0.5},
    "aVF": {"I": -0.5, "II": 1.0},
}
"""Limb leads as weighted sums of I and II: Einthoven (III = II − I) and Goldberger (aVR, aVL, aVF)."""

ATTACHMENT_FORMATS: tuple[str, ...] = ("dicom", "wfdb-zip", "muse-xml")
"""Reader formats :func:`read_attachment` knows (``fhir_mappings`` maps content types to them)."""

_WFDB_SUFFIXES: frozenset[str] = frozenset({".hea", ".dat"})


class EcgRejected(EcglabError):
    """An ECG that exists but cannot be used; ``reason`` says why in one stable word.

    Reasons: ``attachment_too_large``, ``attachment_unavailable``, ``no_attachment``,
    ``unknown_content_type``, ``unreadable`` (not valid DICOM / zip / XML / base64),
    ``unsafe_xml`` (entity declarations), ``no_waveform`` (file holds no rhythm waveform),
    ``unknown_units``, ``non_numeric``, ``bad_shape``, ``wrong_length`` (leads of unequal length),
    ``bad_fs``, ``too_short``, ``too_many_missing``, ``missing_leads``, ``duplicate_leads``,
    ``no_time`` (the resource carries no recording time).
    """

    def __init__(self, reason: str, message: str, reference: str | None = None) -> None:
        super().__init__(f"{reference}: {message}" if reference else message)
        self.reason = reason
        self.reference = reference


class Waveform(NamedTuple):
    """A decoded recording: ``signal`` (T, C) float32 mV, ``fs`` Hz, one name per column."""

    signal: npt.NDArray[np.float32]
    fs: float
    lead_names: tuple[str, ...]


# --------------------------------------------------------------------------- shared helpers


def _waveform(columns: Sequence[npt.ArrayLike], fs: float, names: Sequence[str]) -> Waveform:
    """Stack per-lead sample vectors into a :class:`Waveform`, checking lengths and rate."""
    if not columns:
        raise EcgRejected("bad_shape", "ECG has no leads")
    arrays = [np.asarray(c, dtype=np.float64) for c in columns]
    lengths = {a.shape[0] for a in arrays}
    if len(lengths) != 1:
        raise EcgRejected("wrong_length", f"ECG leads differ in length: {sorted(lengths)} samples")
    if not math.isfinite(fs) or fs <= 0:
        raise EcgRejected("bad_fs", f"ECG sampling rate must be positive, got {fs!r}")
    if not MIN_FS_HZ <= fs <= MAX_FS_HZ:
        raise EcgRejected(
            "bad_fs", f"ECG sampling rate {fs:g} Hz is outside the plausible {MIN_FS_HZ:g}-{MAX_FS_HZ:g} Hz"
        )
    if lengths == {0}:
        raise EcgRejected("bad_shape", "ECG leads have no samples")
    return Waveform(np.stack(arrays, axis=1).astype(np.float32), float(fs), tuple(str(n) for n in names))


def _volt_factor(unit: str | None, units: Mapping[str, float], what: str) -> float:
    """Factor from ``unit`` to mV, or ``unknown_units`` naming ``what`` carried the unit."""
    if isinstance(unit, str) and unit.strip() in units:
        return units[unit.strip()]
    raise EcgRejected(
        "unknown_units", f"{what}: unit {unit!r} is not one of the voltage units {sorted(units)}"
    )


def _b64decode(text: str, what: str) -> bytes:
    """Decode base64 that may contain line breaks; ``unreadable`` when it is not base64."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EcgRejected("unreadable", f"{what}: not valid base64 ({exc})") from exc


def media_type(content_type: str | None) -> str:
    """The MIME type without parameters, lower case (``"Application/XML; charset=utf-8"`` → ``"application/xml"``)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


# --------------------------------------------------------------------------- FHIR valueSampledData


def read_sampled_data(
    components: Sequence[Mapping[str, Any]],
    lead_of: Callable[[Mapping[str, Any]], str | None],
    *,
    units: Mapping[str, float] = VOLT_FACTORS,
) -> Waveform:
    """Decode ``Observation.component[].valueSampledData``, one component per lead (FHIR R4 SampledData).

    Value = ``origin.value + factor × datum``; ``period`` is the milliseconds between samples;
    the markers ``E``, ``L`` and ``U`` become NaN. The unit is ``origin.code`` (UCUM; ``unit``
    as fallback) and must be a voltage. Components without ``valueSampledData`` (e.g. a heart-rate
    measurement on the same Observation) are skipped; components whose lead ``lead_of`` cannot
    name are skipped too, so only identified leads are returned.

    Args:
        components: the Observation's ``component`` list.
        lead_of: returns the lead name for a component's ``code`` (CodeableConcept), or ``None``.
        units: UCUM voltage unit → factor to mV.

    Raises:
        EcgRejected: ``non_numeric``, ``unknown_units``, ``wrong_length``, ``bad_fs``,
            ``bad_shape`` (no usable component, or ``dimensions`` ≠ 1).
    """
    columns: list[np.ndarray] = []
    names: list[str] = []
    periods: set[float] = set()
    for index, component in enumerate(components):
        sampled = component.get("valueSampledData")
        if not isinstance(sampled, Mapping):
            continue
        code = component.get("code")
        lead = lead_of(code) if isinstance(code, Mapping) else None
        if lead is None:
            continue
        where = f"component[{index}] ({lead})"
        try:
            dimensions = int(sampled.get("dimensions", 1))
        except (TypeError, ValueError, OverflowError) as exc:
            raise EcgRejected("non_numeric", f"{where}: dimensions must be a number") from exc
        if dimensions != 1:
            raise EcgRejected("bad_shape", f"{where}: dimensions must be 1 (one lead per component)")
        origin = sampled.get("origin")
        if not isinstance(origin, Mapping):
            origin = {}  # no origin, or not an object: no unit either, so unknown_units below
        unit = origin.get("code") or origin.get("unit")
        scale = _volt_factor(unit, units, where)
        try:
            period = float(sampled["period"])
            factor = float(sampled.get("factor", 1.0))
            offset = float(origin.get("value", 0.0))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise EcgRejected("non_numeric", f"{where}: period/factor/origin must be numbers") from exc
        if not math.isfinite(period) or period <= 0:
            raise EcgRejected("bad_fs", f"{where}: period must be a positive number of ms, got {period!r}")
        periods.add(period)
        columns.append((offset + factor * _parse_samples(sampled.get("data"), where)) * scale)
        names.append(lead)
    if not columns:
        raise EcgRejected("bad_shape", "Observation has no component with valueSampledData for a known lead")
    if len(periods) != 1:
        raise EcgRejected("bad_fs", f"components have different sampling periods: {sorted(periods)} ms")
    return _waveform(columns, 1000.0 / periods.pop(), names)


def _parse_samples(data: object, where: str) -> np.ndarray:
    """Split ``SampledData.data`` into floats, markers E/L/U as NaN; ``non_numeric`` otherwise."""
    if not isinstance(data, str) or not data.strip():
        raise EcgRejected("non_numeric", f"{where}: data is empty")
    tokens = data.split()
    values = np.empty(len(tokens), dtype=np.float64)
    for i, token in enumerate(tokens):
        if token in SAMPLE_MARKERS:
            values[i] = np.nan
            continue
        try:
            values[i] = float(token)
        except ValueError:
            raise EcgRejected("non_numeric", f"{where}: sample {i} is {token[:20]!r}, not a number") from None
        if not math.isfinite(values[i]):
            raise EcgRejected("non_numeric", f"{where}: sample {i} is {token[:20]!r}, not a finite number")
    return values


def encode_sampled_data(digital: npt.ArrayLike, uv_per_unit: float, fs: float) -> list[dict[str, Any]]:
    """``valueSampledData`` dicts (origin 0 µV) for integer samples (T, C): one per column.

    The writer counterpart of :func:`read_sampled_data` (without the component ``code``, which
    the caller adds). Integers keep the payload small and exact.
    """
    arr = np.asarray(digital)
    return [
        {
            "origin": {"value": 0, "unit": "µV", "system": "http://unitsofmeasure.org", "code": "uV"},
            "period": round(1000.0 / fs, 6),
            "factor": uv_per_unit,
            "dimensions": 1,
            "data": " ".join(str(int(v)) for v in arr[:, c]),
        }
        for c in range(arr.shape[1])
    ]


# --------------------------------------------------------------------------- DICOM


def read_dicom(data: bytes, *, units: Mapping[str, float] = VOLT_FACTORS) -> Waveform:
    """Decode a DICOM ECG waveform object (12-lead or General ECG) with pydicom.

    Takes the rhythm multiplex group: the one labelled ``RHYTHM`` if any, else the one with the
    most samples (median beats are short templates, not a recording). Samples are scaled by
    channel sensitivity × correction factor + baseline (pydicom's ``waveform_array``) and
    converted to mV from each channel's sensitivity unit. Leads are named from the channel
    source code (MDC / SCP-ECG), else its code meaning (e.g. ``"Lead I"``).

    Raises:
        EcgRejected: ``unreadable`` (not DICOM), ``no_waveform``, ``unknown_units``, ``bad_fs``.
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
    labels = [str(g.get("MultiplexGroupLabel", "")).strip().upper() for g in groups]
    if "RHYTHM" in labels:
        index = labels.index("RHYTHM")
    else:
        index = max(range(len(groups)), key=lambda i: int(groups[i].get("NumberOfWaveformSamples", 0)))
    group = groups[index]
    try:
        samples = np.asarray(ds.waveform_array(index), dtype=np.float64)  # (T, C) in sensitivity units
        fs = float(group.SamplingFrequency)
        channels = list(group.ChannelDefinitionSequence)
    except (AttributeError, ValueError, TypeError, KeyError) as exc:
        raise EcgRejected("unreadable", f"DICOM waveform group {index} is malformed ({exc})") from exc
    if samples.ndim != 2 or samples.shape[1] != len(channels):
        raise EcgRejected(
            "bad_shape", f"DICOM waveform has {samples.shape} samples for {len(channels)} channels"
        )
    names: list[str] = []
    for c, channel in enumerate(channels):
        unit_codes = channel.get("ChannelSensitivityUnitsSequence") or []
        unit = str(unit_codes[0].get("CodeValue", "")) if unit_codes else None
        samples[:, c] *= _volt_factor(unit, units, f"DICOM channel {c + 1}")
        names.append(_dicom_lead_name(channel, c))
    return _waveform(list(samples.T), fs, names)


def _dicom_lead_name(channel: Any, index: int) -> str:
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


def encode_dicom(
    digital: npt.ArrayLike, uv_per_unit: float, fs: float, lead_names: Sequence[str], *, acquired: str
) -> bytes:
    """A minimal DICOM General ECG Waveform file for int16 samples (T, C) at ``uv_per_unit`` µV.

    ``acquired`` is the DICOM DateTime (``YYYYMMDDHHMMSS``). Patient attributes are left empty:
    the FHIR resource that carries the file names the patient.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    arr = np.asarray(digital)
    if arr.ndim != 2 or arr.shape[1] != len(lead_names):
        raise ValueError(f"samples {arr.shape} do not match {len(lead_names)} lead names")
    codes = {lead: code for code, lead in DICOM_LEAD_CODES.items() if code.startswith("2:")}
    sop_class = UID("1.2.840.10008.5.1.4.1.1.9.1.2")  # General ECG Waveform Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "ECG"
    ds.PatientName = ""
    ds.PatientID = ""
    ds.AcquisitionDateTime = acquired
    ds.ContentDate, ds.ContentTime = acquired[:8], acquired[8:14]
    group = Dataset()
    group.MultiplexGroupLabel = "RHYTHM"
    group.WaveformOriginality = "ORIGINAL"
    group.NumberOfWaveformChannels = arr.shape[1]
    group.NumberOfWaveformSamples = arr.shape[0]
    group.SamplingFrequency = f"{fs:g}"
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    channels = []
    for name in lead_names:
        source = Dataset()
        source.CodeValue = codes.get(name, "")
        source.CodingSchemeDesignator = "MDC"
        source.CodeMeaning = f"Lead {name}"
        unit = Dataset()
        unit.CodeValue = "uV"
        unit.CodingSchemeDesignator = "UCUM"
        unit.CodeMeaning = "microvolt"
        channel = Dataset()
        channel.ChannelSourceSequence = [source]
        channel.ChannelSensitivity = "1"
        channel.ChannelSensitivityUnitsSequence = [unit]
        channel.ChannelSensitivityCorrectionFactor = f"{uv_per_unit:g}"
        channel.ChannelBaseline = "0"
        channel.ChannelSampleSkew = "0"
        channel.WaveformBitsStored = 16
        channels.append(channel)
    group.ChannelDefinitionSequence = channels
    group.WaveformData = np.ascontiguousarray(arr, dtype="<i2").tobytes()
    ds.WaveformSequence = [group]
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# --------------------------------------------------------------------------- WFDB zip


def read_wfdb_zip(
    data: bytes, max_unpacked_bytes: int, *, units: Mapping[str, float] = VOLT_FACTORS
) -> Waveform:
    """Decode a WFDB record (``.hea`` header + ``.dat`` signal files) shipped as a zip, with wfdb.

    The zip is unpacked into a private temporary folder. Only ``.hea``/``.dat`` members are
    extracted, under their base names (no paths, so no escaping the folder), and only when their
    declared total size is at most ``max_unpacked_bytes`` (a zip bomb is refused before inflating).
    Exactly one header is expected. Physical units come from the header (``mV``, ``uV``).

    Raises:
        EcgRejected: ``unreadable`` (bad zip, no or several headers, wfdb cannot parse it),
            ``attachment_too_large``, ``unknown_units``.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, ValueError) as exc:
        raise EcgRejected("unreadable", f"WFDB attachment is not a valid zip ({exc})") from exc
    wanted = [m for m in members if PurePosixPath(m.filename).suffix.lower() in _WFDB_SUFFIXES]
    if sum(m.file_size for m in wanted) > max_unpacked_bytes:
        raise EcgRejected("attachment_too_large", f"WFDB zip unpacks to more than {max_unpacked_bytes} bytes")
    headers = [m for m in wanted if m.filename.lower().endswith(".hea")]
    if len(headers) != 1:
        raise EcgRejected("unreadable", f"WFDB zip must hold exactly one .hea header, found {len(headers)}")
    import wfdb

    with tempfile.TemporaryDirectory(prefix="ecglab-wfdb-") as tmp:
        folder = Path(tmp)
        for member in wanted:
            name = PurePosixPath(member.filename.replace("\\", "/")).name
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                raise EcgRejected(
                    "unreadable", f"WFDB zip member name {name[:40]!r} is not a plain file name"
                )
            (folder / name).write_bytes(archive.read(member))
        record_name = PurePosixPath(headers[0].filename).stem
        try:
            record = wfdb.rdrecord(str(folder / record_name), physical=True)
        except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError) as exc:
            raise EcgRejected("unreadable", f"WFDB record {record_name!r} cannot be read ({exc})") from exc
    if record.p_signal is None:
        raise EcgRejected("unreadable", f"WFDB record {record_name!r} has no signal")
    signal = np.asarray(record.p_signal, dtype=np.float64)
    names = list(record.units or ["mV"] * signal.shape[1])
    columns = [
        signal[:, c] * _volt_factor(names[c], units, f"WFDB signal {record.sig_name[c]!r}")
        for c in range(signal.shape[1])
    ]
    return _waveform(columns, float(record.fs), record.sig_name)


def encode_wfdb_zip(
    digital: npt.ArrayLike, adc_gain: float, fs: float, lead_names: Sequence[str], record_name: str
) -> bytes:
    """A zip holding a WFDB format-16 record of int16 samples (T, C) at ``adc_gain`` units per mV."""
    import wfdb

    arr = np.asarray(digital, dtype=np.int16)
    n_leads = arr.shape[1]
    with tempfile.TemporaryDirectory(prefix="ecglab-wfdb-") as tmp:
        wfdb.wrsamp(
            record_name,
            fs=fs,
            units=["mV"] * n_leads,
            sig_name=list(lead_names),
            d_signal=arr.astype(np.int32),
            fmt=["16"] * n_leads,
            adc_gain=[adc_gain] * n_leads,
            baseline=[0] * n_leads,
            write_dir=tmp,
        )
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for suffix in (".hea", ".dat"):
                archive.write(Path(tmp) / f"{record_name}{suffix}", f"{record_name}{suffix}")
    return out.getvalue()


# --------------------------------------------------------------------------- GE MUSE XML


def read_muse_xml(data: bytes) -> Waveform:
    """Decode a GE MUSE ``RestingECG`` XML export: the ``Rhythm`` waveform's leads.

    Each ``LeadData`` holds ``WaveFormData``: base64 of little-endian int16 samples, scaled by
    ``LeadAmplitudeUnitsPerBit`` in ``LeadAmplitudeUnits``; the rate is
    ``SampleBase × 10^SampleExponent``. MUSE stores I, II and V1–V6; III, aVR, aVL and aVF are
    derived here when absent (III = II − I, aVR = −(I + II)/2, aVL = I − II/2, aVF = II − I/2).
    Documents declaring entities are refused (``unsafe_xml``): no entity expansion tricks.

    Raises:
        EcgRejected: ``unsafe_xml``, ``unreadable``, ``no_waveform``, ``unknown_units``,
            ``wrong_length``, ``bad_fs``.
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
    except ValueError as exc:
        raise EcgRejected("bad_fs", "MUSE SampleBase/SampleExponent are not numbers") from exc
    columns: list[np.ndarray] = []
    names: list[str] = []
    for lead in rhythm.iter("LeadData"):
        name = (lead.findtext("LeadID") or "").strip()
        where = f"MUSE lead {name or len(names) + 1}"
        raw = _b64decode(lead.findtext("WaveFormData") or "", where)
        if len(raw) % 2:
            raise EcgRejected("unreadable", f"{where}: odd number of bytes for int16 samples")
        unit = (lead.findtext("LeadAmplitudeUnits") or "").strip().upper()
        if unit not in MUSE_UNIT_FACTORS:
            raise EcgRejected(
                "unknown_units", f"{where}: LeadAmplitudeUnits {unit!r} is not MICROVOLTS/MILLIVOLTS"
            )
        try:
            per_bit = float(lead.findtext("LeadAmplitudeUnitsPerBit") or "nan")
        except ValueError as exc:
            raise EcgRejected("non_numeric", f"{where}: LeadAmplitudeUnitsPerBit is not a number") from exc
        if not math.isfinite(per_bit):
            raise EcgRejected("non_numeric", f"{where}: LeadAmplitudeUnitsPerBit is missing")
        columns.append(np.frombuffer(raw, dtype="<i2").astype(np.float64) * per_bit * MUSE_UNIT_FACTORS[unit])
        names.append(name)
    if not columns:
        raise EcgRejected("no_waveform", "MUSE Rhythm waveform has no LeadData")
    return derive_leads(_waveform(columns, fs, names), LIMB_WEIGHTS)


def encode_muse_xml(digital: npt.ArrayLike, uv_per_bit: float, fs: float, lead_names: Sequence[str]) -> bytes:
    """A minimal MUSE ``RestingECG`` document with one Rhythm waveform of int16 samples (T, C)."""
    arr = np.asarray(digital, dtype="<i2")
    root = ElementTree.Element("RestingECG")
    waveform = ElementTree.SubElement(root, "Waveform")
    for tag, text in (("WaveformType", "Rhythm"), ("SampleBase", f"{fs:g}"), ("SampleExponent", "0")):
        ElementTree.SubElement(waveform, tag).text = text
    ElementTree.SubElement(waveform, "NumberofLeads").text = str(arr.shape[1])
    for c, name in enumerate(lead_names):
        lead = ElementTree.SubElement(waveform, "LeadData")
        for tag, text in (
            ("LeadSampleCountTotal", str(arr.shape[0])),
            ("LeadAmplitudeUnitsPerBit", f"{uv_per_bit:g}"),
            ("LeadAmplitudeUnits", "MICROVOLTS"),
            ("LeadID", name),
            ("LeadSampleSize", "2"),
            ("WaveFormData", base64.b64encode(np.ascontiguousarray(arr[:, c]).tobytes()).decode("ascii")),
        ):
            ElementTree.SubElement(lead, tag).text = text
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


# --------------------------------------------------------------------------- dispatch and leads


def read_attachment(
    data: bytes, fmt: str, *, max_unpacked_bytes: int, units: Mapping[str, float] = VOLT_FACTORS
) -> Waveform:
    """Decode an attachment's bytes with the reader for ``fmt`` (one of :data:`ATTACHMENT_FORMATS`).

    The caller maps the attachment's ``contentType`` to ``fmt`` (``fhir_mappings``
    ``ecg.attachment_format``), so the accepted types are configuration, not code.

    Raises:
        EcgRejected: ``unknown_content_type`` for another ``fmt``, or whatever the reader raises.
    """
    if fmt == "dicom":
        return read_dicom(data, units=units)
    if fmt == "wfdb-zip":
        return read_wfdb_zip(data, max_unpacked_bytes, units=units)
    if fmt == "muse-xml":
        return read_muse_xml(data)
    raise EcgRejected(
        "unknown_content_type", f"attachment format {fmt!r} is not one ecglab reads {ATTACHMENT_FORMATS}"
    )


def derive_leads(waveform: Waveform, weights: Mapping[str, Mapping[str, float]]) -> Waveform:
    """Add each absent lead of ``weights`` as its weighted sum of measured leads (exact, linear).

    With :data:`LIMB_WEIGHTS`: III = II − I (Einthoven), aVR = −(I + II)/2, aVL = I − II/2,
    aVF = II − I/2 (Goldberger). A lead already present is kept as recorded; a lead whose sources
    are not all present is not derived.
    """
    names = list(waveform.lead_names)
    extra: list[tuple[str, np.ndarray]] = []
    for lead, sources in weights.items():
        if lead in names or not all(source in names for source in sources):
            continue
        column = np.zeros(waveform.signal.shape[0], dtype=np.float64)
        for source, weight in sources.items():
            column += weight * waveform.signal[:, names.index(source)].astype(np.float64)
        extra.append((lead, column))
    if not extra:
        return waveform
    signal = np.column_stack([waveform.signal, *[column for _, column in extra]]).astype(np.float32)
    return Waveform(signal, waveform.fs, (*waveform.lead_names, *[lead for lead, _ in extra]))


def to_model_leads(
    waveform: Waveform,
    resolve: Callable[[str], str | None],
    lead_order: Sequence[str],
    *,
    derived: Mapping[str, Mapping[str, float]] = LIMB_WEIGHTS,
    min_duration_s: float,
) -> Waveform:
    """Name leads canonically, derive absent leads, check completeness and order them.

    Args:
        waveform: a decoded recording with the leads as the source names them.
        resolve: source lead name → canonical lead name or ``None`` (leads the model does not use).
        lead_order: the canonical leads wanted, in output order.
        derived: lead → weights of the measured leads it is computed from when absent.
        min_duration_s: shortest acceptable recording.

    Raises:
        EcgRejected: ``duplicate_leads``, ``missing_leads``, ``too_short``, ``too_many_missing``.
    """
    picked: dict[str, int] = {}
    for column, name in enumerate(waveform.lead_names):
        lead = resolve(name)
        if lead is None:
            continue
        if lead in picked:
            raise EcgRejected(
                "duplicate_leads", f"leads {waveform.lead_names[picked[lead]]!r} and {name!r} are both {lead}"
            )
        picked[lead] = column
    named = derive_leads(
        Waveform(waveform.signal[:, list(picked.values())], waveform.fs, tuple(picked)), derived
    )
    missing = [lead for lead in lead_order if lead not in named.lead_names]
    if missing:
        raise EcgRejected("missing_leads", f"ECG lacks lead(s) {', '.join(missing)}")
    duration = named.signal.shape[0] / named.fs
    if duration < min_duration_s:
        raise EcgRejected(
            "too_short", f"ECG lasts {duration:.2f} s, less than the {min_duration_s:g} s minimum"
        )
    columns = [named.lead_names.index(lead) for lead in lead_order]
    signal = np.ascontiguousarray(named.signal[:, columns], dtype=np.float32)
    missing_fraction = (~np.isfinite(signal)).mean(axis=0)
    worst = int(np.argmax(missing_fraction))
    if missing_fraction[worst] > MAX_MISSING_FRACTION:
        raise EcgRejected(
            "too_many_missing",
            f"lead {lead_order[worst]} misses {missing_fraction[worst]:.0%} of its samples (limit {MAX_MISSING_FRACTION:.0%})",
        )
    return Waveform(signal, named.fs, tuple(lead_order))


def preload() -> None:
    """Import pydicom and wfdb now (about 1 s) so the first hook call does not pay for it.

    The service calls this once at start-up; CLI commands that never read an attachment skip it.
    """
    import pydicom
    import wfdb

    del pydicom, wfdb
