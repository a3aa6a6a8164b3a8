"""Philips SierraECG XML, HL7 aECG, SCP-ECG and EDF readers: real vendor files, built files, hostile input.

Real files (``tests/data/ecg/vendor/``, provenance in its README) pin what each reader returns:
rate, lead names, length, amplitudes, device. Files built here cover what the real ones do not:
other encodings, file-defined Huffman tables and table switches, reference-beat subtraction,
SCP 1.x, EDF+ annotations and units. Hostile inputs (truncation, bit flips, huge declared sizes,
DTDs in UTF-16, decompression bombs, impossible rates) must each end in a prompt ``EcgRejected``
in under 2 s and under 100 MB (tracemalloc peak), never in another exception.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import io
import random
import struct
import time
import tracemalloc
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import edfio
import numpy as np
import numpy.typing as npt
import pytest

from cds_service.ecg.readers import edf, hl7_aecg, philips, scp
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

VENDOR = Path(__file__).parents[1] / "data" / "ecg" / "vendor"
LIMITS = ReadLimits()
Reader = Callable[[bytes, ReadLimits], EcgRecording]
STANDARD_12 = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
MAX_SECONDS = 2.0
MAX_PEAK_BYTES = 100 * 1024 * 1024


def _file(*parts: str) -> bytes:
    return VENDOR.joinpath(*parts).read_bytes()


def _rejected(read: Reader, data: bytes, limits: ReadLimits = LIMITS) -> EcgRejected:
    """``read`` refuses ``data`` with EcgRejected, in under 2 s and under 100 MB of allocations."""
    start = time.perf_counter()
    with pytest.raises(EcgRejected) as caught:
        read(data, limits)
    assert time.perf_counter() - start < MAX_SECONDS
    tracemalloc.start()
    try:
        with pytest.raises(EcgRejected):
            read(data, limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_PEAK_BYTES
    return caught.value


def _survives(read: Reader, data: bytes) -> str:
    """``read`` returns a recording or raises EcgRejected (nothing else), in under 2 s."""
    start = time.perf_counter()
    try:
        read(data, LIMITS)
        outcome = "ok"
    except EcgRejected as exc:
        outcome = exc.reason
    assert time.perf_counter() - start < MAX_SECONDS
    return outcome


def _mutations(data: bytes, seed: int, count: int) -> list[bytes]:
    """Seeded bit flips, byte overwrites and truncations of ``data``."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        mutated = bytearray(data)
        kind = rng.choice(("flip", "byte", "cut"))
        if kind == "cut":
            mutated = mutated[: rng.randrange(len(mutated))]
        for _ in range(rng.randint(1, 6) if kind != "cut" else 0):
            position = rng.randrange(len(mutated))
            mutated[position] = (
                mutated[position] ^ (1 << rng.randrange(8)) if kind == "flip" else rng.randrange(256)
            )
        out.append(bytes(mutated))
    return out


def _lead(recording: EcgRecording, name: str) -> npt.NDArray[np.float64]:
    return recording.signal[:, recording.lead_names.index(name)].astype(np.float64)


def _assert_einthoven(recording: EcgRecording, names: Sequence[str], tolerance: float) -> None:
    """Einthoven and Goldberger hold sample by sample for leads named I, II, III, aVR, aVL, aVF.

    The six limb leads are recorded or stored independently, so the identities only hold when
    every lead was decoded, reconstructed and scaled right.
    """
    i, ii, iii, avr, avl, avf = (_lead(recording, n) for n in names)
    assert np.abs(iii - (ii - i)).max() < tolerance
    assert np.abs(avr + (i + ii) / 2).max() < tolerance
    assert np.abs(avl - (i - iii) / 2).max() < tolerance
    assert np.abs(avf - (ii + iii) / 2).max() < tolerance


def _assert_plausible(recording: EcgRecording) -> None:
    assert np.isfinite(recording.signal).all()
    assert np.abs(recording.signal).max() < 10.0  # mV
    assert (np.ptp(recording.signal, axis=0) > 0.1).all()


# ---------------------------------------------------------------- Philips SierraECG


PHILIPS_FILES = {
    "129DYPRG.XML": ("HeartstartMRx", None, dt.datetime(2011, 12, 1, 7, 27, 34)),
    "3191723_ZZDEMOPTONLY_1-04_orig.xml": (
        "PageWriter Touch",
        "A.01.01.01",
        dt.datetime(2010, 1, 19, 15, 19, 22),
    ),
    "2020-5-18_15-48-11.xml": ("PageWriter TC", "A.07.04.03", dt.datetime(2020, 5, 18, 15, 48, 11)),
}


@pytest.mark.parametrize("name", sorted(PHILIPS_FILES))
def test_philips_real_files(name: str) -> None:
    data = _file("philips_sierra", name)
    assert philips.sniff(data)
    recording = philips.read(data, LIMITS)
    device, software, when = PHILIPS_FILES[name]
    assert recording.source_format == "philips-xml"
    assert recording.fs == 500.0
    assert recording.lead_names == STANDARD_12
    assert recording.source_units == ("uV",) * 12
    assert 10.4 <= recording.duration_s <= 11.0  # 11 s stated, calibration tail dropped
    assert any("calibration" in w for w in recording.warnings)
    assert (recording.device, recording.software, recording.recorded_at) == (device, software, when)
    _assert_plausible(recording)
    # XLI stores III, aVR, aVL, aVF as residuals: rebuilt, they obey Einthoven/Goldberger to a count.
    _assert_einthoven(recording, STANDARD_12[:6], tolerance=0.011)


def _reencoded(data: bytes, encoding: str, declared: str, bom: bool) -> bytes:
    """The same document in another byte encoding, with a declaration that may lie."""
    text = data.decode("utf-8").replace('encoding="UTF-8"', f'encoding="{declared}"', 1)
    body = text.encode(encoding)
    if bom:
        body = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff", "utf-8": b"\xef\xbb\xbf"}[encoding] + body
    return body


@pytest.mark.parametrize(
    ("encoding", "declared", "bom"),
    [
        ("utf-16-le", "UTF-8", False),
        ("utf-16-be", "UTF-16", True),
        ("utf-16-le", "UTF-16", True),
        ("utf-8", "UTF-16", False),
        ("utf-8", "ISO-8859-1", True),
    ],
)
def test_philips_encodings_and_lying_declarations(encoding: str, declared: str, bom: bool) -> None:
    original = _file("philips_sierra", "129DYPRG.XML")
    expected = philips.read(original, LIMITS)
    data = _reencoded(original, encoding, declared, bom)
    assert philips.sniff(data)
    recording = philips.read(data, LIMITS)
    np.testing.assert_array_equal(recording.signal, expected.signal)


def _philips_doc(
    parsed: str, *, rate: str = "500", resolution: str = "5", acquisition: str = "10-WIRE"
) -> bytes:
    """A minimal PhilipsECG 1.04 document around a ``<parsedwaveforms>`` element."""
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<restingecgdata xmlns="http://www3.medical.philips.com">'
        "<documentinfo><documenttype>PhilipsECG</documenttype><documentversion>1.04</documentversion></documentinfo>"
        '<dataacquisition date="2020-01-02" time="03:04:05"><machine detaildescription="P:1:B.2">Cart</machine>'
        f"<signalcharacteristics><samplingrate>{rate}</samplingrate><resolution>{resolution}</resolution>"
        f"<signaloffset>0</signaloffset><signalsigned>True</signalsigned><acquisitiontype>{acquisition}</acquisitiontype>"
        "<numberchannelsallocated>12</numberchannelsallocated></signalcharacteristics></dataacquisition>"
        f"<waveforms>{parsed}</waveforms></restingecgdata>"
    ).encode()


def test_philips_uncompressed_base64_matches_xli() -> None:
    expected = philips.read(_file("philips_sierra", "129DYPRG.XML"), LIMITS)
    counts = np.rint(expected.signal / 0.005).astype("<i2")
    n = counts.shape[0]
    payload = base64.b64encode(counts.T.tobytes()).decode()
    doc = _philips_doc(
        f'<parsedwaveforms dataencoding="Base64" compression="None" compressflag="False" numberofleads="12" '
        f'leadlabels="{" ".join(STANDARD_12)}" durationperchannel="{n * 2}">{payload}</parsedwaveforms>'
    )
    recording = philips.read(doc, LIMITS)
    np.testing.assert_allclose(recording.signal, expected.signal, atol=1e-6)
    assert recording.software == "B.2"


def _lzw_codes(codes: Sequence[int]) -> bytes:
    """Pack 10-bit LZW codes most significant bit first."""
    bits = "".join(f"{c:010b}" for c in codes)
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def _xli_bomb_chunk(repeats: int) -> bytes:
    """One XLI chunk whose LZW codes grow a run of zeros and then repeat its longest entry."""
    packed = _lzw_codes([0, *range(256, 1023), *([1022] * repeats)])
    return struct.pack("<iHh", len(packed), 0, 0) + packed


def _xli_doc(chunks: bytes, duration_ms: int, rate: int = 500) -> bytes:
    return _philips_doc(
        f'<parsedwaveforms dataencoding="Base64" compression="XLI" numberofleads="12" samplespersecond="{rate}" '
        f'leadlabels="{" ".join(STANDARD_12)}" durationperchannel="{duration_ms}">'
        f"{base64.b64encode(chunks).decode()}</parsedwaveforms>"
    )


@pytest.mark.parametrize(("duration_ms", "rate"), [(10_000, 500), (60_000, 10_000)])
def test_philips_xli_bomb_is_bounded(duration_ms: int, rate: int) -> None:
    # 12 chunks of ~25 KB each would inflate to ~190 MB; the per-lead and global caps stop it.
    data = _xli_doc(_xli_bomb_chunk(20_000) * 12, duration_ms, rate)
    assert 250_000 < len(data) < 500_000
    assert _rejected(philips.read, data).reason in {"unreadable", "attachment_too_large", "too_long"}


def test_philips_inflation_and_decoded_size_caps() -> None:
    data = _file("philips_sierra", "129DYPRG.XML")
    assert _rejected(philips.read, data, ReadLimits(max_ratio=1.5)).reason == "attachment_too_large"
    # 12 × 5500 float32 samples (264 KB) exceed a 100 KB decoded-signal budget: refused before decoding.
    assert _rejected(philips.read, data, ReadLimits(max_unpacked_bytes=100_000)).reason == "too_long"


PHILIPS_HOSTILE = {
    "negative rate": (
        '<parsedwaveforms dataencoding="Base64" compression="XLI" durationperchannel="10000" '
        'samplespersecond="-500" leadlabels="I II">AAAA</parsedwaveforms>',
        "bad_fs",
    ),
    "zero rate": (
        '<parsedwaveforms dataencoding="Base64" compression="XLI" durationperchannel="10000" '
        'samplespersecond="0" leadlabels="I II">AAAA</parsedwaveforms>',
        "bad_fs",
    ),
    "NaN rate": (
        '<parsedwaveforms dataencoding="Base64" compression="XLI" durationperchannel="10000" '
        'samplespersecond="NaN" leadlabels="I II">AAAA</parsedwaveforms>',
        "unreadable",
    ),
    "huge duration": (
        '<parsedwaveforms dataencoding="Base64" compression="XLI" durationperchannel="999999999999" '
        'leadlabels="I II">AAAA</parsedwaveforms>',
        "too_long",
    ),
    "huge lead count": (
        '<parsedwaveforms dataencoding="Base64" compression="XLI" durationperchannel="10000" '
        'numberofleads="100000" leadlabels="I II">AAAA</parsedwaveforms>',
        "unreadable",
    ),
    "missing chunks": (
        '<parsedwaveforms dataencoding="Base64" compression="XLI" durationperchannel="10000" '
        'leadlabels="I II">AAAAAAAAAAA=</parsedwaveforms>',
        "unreadable",
    ),
    "unknown 1.03 lead set": (
        '<parsedwaveforms dataencoding="Base64" compressflag="False" '
        'durationperchannel="10000">AAAA</parsedwaveforms>',
        "unreadable",
    ),
    "short plain payload": (
        '<parsedwaveforms dataencoding="Base64" compressflag="False" durationperchannel="10000" '
        'leadlabels="I II">AAAA</parsedwaveforms>',
        "unreadable",
    ),
    "not base64": (
        '<parsedwaveforms dataencoding="Base64" compression="XLI" durationperchannel="10000" '
        'leadlabels="I II">@@@@</parsedwaveforms>',
        "unreadable",
    ),
}


@pytest.mark.parametrize("case", sorted(PHILIPS_HOSTILE))
def test_philips_hostile_headers(case: str) -> None:
    parsed, reason = PHILIPS_HOSTILE[case]
    acquisition = "EASI" if case == "unknown 1.03 lead set" else "10-WIRE"
    assert _rejected(philips.read, _philips_doc(parsed, acquisition=acquisition)).reason == reason


def test_philips_adc_counts_are_implausible() -> None:
    expected = philips.read(_file("philips_sierra", "129DYPRG.XML"), LIMITS)
    counts = np.rint(expected.signal / 0.005).astype("<i2")
    payload = base64.b64encode(counts.T.tobytes()).decode()
    doc = _philips_doc(
        f'<parsedwaveforms dataencoding="Base64" compressflag="False" leadlabels="{" ".join(STANDARD_12)}" '
        f'durationperchannel="{counts.shape[0] * 2}">{payload}</parsedwaveforms>',
        resolution="1000",  # 1 mV per count: counts read as if they were millivolts
    )
    assert _rejected(philips.read, doc).reason == "implausible_amplitude"


# ---------------------------------------------------------------- XML safety (both XML readers)

ENTITY_DOC = '<?xml version="1.0" encoding="utf-16"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'


XML_READERS = {
    "philips": (philips.read, "restingecgdata", "restingecgdata"),
    "hl7": (hl7_aecg.read, 'AnnotatedECG xmlns="urn:hl7-org:v3"', "AnnotatedECG"),
}


@pytest.mark.parametrize("key", sorted(XML_READERS))
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-8"])
def test_dtd_and_entities_refused_in_any_encoding(key: str, encoding: str) -> None:
    read, root, close = XML_READERS[key]
    data = f"{ENTITY_DOC}<{root}>&b;</{close}>".encode(encoding)
    assert _rejected(read, data).reason == "unsafe_xml"


@pytest.mark.parametrize("key", sorted(XML_READERS))
def test_external_entity_and_deep_nesting_refused(key: str) -> None:
    read = XML_READERS[key][0]
    external = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>'
    assert _rejected(read, external).reason == "unsafe_xml"
    deep = b"<r>" + b"<a>" * 50_000 + b"</a>" * 50_000 + b"</r>"
    assert _rejected(read, deep).reason == "unreadable"
    wide = b"<r>" + b"<a/>" * 60_000 + b"</r>"
    assert _rejected(read, wide).reason == "unreadable"


# ---------------------------------------------------------------- HL7 aECG


def test_hl7_aecg_real_file() -> None:
    data = _file("hl7_aecg", "jhu_hl7aecg-Example2.xml")
    assert hl7_aecg.sniff(data)
    recording = hl7_aecg.read(data, LIMITS)
    assert recording.source_format == "hl7-aecg"
    assert recording.fs == 1000.0
    assert recording.lead_names == tuple(f"MDC_ECG_LEAD_{n.upper()}" for n in STANDARD_12)
    assert recording.source_units == ("uV",) * 12
    assert recording.signal.shape == (10_000, 12)  # the rhythm, not the 1.2 s median beats
    assert recording.duration_s == 10.0
    assert recording.device == "Manufacturer ABC 12345"
    assert recording.recorded_at == dt.datetime(2004, 1, 15, 11, 20, 4)
    _assert_plausible(recording)
    _assert_einthoven(recording, recording.lead_names[:6], tolerance=0.005)


def _sequence(
    code: str, digits: str, scale: tuple[str, str] = ("5", "uV"), origin: tuple[str, str] = ("0", "uV")
) -> str:
    return (
        f'<component><sequence><code code="{code}"/><value xsi:type="SLIST_PQ">'
        f'<origin value="{origin[0]}" unit="{origin[1]}"/><scale value="{scale[0]}" unit="{scale[1]}"/>'
        f"<digits>{digits}</digits></value></sequence></component>"
    )


def _aecg(
    sequences: str,
    *,
    increment: str = "0.002",
    unit: str = "s",
    series: str = "RHYTHM",
    time_code: str = "TIME_RELATIVE",
    head: str = "0",
) -> bytes:
    """A minimal AnnotatedECG with one series of the given sequences."""
    return (
        '<?xml version="1.0"?><AnnotatedECG xmlns="urn:hl7-org:v3" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        '<effectiveTime><low value="20240102030405"/></effectiveTime>'
        f'<component><series><code code="{series}"/>'
        "<author><seriesAuthor><manufacturedSeriesDevice><manufacturerModelName>M1</manufacturerModelName>"
        "<softwareName>SW 2</softwareName></manufacturedSeriesDevice>"
        "<manufacturerOrganization><name>Acme</name></manufacturerOrganization></seriesAuthor></author>"
        f'<component><sequenceSet><component><sequence><code code="{time_code}"/><value xsi:type="GLIST_PQ">'
        f'<head value="{head}" unit="s"/><increment value="{increment}" unit="{unit}"/></value></sequence></component>'
        f"{sequences}</sequenceSet></component></series></component></AnnotatedECG>"
    ).encode()


def _wave(n: int = 2500, amplitude: float = 200.0, phase: float = 0.0) -> str:
    t = np.arange(n)
    return " ".join(str(int(v)) for v in np.rint(amplitude * np.sin(2 * np.pi * t / 400 + phase)))


def test_hl7_origin_scale_units_and_own_lead_names() -> None:
    sequences = _sequence("MDC_ECG_LEAD_I", _wave(), scale=("5", "uV"), origin=("100", "uV")) + _sequence(
        "MDC_ECG_LEAD_V3R", _wave(phase=1.0), scale=("0.005", "mV"), origin=("0", "mV")
    )
    recording = hl7_aecg.read(_aecg(sequences, increment="2", unit="ms"), LIMITS)
    assert recording.fs == 500.0
    assert recording.lead_names == ("MDC_ECG_LEAD_I", "MDC_ECG_LEAD_V3R")
    assert recording.source_units == ("uV", "mV")
    expected = np.rint(200 * np.sin(2 * np.pi * np.arange(2500) / 400)) * 0.005 + 0.1
    np.testing.assert_allclose(_lead(recording, "MDC_ECG_LEAD_I"), expected, atol=1e-5)
    assert (recording.device, recording.software) == ("Acme M1", "SW 2")
    assert recording.recorded_at == dt.datetime(2024, 1, 2, 3, 4, 5)


def test_hl7_absolute_time_and_median_beats_only() -> None:
    absolute = _aecg(
        _sequence("MDC_ECG_LEAD_II", _wave()), time_code="TIME_ABSOLUTE", head="20230405060708.500+0200"
    )
    recording = hl7_aecg.read(absolute, LIMITS)
    assert recording.recorded_at == dt.datetime(
        2023, 4, 5, 6, 7, 8, 500_000, tzinfo=dt.timezone(dt.timedelta(hours=2))
    )
    beats_only = _aecg(_sequence("MDC_ECG_LEAD_II", _wave()), series="REPRESENTATIVE_BEAT")
    assert _rejected(hl7_aecg.read, beats_only).reason == "no_waveform"


HL7_HOSTILE = {
    "zero increment": (dict(increment="0"), _sequence("MDC_ECG_LEAD_I", _wave()), "bad_fs"),
    "negative increment": (dict(increment="-0.002"), _sequence("MDC_ECG_LEAD_I", _wave()), "bad_fs"),
    "NaN increment": (dict(increment="NaN"), _sequence("MDC_ECG_LEAD_I", _wave()), "unreadable"),
    "hour increment": (dict(increment="3600"), _sequence("MDC_ECG_LEAD_I", _wave()), "bad_fs"),
    "too many leads": ({}, "".join(_sequence(f"L{k}", _wave(300)) for k in range(65)), "too_long"),
    "unequal leads": (
        {},
        _sequence("MDC_ECG_LEAD_I", _wave()) + _sequence("MDC_ECG_LEAD_II", _wave(2400)),
        "wrong_length",
    ),
    "not numbers": ({}, _sequence("MDC_ECG_LEAD_I", "1 2 x 4"), "non_numeric"),
    "infinite": ({}, _sequence("MDC_ECG_LEAD_I", "1 2 1e999 4"), "non_numeric"),
    "no unit": ({}, _sequence("MDC_ECG_LEAD_I", _wave(), scale=("5", "")), "unknown_units"),
    "not a voltage": ({}, _sequence("MDC_ECG_LEAD_I", _wave(), scale=("5", "mmHg")), "unknown_units"),
    "constant lead": ({}, _sequence("MDC_ECG_LEAD_I", " ".join(["7"] * 2500)), "implausible_amplitude"),
    "counts as mV": ({}, _sequence("MDC_ECG_LEAD_I", _wave(), scale=("1", "mV")), "implausible_amplitude"),
    "volts as uV": (
        {},
        _sequence("MDC_ECG_LEAD_I", _wave(), scale=("0.000005", "uV")),
        "implausible_amplitude",
    ),
}


@pytest.mark.parametrize("case", sorted(HL7_HOSTILE))
def test_hl7_hostile(case: str) -> None:
    options, sequences, reason = HL7_HOSTILE[case]
    assert _rejected(hl7_aecg.read, _aecg(sequences, **options)).reason == reason


# ---------------------------------------------------------------- SCP-ECG

SCP_FILES = {
    "ecgtoolkit_Example.scp": (
        500.0,
        ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6", "III", "aVR", "aVL", "aVF"),
        10.0,
        "ECGConversion ELI250",
        dt.datetime(2002, 11, 22, 9, 10),
    ),
    "welchallyn_ECG_20170504_163507_123456789.SCP": (
        600.0,
        ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6"),
        10.0,
        "Welch Allyn Cardio Control MDW14",
        dt.datetime(2017, 5, 4, 16, 35, 7),
    ),
    "welchallyn_ECG_20060620_example_full_anon.SCP": (
        600.0,
        ("I", "II", "V3R", "V1", "V2", "V4", "V6", "V7"),
        10.0,
        "Welch Allyn Cardio Control MDW14",
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(SCP_FILES))
def test_scp_real_files(name: str) -> None:
    data = _file("scp_ecg", name)
    assert scp.sniff(data)
    recording = scp.read(data, LIMITS)
    fs, names, duration, device, when = SCP_FILES[name]
    assert recording.source_format == "scp-ecg"
    assert (recording.fs, recording.lead_names, recording.duration_s) == (fs, names, duration)
    assert (recording.device, recording.recorded_at) == (device, when)
    assert recording.source_units == ("nV",) * len(names)
    _assert_plausible(recording)


def test_scp_right_sided_and_posterior_leads_keep_their_names() -> None:
    recording = scp.read(_file("scp_ecg", "welchallyn_ECG_20060620_example_full_anon.SCP"), LIMITS)
    assert "V3R" in recording.lead_names and "V7" in recording.lead_names
    assert "V3" not in recording.lead_names and "V5" not in recording.lead_names


def test_scp_matches_the_same_recording_in_dicom() -> None:
    import pydicom

    recording = scp.read(_file("scp_ecg", "ecgtoolkit_Example.scp"), LIMITS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the toolkit's UIDs have empty components
        ds = pydicom.dcmread(io.BytesIO(_file("dicom", "ecgtoolkit_Example.dcm")))
        dicom_mv = ds.waveform_array(0) / 1000.0  # µV → mV
    channels = ds.WaveformSequence[0].ChannelDefinitionSequence
    dicom_names = [c.ChannelSourceSequence[0].CodeMeaning.removeprefix("Lead ") for c in channels]
    assert float(ds.WaveformSequence[0].SamplingFrequency) == recording.fs
    assert sorted(dicom_names) == sorted(recording.lead_names)
    for column, name in enumerate(dicom_names):
        np.testing.assert_allclose(_lead(recording, name), dicom_mv[:, column], atol=1e-4, err_msg=name)


def _crc(data: bytes) -> int:
    return binascii.crc_hqx(data, 0xFFFF)


def _scp_section(number: int, body: bytes, protocol: int) -> bytes:
    rest = struct.pack(
        "<HIBB6s", number, 16 + len(body), protocol, protocol, b"SCPECG" if number == 0 else bytes(6)
    )
    return struct.pack("<H", _crc(rest + body)) + rest + body


def _scp_file(sections: dict[int, bytes], protocol: int = 20) -> bytes:
    """A record with a section 0 pointing to the given section bodies (CRCs computed)."""
    ids = sorted({*range(12), *sections})
    pointer_length = 16 + 10 * len(ids)
    offsets, position = {}, 6 + pointer_length
    for number in ids:
        if number in sections:
            offsets[number] = position
            position += 16 + len(sections[number])
    pointers = b"".join(
        struct.pack(
            "<HII",
            n,
            pointer_length if n == 0 else 16 + len(sections[n]) if n in sections else 0,
            7 if n == 0 else offsets[n] + 1 if n in sections else 0,
        )
        for n in ids
    )
    body = _scp_section(0, pointers, protocol) + b"".join(
        _scp_section(n, sections[n], protocol) for n in ids if n in sections
    )
    size_and_body = struct.pack("<I", 6 + len(body)) + body
    return struct.pack("<H", _crc(size_and_body)) + size_and_body


def _differences(values: npt.NDArray[np.int64], order: int) -> list[int]:
    x = [int(v) for v in values]
    if order == 1:
        return [x[0]] + [x[k] - x[k - 1] for k in range(1, len(x))]
    if order == 2:
        return x[:2] + [x[k] - 2 * x[k - 1] + x[k - 2] for k in range(2, len(x))]
    return x


def _default_bits(value: int) -> str:
    """The SCP default Huffman code of one value."""
    if value == 0:
        return "0"
    if abs(value) <= 8:
        return "1" * abs(value) + "0" + ("1" if value < 0 else "0")
    if -128 <= value <= 127:
        return "1111111110" + format(value & 0xFF, "08b")
    return "1111111111" + format(value & 0xFFFF, "016b")


CUSTOM_TABLES = [  # (code bits, total bits, mode switch, base value)
    [("1", 1, 1, 0), ("01", 2, 1, 1), ("001", 3, 1, -1), ("0001", 20, 1, 0), ("0000", 4, 0, 2)],
    [("0", 17, 1, 0), ("1", 1, 0, 1)],
]


def _custom_bits(values: list[int]) -> str:
    """Encode with :data:`CUSTOM_TABLES`: table 1 for the first half, table 2 (explicit) after a switch."""
    middle = len(values) // 2
    short = {0: "1", 1: "01", -1: "001"}
    first = "".join(short.get(v, "0001" + format(v & 0xFFFF, "016b")) for v in values[:middle])
    return first + "0000" + "".join("0" + format(v & 0xFFFF, "016b") for v in values[middle:])


def _section2(kind: str) -> bytes:
    if kind == "default":
        return struct.pack("<H", 19999)
    out = struct.pack("<H", len(CUSTOM_TABLES))
    for table in CUSTOM_TABLES:
        out += struct.pack("<H", len(table))
        for bits, total, mode, value in table:
            out += struct.pack("<BBBhI", len(bits), total, mode, value, int(bits[::-1], 2))
    return out


def _encode(values: list[int], huffman: str) -> bytes:
    if huffman == "none":
        return struct.pack(f"<{len(values)}h", *values)
    bits = "".join(_default_bits(v) for v in values) if huffman == "default" else _custom_bits(values)
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def _amplitude_section(leads: list[list[int]], nv: int, interval: int, order: int, huffman: str) -> bytes:
    encoded = [_encode(_differences(np.asarray(v), order), huffman) for v in leads]
    header = struct.pack("<HHBB", nv, interval, order, 0) + b"".join(
        struct.pack("<H", len(e)) for e in encoded
    )
    return header + b"".join(encoded)


def _device_tag() -> bytes:
    fixed = struct.pack("<HHHBB6sBBBBB16sB", 1, 2, 3, 1, 255, b"TEST01", 20, 0, 0, 0, 1, bytes(16), 1)
    value = fixed + b"\x00" + b"SN1\x00SW 1.2\x00Impl\x00Acme Cardio\x00"
    return struct.pack("<BH", 14, len(value)) + value


def _section1(year: int = 2024) -> bytes:
    date = struct.pack("<BHHBB", 25, 4, year, 2, 29)
    clock = struct.pack("<BHBBB", 26, 3, 13, 14, 15)
    return _device_tag() + date + clock + struct.pack("<BH", 255, 0)


class _Reference(NamedTuple):
    """Reference beats per lead, their fiducial sample (1-based), and (type, start, fiducial, end) zones."""

    beats: list[npt.NDArray[np.int64]]
    fiducial: int
    zones: list[tuple[int, int, int, int]]


def _synthetic_leads(n: int, count: int = 3, seed: int = 7) -> list[npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return [
        np.rint(300 * np.sin(2 * np.pi * t / 250 + k) + rng.normal(0, 20, n)).astype(np.int64)
        for k in range(count)
    ]


def _scp(
    leads: list[npt.NDArray[np.int64]],
    *,
    ids: Sequence[int] = (1, 2, 3),
    nv: int = 5000,
    interval: int = 2000,
    order: int = 2,
    huffman: str = "default",
    protocol: int = 20,
    reference: _Reference | None = None,
) -> bytes:
    """An SCP-ECG record of the given integer leads (optionally with reference-beat subtraction)."""
    n = len(leads[0])
    flags = 0b100 | (1 if reference else 0)
    section3 = struct.pack("<BB", len(leads), flags) + b"".join(struct.pack("<IIB", 1, n, i) for i in ids)
    sections = {1: _section1(), 3: section3}
    if huffman != "none":
        sections[2] = _section2(huffman)
    residuals = [lead.copy() for lead in leads]
    if reference:
        beats, fiducial, zones = reference
        body4 = struct.pack("<HHH", len(beats[0]) * interval // 1000, fiducial, len(zones))
        for kind, start, centre, end in zones:
            body4 += struct.pack("<HIII", kind, start, centre, end)
            if kind == 0:
                for residual, beat in zip(residuals, beats, strict=True):
                    first = start - centre + fiducial
                    residual[start - 1 : end] -= beat[first - 1 : first - 1 + end - start + 1]
        body4 += b"".join(struct.pack("<II", z[1], z[3]) for z in zones)  # protected zones
        sections[4] = body4
        sections[5] = _amplitude_section([list(b) for b in beats], nv, interval, 1, huffman)
    sections[6] = _amplitude_section([list(r) for r in residuals], nv, interval, order, huffman)
    return _scp_file(sections, protocol)


@pytest.mark.parametrize(
    ("huffman", "order", "protocol"),
    [
        ("default", 2, 20),
        ("default", 1, 13),
        ("default", 0, 11),
        ("custom", 2, 20),
        ("custom", 1, 13),
        ("none", 0, 20),
        ("none", 2, 10),
        ("default", 2, 30),
    ],
)
def test_scp_round_trip(huffman: str, order: int, protocol: int) -> None:
    leads = _synthetic_leads(3000)
    leads[0][100] = 3000  # forces the 16-bit escape codes
    data = _scp(leads, ids=(1, 11, 66), huffman=huffman, order=order, protocol=protocol)
    assert scp.sniff(data)
    recording = scp.read(data, LIMITS)
    assert recording.lead_names == ("I", "V3R", "V8")
    assert recording.fs == 500.0
    assert (recording.device, recording.software) == ("Acme Cardio TEST01", "SW 1.2")
    assert recording.recorded_at == dt.datetime(2024, 2, 29, 13, 14, 15)
    expected = np.stack(leads, axis=1) * 5e-3  # 5000 nV per unit
    np.testing.assert_allclose(recording.signal, expected, rtol=1e-6, atol=1e-6)


def test_scp_reference_beat_subtraction() -> None:
    n, n_ref, fiducial = 5000, 300, 120
    rng = np.random.default_rng(3)
    beats = [
        np.rint(800 * np.exp(-(((np.arange(n_ref) - fiducial) / 15.0) ** 2)) * (k + 1)).astype(np.int64)
        for k in range(2)
    ]
    leads = [rng.integers(-40, 40, n).astype(np.int64) for _ in range(2)]
    zones = []
    for centre in range(400, n - 300, 800):
        start, end = centre - 100, centre + 150
        for lead, beat in zip(leads, beats, strict=True):
            lead[start - 1 : end] += beat[fiducial - 100 - 1 : fiducial + 150]
        zones.append((0, start, centre, end))
    zones.append((1, 4700, 4750, 4760))  # a beat of another type is not subtracted
    data = _scp(leads, ids=(1, 2), reference=_Reference(beats, fiducial, zones))
    expected = np.stack(leads, axis=1) * 5e-3
    np.testing.assert_allclose(scp.read(data, LIMITS).signal, expected, atol=1e-6)
    # The same bytes with the subtraction flag cleared read as the stored residual: the reader,
    # not the builder, put the beats back.
    s3 = _section_offset(data, 3)
    residual = scp.read(_patched(data, s3 + 1, "<B", data[s3 + 1] & ~1), LIMITS).signal
    inside = np.zeros(n, dtype=bool)
    for kind, start, _, end in zones:
        inside[start - 1 : end] |= kind == 0
    assert np.abs(residual[inside] - expected[inside]).max() > 1.0
    np.testing.assert_allclose(residual[~inside], expected[~inside], atol=1e-6)


def _patched(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    """``data`` with a field overwritten and all CRCs recomputed (so the decoder, not the CRC, meets it)."""
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return _fix_crcs(bytes(out))


def _fix_crcs(data: bytes) -> bytes:
    out = bytearray(data)
    try:
        length0 = struct.unpack_from("<I", out, 10)[0]
        for entry in range(22, 6 + length0 - 9, 10):
            _, length, index = struct.unpack_from("<HII", out, entry)
            if length >= 16 and index >= 1 and index - 1 + length <= len(out):
                start = index - 1
                struct.pack_into("<H", out, start, _crc(bytes(out[start + 2 : start + length])))
    except struct.error:
        pass
    if len(out) >= 2:
        struct.pack_into("<H", out, 0, _crc(bytes(out[2:])))
    return bytes(out)


def _section_offset(data: bytes, number: int) -> int:
    """Byte offset of a section's body (after its 16-byte header)."""
    for entry in range(22, 6 + struct.unpack_from("<I", data, 10)[0] - 9, 10):
        sid, length, index = struct.unpack_from("<HII", data, entry)
        if sid == number and length:
            return index - 1 + 16
    raise KeyError(number)


def _scp_hostile_cases() -> dict[str, tuple[bytes, str]]:
    good = _scp(_synthetic_leads(3000))
    s3, s6, s2 = (_section_offset(good, n) for n in (3, 6, 2))
    return {
        "end sample 4e9": (_patched(good, s3 + 2 + 4, "<I", 4_000_000_000), "wrong_length"),
        "all leads 4e9 samples": (
            _patched(
                _patched(_patched(good, s3 + 6, "<I", 4_000_000_000), s3 + 15, "<I", 4_000_000_000),
                s3 + 24,
                "<I",
                4_000_000_000,
            ),
            "too_long",
        ),
        "255 leads": (_patched(good, s3, "<B", 255), "unreadable"),
        "record size beyond file": (_patched(good, 2, "<I", 10**9), "unreadable"),
        "pointer beyond file": (_patched(good, 22 + 10 * 6 + 2, "<I", 10**9), "unreadable"),
        "zero interval": (_patched(good, s6 + 2, "<H", 0), "bad_fs"),
        "65535 us interval": (_patched(good, s6 + 2, "<H", 65535), "bad_fs"),
        "zero multiplier": (_patched(good, s6, "<H", 0), "unknown_units"),
        "lead bytes past section": (_patched(good, s6 + 6, "<H", 65535), "unreadable"),
        "bimodal": (_patched(good, s6 + 5, "<B", 1), "unreadable"),
        "unknown differences": (_patched(good, s6 + 4, "<B", 7), "unreadable"),
        "65000 Huffman tables": (_patched(good, s2, "<H", 65000), "unreadable"),
        "CRC mismatch": (good[:-1] + bytes([good[-1] ^ 1]), "unreadable"),
        "truncated": (good[: len(good) // 2], "unreadable"),
        "not SCP": (b"\x00" * 40, "unreadable"),
    }


@pytest.mark.parametrize("case", sorted(_scp_hostile_cases()))
def test_scp_hostile(case: str) -> None:
    data, reason = _scp_hostile_cases()[case]
    assert _rejected(scp.read, data).reason == reason


def test_scp_huffman_bomb_is_bounded() -> None:
    # 8 leads × 480 000 samples at 8 kHz declared; 300 KB of zero bits decode one sample per bit
    # (the cheapest code): five leads decode in full (2.4 M samples), the sixth has no bytes.
    leads, n, per_lead = 8, 480_000, 60_000
    section3 = struct.pack("<BB", leads, 0b100) + b"".join(
        struct.pack("<IIB", 1, n, 1 + k) for k in range(leads)
    )
    lengths = [per_lead] * 5 + [0] * 3
    section6 = (
        struct.pack("<HHBB", 5000, 125, 0, 0) + struct.pack(f"<{leads}H", *lengths) + bytes(sum(lengths))
    )
    data = _scp_file({2: _section2("default"), 3: section3, 6: section6})
    assert 300_000 <= len(data) < 310_000
    assert _rejected(scp.read, data).reason == "unreadable"


def test_scp_bit_flips_fail_the_crc_and_patched_ones_stay_bounded() -> None:
    data = _file("scp_ecg", "welchallyn_ECG_20170504_163507_123456789.SCP")
    for mutated in _mutations(data, seed=11, count=30):
        if mutated == data:
            continue
        try:
            recording = scp.read(mutated, LIMITS)
        except EcgRejected:
            continue
        # Accepted only when the change missed every section read, and then never silently.
        assert any("CRC" in w for w in recording.warnings)
    for mutated in _mutations(data, seed=12, count=60):
        _survives(scp.read, _fix_crcs(mutated))  # past the CRCs: a recording or a reason, bounded


# ---------------------------------------------------------------- EDF / EDF+


def _edf_text(value: object, width: int) -> bytes:
    text = str(value).encode("latin-1")
    assert len(text) <= width
    return text.ljust(width)


class _EdfSignal(NamedTuple):
    """One hand-built EDF signal: digital range -32768..32767 mapped onto ``physical``."""

    label: str
    data: npt.NDArray[np.int64]
    unit: str = "uV"
    per_record: int = 0  # 0: the whole signal in one record
    physical: tuple[float, float] = (-3276.8, 3276.7)


def _edf(
    signals: list[_EdfSignal],
    *,
    records: int = 1,
    duration: str = "10",
    reserved: str = "",
    recording: str = "X",
    start: tuple[str, str] = ("04.03.21", "08.09.10"),
    header_override: dict[int, bytes] | None = None,
) -> bytes:
    """A hand-built EDF file; ``header_override`` writes raw bytes over header offsets."""
    ns = len(signals)
    per_record = [s.per_record or len(s.data) for s in signals]
    fields = [
        (b"0       ", 8),
        ("X X X X", 80),
        (recording, 80),
        (start[0], 8),
        (start[1], 8),
        (256 * (ns + 1), 8),
        (reserved, 44),
        (records, 8),
        (duration, 8),
        (ns, 4),
    ]
    columns: list[tuple[list[object], int]] = [
        ([s.label for s in signals], 16),
        ([""] * ns, 80),
        ([s.unit for s in signals], 8),
        ([s.physical[0] for s in signals], 8),
        ([s.physical[1] for s in signals], 8),
        ([-32768] * ns, 8),
        ([32767] * ns, 8),
        ([""] * ns, 80),
        (list(per_record), 8),
        ([""] * ns, 32),
    ]
    out = bytearray(b"".join(v if isinstance(v, bytes) else _edf_text(v, w) for v, w in fields))
    for values, width in columns:
        out += b"".join(_edf_text(v, width) for v in values)
    for offset, raw in (header_override or {}).items():
        out[offset : offset + len(raw)] = raw
    stored = min(len(s.data) // n for s, n in zip(signals, per_record, strict=True))
    for r in range(min(records, stored) if records > 0 else stored):
        for s, n in zip(signals, per_record, strict=True):
            out += np.asarray(s.data[r * n : (r + 1) * n], dtype="<i2").tobytes()
    return bytes(out)


def test_edf_plus_written_by_edfio_with_annotations() -> None:
    fs, seconds = 500, 10
    t = np.arange(fs * seconds) / fs
    names = ("I", "II", "V1", "V3R")
    waves = {n: 0.8 * np.sin(2 * np.pi * 1.1 * t + k) for k, n in enumerate(names)}  # mV
    signals = [
        edfio.EdfSignal(
            waves[n] * 1000,
            sampling_frequency=fs,
            label=f"ECG {n}",
            physical_dimension="uV",
            physical_range=(-5000, 5000),
        )
        for n in names
    ]
    signals.append(
        edfio.EdfSignal(
            np.zeros(seconds * 25),
            sampling_frequency=25,
            label="Resp",
            physical_dimension="",
            physical_range=(-1, 1),
        )
    )
    document = edfio.Edf(
        signals,
        recording=edfio.Recording(startdate=dt.date(2031, 3, 4), equipment_code="Cart_X1"),
        starttime=dt.time(8, 9, 10),
        annotations=[edfio.EdfAnnotation(1.0, 0.5, "artifact"), edfio.EdfAnnotation(2, None, "x")],
    )
    buffer = io.BytesIO()
    document.write(buffer)
    data = buffer.getvalue()
    assert data[192:197] == b"EDF+C" and b"EDF Annotations" in data[:2048]
    assert edf.sniff(data)
    recording = edf.read(data, LIMITS)
    assert recording.source_format == "edf"
    assert (recording.fs, recording.lead_names, recording.duration_s) == (500.0, names, 10.0)
    assert recording.source_units == ("uV",) * 4
    assert recording.device == "Cart X1"
    assert recording.recorded_at == dt.datetime(2031, 3, 4, 8, 9, 10)  # four-digit year from the EDF+ field
    assert any("not typed ECG" in w for w in recording.warnings)
    for name in names:
        np.testing.assert_allclose(
            _lead(recording, name), waves[name], atol=0.2 / 1000
        )  # quantisation: 10 mV / 65535


def test_edf_plain_millivolts_and_labels_as_written() -> None:
    t = np.arange(2500)
    data_ii = np.rint(10000 * np.sin(2 * np.pi * t / 250)).astype(np.int64)
    signals = [
        _EdfSignal("II", data_ii, unit="mV", physical=(-3.2768, 3.2767)),
        _EdfSignal("V2", -data_ii, unit="mV", physical=(3.2767, -3.2768)),
    ]  # inverted polarity is legal
    recording = edf.read(_edf(signals, duration="10"), LIMITS)
    assert (recording.fs, recording.lead_names, recording.source_units) == (250.0, ("II", "V2"), ("mV", "mV"))
    np.testing.assert_allclose(_lead(recording, "II"), -3.2768 + (data_ii + 32768) * 1e-4, atol=1e-6)
    np.testing.assert_allclose(_lead(recording, "V2"), _lead(recording, "II"), atol=2e-4)
    assert recording.recorded_at == dt.datetime(2021, 3, 4, 8, 9, 10)
    assert recording.device is None


def _ecg_counts(n: int = 2500) -> npt.NDArray[np.int64]:
    return np.rint(5000 * np.sin(2 * np.pi * np.arange(n) / 250)).astype(np.int64)


def _edf_hostile_cases() -> dict[str, tuple[bytes, str]]:
    one = [_EdfSignal("ECG I", _ecg_counts())]
    return {
        "zero duration": (_edf(one, duration="0"), "no_waveform"),
        "negative duration": (_edf(one, duration="-10"), "bad_fs"),
        "NaN duration": (_edf(one, duration="nan"), "unreadable"),
        "hour records": (_edf(one, duration="3600"), "too_long"),
        "huge record count": (_edf(one, records=99_999_999), "unreadable"),
        "9999 signals": (_edf(one, header_override={252: b"9999"}), "unreadable"),
        "wrong header length": (_edf(one, header_override={184: b"99999999"}), "unreadable"),
        "huge samples per record": (_edf(one, header_override={256 + 216: b"99999999"}), "bad_fs"),
        "discontinuous": (_edf(one, reserved="EDF+D"), "unreadable"),
        "digital range empty": (_edf(one, header_override={256 + 128: b"-32768  "}), "implausible_amplitude"),
        "not a number": (_edf(one, header_override={256 + 104: b"1_000   "}), "unreadable"),
    }


@pytest.mark.parametrize("case", sorted(_edf_hostile_cases()))
def test_edf_hostile_headers(case: str) -> None:
    data, reason = _edf_hostile_cases()[case]
    assert _rejected(edf.read, data).reason == reason


def test_edf_units_rates_and_plausibility() -> None:
    counts = _ecg_counts()
    different_rates = [_EdfSignal("ECG I", counts), _EdfSignal("ECG II", counts[::2], per_record=1250)]
    assert _rejected(edf.read, _edf(different_rates)).reason == "wrong_length"
    assert _rejected(edf.read, _edf([_EdfSignal("ECG I", counts, unit="mmHg")])).reason == "unknown_units"
    adc_as_mv = _EdfSignal("ECG I", counts, unit="mV", physical=(-32768, 32767))  # counts labelled mV
    assert _rejected(edf.read, _edf([adc_as_mv])).reason == "implausible_amplitude"
    volts_as_mv = _EdfSignal("ECG I", counts, unit="mV", physical=(-0.00328, 0.00328))
    assert _rejected(edf.read, _edf([volts_as_mv])).reason == "implausible_amplitude"
    flat = _EdfSignal("ECG I", np.full(2500, 17))
    assert _rejected(edf.read, _edf([flat])).reason == "implausible_amplitude"
    micro = _EdfSignal("ECG I", counts, unit="\u00b5V")
    assert edf.read(_edf([micro]), LIMITS).source_units == ("uV",)


def test_edf_truncation_and_mutations() -> None:
    data = _edf([_EdfSignal("ECG I", _ecg_counts()), _EdfSignal("ECG II", _ecg_counts())])
    for cut in (10, 255, 300, 767, 768, len(data) // 2, len(data) - 1):
        _rejected(edf.read, data[:cut])
    for mutated in _mutations(data, seed=5, count=80):
        _survives(edf.read, mutated)


# ---------------------------------------------------------------- every reader: detection, truncation, fuzz

REAL = {
    "philips": (philips, [("philips_sierra", n) for n in sorted(PHILIPS_FILES)]),
    "hl7": (hl7_aecg, [("hl7_aecg", "jhu_hl7aecg-Example2.xml")]),
    "scp": (scp, [("scp_ecg", n) for n in sorted(SCP_FILES)]),
}


def test_sniffers_recognise_only_their_own_format() -> None:
    samples = {key: [_file(*p) for p in paths] for key, (_, paths) in REAL.items()}
    samples["edf"] = [_edf([_EdfSignal("ECG I", _ecg_counts())])]
    samples["other"] = [
        _file("dicom", "ecgtoolkit_Example.dcm"),
        b"",
        b"<RestingECG></RestingECG>",
        bytes(300),
    ]
    modules = {"philips": philips, "hl7": hl7_aecg, "scp": scp, "edf": edf}
    for kind, files in samples.items():
        for data in files:
            assert {k for k, m in modules.items() if m.sniff(data)} == ({kind} if kind in modules else set())


@pytest.mark.parametrize("key", sorted(REAL))
def test_truncated_real_files_are_rejected(key: str) -> None:
    module, paths = REAL[key]
    for path in paths:
        data = _file(*path)
        for fraction in (0.01, 0.3, 0.7, 0.999):
            _rejected(module.read, data[: int(len(data) * fraction)])


@pytest.mark.parametrize("key", sorted(REAL))
def test_mutated_real_files_are_bounded(key: str) -> None:
    module, paths = REAL[key]
    for index, path in enumerate(paths):
        data = _file(*path)
        for mutated in _mutations(data, seed=index, count=25):
            _survives(module.read, _fix_crcs(mutated) if module is scp else mutated)


@pytest.mark.parametrize("key", sorted(REAL))
def test_oversized_input_refused_before_parsing(key: str) -> None:
    module, paths = REAL[key]
    data = _file(*paths[0])
    assert _rejected(module.read, data, ReadLimits(max_bytes=len(data) - 1)).reason == "attachment_too_large"
