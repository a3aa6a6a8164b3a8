"""The CDS services of the discovery document and the contract of a hook request.

Three services, one per hook (cdshooks.md §0.2): ``ecglab-patient-view``, ``ecglab-order-select``
and ``ecglab-order-sign``, all with the same prefetch templates (:mod:`cds_service.prefetch`).

:func:`parse_hook_request` validates a request body (400, :class:`BadHookRequest`, naming the
field at fault): ``hook``/``hookInstance``/``context`` present, ``hook`` matching the service,
``context.patientId`` a usable FHIR id, ``prefetch`` an object, ``fhirServer`` an absolute
http(s) URL. Unknown fields and vendor extensions are accepted; ``draftOrders`` missing on an
order hook is read as "no draft orders" (Epic only sends it to services authorised for unsigned
orders). Every refusal is answered with an :func:`operation_outcome`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from cds_service.observability import log_safe
from fhir_mappings.errors import EcglabError

log = logging.getLogger(__name__)

FHIR_ID = re.compile(r"(?!\.+$)[A-Za-z0-9\-.]{1,256}")
BEARER_TOKEN = re.compile(r"[\x20-\x7e]{1,16384}")
USER_REF = re.compile(r"(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-.]{1,256}")


@dataclass(frozen=True)
class ServiceDef:
    """One CDS service of the discovery document."""

    id: str
    hook: str
    title: str
    description: str


USAGE = (
    "Needs the Patient, vital-sign and biometric Observations, the newest 12-lead ECG (Observation, Media "
    "or DocumentReference), recent lab results and active lab orders: through prefetch or through "
    "fhirServer + fhirAuthorization (read access to Patient, Observation, Media, DocumentReference, "
    "ServiceRequest, Binary). Without either it answers HTTP 412."
)

SERVICES: dict[str, ServiceDef] = {
    s.id: s
    for s in (
        ServiceDef(
            "ecglab-patient-view",
            "patient-view",
            "ECG-based lab test recommendations (chart open)",
            "Estimates from the newest 12-lead ECG and basic patient data which lab values are likely abnormal "
            "now or within 30/60/120 minutes, and suggests ordering those tests.",
        ),
        ServiceDef(
            "ecglab-order-select",
            "order-select",
            "ECG-based lab test recommendations (ordering)",
            "While orders are being selected, suggests lab tests the ECG model flags as likely abnormal now or "
            "soon; tests already among the draft orders, ordered or recently resulted are not suggested.",
        ),
        ServiceDef(
            "ecglab-order-sign",
            "order-sign",
            "ECG-based lab test recommendations (signing)",
            "Final check before signing: suggests lab tests the ECG model flags as likely abnormal now or soon "
            "that are not yet in the order set, ordered or recently resulted.",
        ),
    )
}


# -- errors and outcomes -----------------------------------------------------------------------------


class HookError(EcglabError):
    """A request the pipeline answers with an HTTP error and an OperationOutcome."""

    status = 400
    issue_code = "invalid"

    def __init__(self, message: str, *, diagnostics: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.diagnostics = diagnostics


class BadHookRequest(HookError):
    """400: the body is not a usable CDS Hooks request."""


class PreconditionFailed(HookError):
    """412: required data is neither in the prefetch nor obtainable from the FHIR server."""

    status = 412
    issue_code = "processing"


def operation_outcome(
    message: str, *, code: str = "processing", diagnostics: str | None = None
) -> dict[str, Any]:
    """A one-issue FHIR OperationOutcome (the body of every non-2xx answer)."""
    issue: dict[str, Any] = {"severity": "error", "code": code, "details": {"text": message}}
    if diagnostics:
        issue["diagnostics"] = diagnostics
    return {"resourceType": "OperationOutcome", "issue": [issue]}


# -- request validation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HookRequest:
    """The parts of a CDS Hooks request the pipeline uses (everything else is ignored, not refused)."""

    hook: str
    hook_instance: str
    patient_id: str
    encounter_id: str | None
    user_ref: str | None
    draft_orders: tuple[Mapping[str, Any], ...]
    fhir_server: str | None
    access_token: str | None
    prefetch: Mapping[str, Any] | None


def _nonempty_str(value: Any) -> bool:
    """Whether ``value`` is a string with something other than blanks."""
    return isinstance(value, str) and bool(value.strip())


def parse_hook_request(body: Any, service: ServiceDef) -> HookRequest:
    """Validate a hook request body for ``service``; :class:`BadHookRequest` names the field at fault."""
    if not isinstance(body, dict):
        raise BadHookRequest("request body must be a JSON object")
    for name in ("hook", "hookInstance"):
        if not _nonempty_str(body.get(name)):
            raise BadHookRequest(f"'{name}' is required and must be a non-empty string")
    if not _storable(body["hookInstance"]):  # it is stored with every issued card
        raise BadHookRequest("'hookInstance' must be valid Unicode text without NUL characters")
    if not isinstance(body.get("context"), dict):
        raise BadHookRequest("'context' is required and must be an object")
    if body["hook"] != service.hook:
        raise BadHookRequest(
            f"service {service.id} answers the {service.hook} hook, not {log_safe(body['hook'])}"
        )
    context: dict[str, Any] = body["context"]
    patient_id = context.get("patientId")
    if not isinstance(patient_id, str) or not FHIR_ID.fullmatch(patient_id):
        raise BadHookRequest("'context.patientId' is required and must be a FHIR resource id")
    encounter = context.get("encounterId")
    encounter_id = encounter if isinstance(encounter, str) and FHIR_ID.fullmatch(encounter) else None
    user = context.get("userId")
    user_ref = user if isinstance(user, str) and USER_REF.fullmatch(user) else None
    draft_orders = _draft_orders(context.get("draftOrders"))
    prefetch = body.get("prefetch")
    if prefetch is not None and not isinstance(prefetch, dict):
        raise BadHookRequest("'prefetch' must be an object of key -> resource")
    fhir_server = body.get("fhirServer")
    if fhir_server is not None and not _usable_url(fhir_server):
        raise BadHookRequest("'fhirServer' must be an absolute http(s) URL")
    authorization = body.get("fhirAuthorization")
    access_token = None
    if authorization is not None:
        if not isinstance(authorization, dict):
            raise BadHookRequest("'fhirAuthorization' must be an object")
        token = authorization.get("access_token")
        access_token = token if _nonempty_str(token) else None
        if access_token is not None and not BEARER_TOKEN.fullmatch(access_token):
            # An HTTP header carries printable ASCII only: such a token cannot be sent, so it counts
            # as absent (the call may still be answered from the prefetch, else it is a 412).
            log.info("fhirAuthorization.access_token is not printable ASCII; treated as absent")
            access_token = None
    return HookRequest(
        hook=body["hook"],
        hook_instance=body["hookInstance"],
        patient_id=patient_id,
        encounter_id=encounter_id,
        user_ref=user_ref,
        draft_orders=draft_orders,
        fhir_server=fhir_server.rstrip("/") if isinstance(fhir_server, str) else None,
        access_token=access_token,
        prefetch=prefetch,
    )


def _storable(text: str) -> bool:
    """Whether a database can store ``text``: encodable as UTF-8 (no lone surrogates), no NUL."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _usable_url(value: Any) -> bool:
    """Whether ``value`` is an absolute http(s) URL that urllib and httpx both accept (port in range)."""
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a port out of range
        httpx.URL(value)
    except (ValueError, httpx.InvalidURL):
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _draft_orders(value: Any) -> tuple[Mapping[str, Any], ...]:
    """Every resource in ``context.draftOrders`` (a Bundle, ``type`` optional as the Sandbox omits it)."""
    if value is None:
        return ()
    if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
        raise BadHookRequest("'context.draftOrders' must be a FHIR Bundle")
    entries = value.get("entry") or []
    if not isinstance(entries, list):
        raise BadHookRequest("'context.draftOrders.entry' must be a list")
    resources = []
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict):
            resources.append(resource)
    return tuple(resources)
