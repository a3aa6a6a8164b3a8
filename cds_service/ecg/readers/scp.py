"""SCP-ECG (EN 1064 / ISO 11073-91064, protocol versions 1.x, 2.x and 3.0) → :class:`EcgRecording`.

An SCP-ECG file is a CRC, a record size and sections found through the pointer table of section 0
(id, length, 1-based byte index). This reader uses:

* section 1 (tagged header) for the device (tag 14) and the acquisition date and time (25, 26);
* section 2 for Huffman tables, file-defined or the standard's default (:mod:`._vendor_huffman`);
  without section 2 the data are plain little-endian 16-bit values;
* section 3 for the leads: sample range (the same for every lead) and lead id, named by
  :data:`LEAD_NAMES`. Right-sided and posterior leads keep their own names (``V3R``, ``V7``):
  they are never V1–V6;
* section 6 for the rhythm: amplitude multiplier (nV), sample interval (µs), first or second
  differences, and each lead's encoded bytes;
* with reference-beat subtraction (section 3 flag), sections 4 (QRS subtraction zones) and 5
  (reference beats): the reference beat is added back inside each type-0 beat's zone.

Bimodal compression (a rhythm decimated outside protected zones) is refused as unsupported. CRCs
are checked: when the file CRC fails, the sections read must each pass their own CRC, so corrupt
waveform bytes are refused and a header edit by an anonymiser is only a warning. Patient tags are
never read.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt

from cds_service.ecg.readers import _vendor_huffman as huffman
from cds_service.ecg.readers._vendor_signal import (
    check_declared,
    check_size,
    clean_text,
    make_recording,
)
from cds_service.ecg.readers.common import check_inflated
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

FORMAT: str = "scp-ecg"
"""The ``source_format`` of recordings this reader returns."""

_IDS_1_TO_30 = "I II V1 V2 V3 V4 V5 V6 V7 V2R V3R V4R V5R V6R V7R X Y Z CC5 CM5 LA RA LL fI fE fC fA fM fF fH"
_IDS_61_TO_78 = "III aVR aVL aVF -aVR V8 V9 V8R V9R D A J Defib Extern A1 A2 A3 A4"

LEAD_NAMES: dict[int, str] = {
    **dict(enumerate(_IDS_1_TO_30.split(), start=1)),
    **dict(enumerate(_IDS_61_TO_78.split(), start=61)),
}
"""SCP-ECG lead identification codes (section 3) → lead name; other codes read ``SCP lead <n>``."""

SECTION_HEADER: int = 16
MAX_QRS: int = 2000
"""Most QRS complexes section 4 may list (300 bpm for 6 minutes)."""
MAX_REFERENCE_MS: int = 10_000


@dataclass(frozen=True)
class _Rhythm:
    """Section 6 (or 5) header: nV per unit, µs per sample, differences, bimodal flag, lead bytes."""

    nv_per_unit: int
    interval_us: int
    differences: int
    bimodal: bool
    lengths: tuple[int, ...]
    data: bytes


def sniff(data: bytes) -> bool:
    """Whether ``data`` starts like an SCP-ECG record: section 0 at byte 7, pointing to itself."""
    try:
        return (
            len(data) >= 32
            and data[8:10] == b"\x00\x00"
            and data[22:24] == b"\x00\x00"
            and data[10:14] == data[24:28]
            and int.from_bytes(data[28:32], "little") == 7
        )
    except Exception:  # sniffing must never fail, whatever the bytes
        return False


def _u16(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 2], "little")


def _u32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "little")


def _sections(data: bytes, warnings: list[str]) -> dict[int, bytes]:
    """The bodies (after the 16-byte headers) of sections 1–6 the pointer table lists, CRC-checked."""
    if len(data) < 6 + SECTION_HEADER + 10:
        raise EcgRejected("unreadable", f"SCP-ECG: {len(data)} bytes cannot hold a record")
    size = _u32(data, 2)
    if size > len(data) or size < 6 + SECTION_HEADER + 10:
        raise EcgRejected("unreadable", f"SCP-ECG: record size {size}, file {len(data)} bytes (truncated)")
    data = data[:size]
    stored = _u16(data, 0)
    file_ok = stored == binascii.crc_hqx(data[2:], 0xFFFF)
    if not file_ok:
        warnings.append("file CRC does not match; the sections read pass their own CRCs")
    length0 = _u32(data, 10)
    if _u16(data, 8) != 0 or not 6 + SECTION_HEADER + 10 <= 6 + length0 <= size:
        raise EcgRejected("unreadable", "SCP-ECG: section 0 is missing or has an impossible length")
    sections: dict[int, bytes] = {}
    for entry in range(6 + SECTION_HEADER, 6 + length0 - 9, 10):
        number, length, index = _u16(data, entry), _u32(data, entry + 2), _u32(data, entry + 6)
        if number not in range(1, 7) or length == 0:
            continue
        start = index - 1
        if start < 0 or length < SECTION_HEADER or start + length > size:
            raise EcgRejected("unreadable", f"SCP-ECG: section {number} points outside the record")
        section = data[start : start + length]
        if _u16(section, 2) != number:
            raise EcgRejected(
                "unreadable", f"SCP-ECG: pointer to section {number} finds section {_u16(section, 2)}"
            )
        crc = _u16(section, 0)
        if not file_ok and crc != binascii.crc_hqx(section[2:], 0xFFFF):
            raise EcgRejected("unreadable", f"SCP-ECG: section {number} fails its CRC (corrupted)")
        sections[number] = section[SECTION_HEADER:]
    return sections


def _leads(body: bytes, limits: ReadLimits) -> tuple[list[str], int, bool]:
    """Section 3: lead names, samples per lead, and whether reference beats were subtracted."""
    if len(body) < 2:
        raise EcgRejected("unreadable", "SCP-ECG: section 3 is too short")
    count, flags = body[0], body[1]
    if not 1 <= count <= limits.max_leads or len(body) < 2 + 9 * count:
        raise EcgRejected("unreadable", f"SCP-ECG: section 3 declares {count} leads")
    spans = set()
    names = []
    for k in range(count):
        first, last, lead = _u32(body, 2 + 9 * k), _u32(body, 6 + 9 * k), body[10 + 9 * k]
        if first < 1 or last < first:
            raise EcgRejected("unreadable", f"SCP-ECG: lead {k + 1} spans samples {first}–{last}")
        spans.add((first, last))
        names.append(LEAD_NAMES.get(lead, f"SCP lead {lead}"))
    if len(spans) != 1:
        raise EcgRejected("wrong_length", f"SCP-ECG: leads cover different sample ranges {sorted(spans)[:4]}")
    ((first, last),) = spans
    return names, last - first + 1, bool(flags & 1)


def _rhythm(body: bytes, count: int, what: str) -> _Rhythm:
    """Section 6 or 5: the header and each lead's encoded bytes."""
    if len(body) < 6 + 2 * count:
        raise EcgRejected("unreadable", f"SCP-ECG: {what} is too short")
    lengths = tuple(_u16(body, 6 + 2 * k) for k in range(count))
    data = body[6 + 2 * count :]
    if sum(lengths) > len(data):
        raise EcgRejected("unreadable", f"SCP-ECG: {what} lead data run past the section (truncated)")
    rhythm = _Rhythm(_u16(body, 0), _u16(body, 2), body[4], body[5] != 0, lengths, data)
    if rhythm.nv_per_unit == 0:
        raise EcgRejected("unknown_units", f"SCP-ECG: {what} states an amplitude multiplier of 0 nV")
    if rhythm.interval_us == 0:
        raise EcgRejected("bad_fs", f"SCP-ECG: {what} states a sample interval of 0 µs")
    if rhythm.differences not in (0, 1, 2):
        raise EcgRejected(
            "unreadable", f"SCP-ECG: {what} difference encoding {rhythm.differences} is unknown"
        )
    return rhythm


def _undifference(values: npt.NDArray[np.int64], order: int) -> npt.NDArray[np.int64]:
    """Undo first or second differences (the first one or two values are stored as they are)."""
    if order == 0 or values.size < 2:
        return values
    if order == 1:
        return np.cumsum(values)
    steps = np.empty_like(values)
    steps[0] = values[0]
    steps[1] = values[1] - values[0]
    steps[2:] = steps[1] + np.cumsum(values[2:])  # x[n] - x[n-1] = (x[n-1] - x[n-2]) + d[n]
    return np.cumsum(steps)


def _decode_leads(
    rhythm: _Rhythm, count: int, tables: list[huffman.Table] | None, limits: ReadLimits, what: str
) -> list[npt.NDArray[np.int64]]:
    """Each lead's ``count`` values, Huffman-decoded (or read as int16) and un-differenced."""
    leads = []
    offset = 0
    for k, length in enumerate(rhythm.lengths):
        stream = rhythm.data[offset : offset + length]
        offset += length
        if tables is None:
            if len(stream) < 2 * count:
                raise EcgRejected(
                    "unreadable", f"SCP-ECG: {what} lead {k + 1} holds fewer than {count} samples"
                )
            values = np.frombuffer(stream, dtype="<i2", count=count).astype(np.int64)
        else:
            values = huffman.decode(stream, count, tables, f"SCP-ECG {what} lead {k + 1}")
        check_inflated(2 * count * (k + 1), max(offset, 1), limits, f"SCP-ECG {what}")
        leads.append(_undifference(values, rhythm.differences))
    return leads


def _add_reference_beats(
    residuals: list[npt.NDArray[np.float64]],
    sections: dict[int, bytes],
    rhythm: _Rhythm,
    tables: list[huffman.Table] | None,
    limits: ReadLimits,
) -> None:
    """Add the reference beat (section 5) back inside the type-0 subtraction zones (section 4)."""
    if 4 not in sections or 5 not in sections:
        raise EcgRejected(
            "unreadable", "SCP-ECG: reference beats were subtracted but section 4 or 5 is missing"
        )
    zones = sections[4]
    if len(zones) < 6:
        raise EcgRejected("unreadable", "SCP-ECG: section 4 is too short")
    length_ms, fiducial, n_qrs = _u16(zones, 0), _u16(zones, 2), _u16(zones, 4)
    if n_qrs > MAX_QRS or len(zones) < 6 + 14 * n_qrs or not 1 <= length_ms <= MAX_REFERENCE_MS:
        raise EcgRejected(
            "unreadable", f"SCP-ECG: section 4 declares {n_qrs} QRS of {length_ms} ms reference"
        )
    reference = _rhythm(sections[5], len(residuals), "section 5")
    if reference.interval_us != rhythm.interval_us:
        raise EcgRejected(
            "unreadable", "SCP-ECG: reference beats are sampled at another rate than the rhythm"
        )
    n_ref = length_ms * 1000 // reference.interval_us
    if n_ref < 1 or not 1 <= fiducial <= n_ref:
        raise EcgRejected("unreadable", f"SCP-ECG: reference beat of {n_ref} samples, fiducial {fiducial}")
    beats = _decode_leads(reference, n_ref, tables, limits, "section 5")
    n_samples = residuals[0].size
    previous_end = 0
    for q in range(n_qrs):
        kind, start, centre, end = (
            _u16(zones, 6 + 14 * q),
            _u32(zones, 8 + 14 * q),
            _u32(zones, 12 + 14 * q),
            _u32(zones, 16 + 14 * q),
        )
        if kind != 0 or start == end == 0:
            continue
        first_ref = start - centre + fiducial
        if not previous_end < start <= end <= n_samples or first_ref < 1 or first_ref + end - start > n_ref:
            raise EcgRejected("unreadable", f"SCP-ECG: subtraction zone {q + 1} ({start}–{end}) is invalid")
        previous_end = end
        for residual, beat in zip(residuals, beats, strict=True):
            residual[start - 1 : end] += beat[first_ref - 1 : first_ref + end - start] * reference.nv_per_unit


def _header(body: bytes | None) -> tuple[str | None, str | None, datetime | None]:
    """Device, software and acquisition time from section 1's tags 14, 25 and 26."""
    tags: dict[int, bytes] = {}
    offset = 0
    while body is not None and offset + 3 <= len(body):
        tag, length = body[offset], _u16(body, offset + 1)
        if tag == 255:
            break
        if tag in (14, 25, 26):
            tags[tag] = body[offset + 3 : offset + 3 + length]
        offset += 3 + length
    device = software = None
    machine = tags.get(14, b"")
    if len(machine) > 36:
        model = machine[8:14].split(b"\x00")[0].decode("latin-1")
        strings = machine[36 + machine[35] :].split(b"\x00")
        known = [s.decode("latin-1") if s.decode("latin-1").lower() != "unknown" else "" for s in strings[:4]]
        known += [""] * (4 - len(known))
        device = clean_text(" ".join(p for p in (known[3], model) if p))
        software = clean_text(known[1] or known[2])
    when = None
    date, time = tags.get(25, b""), tags.get(26, b"")
    if len(date) == 4:
        try:
            when = datetime(_u16(date, 0), date[2], date[3], *(time[:3] if len(time) == 3 else b""))
        except ValueError:
            when = None
    return device, software, when


def read(data: bytes, limits: ReadLimits) -> EcgRecording:
    """Read the rhythm data of an SCP-ECG record.

    Raises:
        EcgRejected: ``unreadable``, ``no_waveform``, ``bad_fs``, ``unknown_units``,
            ``wrong_length``, ``too_long``, ``implausible_amplitude``, ``attachment_too_large``.
    """
    check_size(data, limits, FORMAT)
    warnings: list[str] = []
    sections = _sections(data, warnings)
    if 3 not in sections or 6 not in sections:
        raise EcgRejected("no_waveform", "SCP-ECG: no lead definition (section 3) or rhythm data (section 6)")
    names, n_samples, subtracted = _leads(sections[3], limits)
    rhythm = _rhythm(sections[6], len(names), "section 6")
    if rhythm.bimodal:
        raise EcgRejected("unreadable", "SCP-ECG: bimodal compression is not supported")
    fs = 1e6 / rhythm.interval_us
    if abs(fs - round(fs)) <= fs * 0.5 / rhythm.interval_us:
        fs = float(round(fs))  # the interval is whole µs: 1667 µs is 600 Hz written as well as it can be
    check_declared(len(names), n_samples, fs, limits, FORMAT)
    tables = huffman.parse_tables(sections[2], "SCP-ECG section 2") if 2 in sections else None
    leads = [
        v.astype(np.float64) * rhythm.nv_per_unit
        for v in _decode_leads(rhythm, n_samples, tables, limits, "section 6")
    ]
    if subtracted:
        _add_reference_beats(leads, sections, rhythm, tables, limits)
    device, software, when = _header(sections.get(1))
    if sections.get(1) is not None and when is None:
        warnings.append("acquisition date or time not stated or not valid")
    signal = np.empty((n_samples, len(names)), dtype=np.float32)
    for column, lead in enumerate(leads):
        signal[:, column] = lead * 1e-6
    return make_recording(
        signal,
        fs,
        names,
        ("nV",) * len(names),
        source_format=FORMAT,
        limits=limits,
        device=device,
        software=software,
        recorded_at=when,
        warnings=warnings,
    )
