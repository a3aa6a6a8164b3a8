"""EDF and EDF+ (continuous) recordings → :class:`EcgRecording`.

An EDF file is a 256-byte ASCII header, 256 ASCII bytes per signal, then data records of
little-endian 16-bit samples, each record holding every signal's ``samples per record`` in turn.
Every header number is ASCII and is parsed strictly and range-checked before it is used: the
header length must be ``256 × (signals + 1)``, the data must hold the declared records (``-1`` is
worked out from the size), and the decoded size must pass :class:`ReadLimits` before any sample is
touched.

* Signals: the ``EDF Annotations`` signal of EDF+ is skipped. When some labels carry the EDF+ type
  ``ECG`` (``ECG V2``), only those are read and the type is dropped from the name (``V2``); other
  labels are read as they are. All read signals must share one rate and state a voltage unit.
* Scaling: ``physical = pmin + (digital − dmin) × (pmax − pmin) / (dmax − dmin)``, in the
  signal's physical dimension (uV, mV, V; ``µV`` is read as uV), converted to mV.
* EDF+D (discontinuous) is refused: gluing its records together would invent continuity.

The start comes from the header's date and time (with the four-digit year of the EDF+ recording
field when stated); the device from the EDF+ equipment subfield. The patient field is never read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from cds_service.ecg.readers._vendor_signal import (
    check_declared,
    check_size,
    clean_text,
    make_recording,
    number,
)
from cds_service.ecg.readers.common import volt_factor
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits

FORMAT: str = "edf"
"""The ``source_format`` of recordings this reader returns."""

MAGIC: bytes = b"0       "
ANNOTATIONS: str = "EDF Annotations"
MAX_SIGNALS: int = 512
"""Most signals a header may declare (a polysomnogram has a few dozen)."""
MAX_RECORDS: int = 10_000_000
MAX_PHYSICAL: float = 1e9

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_PLUS_DATE = re.compile(r"(\d{2})-([A-Z]{3})-(\d{4})")


@dataclass(frozen=True)
class _Signal:
    """One signal's header fields, parsed and checked."""

    label: str
    unit: str
    physical: tuple[float, float]
    digital: tuple[int, int]
    per_record: int


def sniff(data: bytes) -> bool:
    """Whether ``data`` starts like an EDF header (cheap, never raises)."""
    try:
        return (
            len(data) >= 256
            and data[:8] == MAGIC
            and data[184:192].strip().isdigit()
            and data[252:256].strip().isdigit()
        )
    except Exception:  # sniffing must never fail, whatever the bytes
        return False


def _field(data: bytes, start: int, width: int) -> str:
    """A header field as stripped text (Latin-1, so a stray ``µ`` byte does not fail)."""
    return data[start : start + width].decode("latin-1").strip()


def _signals(data: bytes, count: int, limits: ReadLimits) -> list[_Signal]:
    """The per-signal header fields, each number range-checked."""
    base = 256

    def column(offset: int, width: int, k: int) -> str:
        return _field(data, base + offset * count + width * k, width)

    signals = []
    for k in range(count):
        label = column(0, 16, k)
        what = f"EDF signal {k + 1}"
        pmin = number(column(104, 8, k), f"{what} physical minimum", low=-MAX_PHYSICAL, high=MAX_PHYSICAL)
        pmax = number(column(112, 8, k), f"{what} physical maximum", low=-MAX_PHYSICAL, high=MAX_PHYSICAL)
        dmin = int(number(column(120, 8, k), f"{what} digital minimum", low=-32768, high=32767, integer=True))
        dmax = int(number(column(128, 8, k), f"{what} digital maximum", low=-32768, high=32767, integer=True))
        per_record = int(
            number(
                column(216, 8, k),
                f"{what} samples per record",
                low=1,
                high=limits.max_samples,
                reason="bad_fs",
                integer=True,
            )
        )
        if label != ANNOTATIONS and (dmax <= dmin or pmax == pmin):
            raise EcgRejected(
                "implausible_amplitude", f"{what}: digital {dmin}..{dmax} to physical {pmin:g}..{pmax:g}"
            )
        signals.append(_Signal(label, column(96, 8, k), (pmin, pmax), (dmin, dmax), per_record))
    return signals


def _lead_name(label: str, index: int) -> str:
    """An EDF label without its EDF+ ``ECG`` type (``ECG V2`` → ``V2``)."""
    name = label[3:].strip() if label.upper().startswith("ECG ") else label
    return name or f"signal {index + 1}"


def _voltage(unit: str, what: str) -> tuple[str, float]:
    """The unit as written (``µV`` spelled ``uV``) and its factor to mV."""
    spelled = unit.replace("\u00b5", "u").replace("\u03bc", "u")
    return spelled, volt_factor(spelled, what)


def _start(data: bytes, recording: str) -> datetime | None:
    """The start date and time, with the EDF+ recording field's four-digit year when stated."""
    try:
        day, month, year = (int(p) for p in _field(data, 168, 8).split("."))
        hour, minute, second = (int(p) for p in _field(data, 176, 8).split("."))
    except ValueError:
        return None
    year += 1900 if year >= 85 else 2000
    plus = _PLUS_DATE.fullmatch(recording.split(" ")[1]) if recording.startswith("Startdate ") else None
    if plus and plus.group(2) in _MONTHS:
        year = int(plus.group(3))
    try:
        return datetime(year, month, day, hour, minute, second)
    except ValueError:
        return None


def read(data: bytes, limits: ReadLimits) -> EcgRecording:
    """Read the ECG signals of an EDF or EDF+C file.

    Raises:
        EcgRejected: ``unreadable``, ``no_waveform``, ``bad_fs``, ``unknown_units``,
            ``wrong_length``, ``too_long``, ``implausible_amplitude``, ``attachment_too_large``.
    """
    check_size(data, limits, FORMAT)
    if len(data) < 256 or data[:8] != MAGIC:
        raise EcgRejected("unreadable", "EDF: not an EDF header")
    count = int(number(_field(data, 252, 4), "EDF number of signals", low=1, high=MAX_SIGNALS, integer=True))
    header = int(
        number(_field(data, 184, 8), "EDF header length", low=256, high=256 * (MAX_SIGNALS + 1), integer=True)
    )
    if header != 256 * (count + 1) or len(data) < header:
        raise EcgRejected(
            "unreadable", f"EDF: header of {header} bytes for {count} signals in {len(data)} bytes"
        )
    reserved = _field(data, 192, 44)
    if reserved.startswith("EDF+D"):
        raise EcgRejected("unreadable", "EDF+D (discontinuous) recordings are not supported")
    records = int(
        number(_field(data, 236, 8), "EDF number of data records", low=-1, high=MAX_RECORDS, integer=True)
    )
    duration = number(_field(data, 244, 8), "EDF data record duration", low=0.0, high=1e6, reason="bad_fs")
    if duration > limits.max_seconds:
        raise EcgRejected(
            "too_long", f"EDF data records last {duration:g} s, longer than {limits.max_seconds:g} s"
        )
    signals = _signals(data, count, limits)
    record_samples = sum(s.per_record for s in signals)
    available = (len(data) - header) // (2 * record_samples)
    if records == -1:
        records = available
    if records < 1 or duration == 0:
        raise EcgRejected("no_waveform", f"EDF holds {records} data records of {duration:g} s")
    if available < records:
        raise EcgRejected("unreadable", f"EDF holds {available} of its {records} data records (truncated)")
    warnings = (
        [f"{len(data) - header - 2 * record_samples * records} bytes after the last data record"]
        if available > records
        else []
    )

    data_signals = [k for k, s in enumerate(signals) if s.label != ANNOTATIONS]
    typed = [k for k in data_signals if signals[k].label.upper().startswith("ECG ")]
    chosen = typed or data_signals
    if not chosen:
        raise EcgRejected("no_waveform", "EDF holds only annotations")
    if len(chosen) < len(data_signals):
        warnings.append(f"skipped {len(data_signals) - len(chosen)} signals that are not typed ECG")
    rates = {signals[k].per_record for k in chosen}
    if len(rates) != 1:
        raise EcgRejected("wrong_length", f"EDF ECG signals hold {sorted(rates)} samples per record")
    (per_record,) = rates
    n_samples = records * per_record
    fs = check_declared(len(chosen), n_samples, per_record / duration, limits, FORMAT)

    table = np.frombuffer(data, dtype="<i2", count=records * record_samples, offset=header).reshape(
        records, record_samples
    )
    starts = np.concatenate(([0], np.cumsum([s.per_record for s in signals])))
    signal_mv = np.empty((n_samples, len(chosen)), dtype=np.float32)
    names, units = [], []
    for column, k in enumerate(chosen):
        spec = signals[k]
        unit, factor = _voltage(spec.unit, f"EDF signal {spec.label!r}")
        gain = (spec.physical[1] - spec.physical[0]) / (spec.digital[1] - spec.digital[0])
        digital = table[:, starts[k] : starts[k] + per_record].reshape(-1).astype(np.float64)
        signal_mv[:, column] = (spec.physical[0] + (digital - spec.digital[0]) * gain) * factor
        names.append(_lead_name(spec.label, k))
        units.append(unit)

    recording = _field(data, 88, 80)
    parts = recording.split(" ")
    equipment = (
        parts[4].replace("_", " ")
        if reserved.startswith("EDF+") and len(parts) > 4 and parts[4] != "X"
        else None
    )
    return make_recording(
        signal_mv,
        fs,
        names,
        units,
        source_format=FORMAT,
        limits=limits,
        device=clean_text(equipment),
        recorded_at=_start(data, recording),
        warnings=warnings,
    )
