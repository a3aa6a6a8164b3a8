"""FHIR resources → the model's inputs: one ECG recording plus the metadata features, by rule.

Everything clinical here is driven by ``fhir_mappings`` (codes, units, plausibility limits, time
windows, race categories, ECG codes, lead names); this module applies the rules and knows nothing
of the network itself. The inference runtime then prepares the ECG (:mod:`cds_service.ecg.prepare`)
and encodes the metadata (training medians, missing indicators).

Rules (each pinned by a test in ``tests/fhir/test_features.py``):

**ECG choice** (:mod:`cds_service.ecg.select`). The newest ECG Observation, Media or
DocumentReference of the patient within ``ecg.max_age_minutes`` (none → :class:`NoEcgError`),
decoded from ``valueSampledData`` or an attachment of any supported format; if it is rejected the
next newest is tried; if all are, the newest one's :class:`EcgRejected` is raised. Its leads are
named, sign-corrected and completed (derived limb leads) by :mod:`cds_service.ecg.canonical`.

**Patient features.** sex from ``gender`` (male 1, female 0; other/unknown missing); age in
completed years from ``birthDate`` to the ECG time (a partial date ``YYYY`` / ``YYYY-MM`` is taken
at the middle of the year / month); race from the US Core race + ethnicity extensions with the
mapping's category rules (Hispanic ethnicity wins; no extension → missing).

**Observation features.** For each feature, values from Observations coded with one of its codes
(``valueQuantity``) or from the component of a listed panel (BP 85354-9), converted to the
canonical unit (UCUM ``code`` first, then the ``unit`` text through the mapping's aliases; an
unknown unit is never guessed). Implausible values are dropped *before* choosing, as training does;
of the rest, the one closest to the ECG time within the feature's window wins (ties: the earlier,
then the lower value). Observations without a time, with ``dataAbsentReason``, with status
``entered-in-error``/``cancelled``, or of another patient are ignored.

**BMI (deviation).** When no BMI Observation is in its window but weight and height are, BMI is
computed as weight / (height/100)² from the chosen values (and checked for plausibility). Training
does the same from MIMIC ``omr`` (:func:`model_training.metadata.bmi_sql`: the charted BMI, else
weight / (height/100)² when plausible), so both sides fill BMI alike; hospitals often chart weight
and height without BMI, and the arithmetic is exact. ``sources["bmi"]`` then names both
Observations.

**Patient binding.** ``context.patientId`` is authoritative. :func:`bind_to_patient` (what
``PatientData.bound_to`` calls, and :func:`extract_model_inputs` applies whenever
``PatientData.patient_id`` is set) drops a Patient resource with another id, and every ECG,
Observation, lab result and ServiceRequest whose subject names another patient
(:func:`cds_service.ecg.select.names_other_patient`: ``Patient/<id>``, versioned or absolute; a
``urn:uuid`` or contained reference cannot be shown to be the context patient and is dropped too),
also when the Patient resource is ``null``. Dropped resources are counted in one warning per call,
by type, never with an id. Without ``patient_id`` (command-line use) the Patient resource's id is
the reference, as before.

Times follow :func:`cds_service.fhir_values.parse_fhir_datetime` (no zone → UTC; a partial date is
the start of its period).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from typing import Any

from cds_service.ecg.isolation import Decoder
from cds_service.ecg.record import EcgRejected
from cds_service.ecg.select import OBSERVATION_TIME, EcgRecord, NoEcgError, names_other_patient, select_ecg
from cds_service.fhir_values import (
    as_list,
    codings,
    first_time,
    has_code,
    parse_fhir_datetime,
    reference,
    resource_id,
    usable,
)
from cds_service.patient_data import PatientData

__all__ = [
    "EcgRecord",
    "EcgRejected",
    "ModelInputs",
    "NoEcgError",
    "PatientData",
    "bind_to_patient",
    "completed_years",
    "extract_metadata",
    "extract_model_inputs",
    "parse_fhir_datetime",
    "select_ecg",
]

GENDER_SYSTEM = "http://hl7.org/fhir/administrative-gender"

log = logging.getLogger(__name__)


@dataclass
class ModelInputs:
    """Everything the inference runtime needs: the ECG and the raw metadata features.

    ``metadata`` maps every feature key of the mappings to its canonical value (categorical: the
    category index as a float) or ``None`` when missing; ``sources`` names the resource that
    supplied each present value.
    """

    ecg: EcgRecord
    metadata: dict[str, float | None]
    sources: dict[str, str]


# --------------------------------------------------------------------------- age


def _birth_date(value: object) -> date | None:
    """``Patient.birthDate``; a partial date is taken at the middle of its year or month.

    Not the time rule of :mod:`cds_service.fhir_values`: this estimates an age, and the middle of
    the period is the unbiased guess (the start would age every such patient by up to a year).
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        if len(text) == 4:
            return date(int(text), 7, 1)
        if len(text) == 7:
            return date(int(text[:4]), int(text[5:7]), 15)
        return date.fromisoformat(text[:10])
    except ValueError:
        return None


def completed_years(born: date, at: datetime) -> int:
    """Whole years from ``born`` to the date of ``at`` (a birthday counts on its day)."""
    day = at.date()
    return day.year - born.year - ((day.month, day.day) < (born.month, born.day))


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class _Value:
    value: float
    at: datetime
    source: str


def _quantity(node: Any, spec: Any) -> float | None:
    """A ``valueQuantity`` in the feature's canonical unit, or ``None`` (absent, unknown unit)."""
    if not isinstance(node, Mapping):
        return None
    value = node.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        value = float(value)  # a JSON integer of 400 digits does not fit a float
    except OverflowError:
        return None
    if not math.isfinite(value):
        return None
    for unit in (node.get("code"), node.get("unit")):
        if isinstance(unit, str) and unit.strip():
            converted = spec.convert(float(value), unit)
            if converted is not None:
                return float(converted)
    return None


def _observation_values(spec: Any, observations: Iterable[Mapping[str, Any]]) -> list[_Value]:
    """Every plausible canonical value of a feature, with its time and source reference."""
    values: list[_Value] = []
    for obs in observations:
        at = first_time(obs, OBSERVATION_TIME)
        if at is None or obs.get("dataAbsentReason") is not None:
            continue
        quantities: list[Any] = []
        if has_code(obs.get("code"), spec.fhir.codes):
            quantities.append(obs.get("valueQuantity"))
        for ref in spec.fhir.components:
            if has_code(obs.get("code"), [ref.panel]):
                quantities.extend(
                    comp.get("valueQuantity")
                    for comp in as_list(obs.get("component"))
                    if isinstance(comp, Mapping)
                    and comp.get("dataAbsentReason") is None
                    and has_code(comp.get("code"), [ref.component])
                )
        for quantity in quantities:
            value = _quantity(quantity, spec)
            if value is not None and spec.is_plausible(value):
                values.append(_Value(value, at, reference(obs)))
    return values


def _closest(values: Iterable[_Value], window: Any, at: datetime) -> _Value | None:
    """The value closest to ``at`` inside the window; ties: the earlier, then the lower value."""
    inside = [v for v in values if window.contains((v.at - at).total_seconds() / 60.0)]
    if not inside:
        return None
    return min(inside, key=lambda v: (abs((v.at - at).total_seconds()), v.at, v.value))


def _race(patient: Mapping[str, Any], spec: Any) -> str | None:
    """The race category from the US Core race (and ethnicity) extensions, or ``None``."""
    urls = list(spec.fhir.extensions)
    by_url = {
        ext["url"]: ext
        for ext in as_list(patient.get("extension"))
        if isinstance(ext, Mapping) and isinstance(ext.get("url"), str)
    }
    present = [by_url[url] for url in urls if url in by_url]
    if not present:
        return None
    pairs: list[tuple[str | None, str | None]] = []
    for ext in present:
        for sub in as_list(ext.get("extension")):
            if isinstance(sub, Mapping) and sub.get("url") in ("ombCategory", "detailed"):
                pairs.extend(codings(sub.get("valueCoding")))
    race_ext = by_url.get(urls[0]) if urls else None
    text = next(
        (
            sub.get("valueString")
            for sub in as_list((race_ext or {}).get("extension"))
            if isinstance(sub, Mapping) and sub.get("url") == "text"
        ),
        None,
    )
    category = spec.categorize_fhir(pairs, text if isinstance(text, str) else None)
    return str(category) if category is not None else None


def extract_metadata(
    patient: Mapping[str, Any] | None,
    observations: Iterable[Mapping[str, Any]],
    mappings: Any,
    at: datetime,
    *,
    patient_id: str | None = None,
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Every feature of the mappings at time ``at`` (the ECG time): values and their sources.

    Observations naming another patient than ``patient_id`` (default: the Patient resource's id)
    are ignored.
    """
    patient_ref = reference(patient) if patient and patient.get("id") else None
    bound_id = patient_id if patient_id is not None else resource_id(patient)
    current = [
        o
        for o in observations
        if isinstance(o, Mapping)
        and o.get("resourceType", "Observation") == "Observation"
        and usable(o)
        and (bound_id is None or not names_other_patient(o, bound_id))
    ]
    metadata: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    for spec in mappings.features:
        key, kind = spec.key, spec.fhir.kind
        value: float | None = None
        source: str | None = None
        if kind == "observation":
            chosen = _closest(_observation_values(spec, current), spec.window, at)
            if chosen is not None:
                value, source = chosen.value, chosen.source
        elif patient is not None:
            source = patient_ref or "Patient"
            if kind == "patient-gender":
                gender = patient.get("gender")
                category = (
                    spec.categorize_fhir([(GENDER_SYSTEM, gender)]) if isinstance(gender, str) else None
                )
                value = float(spec.category_index(category)) if category is not None else None
            elif kind == "patient-race":
                category = _race(patient, spec)
                value = float(spec.category_index(category)) if category is not None else None
            elif kind == "patient-birthdate":
                born = _birth_date(patient.get("birthDate"))
                age = float(completed_years(born, at)) if born is not None else None
                value = age if age is not None and spec.is_plausible(age) else None
        metadata[key] = value
        if value is not None and source is not None:
            sources[key] = source
    _derive_bmi(metadata, sources, mappings)
    return metadata, sources


def _derive_bmi(metadata: dict[str, float | None], sources: dict[str, str], mappings: Any) -> None:
    """Fill a missing BMI from the chosen weight (kg) and height (cm) (documented deviation)."""
    keys = {spec.key for spec in mappings.features}
    if not {"bmi", "weight", "height"} <= keys or metadata.get("bmi") is not None:
        return
    weight, height = metadata.get("weight"), metadata.get("height")
    if weight is None or height is None or height <= 0:
        return
    bmi = weight / (height / 100.0) ** 2
    if mappings.feature("bmi").is_plausible(bmi):
        metadata["bmi"] = bmi
        sources["bmi"] = f"computed from {sources['weight']} and {sources['height']}"


def bind_to_patient(data: PatientData, patient_id: str) -> PatientData:
    """A copy of ``data`` holding only what belongs to ``patient_id`` (module docstring, "Patient binding").

    The copy's ``patient_id`` is ``patient_id``; binding it again changes nothing.
    """
    ignored: Counter[str] = Counter()
    patient = data.patient
    if patient is not None:
        pid = patient.get("id") if isinstance(patient, Mapping) else None
        kind = patient.get("resourceType", "Patient") if isinstance(patient, Mapping) else None
        if kind != "Patient" or (pid is not None and pid != patient_id):
            ignored["Patient"] += 1
            patient = None

    def keep(resources: Iterable[Any]) -> list[dict[str, Any]]:
        kept: list[dict[str, Any]] = []
        for resource in resources:
            if isinstance(resource, dict) and not names_other_patient(resource, patient_id):
                kept.append(resource)
            else:
                ignored[
                    str(resource.get("resourceType", "?"))[:40] if isinstance(resource, Mapping) else "?"
                ] += 1
        return kept

    bound = replace(
        data,
        patient=patient,
        observations=keep(data.observations),
        ecgs=keep(data.ecgs),
        lab_results=keep(data.lab_results),
        service_requests=keep(data.service_requests),
        patient_id=patient_id,
    )
    if ignored:
        log.warning(
            "ignored %d resource(s) that name another patient than the hook context (%s)",
            sum(ignored.values()),
            ", ".join(f"{count} {kind}" for kind, count in sorted(ignored.items())),
        )
    return bound


def extract_model_inputs(
    data: PatientData,
    *,
    mappings: Any = None,
    now: datetime | None = None,
    binary_loader: Callable[[str], bytes] | None = None,
    decoder: Decoder | None = None,
    deadline: float | None = None,
) -> ModelInputs:
    """Choose the ECG and extract the metadata at its time, all by the rules of the module docstring.

    Args:
        data: the patient's resources (prefetched or fetched); bound to ``data.patient_id`` first
            when it is set.
        mappings: loaded ``fhir_mappings`` (default: :func:`fhir_mappings.load_mappings`).
        now: the reference time for the ECG maximum age (default: the current UTC time).
        binary_loader: fetches attachment URLs (``FhirClient.binary_loader``); without it an
            attachment given only by URL is rejected (``attachment_unavailable``).
        decoder: the service's ECG decoder (worker processes); ``None`` decodes in this process.
        deadline: :func:`time.monotonic` instant at which ECG decoding is abandoned.

    Raises:
        NoEcgError: no ECG recent enough.
        EcgRejected: the recent ECGs are all malformed or incomplete; ``reason`` says why.
    """
    if mappings is None:
        from fhir_mappings import load_mappings

        mappings = load_mappings()
    when = now or datetime.now(UTC)
    if data.patient_id is not None:
        data = bind_to_patient(data, data.patient_id)
    patient_id = data.patient_id if data.patient_id is not None else resource_id(data.patient)
    ecg = select_ecg(
        data.ecgs,
        mappings.ecg,
        now=when,
        patient_id=patient_id,
        binary_loader=binary_loader,
        decoder=decoder,
        deadline=deadline,
    )
    metadata, sources = extract_metadata(
        data.patient, data.observations, mappings, ecg.recorded_at, patient_id=patient_id
    )
    return ModelInputs(ecg=ecg, metadata=metadata, sources=sources)
