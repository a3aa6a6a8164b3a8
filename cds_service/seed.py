"""``ecglab seed-fhir``: put demo patients on a FHIR R4 server, with an ECG in every carrier.

Usage::

    ecglab seed-fhir --fhir-url http://127.0.0.1:8091/fhir [--patients 6] [--from SYNTH_OUT] [--seed 0]

Each demo patient is one subject of a MIMIC-IV-layout data set (``--from``, as written by
``ecglab synth-mimic``; without it a small synthetic set is generated into a temporary folder):
its Patient (sex, birth date from ``anchor_age``, US Core race/ethnicity), ED vital signs around
one of its ECGs, OMR biometrics, recent lab results, and for some patients an active lab
ServiceRequest. Times are shifted so that the ECG was taken a few minutes ago (within the ECG
maximum age of ``fhir_mappings``), keeping every other time relative to it.

The ECG is written in a different carrier per patient (:data:`CARRIER_PLAN`), so the demo and the
integration tests exercise every reader: the real GE MUSE teaching ECG (``tests/data/ecg``) as a
``Media`` holding its DICOM and as a ``DocumentReference`` to a ``Binary`` holding its MUSE XML,
then the subject's own WFDB recording as an ``Observation`` with ``valueSampledData``, a ``Media``
with DICOM, and a ``DocumentReference`` with a WFDB zip inline or in a ``Binary``.

Each patient is one transaction Bundle of ``PUT Type/id`` entries with stable ids derived from
the source rows, so running the command again updates the same resources and never duplicates
them. Codes and units come from ``fhir_mappings``. Errors (server unreachable, a rejected
Bundle) raise :class:`~fhir_mappings.errors.InputError` naming the URL and the patient.
"""

from __future__ import annotations

import argparse
import base64
import csv
import gzip
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from cds_service.ecg_readers import encode_dicom, encode_sampled_data, encode_wfdb_zip
from fhir_mappings.errors import InputError

HOSP = Path("mimic-iv/3.1/hosp")
ED = Path("mimic-iv-ed/2.2/ed")
ECG = Path("mimic-iv-ecg/1.0")
TEACHING_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "ecg"
TEACHING_STEM = "guangxi_teaching_sinus_rhythm"

VITAL_CONTEXT = timedelta(hours=6)
"""Vital signs within this distance of the ECG are written (the model uses ±30 min)."""

BIOMETRIC_CONTEXT = timedelta(days=60)
"""OMR rows within this distance of the ECG are written (the model uses ±30 days)."""

LAB_CONTEXT = timedelta(days=7)
"""Lab results up to this long before the ECG (and not after now) are written."""

MAX_LABS = 40
"""Lab results written per patient at most (keeps the demo server small and fast)."""

SYNTH_SUBJECTS = 30
"""Subjects generated when no ``--from`` data set is given."""

VITAL_COLUMNS: dict[str, str] = {
    "temperature": "temperature",
    "heartrate": "heart_rate",
    "resprate": "resp_rate",
    "o2sat": "spo2",
}
"""MIMIC-IV-ED ``vitalsign`` columns written as single Observations → feature key."""

OMB_RACE: dict[str, tuple[str, str]] = {
    "white": ("2106-3", "White"),
    "black": ("2054-5", "Black or African American"),
    "asian": ("2028-9", "Asian"),
}
RACE_SYSTEM = "urn:oid:2.16.840.1.113883.6.238"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
UCUM = "http://unitsofmeasure.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


@dataclass(frozen=True)
class Carrier:
    """How a patient's ECG is written: resource type, file format, and inline or in a Binary."""

    resource: str  # 'observation' | 'media' | 'documentreference'
    fmt: str  # 'sampled' | 'dicom' | 'wfdb-zip' | 'muse-xml'
    via_binary: bool = False
    teaching: bool = False

    @property
    def label(self) -> str:
        """Short description for the summary table."""
        where = " via Binary" if self.via_binary else ""
        what = "teaching " if self.teaching else ""
        return f"{self.resource}/{what}{self.fmt}{where}"


CARRIER_PLAN: tuple[Carrier, ...] = (
    Carrier("media", "dicom", teaching=True),
    Carrier("documentreference", "muse-xml", via_binary=True, teaching=True),
    Carrier("observation", "sampled"),
    Carrier("media", "dicom"),
    Carrier("documentreference", "wfdb-zip"),
    Carrier("documentreference", "wfdb-zip", via_binary=True),
)
"""Carrier of patient k: k-th entry; beyond the list the last four repeat."""


def carrier_for(index: int) -> Carrier:
    """The carrier of the ``index``-th demo patient (see :data:`CARRIER_PLAN`)."""
    if index < len(CARRIER_PLAN):
        return CARRIER_PLAN[index]
    return CARRIER_PLAN[2 + (index - 2) % (len(CARRIER_PLAN) - 2)]


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


# --------------------------------------------------------------------------- reading the MIMIC layout


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


# --------------------------------------------------------------------------- building resources


def _instant(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _coding(c: Any) -> dict[str, str]:
    return {"system": c.system, "code": c.code, "display": c.display}


def _entry(resource: dict[str, Any]) -> dict[str, Any]:
    """A transaction entry that PUTs ``resource`` under its own id (create or update)."""
    url = f"{resource['resourceType']}/{resource['id']}"
    return {"fullUrl": url, "resource": resource, "request": {"method": "PUT", "url": url}}


def _race_extensions(race: str | None, mappings: Any) -> list[dict[str, Any]]:
    """US Core race (+ ethnicity for Hispanic) extensions for a MIMIC race string."""
    if not race:
        return []
    category = mappings.feature("race").categorize_mimic(race)
    race_parts: list[dict[str, Any]] = []
    extensions: list[dict[str, Any]] = []
    if category in OMB_RACE:
        code, display = OMB_RACE[category]
        race_parts.append(
            {"url": "ombCategory", "valueCoding": {"system": RACE_SYSTEM, "code": code, "display": display}}
        )
    race_parts.append({"url": "text", "valueString": race.title()})
    extensions.append({"url": US_CORE + "us-core-race", "extension": race_parts})
    if category == "hispanic":
        extensions.append(
            {
                "url": US_CORE + "us-core-ethnicity",
                "extension": [
                    {
                        "url": "ombCategory",
                        "valueCoding": {
                            "system": RACE_SYSTEM,
                            "code": "2135-2",
                            "display": "Hispanic or Latino",
                        },
                    },
                    {"url": "text", "valueString": "Hispanic or Latino"},
                ],
            }
        )
    return extensions


def _observation(
    rid: str, patient_id: str, coding: Any, when: datetime, value: float, unit: str, category: str
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": category}]}],
        "code": {"coding": [_coding(coding)]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": _instant(when),
        "valueQuantity": {"value": round(value, 3), "unit": unit, "system": UCUM, "code": unit},
    }


def ecg_resources(
    carrier: Carrier,
    recording: Recording | None,
    teaching: tuple[bytes, bytes] | None,
    patient_id: str,
    when: datetime,
    mappings: Any,
) -> list[dict[str, Any]]:
    """The resources that carry one ECG (the carrier resource, plus a Binary when ``via_binary``)."""
    ecg = mappings.ecg
    rid = f"{patient_id}-ecg"
    subject = {"reference": f"Patient/{patient_id}"}
    study = _coding(ecg.observation_codes[0])
    if carrier.fmt == "sampled":
        if recording is None:
            raise InputError("an Observation ECG needs a WFDB recording")
        components = []
        for name, sampled in zip(
            recording.lead_names,
            encode_sampled_data(recording.digital, recording.uv_per_unit, recording.fs),
            strict=True,
        ):
            lead = ecg.resolve_lead(name)
            if lead is None:
                continue
            components.append(
                {
                    "code": {"coding": [_coding(ecg.mdc_lead_codes[lead])], "text": lead},
                    "valueSampledData": sampled,
                }
            )
        return [
            {
                "resourceType": "Observation",
                "id": rid,
                "status": "final",
                "category": [{"coding": [{"system": OBS_CATEGORY, "code": "procedure"}]}],
                "code": {
                    "coding": [study, *[_coding(c) for c in ecg.observation_codes[1:] if "11073" in c.system]]
                },
                "subject": subject,
                "effectiveDateTime": _instant(when),
                "component": components,
            }
        ]
    content, content_type, title = _ecg_file(carrier, recording, teaching, when, mappings)
    attachment: dict[str, Any] = {"contentType": content_type, "title": title, "size": len(content)}
    resources: list[dict[str, Any]] = []
    if carrier.via_binary:
        binary_id = f"{rid}-file"
        resources.append(
            {
                "resourceType": "Binary",
                "id": binary_id,
                "contentType": content_type,
                "data": base64.b64encode(content).decode("ascii"),
            }
        )
        attachment["url"] = f"Binary/{binary_id}"
    else:
        attachment["data"] = base64.b64encode(content).decode("ascii")
    if carrier.resource == "media":
        modality = next((c for c in ecg.media_codes if "dicom" in c.system), ecg.media_codes[0])
        resources.append(
            {
                "resourceType": "Media",
                "id": rid,
                "status": "completed",
                "modality": {"coding": [_coding(modality)]},
                "subject": subject,
                "createdDateTime": _instant(when),
                "content": attachment,
            }
        )
    else:
        resources.append(
            {
                "resourceType": "DocumentReference",
                "id": rid,
                "status": "current",
                "type": {"coding": [_coding(ecg.document_codes[0])]},
                "subject": subject,
                "date": _instant(when),
                "context": {"period": {"start": _instant(when)}},
                "content": [{"attachment": attachment}],
            }
        )
    return resources


def _ecg_file(
    carrier: Carrier,
    recording: Recording | None,
    teaching: tuple[bytes, bytes] | None,
    when: datetime,
    mappings: Any,
) -> tuple[bytes, str, str]:
    """(bytes, content type, title) of the ECG file a carrier holds."""
    types = {fmt.format: fmt.content_type for fmt in reversed(mappings.ecg.attachment_formats)}
    if carrier.teaching:
        if teaching is None:
            raise InputError(f"{TEACHING_DIR}: the teaching ECG files are not there")
        if carrier.fmt == "dicom":
            return teaching[0], types["dicom"], f"{TEACHING_STEM}.dcm"
        return teaching[1], types["muse-xml"], f"{TEACHING_STEM}.xml"
    if recording is None:
        raise InputError(f"carrier {carrier.label} needs a WFDB recording")
    if carrier.fmt == "dicom":
        data = encode_dicom(
            recording.digital,
            recording.uv_per_unit,
            recording.fs,
            recording.lead_names,
            acquired=when.astimezone(UTC).strftime("%Y%m%d%H%M%S"),
        )
        return data, types["dicom"], f"{recording.record_name}.dcm"
    data = encode_wfdb_zip(
        recording.digital,
        1000.0 / recording.uv_per_unit,
        recording.fs,
        recording.lead_names,
        recording.record_name,
    )
    return data, types["wfdb-zip"], f"{recording.record_name}.zip"


def patient_bundle(
    subject: Subject,
    carrier: Carrier,
    patient_id: str,
    ecg_time: datetime,
    mappings: Any,
    *,
    teaching: tuple[bytes, bytes] | None = None,
    order_lab: Any = None,
    now: datetime | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A transaction Bundle with everything of one demo patient, and its summary row.

    Every source time is moved by (``ecg_time`` − the subject's ECG time); rows that would land
    after ``now`` are left out.
    """
    now = now or datetime.now(UTC)
    shift = ecg_time - subject.ecg_time.replace(tzinfo=UTC)
    patient: dict[str, Any] = {"resourceType": "Patient", "id": patient_id, "active": True}
    extensions = _race_extensions(subject.race, mappings)
    if extensions:
        patient["extension"] = extensions
    patient["identifier"] = [{"system": "urn:ecglab:demo:subject", "value": subject.subject_id}]
    patient["name"] = [{"family": "Demo", "given": [f"Subject {subject.subject_id[-4:]}"]}]
    if subject.gender in ("M", "F"):
        patient["gender"] = "male" if subject.gender == "M" else "female"
    if subject.anchor_age is not None:
        born = ecg_time.date() - timedelta(days=round(365.25 * subject.anchor_age + 180))
        patient["birthDate"] = born.isoformat()
    resources: list[dict[str, Any]] = [patient]

    vitals = 0
    for index, when, values in subject.vitals:
        at = when.replace(tzinfo=UTC) + shift
        if at > now:
            continue
        for column, key in VITAL_COLUMNS.items():
            if column in values:
                spec = mappings.feature(key)
                resources.append(
                    _observation(
                        f"{patient_id}-vs{index}-{key.replace('_', '')}",
                        patient_id,
                        spec.fhir.codes[0],
                        at,
                        values[column],
                        spec.unit,
                        "vital-signs",
                    )
                )
                vitals += 1
        if "sbp" in values and "dbp" in values:
            resources.append(
                _bp_panel(
                    f"{patient_id}-vs{index}-bp", patient_id, at, values["sbp"], values["dbp"], mappings
                )
            )
            vitals += 1

    biometrics = 0
    by_name = {
        name: spec
        for spec in mappings.features
        if spec.mimic.table == "hosp/omr"
        for name in spec.mimic.result_names
    }
    for index, when, name, value in subject.omr:
        at = when.replace(tzinfo=UTC) + shift
        spec = by_name[name]
        if at > now:
            continue
        resources.append(
            _observation(
                f"{patient_id}-omr{index}",
                patient_id,
                spec.fhir.codes[0],
                at,
                value * spec.mimic.factor,
                spec.unit,
                "vital-signs",
            )
        )
        biometrics += 1

    labs = 0
    for labevent_id, when, label, value, uom in sorted(subject.labs, key=lambda r: r[1], reverse=True):
        at = when.replace(tzinfo=UTC) + shift
        if at > now or labs >= MAX_LABS:
            continue
        lab = mappings.lab_by_mimic_label(label)
        observation = _observation(
            f"{patient_id}-lab{labevent_id}",
            patient_id,
            lab.result_codes[0],
            at,
            value,
            lab.unit,
            "laboratory",
        )
        observation["valueQuantity"]["unit"] = uom or lab.unit
        resources.append(observation)
        labs += 1

    orders = 0
    if order_lab is not None:
        resources.append(
            {
                "resourceType": "ServiceRequest",
                "id": f"{patient_id}-order-{order_lab.key.replace('_', '-')}",
                "status": "active",
                "intent": "order",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://snomed.info/sct",
                                "code": "108252007",
                                "display": "Laboratory procedure",
                            }
                        ]
                    }
                ],
                "code": {"coding": [_coding(order_lab.order_code)], "text": order_lab.display},
                "subject": {"reference": f"Patient/{patient_id}"},
                "authoredOn": _instant(min(now, ecg_time + timedelta(minutes=2))),
            }
        )
        orders += 1

    resources.extend(ecg_resources(carrier, subject.recording, teaching, patient_id, ecg_time, mappings))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [_entry(r) for r in resources]}
    row = {
        "patient": patient_id,
        "sex": patient.get("gender", "-"),
        "age": f"{subject.anchor_age:.0f}" if subject.anchor_age is not None else "-",
        "race": mappings.feature("race").categorize_mimic(subject.race) or "-",
        "ecg": carrier.label,
        "ecg_time": ecg_time.strftime("%H:%M"),
        "vitals": vitals,
        "biometrics": biometrics,
        "labs": labs,
        "orders": orders,
    }
    return bundle, row


def _bp_panel(
    rid: str, patient_id: str, at: datetime, sbp: float, dbp: float, mappings: Any
) -> dict[str, Any]:
    """A blood-pressure panel Observation with systolic and diastolic components (codes from the mappings)."""
    sys_ref = mappings.feature("sbp").fhir.components[0]
    dia_ref = mappings.feature("dbp").fhir.components[0]
    unit = mappings.feature("sbp").unit
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "vital-signs"}]}],
        "code": {"coding": [_coding(sys_ref.panel)]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": _instant(at),
        "component": [
            {
                "code": {"coding": [_coding(ref.component)]},
                "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
            }
            for ref, value in ((sys_ref, sbp), (dia_ref, dbp))
        ],
    }


# --------------------------------------------------------------------------- talking to the server


def post_transaction(client: httpx.Client, base_url: str, bundle: dict[str, Any], what: str) -> None:
    """POST a transaction Bundle; InputError naming the URL and ``what`` unless every entry succeeded."""
    try:
        response = client.post(base_url, json=bundle)
    except httpx.HTTPError as exc:
        raise InputError(f"{base_url}: cannot reach the FHIR server while writing {what} ({exc})") from exc
    body: Any = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if (
        response.status_code >= 400
        or not isinstance(body, dict)
        or body.get("type") != "transaction-response"
    ):
        raise InputError(
            f"{base_url}: transaction for {what} failed: HTTP {response.status_code}{_diagnostics(body)}"
        )
    failed = [
        (entry.get("response") or {}).get("status", "?")
        for entry in body.get("entry") or []
        if not str((entry.get("response") or {}).get("status", "")).startswith("2")
    ]
    if failed:
        raise InputError(
            f"{base_url}: transaction for {what}: {len(failed)} entries failed ({', '.join(map(str, failed[:3]))})"
        )


def _diagnostics(body: Any) -> str:
    """``: <first OperationOutcome diagnostics>`` when the body carries one."""
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        for issue in body.get("issue") or []:
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
            if text:
                return f": {str(text)[:300]}"
    return ""


def check_server(client: httpx.Client, base_url: str) -> None:
    """GET ``/metadata``: a clear error for a wrong URL or a server that is down."""
    try:
        response = client.get(f"{base_url}/metadata")
    except httpx.HTTPError as exc:
        raise InputError(f"{base_url}: cannot reach the FHIR server ({type(exc).__name__}: {exc})") from exc
    if response.status_code != 200:
        raise InputError(f"{base_url}/metadata: HTTP {response.status_code}; is this a FHIR R4 base URL?")


def seed(
    base_url: str,
    subjects: Sequence[Subject],
    mappings: Any,
    *,
    seed_value: int = 0,
    now: datetime | None = None,
    transport: httpx.BaseTransport | None = None,
) -> list[dict[str, Any]]:
    """Write one transaction per subject (carrier by position); return the summary rows."""
    now = (now or datetime.now(UTC)).replace(second=0, microsecond=0)
    teaching = teaching_files()
    rng = random.Random(seed_value)
    rows = []
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    with httpx.Client(headers=headers, timeout=60.0, transport=transport, follow_redirects=False) as client:
        check_server(client, base_url)
        for index, subject in enumerate(subjects):
            carrier = carrier_for(index)
            if carrier.teaching and teaching is None:
                carrier = carrier_for(len(CARRIER_PLAN) + index)
            patient_id = f"ecglab-{subject.subject_id}"
            order_lab = mappings.labs[rng.randrange(len(mappings.labs))] if index % 2 == 1 else None
            ecg_time = now - timedelta(minutes=5 + 7 * index)
            bundle, row = patient_bundle(
                subject,
                carrier,
                patient_id,
                ecg_time,
                mappings,
                teaching=teaching,
                order_lab=order_lab,
                now=now,
            )
            post_transaction(client, base_url, bundle, f"Patient/{patient_id}")
            rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary rows as an aligned text table."""
    if not rows:
        return "(no patients)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``ecglab seed-fhir`` flags."""
    parser.add_argument("--fhir-url", required=True, help="FHIR R4 base URL, e.g. http://127.0.0.1:8091/fhir")
    parser.add_argument("--patients", type=int, default=6, help="demo patients to write (default 6)")
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        metavar="SYNTH_OUT",
        help="MIMIC-IV-layout folder (ecglab synth-mimic output); default: generate a small one",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed for subject choice and orders (default 0)"
    )


def run(args: argparse.Namespace) -> int:
    """Read or generate the source data, seed the server and print the summary table."""
    from fhir_mappings import load_mappings

    if args.patients < 1:
        raise InputError(f"--patients must be at least 1 (got {args.patients})")
    base_url = str(args.fhir_url).rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise InputError(f"--fhir-url {args.fhir_url!r} must be an http(s) URL")
    mappings = load_mappings()
    if args.source is not None:
        if not Path(args.source).is_dir():
            raise InputError(f"{args.source}: --from folder not found")
        subjects = read_subjects(args.source, args.patients, args.seed, mappings)
    else:
        # Only this branch needs the generator (and pandas); the service never reaches it.
        from model_training.synthetic import generate

        with tempfile.TemporaryDirectory(prefix="ecglab-seed-") as tmp:
            generate(Path(tmp) / "synth", max(SYNTH_SUBJECTS, args.patients), args.seed)
            subjects = read_subjects(Path(tmp) / "synth", args.patients, args.seed, mappings)
    rows = seed(base_url, subjects, mappings, seed_value=args.seed)
    print(format_table(rows))
    print(f"seed-fhir: {len(rows)} patients written to {base_url}")
    return 0


__all__ = [
    "CARRIER_PLAN",
    "Carrier",
    "Recording",
    "Subject",
    "carrier_for",
    "ecg_resources",
    "patient_bundle",
    "post_transaction",
    "read_subjects",
    "seed",
]
