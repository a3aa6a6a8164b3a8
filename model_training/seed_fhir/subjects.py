"""Reading the demo patients' source data: MIMIC-IV-layout subjects and the teaching ECG.

A :class:`Subject` is one subject of a MIMIC-IV-layout folder (as ``ecglab synth-mimic`` writes it,
or real MIMIC-IV) with the rows around one of its ECGs: Patient demographics, ED vital signs, OMR
biometrics and lab results, times as in the source. Its ECG is read once as integers at a common
gain (:class:`Recording`), so every carrier written from it decodes to the same signal. Missing
tables or files raise :class:`~fhir_mappings.errors.InputError` naming the path.
"""

from __future__ import annotations

import csv
import gzip
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fhir_mappings.errors import InputError

HOSP = Path("mimic-iv/3.1/hosp")
ED = Path("mimic-iv-ed/2.2/ed")
ECG = Path("mimic-iv-ecg/1.0")
TEACHING_DIR = Path(__file__).resolve().parents[2] / "tests" / "data" / "ecg"
TEACHING_STEM = "guangxi_teaching_sinus_rhythm"

VITAL_CONTEXT = timedelta(hours=6)
"""Vital signs within this distance of the ECG are written (the model uses ±30 min)."""

BIOMETRIC_CONTEXT = timedelta(days=60)
"""OMR rows within this distance of the ECG are written (the model uses ±30 days)."""

LAB_CONTEXT = timedelta(days=7)
"""Lab results up to this long before the ECG (and not after now) are written."""

VITAL_COLUMNS: dict[str, str] = {
    "temperature": "temperature",
    "heartrate": "heart_rate",
    "resprate": "resp_rate",
    "o2sat": "spo2",
}
"""MIMIC-IV-ED ``vitalsign`` columns written as single Observations → feature key."""


@dataclass
class Recording:
    """An ECG as integers: ``digital`` (T, C) int16 at ``uv_per_unit`` µV, ``fs`` Hz, lead names."""

    digital: npt.NDArray[np.int16]
    uv_per_unit: float
    fs: float
    lead_names: tuple[str, ...]
    record_name: str


@dataclass
class Subject:
    """One MIMIC-layout subject's rows around one chosen ECG (times as in the source)."""

    subject_id: str
    gender: str | None
    anchor_age: float | None
    race: str | None
    ecg_time: datetime
    recording: Recording
    vitals: list[tuple[int, datetime, dict[str, float]]] = field(default_factory=list)
    omr: list[tuple[int, datetime, str, float]] = field(default_factory=list)
    labs: list[tuple[str, datetime, str, float, str]] = field(default_factory=list)
    anchor_year: float | None = None

    @property
    def age_at_ecg(self) -> float | None:
        """Age at the ECG as training computes it: ``anchor_age + (ECG year − anchor_year)``."""
        if self.anchor_age is None:
            return None
        shift = self.ecg_time.year - self.anchor_year if self.anchor_year is not None else 0.0
        return self.anchor_age + shift


def _table(root: Path, folder: Path, name: str) -> Iterator[dict[str, str]]:
    """Rows of ``name.csv.gz`` or ``name.csv`` under ``root/folder``; InputError naming it if absent."""
    for candidate in (root / folder / f"{name}.csv.gz", root / folder / f"{name}.csv"):
        if candidate.exists():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rt", encoding="utf-8", newline="") as handle:
                yield from csv.DictReader(handle)
            return
    raise InputError(
        f"{root / folder / (name + '.csv.gz')}: not found (is --from a synth-mimic / MIMIC-IV folder?)"
    )


def _time(text: str) -> datetime | None:
    """A MIMIC ``YYYY-MM-DD[ HH:MM:SS]`` as naive datetime, ``None`` when blank or malformed."""
    try:
        return datetime.fromisoformat(text.strip()) if text and text.strip() else None
    except ValueError:
        return None


def _number(text: str | None) -> float | None:
    """A finite float or ``None``."""
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and np.isfinite(value) else None


def read_recording(root: Path, path: str) -> Recording:
    """A WFDB record (``record_list.path``) as integers at a common gain; invalid samples interpolated.

    All carriers then hold the same integers, so their decoded signals agree exactly.
    """
    import wfdb

    base = root / ECG / path
    if not base.with_suffix(".hea").exists():
        raise InputError(f"{base.with_suffix('.hea')}: WFDB header not found")
    record = wfdb.rdrecord(str(base), physical=True)
    signal = np.asarray(record.p_signal, dtype=np.float64)  # (T, C) mV, NaN where invalid
    for column in range(signal.shape[1]):
        bad = ~np.isfinite(signal[:, column])
        if bad.all():
            signal[:, column] = 0.0
        elif bad.any():
            t = np.arange(signal.shape[0])
            signal[bad, column] = np.interp(t[bad], t[~bad], signal[~bad, column])
    gains = {float(g) for g in record.adc_gain}
    gain = gains.pop() if len(gains) == 1 else 1000.0
    digital = np.clip(np.rint(signal * gain), -32767, 32767).astype(np.int16)
    return Recording(digital, 1000.0 / gain, float(record.fs), tuple(record.sig_name), record.record_name)


def read_subjects(root: Path, count: int, seed: int, mappings: Any) -> list[Subject]:
    """``count`` subjects with an ECG, each with the ECG that has the most vital signs near it."""
    root = Path(root)
    patients = {row["subject_id"]: row for row in _table(root, HOSP, "patients")}
    records: dict[str, list[dict[str, str]]] = {}
    record_list = root / ECG / "record_list.csv"
    if not record_list.exists():
        raise InputError(f"{record_list}: not found (is --from a synth-mimic / MIMIC-IV folder?)")
    with record_list.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("subject_id") in patients and _time(row.get("ecg_time", "")):
                records.setdefault(row["subject_id"], []).append(row)
    chosen_ids = sorted(records)
    random.Random(seed).shuffle(chosen_ids)
    chosen_ids = chosen_ids[:count]
    if len(chosen_ids) < count:
        raise InputError(f"{record_list}: only {len(chosen_ids)} subjects have an ECG, {count} requested")
    wanted = set(chosen_ids)
    vitals: dict[str, list[tuple[int, datetime, dict[str, str]]]] = {}
    for index, row in enumerate(_table(root, ED, "vitalsign")):
        when = _time(row.get("charttime", ""))
        if row["subject_id"] in wanted and when is not None:
            vitals.setdefault(row["subject_id"], []).append((index, when, row))
    race: dict[str, str] = {}
    for table, folder in (("admissions", HOSP), ("edstays", ED)):
        for row in _table(root, folder, table):
            if row["subject_id"] in wanted and row.get("race") and row["subject_id"] not in race:
                race[row["subject_id"]] = row["race"]
    subjects = []
    for subject_id in chosen_ids:
        rows = vitals.get(subject_id, [])

        def near(
            rec: dict[str, str], rows: list[tuple[int, datetime, dict[str, str]]] = rows
        ) -> tuple[int, datetime]:
            at = _time(rec["ecg_time"]) or datetime.min
            return (-sum(abs(when - at) <= timedelta(minutes=30) for _, when, _ in rows), at)

        record = min(records[subject_id], key=near)
        ecg_time = _time(record["ecg_time"]) or datetime.min  # never blank: filtered above
        patient = patients[subject_id]
        subject = Subject(
            subject_id=subject_id,
            gender=patient.get("gender") or None,
            anchor_age=_number(patient.get("anchor_age")),
            anchor_year=_number(patient.get("anchor_year")),
            race=race.get(subject_id),
            ecg_time=ecg_time,
            recording=read_recording(root, record["path"]),
        )
        for index, when, row in rows:
            if abs(when - ecg_time) <= VITAL_CONTEXT:
                values = {
                    col: v
                    for col in (*VITAL_COLUMNS, "sbp", "dbp")
                    if (v := _number(row.get(col))) is not None
                }
                subject.vitals.append((index, when, values))
        subjects.append(subject)
    _attach_omr_and_labs(root, subjects, mappings)
    return subjects


def _attach_omr_and_labs(root: Path, subjects: list[Subject], mappings: Any) -> None:
    """Add OMR biometrics and lab results near each subject's ECG."""
    by_id = {s.subject_id: s for s in subjects}
    omr_names = {
        name
        for spec in mappings.features
        if spec.mimic.table == "hosp/omr"
        for name in spec.mimic.result_names
    }
    for index, row in enumerate(_table(root, HOSP, "omr")):
        subject = by_id.get(row["subject_id"])
        when = _time(row.get("chartdate", ""))
        value = _number(row.get("result_value"))
        near = subject is not None and when is not None and abs(when - subject.ecg_time) <= BIOMETRIC_CONTEXT
        if near and subject and when and value is not None and row.get("result_name") in omr_names:
            subject.omr.append((index, when, row["result_name"], value))
    labels = {row["itemid"]: row.get("label", "") for row in _table(root, HOSP, "d_labitems")}
    for row in _table(root, HOSP, "labevents"):
        subject = by_id.get(row["subject_id"])
        when = _time(row.get("charttime", ""))
        value = _number(row.get("valuenum"))
        label = labels.get(row.get("itemid", ""), "")
        if subject is None or when is None or value is None or mappings.lab_by_mimic_label(label) is None:
            continue
        if subject.ecg_time - LAB_CONTEXT <= when <= subject.ecg_time + timedelta(hours=2):
            labevent_id = row.get("labevent_id") or str(len(subject.labs))
            subject.labs.append((labevent_id, when, label, value, row.get("valueuom", "")))


def teaching_files(folder: Path = TEACHING_DIR) -> tuple[bytes, bytes] | None:
    """The teaching ECG as (DICOM bytes, MUSE XML bytes), or ``None`` outside a source checkout."""
    dcm, xml = folder / f"{TEACHING_STEM}.dcm", folder / f"{TEACHING_STEM}.xml"
    if dcm.exists() and xml.exists():
        return dcm.read_bytes(), xml.read_bytes()
    return None
