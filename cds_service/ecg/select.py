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
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from cds_service.ecg.canonical import to_model_leads
from cds_service.ecg.readers import read_file
from cds_service.ecg.readers.sampled_data import read_components
from cds_service.ecg.record import EcgRecording, EcgRejected, ReadLimits
from cds_service.fhir_values import as_list, as_text, first_time, has_code, of_patient, reference, usable
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
    "read_limits",
    "select_ecg",
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


def _ecg_candidates(
    resources: Iterable[Mapping[str, Any]], ecg: Any, patient_ref: str | None
) -> list[_Candidate]:
    """ECG resources (any carrier) of this patient, with their recording time."""
    found: list[_Candidate] = []
    for resource in resources:
        if not isinstance(resource, Mapping) or not usable(resource) or not of_patient(resource, patient_ref):
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
        if not any(has_code(resource.get(path), codes) for path in ecg.code_paths[carrier]):
            continue
        found.append(_Candidate(resource, carrier, first_time(resource, times)))
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


def _decode(candidate: _Candidate, ecg: Any, loader: Callable[[str], bytes] | None) -> EcgRecording:
    """The candidate's recording with the 12 model leads (raises :class:`EcgRejected`)."""
    limits = read_limits(ecg)
    aliases = lead_aliases(ecg)
    if candidate.carrier == "observation":
        components = [c for c in as_list(candidate.resource.get("component")) if isinstance(c, Mapping)]
        recording = read_components(components, _lead_of(ecg, aliases), limits)
    else:
        attachment = _attachment(candidate, ecg)
        content = _attachment_bytes(attachment, limits.max_bytes, loader)
        hint = ecg.attachment_format(as_text(attachment.get("contentType")))
        recording = read_file(content, limits, hint)
    return to_model_leads(recording, aliases, min_duration_s=float(ecg.min_duration_s))


def select_ecg(
    resources: Iterable[Mapping[str, Any]],
    ecg: Any,
    *,
    now: datetime,
    patient_ref: str | None = None,
    binary_loader: Callable[[str], bytes] | None = None,
) -> EcgRecord:
    """The newest usable ECG within the maximum age (see the module docstring).

    Args:
        resources: the patient's ECG resources (any carrier; others are ignored).
        ecg: the ``ecg.yaml`` spec (``load_mappings().ecg``).
        now: the reference time for the maximum age.
        patient_ref: ``Patient/<id>``; resources of another patient are ignored.
        binary_loader: fetches attachment URLs.

    Raises:
        NoEcgError: no ECG resource recent enough.
        EcgRejected: every recent ECG is unusable; the newest one's reason.
    """
    candidates = _ecg_candidates(resources, ecg, patient_ref)
    oldest = now - timedelta(minutes=int(ecg.max_age_minutes))
    recent = sorted(
        (
            c
            for c in candidates
            if c.recorded_at is not None and oldest <= c.recorded_at <= now + FUTURE_TOLERANCE
        ),
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
        try:
            recording = _decode(candidate, ecg, binary_loader)
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
