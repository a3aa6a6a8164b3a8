"""The HTTP surface of the service: the CDS Hooks routes, health, metrics, CORS and error answers.

Two blueprints, registered by :func:`cds_service.app.create_app`, which read the assembled service
from ``current_app.extensions["ecglab"]`` (:class:`cds_service.app.ServiceState`):

* :data:`blueprint` — discovery, hook calls, feedback, the model card (``GET
  /cds-services/model-card`` as JSON, ``GET /model-card`` as HTML: no JWT, since the card holds
  no patient data and a clinician follows the cards' link to it from the EHR; the HTML page is
  served with a Content-Security-Policy that allows nothing but its own inline style) and
  ``/healthz``, plus the app-wide request hooks (timer, CORS preflight and headers, request
  metrics) and error handlers (401, Werkzeug HTTP errors, unexpected exceptions), so that every
  path, ``/demo`` included, answers the same way;
* :data:`metrics_blueprint` — ``GET /metrics``, registered only with ``ECGLAB_METRICS`` on (off,
  the path does not exist: 404), followed by the gauges of the newest ``ecglab monitor`` report
  in ``ECGLAB_MONITOR_DIR`` (``ecglab_local_*``, ``ecglab_input_psi``, …).

The kill switch has no endpoint: it is the ``ECGLAB_CONTROLS`` file, re-read when it changes
(:mod:`cds_service.controls`); ``/healthz`` reports the mode in force and any controls error.

Every non-2xx answer carries a FHIR OperationOutcome (``application/fhir+json``); a 401 says only
"unauthorized" (cdshooks.md §8, BP), and a 500 never contains a stack trace.

Browser exposure. A web page on another site can make a browser send a "simple" cross-site POST
(``text/plain``, ``application/x-www-form-urlencoded`` or ``multipart/form-data``, no custom
headers) without asking anyone. So a hook or feedback body must be declared JSON:
``application/json`` (what CDS Hooks clients send) or ``application/fhir+json`` (accepted for
EHRs that label every FHIR-flavoured payload so), with no charset or UTF-8 (RFC 8259 JSON is
UTF-8); anything else, a missing Content-Type included, is a 415 OperationOutcome. Neither type is
CORS-safelisted, so a cross-site page can only send them after a preflight, which CORS decides.
The Content-Type is checked first, before the JWT: the 415 is the same whatever the token (it says
nothing about whether authentication would pass), and costs no key download or ``jti``.

CORS headers go only on the CDS Hooks endpoints (discovery, hook calls, feedback and their
``OPTIONS`` preflights), which browser-based clients such as the CDS Hooks Sandbox call; the model
card, ``/healthz``, ``/metrics`` and ``/demo`` never carry them. ``ECGLAB_CORS_ORIGINS`` lists the
origins (empty by default: no CORS at all); ``*`` needs auth on (:meth:`Settings.check`), where
every call still needs the EHR's bearer JWT and no cookie is ever honoured.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from cds_service.auth import AuthError, Caller
from cds_service.db import ping
from cds_service.feedback import FeedbackError, parse_feedback, store_feedback
from cds_service.governance import MODEL_CARD_JSON_PATH, MODEL_CARD_PATH, gauge_exposition
from cds_service.hook_request import SERVICES, operation_outcome
from cds_service.hooks import count_outcome
from cds_service.model_card_html import render_model_card_html
from cds_service.observability import (
    FEEDBACK_ITEMS,
    REQUEST_SECONDS,
    REQUESTS,
    bind_request,
    log_safe,
    render_metrics,
    reset_request,
)

if TYPE_CHECKING:
    from cds_service.app import ServiceState

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
CDS_PREFIX = "/cds-services"
ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, Accept"
#: Media types a hook or feedback body may be declared as; neither is CORS-safelisted.
JSON_MEDIA_TYPES = frozenset({"application/json", "application/fhir+json"})
#: The charsets a JSON body may declare (RFC 8259 §8.1: JSON exchanged between systems is UTF-8).
JSON_CHARSETS = frozenset({"utf-8", "utf8"})
#: The endpoints of the CDS Hooks API proper: the only ones that answer CORS.
CORS_ENDPOINTS = frozenset({"ecglab.discovery", "ecglab.hook", "ecglab.feedback"})
#: Deepest JSON nesting accepted in a request body. A prefetched FHIR resource nests about a dozen
#: levels; thousands of levels make the JSON parser (and any recursive reader) hit Python's
#: recursion limit, which must be a 400, not a 500.
MAX_JSON_DEPTH = 100

blueprint = Blueprint("ecglab", __name__)
metrics_blueprint = Blueprint("ecglab_metrics", __name__)


def _state() -> ServiceState:
    """The service assembled by ``create_app`` for the current app."""
    state: ServiceState = current_app.extensions["ecglab"]
    return state


# -- responses ---------------------------------------------------------------------------------------


def _outcome_response(status: int, message: str, *, code: str, diagnostics: str | None = None) -> Response:
    """A JSON response carrying an OperationOutcome with ``status`` (``application/fhir+json``)."""
    response = jsonify(operation_outcome(message, code=code, diagnostics=diagnostics))
    response.status_code = status
    response.mimetype = FHIR_JSON
    return response


def _unauthorized() -> Response:
    """The one 401 answer: a generic OperationOutcome and ``WWW-Authenticate: Bearer``, no reason (BP)."""
    response = _outcome_response(401, "Unauthorized", code="login")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests objects/arrays more than ``limit`` levels (checked iteratively)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _json_body() -> tuple[Any, str | None]:
    """The request body parsed as JSON, or ``(None, why not)``: not JSON, or nested too deeply."""
    try:
        body = request.get_json(force=True, silent=True)
    except RecursionError:  # only ValueError is silenced; a deeply nested body exhausts the parser's stack
        return None, f"Request body nests deeper than {MAX_JSON_DEPTH} levels"
    if body is None:
        return None, "Request body is not JSON"
    if _nesting_exceeds(body, MAX_JSON_DEPTH):
        return None, f"Request body nests deeper than {MAX_JSON_DEPTH} levels"
    return body, None


def _endpoint_kind(path: str) -> str:
    """The metrics label for a path: discovery, service, feedback, model_card, healthz, metrics or other."""
    if path == CDS_PREFIX or path == CDS_PREFIX + "/":
        return "discovery"
    if path in (MODEL_CARD_JSON_PATH, MODEL_CARD_PATH):
        return "model_card"
    if path.startswith(CDS_PREFIX + "/"):
        return "feedback" if path.endswith("/feedback") else "service"
    if path in ("/healthz", "/metrics"):
        return path.lstrip("/")
    return "other"


def _unsupported_media_type() -> Response | None:
    """A 415 OperationOutcome unless the body is declared UTF-8 JSON (see the module docstring).

    Called before authentication, so a cross-site "simple request" is refused with the same answer
    whatever it carries, and before the body is read.
    """
    charset = request.mimetype_params.get("charset", "utf-8").strip().lower()
    if request.mimetype in JSON_MEDIA_TYPES and charset in JSON_CHARSETS:
        return None
    log.info("415 on %s: Content-Type %s", request.path, log_safe(request.content_type or "(none)")[:120])
    return _outcome_response(415, "Content-Type must be application/json (UTF-8)", code="not-supported")


def _cors_origin() -> str | None:
    """The ``Access-Control-Allow-Origin`` value for this request, or ``None`` for no CORS headers.

    ``None`` off the CDS Hooks endpoints, with no origins configured, and for an origin not listed.
    """
    allowed = _state().settings.cors_origins
    if request.endpoint not in CORS_ENDPOINTS or not allowed:
        return None
    if "*" in allowed:
        return "*"
    origin = request.headers.get("Origin", "").rstrip("/").lower()
    return origin if origin in {o.lower() for o in allowed} else None


def _preflight() -> Response:
    """The ``204`` answer to a CORS preflight; it names methods and headers only to a listed origin.

    ``Access-Control-Allow-Private-Network`` answers Chrome's Private Network Access preflight, so
    a public page such as the CDS Hooks Sandbox may call a service on the user's own machine (the
    compose set-up), once the origin is listed.
    """
    response = Response(status=204)
    del response.headers["Content-Type"]
    if _cors_origin() is not None:
        response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
        response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"
        if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
            response.headers["Access-Control-Allow-Private-Network"] = "true"
    return response


def _authenticate() -> Caller:
    """Verify the request's JWT (raises AuthError → 401) and remember the caller on ``g``."""
    caller = _state().authenticator.authenticate(request.headers.get("Authorization"), request.path)
    g.caller = caller
    return caller


# -- app-wide request hooks and error handlers -------------------------------------------------------


@blueprint.before_app_request
def _start() -> Response | None:
    """Start the request timer; answer CORS preflights of the CDS endpoints, before any authentication."""
    g.started = time.perf_counter()
    if request.method == "OPTIONS" and request.endpoint in CORS_ENDPOINTS:
        return _preflight()
    return None


@blueprint.after_app_request
def _finish(response: Response) -> Response:
    """Add CORS headers (CDS endpoints only) and record request count and latency metrics."""
    origin = _cors_origin()
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
    allowed = _state().settings.cors_origins
    if request.endpoint in CORS_ENDPOINTS and allowed and "*" not in allowed:
        response.vary.add("Origin")  # the answer depends on the Origin, allowed or not: caches must know
    kind = "preflight" if request.method == "OPTIONS" else _endpoint_kind(request.path)
    service_id = (request.view_args or {}).get("service_id", "-")
    service_label = service_id if service_id in SERVICES or service_id == "-" else "unknown"
    REQUESTS.labels(kind, service_label, str(response.status_code)).inc()
    REQUEST_SECONDS.labels(kind, service_label).observe(
        time.perf_counter() - g.get("started", time.perf_counter())
    )
    return response


@blueprint.app_errorhandler(AuthError)
def _auth_failed(exc: AuthError) -> Response:
    """Log why a token was refused (iss and jti only) and answer a bare 401."""
    log.warning(
        "401 on %s: %s (iss=%s jti=%s)", request.path, exc.reason, log_safe(exc.iss), log_safe(exc.jti)
    )
    return _unauthorized()


@blueprint.app_errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    """Werkzeug HTTP errors (404 route, 405, 413) as OperationOutcome bodies."""
    status = exc.code or 500
    return _outcome_response(status, exc.name, code="not-found" if status == 404 else "processing")


@blueprint.app_errorhandler(Exception)
def _unexpected(exc: Exception) -> Response:
    """Any unhandled exception: logged with its trace, answered as a 500 without one."""
    log.exception("unhandled error on %s %s", request.method, request.path)
    return _outcome_response(500, "Internal error; the service log has the details.", code="exception")


# -- routes ------------------------------------------------------------------------------------------


@blueprint.get(CDS_PREFIX)
def discovery() -> Response:
    """``GET /cds-services``: the discovery document (JWT required)."""
    caller = _authenticate()
    log.info("discovery (iss=%s jti=%s)", log_safe(caller.iss), log_safe(caller.jti))
    return jsonify(_state().discovery)


@blueprint.post(f"{CDS_PREFIX}/<service_id>")
def hook(service_id: str) -> Response:
    """``POST /cds-services/{id}``: run the hook pipeline and answer cards or an OperationOutcome."""
    unsupported = _unsupported_media_type()
    if unsupported is not None:
        return unsupported
    caller = _authenticate()
    service = SERVICES.get(service_id)
    if service is None:
        return _outcome_response(404, f"No CDS service with id {log_safe(service_id)}", code="not-found")
    body, problem = _json_body()
    hook_instance = body.get("hookInstance") if isinstance(body, dict) else None
    log_context = bind_request(service.id, hook_instance if isinstance(hook_instance, str) else "-")
    try:
        started = time.perf_counter()
        if problem is not None:
            result_status, payload, outcome = 400, operation_outcome(problem, code="invalid"), "bad_request"
        else:
            result = _state().pipeline.handle(service, body, caller)
            result_status, payload, outcome = result.status, result.body, result.outcome
        count_outcome(service.id, outcome)
        log.info(
            "hook %s hookInstance=%s answered %d (%s, %d cards) in %.0f ms (iss=%s tenant=%s jti=%s)",
            service.hook,
            log_safe(hook_instance),
            result_status,
            outcome,
            len(payload.get("cards", [])),
            1000 * (time.perf_counter() - started),
            log_safe(caller.iss),
            log_safe(caller.tenant),
            log_safe(caller.jti),
        )
    finally:
        reset_request(log_context)
    response = jsonify(payload)
    response.status_code = result_status
    if result_status != 200:
        response.mimetype = FHIR_JSON
    return response


@blueprint.post(f"{CDS_PREFIX}/<service_id>/feedback")
def feedback(service_id: str) -> Response:
    """``POST /cds-services/{id}/feedback``: parse and store clinician feedback idempotently."""
    unsupported = _unsupported_media_type()
    if unsupported is not None:
        return unsupported
    caller = _authenticate()
    if service_id not in SERVICES:
        return _outcome_response(404, f"No CDS service with id {log_safe(service_id)}", code="not-found")
    body, problem = _json_body()
    if problem is not None:
        log.info("feedback rejected: %s", problem)
        return _outcome_response(400, problem, code="invalid")
    try:
        items = parse_feedback(body)
        added = store_feedback(_state().engine, service_id, items, issuer=caller.iss)
    except FeedbackError as exc:
        log.info("feedback rejected: %s", exc)
        return _outcome_response(exc.status, str(exc), code=exc.issue_code)
    for item in items:
        FEEDBACK_ITEMS.labels(item.outcome).inc()
    log.info(
        "feedback for %s: %d item(s), %d new (iss=%s jti=%s)",
        service_id,
        len(items),
        added,
        log_safe(caller.iss),
        log_safe(caller.jti),
    )
    return jsonify({"received": len(items), "stored": added})


@blueprint.get("/healthz")
def healthz() -> Response:
    """``GET /healthz``: 200 when the model is loaded and the database answers, else 503."""
    state = _state()
    runtime = state.runtime
    controls = state.pipeline.control_state()
    database_ok = ping(state.engine)
    model_ok = runtime is not None
    body = {
        "status": "ok" if database_ok and model_ok else "unavailable",
        "model": {
            "loaded": model_ok,
            "version": str(runtime.version) if model_ok else None,
            "provider": getattr(runtime, "provider", None) if model_ok else None,
            "syntheticModel": bool(runtime.trained_on_synthetic) if model_ok else None,
        },
        "database": "ok" if database_ok else "unreachable",
        "auth": "on" if state.settings.auth else "off",
        "mode": controls.mode,
        "audit": "on" if state.audit.enabled else "off",
    }
    if controls.error is not None:
        body["controlsError"] = controls.error
    response = jsonify(body)
    response.status_code = 200 if database_ok and model_ok else 503
    return response


@metrics_blueprint.get("/metrics")
def metrics() -> Response:
    """``GET /metrics``: the Prometheus exposition (all workers' samples in multiprocess mode)."""
    payload, content_type = render_metrics()
    payload += gauge_exposition(_state().monitor_report.get())
    return Response(payload, status=200, content_type=content_type)


def _model_card_or_404() -> dict[str, Any] | Response:
    """The current model card, or a 404 OperationOutcome for a runtime without a manifest."""
    card = _state().model_card.card()
    if card is None:
        return _outcome_response(404, "No model card: the model runtime has no manifest", code="not-found")
    return card


@blueprint.get(MODEL_CARD_JSON_PATH)
def model_card_json() -> Response:
    """``GET /cds-services/model-card``: the model card as JSON (HTI-1 source attributes, CHAI fields)."""
    card = _model_card_or_404()
    if isinstance(card, Response):
        return card
    return jsonify(card)


@blueprint.get(MODEL_CARD_PATH)
def model_card_html() -> Response:
    """``GET /model-card``: the model card as a self-contained HTML page."""
    card = _model_card_or_404()
    if isinstance(card, Response):
        return card
    page = render_model_card_html(card, json_url=_state().model_card.json_url)
    response = Response(page, status=200, mimetype="text/html")
    response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
