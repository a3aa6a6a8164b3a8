"""Which ECG of the patient's FHIR resources the model reads, and decoding it to the model's leads.

Candidates are ECG ``Observation`` (code in ``ecg.observation_codes``), ``Media`` and
``DocumentReference`` resources whose code fields (``ecg.code_paths``) hold one of the ECG codes,
of this patient, not ``entered-in-error``/``cancelled``/``superseded``/``not-done``. Their time:
Observation ``effective[x]`` then ``issued``; Media ``created[x]`` then ``issued``;
DocumentReference ``context.period.start`` then ``date``. Only ECGs at most
``ecg.max_age_minutes`` old at ``now`` (and at most :data:`FUTURE_TOLERANCE` in the future) count;
none → :class:`NoEcgError`. The newest is decoded; **if it is rejected, the next newest is tried**,
so one corrupt upload does not hide a good recording taken minutes earlier; if every candidate is
rejected, the newest one's :class:`EcgRejected` is raised (its ``reason`` names why).

Decoding: Observation ``component[].valueSampledData`` (lead from the MDC code, else a code
display/text that names a lead); Media ``content`` and DocumentReference ``content[].attachment``
(an attachment with an accepted ``contentType`` first) as inline ``data`` or a ``url`` fetched
through ``binary_loader``, at most ``ecg.max_attachment_bytes``, read by the reader that
recognises the bytes (:func:`cds_service.ecg.readers.read_file`; the content type is a hint).
Then :func:`cds_service.ecg.canonical.to_model_leads` names, derives and checks the leads. Any
failure while decoding, expected or not, rejects that ECG; it never fails the hook call.

**Where decoding runs.** Attachments are fetched here (the FHIR client lives in this process);
the bytes or the named components become a :class:`~cds_service.ecg.isolation.DecodeJob`. Given a
:class:`~cds_service.ecg.isolation.Decoder` (the service's), the job is decoded in its worker
processes and abandoned at ``deadline`` (``decode_timeout``); without one (command-line paths) it
is decoded in this process. Once the deadline has passed, older candidates are not tried.

**Patient binding** (:func:`names_other_patient`). A resource whose ``subject`` (or, lacking one,
``patient``) reference does not name the context patient is never a candidate: the reference must
be ``Patient/<id>``, optionally versioned (``/_history/<v>``) or absolute
(``https://ehr/fhir/Patient/<id>``; any base, since an EHR may write its own base in several
spellings), with exactly that id. ``urn:uuid:``/``urn:oid:`` references (Bundle-internal; prefetch
and search results carry resolved references), contained (``#x``) references, other resource
types, other ids and malformed subjects are another patient as far as this service can tell, and
are ignored. A resource without a subject reference (absent, or identifier only) is kept: it came
from a query scoped to the patient, and nothing in it names anyone else.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from cds_service.ecg.isolation import DecodeJob, Decoder, decode
from cds_service.ecg.readers.sampled_data import lead_components
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits
from cds_service.fhir_values import as_list, as_text, first_time, has_code, reference, usable
from fhir_mappings.errors import EcglabError
from fhir_mappings.leads import canonical_lead

__all__ = [
    "DOCUMENT_TIME",
    "FUTURE_TOLERANCE",
    "MEDIA_TIME",
    "OBSERVATION_TIME",
    "EcgRecord",
    "NoEcgError",
    "lead_aliases",
    "names_other_patient",
    "read_limits",
    "recorded_at",
    "select_ecg",
    "within_max_age",
]

log = logging.getLogger(__name__)

FUTURE_TOLERANCE: timedelta = timedelta(minutes=5)
"""An ECG stamped this far after ``now`` is still accepted (clock skew between systems)."""

UNPACK_FACTOR: int = 4
"""A compressed ECG (a zipped WFDB record) may unpack to this many times ``max_attachment_bytes``."""

OBSERVATION_TIME: tuple[str, ...] = (
    "effectiveDateTime",
    "effectivePeriod.start",
    "effectivePeriod.end",
    "effectiveInstant",
    "issued",
)
"""Where an Observation's time is, in order of preference (also used for metadata Observations)."""
MEDIA_TIME: tuple[str, ...] = ("createdDateTime", "createdPeriod.start", "issued")
DOCUMENT_TIME: tuple[str, ...] = ("context.period.start", "date")
RECORDING_TIME: dict[str, tuple[str, ...]] = {
    "Observation": OBSERVATION_TIME,
    "Media": MEDIA_TIME,
    "DocumentReference": DOCUMENT_TIME,
}
"""Where each ECG carrier's recording time is (module docstring)."""


def recorded_at(resource: Mapping[str, Any]) -> datetime | None:
    """The recording time of an ECG carrier (Observation, Media, DocumentReference); ``None`` without one."""
    times = RECORDING_TIME.get(str(resource.get("resourceType")))
    return first_time(resource, times) if times is not None else None


def within_max_age(at: datetime, now: datetime, ecg: Any) -> bool:
    """Whether an ECG recorded ``at`` counts at ``now``: at most ``ecg.max_age_minutes`` old, and at
    most :data:`FUTURE_TOLERANCE` in the future."""
    return now - timedelta(minutes=int(ecg.max_age_minutes)) <= at <= now + FUTURE_TOLERANCE


_PATIENT_REFERENCE = re.compile(
    r"(?:[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#]+(?:/[^\s/?#]+)*/)?"
    r"Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?"
)
"""A reference to a Patient, relative or absolute, optionally versioned; group 1 is the id."""


class NoEcgError(EcglabError):
    """The patient has no ECG recent enough (or none at all): there is nothing to predict from."""


@dataclass
class EcgRecord:
    """The chosen ECG: (T, 12) float32 mV in ``lead_names`` order at ``fs`` Hz, with provenance."""

    signal: npt.NDArray[np.float32]
    fs: float
    lead_names: tuple[str, ...]
    recorded_at: datetime
    reference: str
    carrier: str


@dataclass(frozen=True)
class _Candidate:
    resource: Mapping[str, Any]
    carrier: str
    recorded_at: datetime | None


def read_limits(ecg: Any) -> ReadLimits:
    """The reader bounds for an ``ecg.yaml`` spec: its attachment size, and 4× that unpacked."""
    limit = int(ecg.max_attachment_bytes)
    return ReadLimits(max_bytes=limit, max_unpacked_bytes=UNPACK_FACTOR * limit)


def lead_aliases(ecg: Any) -> dict[str, list[str]]:
    """Every other name of each model lead in an ``ecg.yaml`` spec: its aliases and MDC code/display."""
    aliases = {lead: list(names) for lead, names in ecg.lead_aliases.items()}
    for lead, coding in ecg.mdc_lead_codes.items():
        aliases.setdefault(lead, []).extend(str(v) for v in (coding.code, coding.display) if v)
    return aliases


def names_other_patient(resource: Mapping[str, Any], patient_id: str) -> bool:
    """Whether the resource's subject (or patient) reference is not ``Patient/<patient_id>``.

    The rules are in the module docstring ("Patient binding"); ids are compared exactly.
    """
    subject = resource.get("subject")
    if subject is None:
        subject = resource.get("patient")
    if subject is None:
        return False
    if not isinstance(subject, Mapping):
        return True
    ref = subject.get("reference")
    if ref is None:
        return False  # identifier-only (logical) reference: nothing names another patient
    if not isinstance(ref, str):
        return True
    match = _PATIENT_REFERENCE.fullmatch(ref.strip())
    return match is None or match.group(1) != patient_id


def _ecg_candidates(
    resources: Iterable[Mapping[str, Any]], ecg: Any, patient_id: str | None
) -> list[_Candidate]:
    """ECG resources (any carrier) of this patient, with their recording time."""
    found: list[_Candidate] = []
    others = 0
    for resource in resources:
        if not isinstance(resource, Mapping) or not usable(resource):
            continue
        if patient_id is not None and names_other_patient(resource, patient_id):
            others += 1
            continue
        kind = resource.get("resourceType")
        if kind == "Observation":
            carrier, codes = "observation", ecg.observation_codes
        elif kind == "Media":
            carrier, codes = "media", ecg.media_codes
        elif kind == "DocumentReference":
            carrier, codes = "documentreference", ecg.document_codes
        else:
            continue
        if not any(has_code(resource.get(path), codes) for path in ecg.code_paths[carrier]):
            continue
        found.append(_Candidate(resource, carrier, recorded_at(resource)))
    if others:
        log.warning("ignored %d ECG resource(s) naming another patient than the hook context", others)
    return found


def _lead_of(ecg: Any, aliases: Mapping[str, list[str]]) -> Callable[[Mapping[str, Any]], str | None]:
    """Lead name of a component code: an MDC lead coding, else a display/code/text that names a lead."""

    def lead(code: Mapping[str, Any]) -> str | None:
        codings = [c for c in as_list(code.get("coding")) if isinstance(c, Mapping)]
        for coding in codings:
            found = ecg.lead_for_coding(as_text(coding.get("system")), as_text(coding.get("code")))
            if found:
                return str(found)
        names = [coding.get(key) for coding in codings for key in ("display", "code")] + [code.get("text")]
        for name in names:
            if isinstance(name, str) and canonical_lead(name, aliases) is not None:
                return name  # as the source spells it: a sign ("-aVR") is resolved with the others
        return None

    return lead


def _attachment_bytes(
    attachment: Mapping[str, Any], limit: int, loader: Callable[[str], bytes] | None
) -> bytes:
    """The bytes of an Attachment: inline base64 ``data`` or ``url`` through ``loader``; size-limited."""
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


def _attachment(candidate: _Candidate, ecg: Any) -> Mapping[str, Any]:
    """The attachment of a Media or DocumentReference; of several, the first with an accepted type."""
    resource = candidate.resource
    if candidate.carrier == "media":
        content = resource.get("content")
        if not isinstance(content, Mapping):
            raise EcgRejected("no_attachment", "Media has no content attachment")
        return content
    attachments = [
        c["attachment"]
        for c in as_list(resource.get("content"))
        if isinstance(c, Mapping) and isinstance(c.get("attachment"), Mapping)
    ]
    if not attachments:
        raise EcgRejected("no_attachment", "DocumentReference has no content attachment")
    readable = [a for a in attachments if ecg.attachment_format(as_text(a.get("contentType"))) is not None]
    return readable[0] if readable else attachments[0]


def _job(candidate: _Candidate, ecg: Any, loader: Callable[[str], bytes] | None) -> DecodeJob:
    """What decoding the candidate needs: its bytes (fetched here) or its named lead components."""
    limits = read_limits(ecg)
    aliases = lead_aliases(ecg)
    min_duration_s = float(ecg.min_duration_s)
    if candidate.carrier == "observation":
        components = [c for c in as_list(candidate.resource.get("component")) if isinstance(c, Mapping)]
        leads = tuple(lead_components(components, _lead_of(ecg, aliases)))
        return DecodeJob(limits, aliases, min_duration_s, leads=leads)
    attachment = _attachment(candidate, ecg)
    content = _attachment_bytes(attachment, limits.max_bytes, loader)
    hint = ecg.attachment_format(as_text(attachment.get("contentType")))
    return DecodeJob(limits, aliases, min_duration_s, data=content, hint=hint)


def _decode(
    candidate: _Candidate,
    ecg: Any,
    loader: Callable[[str], bytes] | None,
    decoder: Decoder | None,
    deadline: float | None,
) -> EcgRecording:
    """The candidate's recording with the 12 model leads (raises :class:`EcgRejected`)."""
    job = _job(candidate, ecg, loader)
    return decoder.decode(job, deadline) if decoder is not None else decode(job)


def select_ecg(
    resources: Iterable[Mapping[str, Any]],
    ecg: Any,
    *,
    now: datetime,
    patient_id: str | None = None,
    binary_loader: Callable[[str], bytes] | None = None,
    decoder: Decoder | None = None,
    deadline: float | None = None,
) -> EcgRecord:
    """The newest usable ECG within the maximum age (see the module docstring).

    Args:
        resources: the patient's ECG resources (any carrier; others are ignored).
        ecg: the ``ecg.yaml`` spec (``load_mappings().ecg``).
        now: the reference time for the maximum age.
        patient_id: the context patient's id; resources naming another patient are ignored
            (:func:`names_other_patient`). ``None``: no binding (the caller has bound the data).
        binary_loader: fetches attachment URLs.
        decoder: decodes in worker processes; ``None``: in this process.
        deadline: :func:`time.monotonic` instant at which decoding is abandoned
            (``decode_timeout``); used by ``decoder`` only.

    Raises:
        NoEcgError: no ECG resource recent enough.
        EcgRejected: every recent ECG is unusable; the newest one's reason.
    """
    candidates = _ecg_candidates(resources, ecg, patient_id)
    recent = sorted(
        (c for c in candidates if c.recorded_at is not None and within_max_age(c.recorded_at, now, ecg)),
        key=lambda c: c.recorded_at or now,
        reverse=True,
    )
    if not recent:
        undated = [c for c in candidates if c.recorded_at is None]
        if undated:
            raise EcgRejected(
                "no_time", "ECG resource carries no recording time", reference(undated[0].resource)
            )
        raise NoEcgError(
            f"no ECG recorded in the last {int(ecg.max_age_minutes)} minutes ({len(candidates)} older or future-dated)"
        )
    rejections: list[EcgRejected] = []
    for candidate in recent:
        ref = reference(candidate.resource)
        if rejections and deadline is not None and time.monotonic() >= deadline:
            break  # no time left for an older one; the newest one's reason stands
        try:
            recording = _decode(candidate, ecg, binary_loader, decoder, deadline)
        except EcgRejected as exc:
            rejection = exc
        except Exception as exc:  # a decoding bug on hostile input rejects this ECG only
            # The type only: an exception's text may quote the file's content.
            log.warning("ECG %s: unexpected %s while decoding", candidate.carrier, type(exc).__name__)
            rejection = EcgRejected("unreadable", f"decoding failed ({type(exc).__name__})")
        else:
            assert candidate.recorded_at is not None
            return EcgRecord(
                recording.signal,
                recording.fs,
                recording.lead_names,
                candidate.recorded_at,
                ref,
                candidate.carrier,
            )
        log.warning("ECG %s rejected (%s); trying an older one", candidate.carrier, rejection.reason)
        rejections.append(EcgRejected(rejection.reason, str(rejection), ref))
    newest = rejections[0]
    if len(rejections) > 1:
        raise EcgRejected(newest.reason, f"{newest} (and {len(rejections) - 1} older ECG(s) rejected too)")
    raise newest
