"""The CDS services and the hook pipeline: request → data → model inputs → predictions → cards.

Three services, one per hook (cdshooks.md §0.2): ``ecglab-patient-view``, ``ecglab-order-select``
and ``ecglab-order-sign``, all with the same prefetch templates (:mod:`cds_service.prefetch`).

:meth:`HookPipeline.handle` runs one call:

1. **Validate** the request (400): ``hook``/``hookInstance``/``context`` present, ``hook``
   matching the service, ``context.patientId`` a usable FHIR id, ``prefetch`` an object. Unknown
   fields and vendor extensions are accepted; ``draftOrders`` missing on an order hook is read as
   "no draft orders" (Epic only sends it to services authorised for unsigned orders).
2. **Decide data access** (cdshooks.md §0.3): prefetch keys present are used (``null`` = nothing
   found); absent keys and OperationOutcome values are fetched from ``fhirServer`` with the
   ``fhirAuthorization`` token, but only when that server is allowed for the caller
   (:meth:`Authenticator.fhir_server_allowed`); otherwise the answer is **412** with an
   OperationOutcome naming the missing keys, and no outbound call is made.
3. **Fetch** the missing parts within the time budget: all of them through
   :meth:`FhirClient.fetch_patient_data` when nothing was prefetched, else just the missing keys'
   queries, in parallel. An unreachable or refusing server is a 412 (the data cannot be obtained);
   a FHIR timeout counts as the budget running out.
4. **Extract** the model inputs. No ECG, or none recent enough, or a rejected ECG: 200 with no
   cards and a log line naming the reason; that is an answer ("no advice"), not an error.
5. **Predict** with the runtime and **build the cards** (:mod:`cds_service.cards`).

Steps 3–5 run on a worker thread bounded by ``ECGLAB_BUDGET_MS``: past the budget the call
answers ``{"cards": []}`` and logs it. A bug or a model failure is a logged 500 with an
OperationOutcome (never a stack trace in the body), unless ``ECGLAB_FAIL_QUIET`` is on, in which
case it is a logged 200 with no cards.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine

from cds_service.auth import Authenticator, Caller
from cds_service.cards import BuiltCard, CardContext, ModelFacts, build_cards
from cds_service.db import IssuedCard, insert_ignoring_duplicates
from cds_service.observability import CARDS, FHIR_SECONDS, HOOK_OUTCOMES, INFERENCE_SECONDS, log_safe
from cds_service.prefetch import DecodedPrefetch, PrefetchQuery, assemble, decode_prefetch
from cds_service.settings import Settings
from fhir_mappings import Mappings
from fhir_mappings.errors import EcglabError

if TYPE_CHECKING:
    from cds_service.features import ModelInputs
    from cds_service.inference import TargetPrediction

log = logging.getLogger(__name__)

FHIR_ID = re.compile(r"(?!\.+$)[A-Za-z0-9\-.]{1,256}")
BEARER_TOKEN = re.compile(r"[\x20-\x7e]{1,16384}")
USER_REF = re.compile(r"(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-.]{1,256}")


class ModelRuntimeLike(Protocol):
    """What the service needs from a model runtime (:class:`cds_service.inference.ModelRuntime` or a test double)."""

    @property
    def version(self) -> str:
        """Model version, stated on cards and recorded with issued cards."""
        ...

    @property
    def trained_on_synthetic(self) -> bool:
        """True for a demo model: cards then carry a not-for-clinical-use warning."""
        ...

    @property
    def provider(self) -> str:
        """ONNX Runtime execution provider in use (reported by /healthz)."""
        ...

    def predict(self, inputs: ModelInputs) -> list[TargetPrediction]:
        """Every target's probability with its decision threshold, for one patient's inputs."""
        ...


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


class BudgetExceeded(EcglabError):
    """The call ran out of its time budget; it answers with no cards."""


def operation_outcome(
    message: str, *, code: str = "processing", diagnostics: str | None = None
) -> dict[str, Any]:
    """A one-issue FHIR OperationOutcome (the body of every non-2xx answer)."""
    issue: dict[str, Any] = {"severity": "error", "code": code, "details": {"text": message}}
    if diagnostics:
        issue["diagnostics"] = diagnostics
    return {"resourceType": "OperationOutcome", "issue": [issue]}


@dataclass
class HookResult:
    """What one hook call answers, and how it went (for metrics and logs)."""

    status: int
    body: dict[str, Any]
    outcome: str
    cards: list[BuiltCard] = field(default_factory=list)


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


# -- the pipeline -------------------------------------------------------------------------------------


@dataclass
class PipelineDeps:
    """Everything a hook call needs; built once per app (see :func:`cds_service.app.create_app`).

    ``fhir_transport`` is handed to every :class:`FhirClient` (tests inject an
    ``httpx.MockTransport``); ``clock`` gives "now" for the ECG age and the recent-result window.
    """

    settings: Settings
    mappings: Mappings
    runtime: ModelRuntimeLike
    queries: tuple[PrefetchQuery, ...]
    engine: Engine
    authenticator: Authenticator
    executor: concurrent.futures.ThreadPoolExecutor
    fhir_executor: concurrent.futures.ThreadPoolExecutor
    fhir_transport: httpx.BaseTransport | None = None
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)


class HookPipeline:
    """Runs hook calls; one instance per app, shared by request threads."""

    def __init__(self, deps: PipelineDeps) -> None:
        self.deps = deps

    # -- entry point -----------------------------------------------------------------------------
    def handle(self, service: ServiceDef, body: Any, caller: Caller) -> HookResult:
        """Answer one hook call (never raises: every failure becomes a status + OperationOutcome)."""
        started = time.monotonic()
        deadline = started + self.deps.settings.budget_ms / 1000.0
        try:
            request = parse_hook_request(body, service)
            decoded = decode_prefetch(request.prefetch, self.deps.queries)
            for key, note in decoded.notes.items():
                log.info("prefetch key %s unusable (%s); treated as absent", key, note)
            can_fetch = self._may_fetch(request, caller, needed=bool(decoded.missing))
            if decoded.missing and not can_fetch:
                raise PreconditionFailed(
                    "Required data is missing from the prefetch and the FHIR server cannot be queried.",
                    diagnostics="prefetch keys absent or unusable: "
                    + ", ".join(decoded.missing)
                    + "; send them, or send fhirServer and fhirAuthorization",
                )
            work = contextvars.copy_context()
            future = self.deps.executor.submit(
                work.run, self._evaluate, service, request, decoded, can_fetch, deadline
            )
            try:
                result = future.result(timeout=max(deadline - time.monotonic(), 0.0))
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise BudgetExceeded("the hook call exceeded its time budget") from None
        except HookError as exc:
            log.info("hook call answered %d: %s", exc.status, exc.message)
            outcome = "precondition_failed" if exc.status == 412 else "bad_request"
            body_out = operation_outcome(exc.message, code=exc.issue_code, diagnostics=exc.diagnostics)
            return HookResult(exc.status, body_out, outcome)
        except BudgetExceeded:
            log.warning(
                "time budget of %d ms exceeded after %.0f ms; answering with no cards",
                self.deps.settings.budget_ms,
                1000 * (time.monotonic() - started),
            )
            return HookResult(200, {"cards": []}, "budget_exceeded")
        except Exception:
            if self.deps.settings.fail_quiet:
                log.exception("hook call failed; ECGLAB_FAIL_QUIET is on, answering with no cards")
                return HookResult(200, {"cards": []}, "error")
            log.exception("hook call failed")
            return HookResult(
                500,
                operation_outcome("Internal error; the service log has the details.", code="exception"),
                "error",
            )
        self._record(service, request, result.cards)
        return result

    def _may_fetch(self, request: HookRequest, caller: Caller, *, needed: bool) -> bool:
        """Whether the FHIR server may be queried for this request (logged when it may not)."""
        if request.fhir_server is None or request.access_token is None:
            return False
        if not self.deps.authenticator.fhir_server_allowed(caller, request.fhir_server):
            if needed:
                parts = urlsplit(request.fhir_server)
                log.warning(
                    "fhirServer %s://%s is not allowed for iss=%s; no outbound call",
                    parts.scheme,
                    log_safe(parts.netloc),
                    log_safe(caller.iss),
                )
            return False
        return True

    # -- worker-thread part -----------------------------------------------------------------------
    def _evaluate(
        self,
        service: ServiceDef,
        request: HookRequest,
        decoded: DecodedPrefetch,
        can_fetch: bool,
        deadline: float,
    ) -> HookResult:
        """Steps 3-5 on a worker thread: fetch what is missing, extract inputs, predict, build cards."""
        from cds_service.features import EcgRejected, NoEcgError, extract_model_inputs

        client = self._client(request, deadline) if can_fetch else None
        try:
            data = self._gather(request, decoded, client, deadline)
            loader = None
            if client is not None:
                loader = client.binary_loader(self.deps.mappings.ecg.max_attachment_bytes, deadline=deadline)
            now = self.deps.clock()
            try:
                inputs = extract_model_inputs(
                    data, mappings=self.deps.mappings, now=now, binary_loader=loader
                )
            except NoEcgError as exc:
                log.info("no usable ECG (%s); no cards", exc)
                return HookResult(200, {"cards": []}, "no_ecg")
            except EcgRejected as exc:
                log.info("ECG rejected (reason=%s); no cards", log_safe(getattr(exc, "reason", "unknown")))
                return HookResult(200, {"cards": []}, "ecg_rejected")
        finally:
            if client is not None:
                client.close()
        if time.monotonic() > deadline:
            raise BudgetExceeded("budget spent before inference")
        t0 = time.perf_counter()
        predictions = self.deps.runtime.predict(inputs)
        INFERENCE_SECONDS.observe(time.perf_counter() - t0)
        runtime = self.deps.runtime
        manifest = getattr(runtime, "manifest", None)
        model = ModelFacts(
            name=str(getattr(manifest, "name", "ecglab")),
            version=str(runtime.version),
            synthetic=bool(runtime.trained_on_synthetic),
        )
        ctx = CardContext(
            service_id=service.id,
            hook_instance=request.hook_instance,
            patient_id=request.patient_id,
            encounter_id=request.encounter_id,
            user_ref=request.user_ref,
            draft_orders=request.draft_orders,
            now=now,
        )
        cards = build_cards(
            predictions,
            inputs=inputs,
            data=data,
            ctx=ctx,
            mappings=self.deps.mappings,
            settings=self.deps.settings,
            model=model,
        )
        return HookResult(200, {"cards": [c.card for c in cards]}, "cards" if cards else "no_cards", cards)

    def _client(self, request: HookRequest, deadline: float) -> Any:
        """A FhirClient for the request's fhirServer and token, its timeout capped by the budget left."""
        from cds_service.fhir_client import FhirClient

        assert request.fhir_server is not None  # guarded by _may_fetch
        timeout = min(self.deps.settings.fhir_timeout_ms / 1000.0, max(deadline - time.monotonic(), 0.01))
        return FhirClient(
            request.fhir_server, request.access_token, timeout=timeout, transport=self.deps.fhir_transport
        )

    def _gather(self, request: HookRequest, decoded: DecodedPrefetch, client: Any, deadline: float) -> Any:
        """PatientData from the prefetch plus whatever had to be fetched."""
        if not decoded.missing:
            return assemble(decoded.resources, self.deps.queries)
        from cds_service.fhir_client import FhirError, FhirTimeout
        from fhir_mappings.errors import InputError

        t0 = time.perf_counter()
        try:
            if len(decoded.missing) == len(self.deps.queries):
                return client.fetch_patient_data(request.patient_id, self.deps.mappings, deadline=deadline)
            fetched = self._fetch_keys(client, request.patient_id, decoded.missing, deadline)
        except FhirTimeout:
            raise BudgetExceeded("FHIR fetch ran past the budget") from None
        except FhirError as exc:
            status = f" (HTTP {exc.status})" if exc.status else ""
            raise PreconditionFailed(
                "Required data could not be read from the FHIR server.",
                diagnostics=f"{type(exc).__name__}{status} while fetching: " + ", ".join(decoded.missing),
            ) from None
        except InputError:
            raise PreconditionFailed(
                "Required data could not be read from the FHIR server.",
                diagnostics="context.patientId cannot be used in a FHIR query",
            ) from None
        finally:
            FHIR_SECONDS.observe(time.perf_counter() - t0)
        return assemble({**decoded.resources, **fetched}, self.deps.queries)

    def _fetch_keys(
        self, client: Any, patient_id: str, keys: Sequence[str], deadline: float
    ) -> dict[str, list[dict[str, Any]]]:
        """Run the queries of the missing prefetch keys concurrently; the first failure wins."""
        from cds_service.fhir_client import FhirTimeout

        by_key = {q.key: q for q in self.deps.queries}
        futures: dict[concurrent.futures.Future[Any], str] = {}
        for key in keys:
            query = by_key[key]
            if query.read:
                future = self.deps.fhir_executor.submit(
                    client.read, query.resource_type, patient_id, deadline=deadline
                )
            else:
                future = self.deps.fhir_executor.submit(
                    client.search, query.resource_type, query.bind(patient_id), deadline=deadline
                )
            futures[future] = key
        remaining = max(deadline - time.monotonic(), 0.0)
        done, pending = concurrent.futures.wait(
            futures, timeout=remaining, return_when=concurrent.futures.FIRST_EXCEPTION
        )
        for future in pending:
            future.cancel()
        for future in done:
            error = future.exception()
            if error is not None:
                raise error
        if pending:
            raise FhirTimeout(f"{len(pending)} of {len(futures)} FHIR requests missed the deadline")
        out: dict[str, list[dict[str, Any]]] = {}
        for future, key in futures.items():
            value = future.result()
            out[key] = [value] if isinstance(value, dict) else list(value)
        return out

    # -- bookkeeping --------------------------------------------------------------------------------
    def _record(self, service: ServiceDef, request: HookRequest, cards: list[BuiltCard]) -> None:
        """Count the cards and store them for feedback analysis (a storage failure is logged, not fatal)."""
        for card in cards:
            CARDS.labels(service.id, card.lab_key).inc()
        if not cards or not self.deps.settings.record_cards:
            return
        issued = datetime.now(UTC)
        version = str(self.deps.runtime.version)
        rows = [
            {
                "card_uuid": c.card["uuid"],
                "suggestion_uuid": c.suggestion_uuid,
                "service_id": service.id,
                "hook_instance": request.hook_instance[:256],
                "lab_key": c.lab_key,
                "topic_code": c.topic_code,
                "indicator": c.indicator,
                "direction": c.direction,
                "horizon_min": c.horizon_min,
                "probability": float(c.probability),
                "decision_threshold": float(c.decision_threshold),
                "model_version": version[:64],
                "issued_at": issued,
            }
            for c in cards
        ]
        try:
            insert_ignoring_duplicates(self.deps.engine, IssuedCard.__table__, rows, "card_uuid")
        except Exception:
            log.exception("could not record %d issued card(s); answering anyway", len(rows))


def count_outcome(service_id: str, outcome: str) -> None:
    """Increment the per-service hook outcome counter."""
    HOOK_OUTCOMES.labels(service_id, outcome).inc()
