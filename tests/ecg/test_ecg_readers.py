"""ECG readers: each format decodes to one EcgRecording (mV, fs, names as stored); each defect has a reason.

The real recording is the MIT-licensed GE MUSE teaching ECG vendored from ecg2dcm 1.3.1
(``tests/data/ecg/ATTRIBUTION.md``): the same 10 s, 500 Hz strip as MUSE XML and as DICOM. The
registry (:mod:`cds_service.ecg.readers`) picks the reader from the content, never the MIME type
alone, and turns any reader failure into a rejection.
"""

from __future__ import annotations

import base64
import io
import re
import struct
import time
import tracemalloc
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cds_service.ecg.canonical import to_model_leads
from cds_service.ecg.readers import FORMATS, detect_format, dicom, muse, read_file, wfdb
from cds_service.ecg.readers.sampled_data import read_components
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits
from fhir_mappings.leads import canonical_lead
from fhir_mappings.signal_spec import MODEL_LEADS
from model_training.ecg_writers import encode_dicom, encode_muse_xml, encode_sampled_data, encode_wfdb_zip

DATA = Path(__file__).parents[1] / "data" / "ecg"
TEACHING_XML = DATA / "guangxi_teaching_sinus_rhythm.xml"
TEACHING_DCM = DATA / "guangxi_teaching_sinus_rhythm.dcm"
MUSE_LSB_MV = 4.88e-3  # LeadAmplitudeUnitsPerBit of the teaching file, in mV
STORED = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
DICOM_ORDER = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
LIMITS = ReadLimits()


def _lead(w: EcgRecording, name: str) -> np.ndarray:
    return w.signal[:, w.lead_names.index(name)].astype(np.float64)


def _digital(seed: int = 0, n: int = 5000) -> np.ndarray:
    """Deterministic int16-range samples for the 12 leads (≈ ±1 mV at 5 µV per unit)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 500.0
    base = np.sin(2 * np.pi * 1.2 * t)[:, None] * rng.uniform(50, 200, 12)[None, :]
    return np.round(base + rng.normal(0, 5, (n, 12))).astype(np.int16)


@pytest.fixture(scope="module")
def teaching_xml() -> EcgRecording:
    return muse.read(TEACHING_XML.read_bytes(), LIMITS)


@pytest.fixture(scope="module")
def teaching_dcm() -> EcgRecording:
    return dicom.read(TEACHING_DCM.read_bytes(), LIMITS)


# --------------------------------------------------------------------------- real teaching ECG


def test_muse_xml_rhythm_strip_is_500hz_10s_with_its_8_stored_leads(teaching_xml: EcgRecording) -> None:
    """MUSE XML: the Rhythm waveform (not the 1.2 s median beat), 500 Hz × 10 s, the 8 leads it stores."""
    assert teaching_xml.fs == 500.0
    assert teaching_xml.signal.shape == (5000, 8)
    assert teaching_xml.lead_names == STORED
    assert teaching_xml.signal.dtype == np.float32
    assert teaching_xml.source_format == "muse-xml" and teaching_xml.source_units == ("MICROVOLTS",) * 8


def test_muse_xml_amplitudes_are_millivolts(teaching_xml: EcgRecording) -> None:
    """Units: MICROVOLTS × LeadAmplitudeUnitsPerBit → mV; a real QRS peaks at about 0.5–3 mV, not µV."""
    peak = np.abs(_lead(teaching_xml, "II")).max()
    assert 0.5 < peak < 3.0
    first = base64.b64decode(
        TEACHING_XML.read_text(encoding="utf-8")
        .split("<WaveformType>Rhythm")[1]
        .split("<WaveFormData>")[1]
        .split("<")[0]
    )
    assert _lead(teaching_xml, "I")[0] == pytest.approx(
        np.frombuffer(first[:2], "<i2")[0] * MUSE_LSB_MV, abs=1e-6
    )


def test_muse_xml_limb_leads_derive_by_einthoven_and_goldberger(teaching_xml: EcgRecording) -> None:
    """MUSE stores I, II, V1–V6: III = II − I, aVR = −(I+II)/2, aVL = I − II/2, aVF = II − I/2."""
    full = to_model_leads(teaching_xml)
    assert full.lead_names == MODEL_LEADS
    one, two = _lead(full, "I"), _lead(full, "II")
    np.testing.assert_allclose(_lead(full, "III"), two - one, atol=1e-6)
    np.testing.assert_allclose(_lead(full, "aVR"), -(one + two) / 2, atol=1e-6)
    np.testing.assert_allclose(_lead(full, "aVL"), one - two / 2, atol=1e-6)
    np.testing.assert_allclose(_lead(full, "aVF"), two - one / 2, atol=1e-6)


def test_dicom_reads_rhythm_group_with_mdc_lead_codes(teaching_dcm: EcgRecording) -> None:
    """DICOM: the RHYTHM multiplex group (5000 samples), leads named from MDC codes 2:1… in file order."""
    assert teaching_dcm.fs == 500.0
    assert teaching_dcm.signal.shape == (5000, 12)
    assert teaching_dcm.lead_names == DICOM_ORDER
    assert teaching_dcm.source_format == "dicom"


def test_dicom_stored_limb_leads_obey_einthoven(teaching_dcm: EcgRecording) -> None:
    """Einthoven's law on the stored (independently quantised) DICOM channels: III − (II − I) ≈ 0."""
    residual = _lead(teaching_dcm, "III") - (_lead(teaching_dcm, "II") - _lead(teaching_dcm, "I"))
    assert np.abs(residual).max() <= MUSE_LSB_MV + 1e-6
    goldberger = _lead(teaching_dcm, "aVR") + _lead(teaching_dcm, "aVL") + _lead(teaching_dcm, "aVF")
    assert np.abs(goldberger).max() <= 2 * MUSE_LSB_MV


def test_xml_and_dicom_of_the_same_ecg_agree_within_quantisation(
    teaching_xml: EcgRecording, teaching_dcm: EcgRecording
) -> None:
    """Same recording, two carriers: stored leads bit-equal, derived leads within one LSB (4.88 µV)."""
    xml, dcm = to_model_leads(teaching_xml), to_model_leads(teaching_dcm)
    for lead in MODEL_LEADS:
        tol = 1e-6 if lead in STORED else MUSE_LSB_MV
        np.testing.assert_allclose(_lead(xml, lead), _lead(dcm, lead), atol=tol, err_msg=lead)


# --------------------------------------------------------------------------- MUSE defects


def test_muse_xml_with_entity_declaration_is_refused() -> None:
    """XML safety: a document declaring entities (billion laughs, XXE) is refused unparsed."""
    bomb = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><RestingECG>&a;</RestingECG>'
    with pytest.raises(EcgRejected) as info:
        muse.read(bomb, LIMITS)
    assert info.value.reason == "unsafe_xml"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not xml at all", "unreadable"),
        (b"<RestingECG><Waveform><WaveformType>Median</WaveformType></Waveform></RestingECG>", "no_waveform"),
    ],
)
def test_muse_xml_malformed_documents_are_named(payload: bytes, reason: str) -> None:
    """A non-XML body and an export with only a median beat are rejected with their reason."""
    with pytest.raises(EcgRejected) as info:
        muse.read(payload, LIMITS)
    assert info.value.reason == reason


def test_muse_xml_unknown_amplitude_units_are_rejected() -> None:
    """Units are never guessed: LeadAmplitudeUnits other than MICRO/MILLIVOLTS → unknown_units."""
    doc = encode_muse_xml(_digital()[:, :8], 4.88, 500, STORED).replace(b"MICROVOLTS", b"FURLONGS", 1)
    with pytest.raises(EcgRejected) as info:
        muse.read(doc, LIMITS)
    assert info.value.reason == "unknown_units"


def test_muse_xml_bad_base64_is_unreadable() -> None:
    """WaveFormData that is not base64 → unreadable, not a crash."""
    doc = encode_muse_xml(_digital()[:, :8], 4.88, 500, STORED)
    start = doc.index(b"<WaveFormData>") + len(b"<WaveFormData>")
    broken = doc[:start] + b"!!!" + doc[start + 3 :]
    with pytest.raises(EcgRejected) as info:
        muse.read(broken, LIMITS)
    assert info.value.reason == "unreadable"


def test_muse_xml_round_trip() -> None:
    """The MUSE writer and reader agree: int16 × 4.88 µV back in mV."""
    digital = _digital()[:, :8]
    w = muse.read(encode_muse_xml(digital, 4.88, 500, STORED), LIMITS)
    np.testing.assert_allclose(w.signal, digital * 4.88e-3, atol=1e-6)


# --------------------------------------------------------------------------- DICOM defects and round trip


def test_dicom_round_trip_keeps_samples_and_names() -> None:
    """The DICOM writer and reader agree on samples (µV × correction → mV), rate and lead names."""
    digital = _digital(1)
    w = dicom.read(encode_dicom(digital, 5.0, 500, DICOM_ORDER, acquired="20250101120000"), LIMITS)
    assert w.lead_names == DICOM_ORDER and w.fs == 500.0
    np.testing.assert_allclose(w.signal, digital * 5e-3, atol=1e-6)


def test_dicom_garbage_is_unreadable() -> None:
    """Bytes that are not DICOM → unreadable."""
    with pytest.raises(EcgRejected) as info:
        dicom.read(b"\x00" * 200, LIMITS)
    assert info.value.reason == "unreadable"


def test_dicom_without_waveform_is_rejected() -> None:
    """A DICOM object with no WaveformSequence (e.g. an image) → no_waveform."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    with pytest.raises(EcgRejected) as info:
        dicom.read(out.getvalue(), LIMITS)
    assert info.value.reason == "no_waveform"


def test_dicom_longer_than_the_limit_is_refused_before_decoding() -> None:
    """A waveform declaring more seconds than ReadLimits.max_seconds → too_long."""
    data = encode_dicom(_digital(1), 5.0, 500, DICOM_ORDER, acquired="20250101120000")
    with pytest.raises(EcgRejected) as info:
        dicom.read(data, ReadLimits(max_seconds=5.0))
    assert info.value.reason == "too_long"


# --------------------------------------------------------------------------- WFDB zip


def test_wfdb_zip_round_trip() -> None:
    """WFDB format 16 at 200 units/mV: written with wfdb, read back as the same mV values."""
    digital = _digital(2)
    names = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")  # MIMIC-IV-ECG order
    w = wfdb.read(encode_wfdb_zip(digital, 200.0, 500, names, "40689238"), LIMITS)
    assert w.lead_names == names and w.fs == 500.0 and w.source_format == "wfdb-zip"
    np.testing.assert_allclose(w.signal, digital / 200.0, atol=1e-6)


def test_wfdb_zip_member_folders_are_flattened() -> None:
    """Zip member paths are reduced to base names (no writing outside the private temp folder)."""
    inner = zipfile.ZipFile(io.BytesIO(encode_wfdb_zip(_digital(3), 200.0, 500, MODEL_LEADS, "rec")))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name in inner.namelist():
            z.writestr(f"../../files/p1000/{name}", inner.read(name))
    assert wfdb.read(out.getvalue(), LIMITS).signal.shape == (5000, 12)


def test_wfdb_zip_bomb_is_refused_before_unpacking() -> None:
    """The declared unpacked size, and each member's inflation ratio, are checked first (attachment_too_large)."""
    data = encode_wfdb_zip(_digital(4), 200.0, 500, MODEL_LEADS, "rec")
    with pytest.raises(EcgRejected) as info:
        wfdb.read(data, ReadLimits(max_unpacked_bytes=1000))
    assert info.value.reason == "attachment_too_large"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("rec.hea", b"rec 1 500 10\nrec.dat 16 200 16 0 0 0 0 I\n")
        z.writestr("rec.dat", b"\x00" * 1_000_000)  # inflates ~1000x
    with pytest.raises(EcgRejected) as info:
        wfdb.read(out.getvalue(), LIMITS)
    assert info.value.reason == "attachment_too_large"


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ({"rec.dat": b"\x00\x00"}, "unreadable"),
        ({"a.hea": b"a 1 500 10\n", "b.hea": b"b 1 500 10\n"}, "unreadable"),
        ({"rec.hea": b"rec 1 500 10\nrec.dat 16 200 16 0 0 0 0 I\n"}, "unreadable"),
    ],
    ids=["no header", "two headers", "missing dat"],
)
def test_wfdb_zip_incomplete_records_are_unreadable(members: dict[str, bytes], reason: str) -> None:
    """A zip without exactly one header, or whose signal file is missing, is rejected by name."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, content in members.items():
            z.writestr(name, content)
    with pytest.raises(EcgRejected) as info:
        wfdb.read(out.getvalue(), LIMITS)
    assert info.value.reason == reason


def test_wfdb_not_a_zip_is_unreadable() -> None:
    """Bytes that are not a zip → unreadable."""
    with pytest.raises(EcgRejected) as info:
        wfdb.read(b"PK-not-really", LIMITS)
    assert info.value.reason == "unreadable"


# --------------------------------------------------------------------------- FHIR valueSampledData


def _component(name: str, sampled: dict[str, object]) -> dict[str, object]:
    return {"code": {"text": name}, "valueSampledData": sampled}


def _lead_of(code: Mapping[str, Any]) -> str | None:
    text = code.get("text")
    return text if isinstance(text, str) and canonical_lead(text) is not None else None


def test_sampled_data_scaling_origin_factor_period() -> None:
    """SampledData: value = origin + factor × datum, in origin's unit (µV → mV); fs = 1000 / period(ms)."""
    sampled = {
        "origin": {"value": 10, "code": "uV"},
        "period": 2,
        "factor": 2.5,
        "dimensions": 1,
        "data": "0 4 -4",
    }
    w = read_components([_component("I", sampled)], _lead_of, LIMITS)
    assert w.fs == 500.0 and w.lead_names == ("I",) and w.source_format == "sampled-data"
    np.testing.assert_allclose(w.signal[:, 0], [0.010, 0.020, 0.000], atol=1e-7)


def test_sampled_data_markers_become_nan() -> None:
    """The SampledData markers E (error), L (below limit), U (above limit) become NaN samples."""
    sampled = {"origin": {"value": 0, "code": "mV"}, "period": 2, "data": "1 E 2 L U 3"}
    w = read_components([_component("II", sampled)], _lead_of, LIMITS)
    assert np.isnan(w.signal[:, 0]).tolist() == [False, True, False, True, True, False]


def test_sampled_data_round_trip_with_writer() -> None:
    """encode_sampled_data writes what the sampled-data reader reads back (12 leads, µV integers)."""
    digital = _digital(5)
    components = [
        _component(n, s) for n, s in zip(MODEL_LEADS, encode_sampled_data(digital, 5.0, 500), strict=True)
    ]
    w = read_components(components, _lead_of, LIMITS)
    assert w.lead_names == MODEL_LEADS and w.fs == 500.0
    np.testing.assert_allclose(w.signal, digital * 5e-3, atol=1e-6)


@pytest.mark.parametrize(
    ("components", "reason"),
    [
        (
            [_component("I", {"origin": {"value": 0, "code": "mV"}, "period": 2, "data": "1 2 x"})],
            "non_numeric",
        ),
        (
            [_component("I", {"origin": {"value": 0, "code": "mV"}, "period": 2, "data": "1 2 nan"})],
            "non_numeric",
        ),
        ([_component("I", {"origin": {"value": 0, "code": "mV"}, "period": 2, "data": ""})], "non_numeric"),
        ([_component("I", {"origin": {"value": 0}, "period": 2, "data": "1 2"})], "unknown_units"),
        (
            [_component("I", {"origin": {"value": 0, "code": "mm[Hg]"}, "period": 2, "data": "1 2"})],
            "unknown_units",
        ),
        ([_component("I", {"origin": {"value": 0, "code": "mV"}, "period": 0, "data": "1 2"})], "bad_fs"),
        (
            [
                _component("I", {"origin": {"value": 0, "code": "mV"}, "period": 2, "data": "1 2 3"}),
                _component("II", {"origin": {"value": 0, "code": "mV"}, "period": 2, "data": "1 2"}),
            ],
            "wrong_length",
        ),
        (
            [
                _component("I", {"origin": {"value": 0, "code": "mV"}, "period": 2, "data": "1 2"}),
                _component("II", {"origin": {"value": 0, "code": "mV"}, "period": 4, "data": "1 2"}),
            ],
            "bad_fs",
        ),
        (
            [
                _component(
                    "I", {"origin": {"value": 0, "code": "mV"}, "period": 2, "dimensions": 3, "data": "1 2 3"}
                )
            ],
            "bad_shape",
        ),
        (
            [_component("not a lead", {"origin": {"value": 0, "code": "mV"}, "period": 2, "data": "1 2"})],
            "bad_shape",
        ),
    ],
    ids=[
        "letters",
        "nan token",
        "empty",
        "no unit",
        "pressure unit",
        "zero period",
        "unequal length",
        "unequal period",
        "dimensions",
        "no known lead",
    ],
)
def test_sampled_data_defects_have_reasons(components: list[dict[str, object]], reason: str) -> None:
    """Malformed SampledData is rejected with a named reason, never a crash."""
    with pytest.raises(EcgRejected) as info:
        read_components(components, _lead_of, LIMITS)
    assert info.value.reason == reason


# --------------------------------------------------------------------------- the registry


def _files() -> dict[str, bytes]:
    digital = _digital(8)
    return {
        "dicom": encode_dicom(digital, 5.0, 500, DICOM_ORDER, acquired="20250101120000"),
        "wfdb-zip": encode_wfdb_zip(digital, 200.0, 500, DICOM_ORDER, "rec"),
        "muse-xml": encode_muse_xml(digital[:, :8], 4.88, 500, STORED),
    }


def test_formats_are_detected_from_content() -> None:
    """Each writer's output is recognised by exactly its reader; other bytes by none."""
    files = _files()
    assert set(files) <= set(FORMATS)
    for fmt, data in files.items():
        assert detect_format(data) == fmt
        assert [name for name, module in FORMATS.items() if module.sniff(data)] == [fmt]
    assert detect_format(b"%PDF-1.4 not an ECG") is None
    assert detect_format(b"") is None
    assert detect_format(TEACHING_XML.read_bytes()) == "muse-xml"
    assert detect_format(TEACHING_DCM.read_bytes()) == "dicom"


@pytest.mark.parametrize("wrong_hint", ["muse-xml", "wfdb-zip", "pdf", None])
def test_read_file_ignores_a_wrong_content_type_hint(wrong_hint: str | None) -> None:
    """A DICOM file labelled as XML, zip, PDF or nothing is still read as DICOM: content decides."""
    w = read_file(_files()["dicom"], LIMITS, wrong_hint)
    assert w.source_format == "dicom" and w.lead_names == DICOM_ORDER


def test_read_file_uses_the_hint_only_for_unrecognised_bytes() -> None:
    """Bytes no reader recognises: read with the hinted reader (its reason), else unknown_content_type."""
    with pytest.raises(EcgRejected) as info:
        read_file(b"%PDF-1.4", LIMITS, "pdf")
    assert info.value.reason == "unknown_content_type"
    with pytest.raises(EcgRejected) as info:
        read_file(b"\x00" * 200, LIMITS, "dicom")
    assert info.value.reason == "unreadable"


def test_read_file_refuses_files_over_the_byte_limit() -> None:
    """More bytes than ReadLimits.max_bytes → attachment_too_large, before any reader runs."""
    with pytest.raises(EcgRejected) as info:
        read_file(_files()["dicom"], ReadLimits(max_bytes=1000))
    assert info.value.reason == "attachment_too_large"


@pytest.mark.parametrize("error", [RuntimeError("bug"), IndexError("list index"), MemoryError()])
def test_a_reader_raising_unexpectedly_gives_unreadable(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """A reader bug or a library error on hostile bytes is a rejected ECG (unreadable), never a 500."""

    def broken(data: bytes, limits: ReadLimits) -> EcgRecording:
        raise error

    monkeypatch.setattr(FORMATS["dicom"], "read", broken)
    with pytest.raises(EcgRejected) as info:
        read_file(_files()["dicom"], LIMITS)
    assert info.value.reason == "unreadable"
    assert isinstance(info.value.__cause__, type(error))


# --------------------------------------------------------------------------- hostile input: bounded work


def _bounded(read: Any, data: Any, limits: ReadLimits = LIMITS, *, seconds: float = 2.0, mb: int = 64) -> str:
    """The rejection reason of ``read(data, limits)``, asserting it comes within time and memory.

    Timed without tracemalloc (which slows pure-Python parsing several times), then traced once
    more for the allocation peak.
    """
    started = time.perf_counter()
    with pytest.raises(EcgRejected) as info:
        read(data, limits)
    assert time.perf_counter() - started < seconds
    tracemalloc.start()
    try:
        with pytest.raises(EcgRejected):
            read(data, limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < mb * 2**20, f"traced peak {peak / 2**20:.0f} MB"
    return info.value.reason


def _dicom_dataset(digital: np.ndarray | None = None) -> Any:
    import pydicom

    data = encode_dicom(
        _digital(1) if digital is None else digital, 5.0, 500, DICOM_ORDER, acquired="20250101120000"
    )
    return pydicom.dcmread(io.BytesIO(data))


def _dicom_bytes(ds: Any, syntax: Any = None) -> bytes:
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def test_dicom_deflated_transfer_syntax_is_read_under_caps() -> None:
    """Deflated Explicit VR LE is inflated by the reader (not pydicom) and reads like the plain file."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    plain = dicom.read(_dicom_bytes(_dicom_dataset()), LIMITS)
    deflated = _dicom_bytes(_dicom_dataset(), DeflatedExplicitVRLittleEndian)
    assert len(deflated) < 0.8 * len(_dicom_bytes(_dicom_dataset()))
    np.testing.assert_array_equal(dicom.read(deflated, LIMITS).signal, plain.signal)


def test_dicom_deflate_bomb_stops_at_the_running_cap() -> None:
    """A deflated data set of a few dozen KB inflating to 60 MB is refused at the running cap, never fully inflated."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = _dicom_dataset()
    ds.add_new(0x00091010, "OB", bytes(60 * 2**20))  # a private element of zeros
    bomb = _dicom_bytes(ds, DeflatedExplicitVRLittleEndian)
    assert len(bomb) < 200_000
    assert _bounded(dicom.read, bomb) == "attachment_too_large"


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("NumberOfWaveformChannels", 1000, "too_long"),
        ("NumberOfWaveformChannels", 11, "bad_shape"),
        ("NumberOfWaveformSamples", 2**31, "too_long"),
        ("SamplingFrequency", 1e-3, "bad_fs"),
        ("WaveformBitsAllocated", 12, "unreadable"),
        ("WaveformSampleInterpretation", "MB", "unreadable"),
    ],
)
def test_dicom_declared_numbers_are_checked_before_decoding(field: str, value: Any, reason: str) -> None:
    """Counts, rate, sample width and interpretation are range-checked before any sample is read."""
    ds = _dicom_dataset()
    setattr(ds.WaveformSequence[0], field, value)
    assert _bounded(dicom.read, _dicom_bytes(ds)) == reason


def test_dicom_samples_shorter_than_declared_and_absurd_scales_are_refused() -> None:
    """Data shorter than samples × channels, and a sensitivity of 1e300, are refused, not computed."""
    ds = _dicom_dataset()
    ds.WaveformSequence[0].WaveformData = ds.WaveformSequence[0].WaveformData[:1000]
    assert _bounded(dicom.read, _dicom_bytes(ds)) == "unreadable"
    ds = _dicom_dataset()
    ds.WaveformSequence[0].ChannelDefinitionSequence[3].ChannelSensitivity = "1e300"
    assert _bounded(dicom.read, _dicom_bytes(ds)) == "unreadable"


def test_dicom_with_a_million_elements_is_refused_while_parsing() -> None:
    """Pure-Python parsing costs per element: more than MAX_ELEMENTS top-level elements stop the parse."""
    head = _dicom_bytes(_dicom_dataset())
    body = b"".join(
        struct.pack("<HH2sH", 0x0011 + 2 * (i // 0xFFFF), i % 0xFFFF, b"LO", 0) for i in range(10**6)
    )
    assert _bounded(dicom.read, head + body, ReadLimits(max_bytes=20 * 2**20)) == "unreadable"


def _wfdb_zip(header: bytes, dat: bytes = b"\x00" * 24_000, name: str = "rec.dat") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("rec.hea", header)
        z.writestr(name, dat)
    return out.getvalue()


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"rec 1 500 1000\n../../etc/passwd 16 200 16 0 0 0 0 I\n", "unreadable"),
        (b"rec 1 500 1000\n/etc/passwd 16 200 16 0 0 0 0 I\n", "unreadable"),
        (b"rec 1 500 1000\nrec.dat 508 200 16 0 0 0 0 I\n", "unreadable"),
        (b"rec 1 500\nrec.dat 16 200 16 0 0 0 0 I\n", "unreadable"),
        (b"rec 1 500 999999999\nrec.dat 16 200 16 0 0 0 0 I\n", "too_long"),
        (b"rec 1 0.001 1000\nrec.dat 16 200 16 0 0 0 0 I\n", "bad_fs"),
        (b"rec 1 500 1000\nrec.dat 16x9999 200 16 0 0 0 0 I\n", "too_long"),
        (b"rec 1 500 1000\nrec.dat 16 1e300 16 0 0 0 0 I\n", "unreadable"),
        (b"rec 1 500 1000\nrec.dat 16+99999999 200 16 0 0 0 0 I\n", "unreadable"),
        (b"rec 100 500 1000\n" + b"rec.dat 16 200 16 0 0 0 0 I\n" * 100, "too_long"),
    ],
    ids=[
        "path escape",
        "absolute path",
        "flac",
        "no length",
        "huge length",
        "rate",
        "samples per frame",
        "gain",
        "byte offset",
        "signal count",
    ],
)
def test_wfdb_header_numbers_and_file_names_are_checked_first(header: bytes, reason: str) -> None:
    """Every header number that drives wfdb's work, and every file it names, is checked before reading."""
    assert _bounded(wfdb.read, _wfdb_zip(header)) == reason


def test_wfdb_zip_member_lying_about_its_size_is_capped_while_inflating() -> None:
    """Declared sizes are not evidence: a member claiming 64 bytes that inflates to 8 MB is stopped."""
    packed = _wfdb_zip(b"rec 1 500 1000\nrec.dat 16 200 16 0 0 0 0 I\n", bytes(8 * 2**20))
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(packed)) as z, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as bomb:
        for info in z.infolist():
            bomb.writestr(info.filename, z.read(info))
    lying = re.sub(
        rb"PK\x01\x02(.{16})(.{4})(.{4})",
        lambda m: b"PK\x01\x02" + m.group(1) + m.group(2) + struct.pack("<I", 64),
        out.getvalue(),
        flags=re.DOTALL,
    )
    assert _bounded(wfdb.read, lying) in {"attachment_too_large", "unreadable"}
    assert _bounded(wfdb.read, lying, ReadLimits(max_unpacked_bytes=2**20)) in {
        "attachment_too_large",
        "unreadable",
    }


def test_wfdb_zip_with_other_compression_is_refused() -> None:
    """Only stored and deflated members are unpacked (bzip2/lzma are refused unread)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_BZIP2) as z:
        z.writestr("rec.hea", b"rec 1 500 1000\nrec.dat 16 200 16 0 0 0 0 I\n")
        z.writestr("rec.dat", bytes(2000))
    assert _bounded(wfdb.read, out.getvalue()) == "unreadable"


def _muse(digital: np.ndarray | None = None) -> str:
    return encode_muse_xml(_digital()[:, :8] if digital is None else digital, 4.88, 500, STORED).decode(
        "utf-8"
    )


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be"])
def test_muse_xml_in_utf16_is_read_and_its_entities_refused(codec: str) -> None:
    """UTF-16 (with or without BOM) is detected and read; entities in it are refused like in UTF-8."""
    text = _muse()
    assert muse.read(text.encode(codec), LIMITS).signal.shape == (5000, 8)
    assert detect_format(text.encode(codec)) == "muse-xml"
    bomb = re.sub(r"(<\?xml[^>]*\?>)", r'\1<!DOCTYPE RestingECG [<!ENTITY a "x">]>', text, count=1)
    assert (
        _bounded(muse.read, bomb.replace("<RestingECG>", "<RestingECG>&a;", 1).encode(codec)) == "unsafe_xml"
    )


def test_muse_xml_external_doctype_is_dropped_unread_and_other_dtds_refused() -> None:
    """The real exports' external DOCTYPE is tolerated (never fetched); a DOCTYPE after a comment is not."""
    text = _muse()
    declared = re.sub(
        r"(<\?xml[^>]*\?>)", r'\1\n<!DOCTYPE RestingECG SYSTEM "http://127.0.0.1:9/restecg.dtd">', text
    )
    assert muse.read(declared.encode(), LIMITS).signal.shape == (5000, 8)
    hidden = re.sub(r"(<\?xml[^>]*\?>)", r'\1<!-- x --><!DOCTYPE RestingECG SYSTEM "restecg.dtd">', text)
    assert _bounded(muse.read, hidden.encode()) == "unsafe_xml"


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda t: t.replace("<SampleExponent>0<", "<SampleExponent>400000<", 1), "bad_fs"),
        (lambda t: t.replace("<SampleBase>500<", "<SampleBase>1e400<", 1), "bad_fs"),
        (
            lambda t: t.replace("<LeadAmplitudeUnitsPerBit>4.88<", "<LeadAmplitudeUnitsPerBit>1e300<", 1),
            "non_numeric",
        ),
        (
            lambda t: t.replace(
                "<LeadSampleCountTotal>",
                "<LeadByteCountTotal>7</LeadByteCountTotal><LeadSampleCountTotal>",
                1,
            ),
            "unreadable",
        ),
        (lambda t: t.replace("<LeadSampleCountTotal>5000<", "<LeadSampleCountTotal>4999<", 1), "unreadable"),
        (lambda t: t.replace("<LeadData>", "<x>" * 100 + "</x>" * 100 + "<LeadData>", 1), "unreadable"),
    ],
    ids=["exponent", "base", "amplitude", "byte count", "sample count", "nesting"],
)
def test_muse_xml_numbers_and_structure_are_bounded(edit: Any, reason: str) -> None:
    """Rate parts, amplitude per bit, stated byte counts and nesting depth are checked before use."""
    assert _bounded(muse.read, edit(_muse()).encode()) == reason


def test_muse_xml_waveform_size_is_checked_before_base64_decoding() -> None:
    """A lead whose base64 would decode to more than 60 s of samples is refused without decoding it."""
    text = _muse()
    huge = base64.b64encode(bytes(2 * 500 * 61)).decode()
    start = text.index("<WaveFormData>", text.index("Rhythm")) + len("<WaveFormData>")
    doc = text[:start] + huge + text[text.index("</WaveFormData>", start) :]
    assert _bounded(muse.read, doc.encode()) == "too_long"


def test_sampled_data_is_capped_before_it_is_all_parsed() -> None:
    """10 M tokens of data: refused after one chunk (too_long), not after splitting 10 M strings."""
    sampled = {"origin": {"value": 0, "code": "uV"}, "period": 2, "data": "1 " * 10_000_000}
    assert (
        _bounded(lambda c, lim: read_components(c, _lead_of, lim), [_component("I", sampled)]) == "too_long"
    )


@pytest.mark.parametrize(
    ("sampled", "reason"),
    [
        ({"origin": {"value": 0, "code": "uV"}, "period": 2, "data": "1" * 5000}, "non_numeric"),
        ({"origin": {"value": 0, "code": "uV"}, "period": 2, "factor": 1e300, "data": "1 2"}, "non_numeric"),
        ({"origin": {"value": 1e300, "code": "uV"}, "period": 2, "data": "1 2"}, "non_numeric"),
        ({"origin": {"value": 0, "code": "uV"}, "period": "nan", "data": "1 2"}, "non_numeric"),
        (
            {"origin": {"value": 0, "code": "uV"}, "period": 2, "dimensions": 10**400, "data": "1 2"},
            "non_numeric",
        ),
    ],
    ids=["long token", "factor", "origin", "nan period", "dimensions"],
)
def test_sampled_data_numbers_are_bounded(sampled: dict[str, object], reason: str) -> None:
    """Tokens, factor, origin, period and dimensions beyond their bounds are refused by name."""
    assert _bounded(lambda c, lim: read_components(c, _lead_of, lim), [_component("I", sampled)]) == reason


def test_sampled_data_total_samples_across_leads_is_capped() -> None:
    """12 leads each within the per-lead limit but together beyond max_cells → too_long, early."""
    limits = ReadLimits(max_unpacked_bytes=8 * 100_000)  # 100 000 samples in all
    leads = [
        _component(lead, {"origin": {"value": 0, "code": "uV"}, "period": 2, "data": "1 " * 20_000})
        for lead in MODEL_LEADS
    ]
    assert _bounded(lambda c, lim: read_components(c, _lead_of, lim), leads, limits) == "too_long"
    with pytest.raises(EcgRejected) as info:
        read_components([_component("I", {"period": 2, "data": "1"})] * 2000, _lead_of, LIMITS)
    assert info.value.reason == "too_long"
