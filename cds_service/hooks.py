"""The hook pipeline: request → data → model inputs → predictions → cards.

The services and the request contract are in :mod:`cds_service.hook_request`;
:meth:`HookPipeline.handle` runs one call:

1. **Validate** the request (400, :func:`cds_service.hook_request.parse_hook_request`).
2. **Decide data access** (cdshooks.md §0.3): prefetch keys present are used (``null`` = nothing
   found); absent keys and OperationOutcome values are fetched from ``fhirServer`` with the
   ``fhirAuthorization`` token, but only when that server is allowed for the caller
   (:meth:`Authenticator.fhir_server_allowed`); otherwise the answer is **412** with an
   OperationOutcome naming the missing keys, and no outbound call is made.
3. **Fetch** exactly the missing keys within the time budget (every key when nothing was
   prefetched), in parallel on the app's FHIR pool, each with the query its prefetch template
   names plus a date filter from the pipeline's clock (:func:`cds_service.fetch.gather_patient_data`).
   An unreachable or refusing server is a 412 (the data cannot be obtained); a FHIR timeout
   counts as the budget running out.
4. **Reuse or extract.** With the prediction cache on (``ECGLAB_PREDICTION_CACHE_S``), it is
   consulted before the ECG is decoded (:func:`cds_service.fetch.probe_predictions`): a call
   whose inputs match a stored prediction (an order hook after patient-view on the same ECG)
   takes its predictions: no ECG decoding, no inference. Otherwise the model
   inputs are extracted (:func:`cds_service.fetch.model_inputs`, same clock reading). No ECG, or
   none recent enough, or a rejected ECG: 200 with no cards and a log line naming the reason;
   that is an answer ("no advice"), not an error.
5. **Predict** with the runtime (and store the prediction for later calls) and **build the
   cards** (:mod:`cds_service.cards`), each linked to the model card and naming the model's SHA-256.

**Controls** (:mod:`cds_service.controls`): one reading per call of the kill-switch file, made
stricter by ``ECGLAB_MODE`` (``off`` > ``shadow`` > ``live``: the stricter of the two applies).
``off``: the request is validated, nothing is fetched or predicted, the answer has no cards.
Disabled targets are dropped before the cards are built, disabled labs' cards after;
``shadow``: the cards are built and audited but the EHR receives ``{"cards": []}`` (outcome
``shadow``) and nothing is recorded as issued.

**Audit** (:mod:`cds_service.hook_audit`): every call whose request parsed, whatever its outcome
(412, no ECG, rejected ECG, budget, error, off included), is handed to the audit trail after the
answer is computed; the row is written on the audit thread. A call answered from a stored
prediction is audited with it and with the input facts stored alongside.

**FHIR connections** are pooled per ``fhirServer`` base URL in each worker
(:class:`cds_service.fhir_http.FhirConnections`, owned by the app); the token goes on each
request of its own call only. Every FHIR answer is capped at ``ECGLAB_MAX_BODY_MB``.

Steps 3–5 run on a worker thread bounded by ``ECGLAB_BUDGET_MS``: past the budget the call
answers ``{"cards": []}`` and logs it. A bug or a model failure is a logged 500 with an
OperationOutcome (never a stack trace in the body), unless ``ECGLAB_FAIL_QUIET`` is on, in which
case it is a logged 200 with no cards.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Engine

from cds_service.auth import Authenticator, Caller
from cds_service.cards import CARD_EXTENSION, BuiltCard, CardContext, ModelFacts, build_cards
from cds_service.controls import Controls, ControlState, Mode
from cds_service.db import IssuedCard, insert_ignoring_duplicates
from cds_service.ecg.isolation import Decoder
from cds_service.ecg.record import EcgRejected
from cds_service.features import NoEcgError
from cds_service.fetch import (
    CacheProbe,
    gather_patient_data,
    model_inputs,
    probe_predictions,
    remember_predictions,
)
from cds_service.fhir_client import FhirClient, FhirError, FhirTimeout, FhirUnauthorized
from cds_service.fhir_http import FhirConnections
from cds_service.governance import card_link
from cds_service.hook_audit import AuditTrail, CallFacts, CallTrace, InputFacts
from cds_service.hook_request import (
    HookError,
    HookRequest,
    PreconditionFailed,
    ServiceDef,
    operation_outcome,
    parse_hook_request,
)
from cds_service.observability import CARDS, FHIR_SECONDS, HOOK_OUTCOMES, INFERENCE_SECONDS, log_safe
from cds_service.patient_data import PatientData
from cds_service.prediction_cache import PredictionCache
from cds_service.prefetch import DecodedPrefetch, PrefetchQuery, decode_prefetch
from cds_service.settings import Settings
from cds_service.smart_backend import SmartBackendClient, SmartBackendError, TokenTimeout
from fhir_mappings import Mappings
from fhir_mappings.errors import EcglabError, InputError

if TYPE_CHECKING:
    from cds_service.features import ModelInputs
    from cds_service.inference import TargetPrediction

log = logging.getLogger(__name__)

#: How strict each control mode is: the stricter of ``ECGLAB_MODE`` and the controls file wins.
MODE_RANK = {"live": 0, "shadow": 1, "off": 2}


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


# -- outcomes --------------------------------------------------------------------------------------


class BudgetExceeded(EcglabError):
    """The call ran out of its time budget; it answers with no cards."""


@dataclass
class HookResult:
    """What one hook call answers, and how it went (for metrics and logs)."""

    status: int
    body: dict[str, Any]
    outcome: str
    cards: list[BuiltCard] = field(default_factory=list)
    trace: CallTrace = field(default_factory=CallTrace)


# -- the pipeline -------------------------------------------------------------------------------------


@dataclass
class PipelineDeps:
    """Everything a hook call needs; built once per app (see :func:`cds_service.app.create_app`).

    ``executor`` runs the calls within their budget, ``fhir_executor`` their FHIR requests (both
    owned and closed by the app). ``fhir_transport`` is handed to every :class:`FhirClient` (tests
    inject an ``httpx.MockTransport``). ``clock`` is the one "now" of a call, read once: it dates
    the self-fetched queries' filters, the ECG's maximum age, the feature windows, the
    recent-result window of the cards and the audit row. ``controls`` is the kill-switch file and
    ``audit`` the audit trail (both built by the app). ``smart_backend`` maps an issuer to its
    SMART Backend Services client: a call of that issuer naming one of its FHIR servers but
    carrying no ``fhirAuthorization`` is fetched with the service's own token.
    ``fhir_connections`` are the pooled HTTP clients every :class:`FhirClient` borrows (``None``:
    each call opens its own); ``predictions`` is the prediction cache (``None``: off); ``decoder``
    decodes ECG files in worker processes, abandoned at the call's deadline (``None``: in-process).
    """

    settings: Settings
    mappings: Mappings
    runtime: ModelRuntimeLike
    queries: tuple[PrefetchQuery, ...]
    engine: Engine
    authenticator: Authenticator
    executor: concurrent.futures.ThreadPoolExecutor
    fhir_executor: concurrent.futures.ThreadPoolExecutor
    controls: Controls
    audit: AuditTrail
    fhir_transport: httpx.BaseTransport | None = None
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    smart_backend: Mapping[str, SmartBackendClient] = field(default_factory=dict)
    fhir_connections: FhirConnections | None = None
    predictions: PredictionCache | None = None
    decoder: Decoder | None = None


class HookPipeline:
    """Runs hook calls; one instance per app, shared by request threads."""

    def __init__(self, deps: PipelineDeps) -> None:
        self.deps = deps

    # -- entry point -----------------------------------------------------------------------------
    def handle(self, service: ServiceDef, body: Any, caller: Caller) -> HookResult:
        """Answer one hook call (never raises: every failure becomes a status + OperationOutcome)."""
        started = time.monotonic()
        try:
            request = parse_hook_request(body, service)
        except HookError as exc:
            return self._refused(exc)
        except Exception:
            return self._failed()
        now = self.deps.clock()
        controls = self.control_state()
        result = self._answer(service, request, caller, started, now, controls)
        self._record(service, request, result.cards, issuer=caller.iss)
        self._audit(service, request, caller, result, started, now, controls)
        return result

    def control_state(self) -> ControlState:
        """The kill-switch state for one call: the controls file, made stricter by ``ECGLAB_MODE``."""
        state = self.deps.controls.current()
        floor: Mode = "shadow" if self.deps.settings.mode == "shadow" else "live"
        if MODE_RANK[state.mode] < MODE_RANK[floor]:
            state = dataclasses.replace(state, mode=floor)
        return state

    def _answer(
        self,
        service: ServiceDef,
        request: HookRequest,
        caller: Caller,
        started: float,
        now: datetime,
        controls: ControlState,
    ) -> HookResult:
        """The answer to a parsed request: cards, no cards or an error (see the module docstring)."""
        if not controls.runs_model:
            log.info("service switched off by the controls (%s); no cards", controls.source)
            return HookResult(200, {"cards": []}, "off")
        deadline = started + self.deps.settings.budget_ms / 1000.0
        try:
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
                work.run,
                self._evaluate,
                service,
                request,
                caller,
                decoded,
                can_fetch,
                deadline,
                now,
                controls,
            )
            try:
                return future.result(timeout=max(deadline - time.monotonic(), 0.0))
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise BudgetExceeded("the hook call exceeded its time budget") from None
        except HookError as exc:
            return self._refused(exc)
        except BudgetExceeded:
            log.warning(
                "time budget of %d ms exceeded after %.0f ms; answering with no cards",
                self.deps.settings.budget_ms,
                1000 * (time.monotonic() - started),
            )
            return HookResult(200, {"cards": []}, "budget_exceeded")
        except Exception:
            return self._failed()

    @staticmethod
    def _refused(exc: HookError) -> HookResult:
        """A 400 or 412 answer with the error's OperationOutcome."""
        log.info("hook call answered %d: %s", exc.status, exc.message)
        outcome = "precondition_failed" if exc.status == 412 else "bad_request"
        body_out = operation_outcome(exc.message, code=exc.issue_code, diagnostics=exc.diagnostics)
        return HookResult(exc.status, body_out, outcome)

    def _failed(self) -> HookResult:
        """The answer to a bug or a model failure (logged with its trace): 500, or no cards when fail-quiet."""
        if self.deps.settings.fail_quiet:
            log.exception("hook call failed; ECGLAB_FAIL_QUIET is on, answering with no cards")
            return HookResult(200, {"cards": []}, "error")
        log.exception("hook call failed")
        return HookResult(
            500,
            operation_outcome("Internal error; the service log has the details.", code="exception"),
            "error",
        )

    def _audit(
        self,
        service: ServiceDef,
        request: HookRequest,
        caller: Caller,
        result: HookResult,
        started: float,
        now: datetime,
        controls: ControlState,
    ) -> None:
        """Hand the answered call to the audit trail (written on its own thread)."""
        self.deps.audit.submit(
            CallFacts(
                time=now,
                service_id=service.id,
                hook_instance=request.hook_instance,
                issuer=caller.iss,
                patient_id=request.patient_id,
                mode="shadow" if controls.mode == "shadow" else self.deps.settings.mode,
                outcome=result.outcome,
                latency_ms=1000.0 * (time.monotonic() - started),
                trace=result.trace,
            )
        )

    def _may_fetch(self, request: HookRequest, caller: Caller, *, needed: bool) -> bool:
        """Whether the FHIR server may be queried for this request (logged when it may not)."""
        if request.fhir_server is None:
            return False
        if request.access_token is None:
            backend = self.deps.smart_backend.get(caller.iss or "")
            if backend is None or not backend.covers(request.fhir_server):
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
        caller: Caller,
        decoded: DecodedPrefetch,
        can_fetch: bool,
        deadline: float,
        now: datetime,
        controls: ControlState,
    ) -> HookResult:
        """Steps 3-5 on a worker thread: fetch what is missing, extract inputs, predict, build cards."""
        token = None
        if can_fetch:
            assert request.fhir_server is not None  # guarded by _may_fetch
            token = request.access_token or self._backend_token(request.fhir_server, caller, deadline)
        client = self._client(request, token, deadline) if token is not None else None
        refused = None
        if token is not None and request.access_token is None:
            refused = functools.partial(self.deps.smart_backend[caller.iss or ""].invalidate, token)
        try:
            data = self._gather(request, decoded, client, now, deadline, on_unauthorized=refused)
            probe = self._probe(request, data, client, now, deadline)
            try:
                inputs = self._inputs(data, probe, client, now, deadline)
            except NoEcgError as exc:
                log.info("no usable ECG (%s); no cards", exc)
                return HookResult(200, {"cards": []}, "no_ecg", trace=CallTrace(ecgs=data.ecgs))
            except EcgRejected as exc:
                log.info("ECG rejected (reason=%s); no cards", log_safe(exc.reason))
                trace = CallTrace(ecgs=data.ecgs, ecg_reference=exc.reference)
                return HookResult(200, {"cards": []}, "ecg_rejected", trace=trace)
        finally:
            if client is not None:
                client.close()
        predictions, input_facts = self._predict(inputs, probe, deadline)
        runtime = self.deps.runtime
        manifest = getattr(runtime, "manifest", None)
        model = ModelFacts.from_manifest(
            manifest, version=str(runtime.version), synthetic=bool(runtime.trained_on_synthetic)
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
        built = build_cards(
            controls.filter_predictions(predictions),
            inputs=inputs,
            data=data,
            ctx=ctx,
            mappings=self.deps.mappings,
            settings=self.deps.settings,
            model=model,
        )
        cards = controls.filter_cards(built)
        self._link_model_card(cards)
        trace = CallTrace(
            inputs=inputs,
            ecgs=data.ecgs,
            predictions=predictions,
            cards=cards,
            ecg_reference=inputs.ecg.reference,
            input_facts=input_facts,
        )
        returned = controls.response_cards(cards)
        if not controls.returns_cards:
            return HookResult(200, {"cards": []}, "shadow", trace=trace)
        outcome = "cards" if returned else "no_cards"
        return HookResult(200, {"cards": [c.card for c in returned]}, outcome, returned, trace)

    def _probe(
        self,
        request: HookRequest,
        data: PatientData,
        client: FhirClient | None,
        now: datetime,
        deadline: float,
    ) -> CacheProbe:
        """The prediction cache consulted before decoding (an empty probe when the cache is off)."""
        if self.deps.predictions is None:
            return CacheProbe()
        return probe_predictions(
            data,
            self.deps.predictions,
            mappings=self.deps.mappings,
            now=now,
            client=client,
            deadline=deadline,
            need_input_facts=self.deps.audit.enabled,
            context_patient=request.patient_id,
        )

    def _inputs(
        self, data: PatientData, probe: CacheProbe, client: FhirClient | None, now: datetime, deadline: float
    ) -> ModelInputs:
        """The hit's inputs (no ECG samples), else those extracted from ``data`` (decoding its ECG)."""
        if probe.inputs is not None:
            return probe.inputs
        mappings = self.deps.mappings
        return model_inputs(
            data,
            mappings=mappings,
            now=now,
            client=client,
            deadline=deadline,
            fetched=probe.fetched,
            decoder=self.deps.decoder,
        )

    def _predict(
        self, inputs: ModelInputs, probe: CacheProbe, deadline: float
    ) -> tuple[list[TargetPrediction], InputFacts | None]:
        """The predictions (stored ones on a hit, else the runtime's, then stored) and the audit's input facts.

        A miss that will be stored computes the input facts now (they are stored with it, and the
        audit row reuses them); otherwise the audit thread computes them.
        """
        if probe.hit is not None:
            return list(probe.hit.predictions), probe.hit.input_facts
        if time.monotonic() > deadline:
            raise BudgetExceeded("budget spent before inference")
        t0 = time.perf_counter()
        predictions = self.deps.runtime.predict(inputs)
        INFERENCE_SECONDS.observe(time.perf_counter() - t0)
        cache = self.deps.predictions
        if cache is None or not probe.stores(inputs):
            return predictions, None
        facts = self.deps.audit.input_facts(inputs) if self.deps.audit.enabled else None
        remember_predictions(cache, probe, inputs, predictions, facts)
        return predictions, facts

    def _link_model_card(self, cards: list[BuiltCard]) -> None:
        """Link every card to the model card and name the model's SHA-256 in the card's extension."""
        link = card_link(self.deps.settings.public_url)
        sha256 = self.deps.audit.model.sha256
        for built in cards:
            built.card.setdefault("links", []).append(dict(link))
            extension = built.card.setdefault("extension", {}).setdefault(CARD_EXTENSION, {})
            if sha256:
                extension["modelSha256"] = sha256

    def _client(self, request: HookRequest, token: str, deadline: float) -> FhirClient:
        """A FhirClient for the request's fhirServer and ``token``, its timeout capped by the budget left."""
        assert request.fhir_server is not None  # guarded by _may_fetch
        timeout = min(self.deps.settings.fhir_timeout_ms / 1000.0, max(deadline - time.monotonic(), 0.01))
        return FhirClient(
            request.fhir_server,
            token,
            timeout=timeout,
            transport=self.deps.fhir_transport,
            max_response_bytes=self.deps.settings.max_body_mb * 1024 * 1024,
            connections=self.deps.fhir_connections,
        )

    def _backend_token(self, fhir_server: str, caller: Caller, deadline: float) -> str:
        """The service's own SMART Backend Services token for ``fhir_server`` (the EHR sent none).

        Raises:
            BudgetExceeded: the token endpoint did not answer within the call's budget.
            PreconditionFailed: the authorization server gave no token (refused, failed, backing off).
        """
        backend = self.deps.smart_backend[caller.iss or ""]  # guarded by _may_fetch
        try:
            return backend.token_for(fhir_server, deadline)
        except TokenTimeout:
            raise BudgetExceeded("no FHIR token within the budget") from None
        except SmartBackendError as exc:
            log.warning("no SMART backend token for iss=%s (%s)", log_safe(caller.iss), exc.code)
            raise PreconditionFailed(
                "The FHIR server's authorization server gave the service no token.",
                diagnostics=f"SMART backend token: {exc.code}",
            ) from None

    def _gather(
        self,
        request: HookRequest,
        decoded: DecodedPrefetch,
        client: FhirClient | None,
        now: datetime,
        deadline: float,
        *,
        on_unauthorized: Callable[[], None] | None = None,
    ) -> PatientData:
        """PatientData from the prefetch plus the missing keys, FHIR failures mapped to the call's answer."""
        t0 = time.perf_counter()
        try:
            return gather_patient_data(
                self.deps.queries,
                request.patient_id,
                now=now,
                prefetched=decoded.resources,
                client=client,
                deadline=deadline,
                executor=self.deps.fhir_executor,
            )
        except FhirTimeout:
            raise BudgetExceeded("FHIR fetch ran past the budget") from None
        except FhirError as exc:
            if isinstance(exc, FhirUnauthorized) and on_unauthorized is not None:
                on_unauthorized()  # the server refused the service's own token: ask for a new one next time
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
            if decoded.missing:
                FHIR_SECONDS.observe(time.perf_counter() - t0)

    # -- bookkeeping --------------------------------------------------------------------------------
    def _record(
        self, service: ServiceDef, request: HookRequest, cards: list[BuiltCard], *, issuer: str | None = None
    ) -> None:
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
                "issuer": issuer,
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
