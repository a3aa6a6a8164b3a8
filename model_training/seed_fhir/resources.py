"""Building the demo patients' FHIR resources: Patient, vitals, biometrics, labs, an order, the ECG.

Each patient becomes one transaction Bundle of ``PUT Type/id`` entries with stable ids derived
from the source rows, so writing it again updates the same resources and never duplicates them.
Codes and units come from ``fhir_mappings``.

The ECG is written in a different carrier per patient (:data:`CARRIER_PLAN`), so the demo and the
integration tests exercise every reader: the real GE MUSE teaching ECG (``tests/data/ecg``) as a
``Media`` holding its DICOM and as a ``DocumentReference`` to a ``Binary`` holding its MUSE XML,
then the subject's own WFDB recording as an ``Observation`` with ``valueSampledData``, a ``Media``
with DICOM, and a ``DocumentReference`` with a WFDB zip inline or in a ``Binary``. The files are
encoded by :mod:`model_training.ecg_writers`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fhir_mappings.errors import InputError
from model_training.ecg_writers import encode_dicom, encode_sampled_data, encode_wfdb_zip
from model_training.seed_fhir.subjects import TEACHING_DIR, TEACHING_STEM, VITAL_COLUMNS, Recording, Subject

MAX_LABS = 40
"""Lab results written per patient at most (keeps the demo server small and fast)."""

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
        # unrounded: the service must see the value training saw (train/serve parity, issue 15)
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
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
    age = subject.age_at_ecg  # the age training computes, so the service derives the same completed years
    if age is not None:
        born = ecg_time.date() - timedelta(days=round(365.25 * age + 180))
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
        if "sbp" in values or "dbp" in values:  # a panel with the components measured, as charted
            resources.append(
                _bp_panel(
                    f"{patient_id}-vs{index}-bp",
                    patient_id,
                    at,
                    values.get("sbp"),
                    values.get("dbp"),
                    mappings,
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
        "age": f"{subject.age_at_ecg:.0f}" if subject.age_at_ecg is not None else "-",
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
    rid: str, patient_id: str, at: datetime, sbp: float | None, dbp: float | None, mappings: Any
) -> dict[str, Any]:
    """A blood-pressure panel Observation with its systolic and/or diastolic component (codes from the mappings)."""
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
            if value is not None
        ],
    }
