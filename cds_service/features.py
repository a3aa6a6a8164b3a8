"""FHIR resources → the model's inputs: one ECG recording plus the metadata features, by rule.

Everything clinical here is driven by ``fhir_mappings`` (codes, units, plausibility limits, time
windows, race categories, ECG codes, lead names); this module applies the rules and knows nothing
of the network itself. The inference runtime then prepares the ECG (:mod:`cds_service.signal`)
and encodes the metadata (training medians, missing indicators).

Rules (each pinned by a test in ``tests/test_features.py``):

**ECG choice.** Candidates are ECG ``Observation`` (code in ``ecg.observation_codes``), ``Media``
and ``DocumentReference`` resources whose code fields (``ecg.code_paths``) hold one of the ECG
codes, of this patient, not ``entered-in-error``/``cancelled``/``superseded``/``not-done``. Their
time: Observation ``effective[x]`` then ``issued``; Media ``created[x]`` then ``issued``;
DocumentReference ``context.period.start`` then ``date``. Only ECGs at most
``ecg.max_age_minutes`` old at ``now`` (and at most :data:`FUTURE_TOLERANCE` in the future) count;
none → :class:`NoEcgError`. The newest is decoded; **if it is rejected (malformed), the next newest
is tried**, so one corrupt upload does not hide a good recording taken minutes earlier; if every
candidate is rejected, the newest one's :class:`EcgRejected` is raised (its ``reason`` names why).
Decoding: Observation ``component[].valueSampledData`` (lead from the MDC code, else code
display/text via the lead aliases); Media ``content`` and DocumentReference ``content[].attachment``
as DICOM, WFDB zip or MUSE XML by ``contentType`` (``ecg.attachment_formats``), inline ``data`` or
a ``url`` fetched through ``binary_loader``, at most ``ecg.max_attachment_bytes``. Absent limb
leads are derived from I and II (``ecg.derived_leads``); all 12 model leads must then be there.

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
reads BMI only from MIMIC ``omr``; hospitals often chart weight and height without BMI, and the
arithmetic is exact, so this fills a value the model would otherwise impute. ``sources["bmi"]``
then names both Observations.

Times: a FHIR dateTime without a zone is taken as UTC; a date without a time as 00:00 UTC.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from cds_service.ecg_readers import EcgRejected, Waveform, read_attachment, read_sampled_data, to_model_leads
from cds_service.patient_data import PatientData
from fhir_mappings.errors import EcglabError

__all__ = [
    "EcgRecord",
    "EcgRejected",
    "ModelInputs",
    "NoEcgError",
    "PatientData",
    "extract_metadata",
    "extract_model_inputs",
    "parse_fhir_datetime",
    "select_ecg",
]

log = logging.getLogger(__name__)

FUTURE_TOLERANCE: timedelta = timedelta(minutes=5)
"""An ECG stamped this far after ``now`` is still accepted (clock skew between systems)."""

IGNORED_STATUSES: frozenset[str] = frozenset({"entered-in-error", "cancelled", "superseded", "not-done"})
"""Resource statuses that mean "this did not happen or was withdrawn"."""

UNPACK_FACTOR: int = 4
"""A zipped WFDB record may unpack to this many times ``max_attachment_bytes``."""

GENDER_SYSTEM = "http://hl7.org/fhir/administrative-gender"


@dataclass
class EcgRecord:
    """The chosen ECG: (T, 12) float32 mV in ``lead_names`` order at ``fs`` Hz, with provenance."""

    signal: npt.NDArray[np.float32]
    fs: float
    lead_names: tuple[str, ...]
    recorded_at: datetime
    reference: str
    carrier: str


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


class NoEcgError(EcglabError):
    """The patient has no ECG recent enough (or none at all): there is nothing to predict from."""


# --------------------------------------------------------------------------- time


def parse_fhir_datetime(value: object) -> datetime | None:
    """A FHIR ``date``/``dateTime``/``instant`` as an aware UTC datetime; ``None`` if unparsable.

    Partial dates take their first instant (``2024`` → 2024-01-01T00:00Z); a dateTime without a
    zone is taken as UTC.
    """
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    try:
        if len(text) == 4:
            parsed = datetime(int(text), 1, 1)
        elif len(text) == 7:
            parsed = datetime(int(text[:4]), int(text[5:7]), 1)
        else:
            parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: 0001-01-01T00:00+01:00 has no UTC instant
        return None


def _birth_date(value: object) -> date | None:
    """``Patient.birthDate``; a partial date is taken at the middle of its year or month."""
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


def _first_time(resource: Mapping[str, Any], paths: Sequence[str]) -> datetime | None:
    """The first parsable time among ``paths`` (``a.b`` walks into nested objects)."""
    for path in paths:
        node: Any = resource
        for part in path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        parsed = parse_fhir_datetime(node)
        if parsed is not None:
            return parsed
    return None


OBSERVATION_TIME: tuple[str, ...] = (
    "effectiveDateTime",
    "effectivePeriod.start",
    "effectivePeriod.end",
    "effectiveInstant",
    "issued",
)
MEDIA_TIME: tuple[str, ...] = ("createdDateTime", "createdPeriod.start", "issued")
DOCUMENT_TIME: tuple[str, ...] = ("context.period.start", "date")


# --------------------------------------------------------------------------- small FHIR helpers
# Resources arrive from the EHR as arbitrary JSON: a field that should hold a list or a string may
# hold a number or an object. These helpers read such fields defensively, so a malformed resource
# is skipped instead of failing the whole hook call.


def _list(value: Any) -> list[Any]:
    """``value`` when it is a JSON array, else an empty list."""
    return value if isinstance(value, list) else []


def _text(value: Any) -> str | None:
    """``value`` when it is a string, else ``None``."""
    return value if isinstance(value, str) else None


def _codings(node: Any) -> list[tuple[str | None, str | None]]:
    """(system, code) pairs of a CodeableConcept, a list of them, or a Coding (non-strings as ``None``)."""
    if isinstance(node, list):
        return [pair for item in node for pair in _codings(item)]
    if not isinstance(node, Mapping):
        return []
    if "coding" in node:
        return [
            (_text(c.get("system")), _text(c.get("code")))
            for c in _list(node.get("coding"))
            if isinstance(c, Mapping)
        ]
    if "code" in node:
        return [(_text(node.get("system")), _text(node.get("code")))]
    return []


def _has_code(node: Any, codes: Iterable[Any]) -> bool:
    """Whether a CodeableConcept (or list of them) carries one of the mapping ``codes``."""
    pairs = _codings(node)
    return any(code.matches(system, value) for code in codes for system, value in pairs)


def _reference(resource: Mapping[str, Any]) -> str:
    """``Type/id`` of a resource (``Type/?`` without an id)."""
    return f"{resource.get('resourceType', '?')}/{resource.get('id', '?')}"


def _of_patient(resource: Mapping[str, Any], patient_ref: str | None) -> bool:
    """False when the resource names another patient as subject (or patient)."""
    if patient_ref is None:
        return True
    subject = resource.get("subject") or resource.get("patient")
    ref = subject.get("reference") if isinstance(subject, Mapping) else None
    if not isinstance(ref, str):
        return True
    return ref == patient_ref or ref.endswith("/" + patient_ref)


def _usable(resource: Mapping[str, Any]) -> bool:
    """False for withdrawn or erroneous resources."""
    return _text(resource.get("status")) not in IGNORED_STATUSES


# --------------------------------------------------------------------------- ECG


@dataclass(frozen=True)
class _Candidate:
    resource: Mapping[str, Any]
    carrier: str
    recorded_at: datetime | None


def _ecg_candidates(
    resources: Iterable[Mapping[str, Any]], ecg: Any, patient_ref: str | None
) -> list[_Candidate]:
    """ECG resources (any carrier) of this patient, with their recording time."""
    found: list[_Candidate] = []
    for resource in resources:
        if (
            not isinstance(resource, Mapping)
            or not _usable(resource)
            or not _of_patient(resource, patient_ref)
        ):
            continue
        kind = resource.get("resourceType")
        if kind == "Observation":
            carrier, codes, times = "observation", ecg.observation_codes, OBSERVATION_TIME
        elif kind == "Media":
            carrier, codes, times = "media", ecg.media_codes, MEDIA_TIME
        elif kind == "DocumentReference":
            carrier, codes, times = "documentreference", ecg.document_codes, DOCUMENT_TIME
        else:
            continue
        if not any(_has_code(resource.get(path), codes) for path in ecg.code_paths[carrier]):
            continue
        found.append(_Candidate(resource, carrier, _first_time(resource, times)))
    return found


def _units(ecg: Any) -> dict[str, float]:
    """The mapping's amplitude units as factors to mV (offsets are zero for voltages)."""
    return {
        unit: conversion.factor for unit, conversion in ecg.amplitude_units.items() if conversion.offset == 0
    }


def _lead_of(ecg: Any) -> Callable[[Mapping[str, Any]], str | None]:
    """Lead of a component code: an MDC lead coding, else a coding display/code or the text as alias."""

    def lead(code: Mapping[str, Any]) -> str | None:
        codings = [c for c in _list(code.get("coding")) if isinstance(c, Mapping)]
        for coding in codings:
            found = ecg.lead_for_coding(_text(coding.get("system")), _text(coding.get("code")))
            if found:
                return str(found)
        names = [coding.get(key) for coding in codings for key in ("display", "code")] + [code.get("text")]
        for name in names:
            found = ecg.resolve_lead(name) if isinstance(name, str) else None
            if found:
                return str(found)
        return None

    return lead


def _attachment_bytes(
    attachment: Mapping[str, Any], ecg: Any, loader: Callable[[str], bytes] | None
) -> bytes:
    """The bytes of an Attachment: inline base64 ``data`` or ``url`` through ``loader``; size-limited."""
    limit = int(ecg.max_attachment_bytes)
    size = attachment.get("size")
    if isinstance(size, int | float) and size > limit:
        raise EcgRejected("attachment_too_large", f"attachment declares {int(size)} bytes, over {limit}")
    data = attachment.get("data")
    if isinstance(data, str) and data:
        if len(data) * 3 // 4 > limit + 3:
            raise EcgRejected(
                "attachment_too_large", f"attachment holds about {len(data) * 3 // 4} bytes, over {limit}"
            )
        try:
            return base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise EcgRejected("unreadable", "attachment data is not valid base64") from exc
    url = attachment.get("url")
    if isinstance(url, str) and url:
        if loader is None:
            raise EcgRejected("attachment_unavailable", "attachment is a URL and no loader was given")
        try:
            content = loader(url)
        except EcgRejected:
            raise
        except EcglabError as exc:
            reason = str(getattr(exc, "reason", "attachment_unavailable"))
            raise EcgRejected(reason, f"attachment could not be fetched ({exc})") from exc
        if len(content) > limit:
            raise EcgRejected("attachment_too_large", f"attachment is {len(content)} bytes, over {limit}")
        return content
    raise EcgRejected("no_attachment", "attachment has neither data nor url")


def _decode_attachment(
    attachment: Mapping[str, Any], ecg: Any, loader: Callable[[str], bytes] | None
) -> Waveform:
    """Check the content type, fetch the bytes and decode them with the matching reader."""
    content_type = attachment.get("contentType")
    fmt = ecg.attachment_format(content_type if isinstance(content_type, str) else None)
    if fmt is None:
        raise EcgRejected(
            "unknown_content_type", f"attachment content type {content_type!r} is not an accepted ECG format"
        )
    content = _attachment_bytes(attachment, ecg, loader)
    return read_attachment(
        content, fmt, max_unpacked_bytes=UNPACK_FACTOR * int(ecg.max_attachment_bytes), units=_units(ecg)
    )


def _decode(candidate: _Candidate, ecg: Any, loader: Callable[[str], bytes] | None) -> Waveform:
    """The candidate's waveform in model lead order (raises :class:`EcgRejected`)."""
    resource = candidate.resource
    if candidate.carrier == "observation":
        components = [c for c in _list(resource.get("component")) if isinstance(c, Mapping)]
        raw = read_sampled_data(components, _lead_of(ecg), units=_units(ecg))
    elif candidate.carrier == "media":
        content = resource.get("content")
        if not isinstance(content, Mapping):
            raise EcgRejected("no_attachment", "Media has no content attachment")
        raw = _decode_attachment(content, ecg, loader)
    else:
        attachments = [
            c["attachment"]
            for c in _list(resource.get("content"))
            if isinstance(c, Mapping) and isinstance(c.get("attachment"), Mapping)
        ]
        if not attachments:
            raise EcgRejected("no_attachment", "DocumentReference has no content attachment")
        readable = [a for a in attachments if ecg.attachment_format(_text(a.get("contentType"))) is not None]
        raw = _decode_attachment(readable[0] if readable else attachments[0], ecg, loader)
    return to_model_leads(
        raw,
        ecg.resolve_lead,
        ecg.lead_order,
        derived=ecg.derived_leads,
        min_duration_s=float(ecg.min_duration_s),
    )


def select_ecg(
    resources: Iterable[Mapping[str, Any]],
    ecg: Any,
    *,
    now: datetime,
    patient_ref: str | None = None,
    binary_loader: Callable[[str], bytes] | None = None,
) -> EcgRecord:
    """The newest usable ECG within the maximum age (see the module docstring, "ECG choice").

    Raises:
        NoEcgError: no ECG resource recent enough.
        EcgRejected: every recent ECG is malformed; the newest one's reason.
    """
    candidates = _ecg_candidates(resources, ecg, patient_ref)
    oldest = now - timedelta(minutes=int(ecg.max_age_minutes))
    recent = sorted(
        (
            (c.recorded_at, c)
            for c in candidates
            if c.recorded_at is not None and oldest <= c.recorded_at <= now + FUTURE_TOLERANCE
        ),
        key=lambda pair: pair[0],
        reverse=True,
    )
    if not recent:
        undated = [c for c in candidates if c.recorded_at is None]
        if undated:
            raise EcgRejected(
                "no_time", "ECG resource carries no recording time", _reference(undated[0].resource)
            )
        raise NoEcgError(
            f"no ECG recorded in the last {int(ecg.max_age_minutes)} minutes ({len(candidates)} older or future-dated)"
        )
    rejections: list[EcgRejected] = []
    for recorded_at, candidate in recent:
        reference = _reference(candidate.resource)
        try:
            waveform = _decode(candidate, ecg, binary_loader)
        except EcgRejected as exc:
            log.warning("ECG %s rejected (%s); trying an older one", candidate.carrier, exc.reason)
            rejections.append(EcgRejected(exc.reason, str(exc), reference))
            continue
        return EcgRecord(
            waveform.signal, waveform.fs, waveform.lead_names, recorded_at, reference, candidate.carrier
        )
    newest = rejections[0]
    if len(rejections) > 1:
        raise EcgRejected(newest.reason, f"{newest} (and {len(rejections) - 1} older ECG(s) rejected too)")
    raise newest


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
        at = _first_time(obs, OBSERVATION_TIME)
        if at is None or obs.get("dataAbsentReason") is not None:
            continue
        quantities: list[Any] = []
        if _has_code(obs.get("code"), spec.fhir.codes):
            quantities.append(obs.get("valueQuantity"))
        for ref in spec.fhir.components:
            if _has_code(obs.get("code"), [ref.panel]):
                quantities.extend(
                    comp.get("valueQuantity")
                    for comp in _list(obs.get("component"))
                    if isinstance(comp, Mapping)
                    and comp.get("dataAbsentReason") is None
                    and _has_code(comp.get("code"), [ref.component])
                )
        for quantity in quantities:
            value = _quantity(quantity, spec)
            if value is not None and spec.is_plausible(value):
                values.append(_Value(value, at, _reference(obs)))
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
        for ext in _list(patient.get("extension"))
        if isinstance(ext, Mapping) and isinstance(ext.get("url"), str)
    }
    present = [by_url[url] for url in urls if url in by_url]
    if not present:
        return None
    pairs: list[tuple[str | None, str | None]] = []
    for ext in present:
        for sub in _list(ext.get("extension")):
            if isinstance(sub, Mapping) and sub.get("url") in ("ombCategory", "detailed"):
                pairs.extend(_codings(sub.get("valueCoding")))
    race_ext = by_url.get(urls[0]) if urls else None
    text = next(
        (
            sub.get("valueString")
            for sub in _list((race_ext or {}).get("extension"))
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
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Every feature of the mappings at time ``at`` (the ECG time): values and their sources."""
    patient_ref = _reference(patient) if patient and patient.get("id") else None
    usable = [
        o
        for o in observations
        if isinstance(o, Mapping)
        and o.get("resourceType", "Observation") == "Observation"
        and _usable(o)
        and _of_patient(o, patient_ref)
    ]
    metadata: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    for spec in mappings.features:
        key, kind = spec.key, spec.fhir.kind
        value: float | None = None
        source: str | None = None
        if kind == "observation":
            chosen = _closest(_observation_values(spec, usable), spec.window, at)
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


def extract_model_inputs(
    data: PatientData,
    *,
    mappings: Any = None,
    now: datetime | None = None,
    binary_loader: Callable[[str], bytes] | None = None,
) -> ModelInputs:
    """Choose the ECG and extract the metadata at its time, all by the rules of the module docstring.

    Args:
        data: the patient's resources (prefetched or fetched).
        mappings: loaded ``fhir_mappings`` (default: :func:`fhir_mappings.load_mappings`).
        now: the reference time for the ECG maximum age (default: the current UTC time).
        binary_loader: fetches attachment URLs (``FhirClient.binary_loader``); without it an
            attachment given only by URL is rejected (``attachment_unavailable``).

    Raises:
        NoEcgError: no ECG recent enough.
        EcgRejected: the recent ECGs are all malformed or incomplete; ``reason`` says why.
    """
    if mappings is None:
        from fhir_mappings import load_mappings

        mappings = load_mappings()
    when = now or datetime.now(UTC)
    patient_ref = _reference(data.patient) if data.patient and data.patient.get("id") else None
    ecg = select_ecg(data.ecgs, mappings.ecg, now=when, patient_ref=patient_ref, binary_loader=binary_loader)
    metadata, sources = extract_metadata(data.patient, data.observations, mappings, ecg.recorded_at)
    return ModelInputs(ecg=ecg, metadata=metadata, sources=sources)
