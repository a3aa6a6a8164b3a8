"""The Flask application factory of the CDS Hooks 2.0 service.

Endpoints (cdshooks.md §0.1):

====================================  =====================================================
``GET  /cds-services``                discovery (JWT required, as for every CDS call)
``POST /cds-services/{id}``           a hook call → ``{"cards": [...]}``
``POST /cds-services/{id}/feedback``  clinician feedback on our cards
``OPTIONS`` on the three above        CORS preflight, answered without a JWT
``GET  /healthz``                     200 when the model and the database are usable, else 503
``GET  /metrics``                     Prometheus metrics (``ECGLAB_METRICS``)
``/demo``                             card-preview page, only with ``ECGLAB_DEMO=on`` (auth off)
====================================  =====================================================

Every non-2xx answer carries a FHIR OperationOutcome (``application/fhir+json``); a 401 says only
"unauthorized" (cdshooks.md §8, BP), and a 500 never contains a stack trace.

``create_app(config, *, runtime=None)`` takes a :class:`Settings`, a dict of settings (field or
``ECGLAB_*`` names; the environment is not read) or ``None`` (read the environment). ``runtime``
is the model: any object with ``version``, ``trained_on_synthetic``, ``provider`` and
``predict(ModelInputs) -> list[TargetPrediction]``; by default the newest manifest in
``ECGLAB_MODEL_DIR`` is loaded with :meth:`cds_service.inference.ModelRuntime.load`, and a model
that cannot be loaded stops startup (``ConfigError``).

The assembled pieces live in ``app.extensions["ecglab"]`` (:class:`ServiceState`); tests swap its
``jwks.transport`` and ``pipeline.deps.fhir_transport`` for ``httpx.MockTransport`` objects.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, g, jsonify, request
from sqlalchemy import Engine
from werkzeug.exceptions import HTTPException

from cds_service.auth import Authenticator, AuthError, Caller
from cds_service.db import init_db, make_engine, ping
from cds_service.feedback import FeedbackError, parse_feedback, store_feedback
from cds_service.hooks import (
    SERVICES,
    USAGE,
    HookPipeline,
    ModelRuntimeLike,
    PipelineDeps,
    count_outcome,
    operation_outcome,
)
from cds_service.issuers import IssuerConfig, JwksCache, load_issuers
from cds_service.observability import (
    FEEDBACK_ITEMS,
    REQUEST_SECONDS,
    REQUESTS,
    bind_request,
    log_safe,
    render_metrics,
    reset_request,
)
from cds_service.prefetch import PrefetchQuery, build_queries, templates
from cds_service.settings import Settings
from fhir_mappings import Mappings, load_mappings

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
CDS_PREFIX = "/cds-services"
ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, Accept"
DISCOVERY_EXTENSION = "org.ecglab.service"
#: Deepest JSON nesting accepted in a request body. A prefetched FHIR resource nests about a dozen
#: levels; thousands of levels make the JSON parser (and any recursive reader) hit Python's
#: recursion limit, which must be a 400, not a 500.
MAX_JSON_DEPTH = 100


@dataclass
class ServiceState:
    """The assembled service: settings, model, mappings, database, auth and the hook pipeline."""

    settings: Settings
    mappings: Mappings
    runtime: ModelRuntimeLike
    engine: Engine
    issuers: dict[str, IssuerConfig]
    jwks: JwksCache
    authenticator: Authenticator
    pipeline: HookPipeline
    queries: tuple[PrefetchQuery, ...]
    discovery: dict[str, Any]


def _settings(config: Settings | dict[str, Any] | None) -> Settings:
    """Normalise ``create_app``'s ``config`` argument into validated :class:`Settings`."""
    if isinstance(config, Settings):
        config.check()
        return config
    if config is None:
        return Settings.from_env()
    return Settings.from_mapping(config)


def _load_runtime(settings: Settings) -> ModelRuntimeLike:
    """The ONNX model runtime from ``ECGLAB_MODEL_DIR`` (a ManifestError stops startup)."""
    from cds_service.inference import ModelRuntime

    runtime = ModelRuntime.load(settings.model_dir, list(settings.onnx_providers) or None)
    return runtime


def build_discovery(queries: tuple[PrefetchQuery, ...], runtime: ModelRuntimeLike) -> dict[str, Any]:
    """The discovery document: one service per hook, all with the same prefetch templates."""
    prefetch = templates(queries)
    services = []
    for service in SERVICES.values():
        services.append(
            {
                "hook": service.hook,
                "id": service.id,
                "title": service.title,
                "description": service.description,
                "prefetch": dict(prefetch),
                "usageRequirements": USAGE,
                "extension": {
                    DISCOVERY_EXTENSION: {
                        "modelVersion": str(runtime.version),
                        "syntheticModel": bool(runtime.trained_on_synthetic),
                    }
                },
            }
        )
    return {"services": services}


def _warn_auth_off(settings: Settings) -> None:
    """Log the loud development-mode warning (auth off), naming the FHIR servers still allowed."""
    banner = "!" * 78
    allowed = ", ".join(settings.dev_fhir_servers) or "loopback FHIR servers only"
    log.warning(
        "%s\nECGLAB_AUTH=off: JWT AUTHENTICATION IS DISABLED. Anyone who can reach this port can call the "
        "service. Development only; never expose it. FHIR servers allowed: %s\n%s",
        banner,
        allowed,
        banner,
    )


def create_app(
    config: Settings | dict[str, Any] | None = None, *, runtime: ModelRuntimeLike | None = None
) -> Flask:
    """Build the Flask app; see the module docstring for ``config`` and ``runtime``."""
    settings = _settings(config)
    issuers = load_issuers(settings.issuers) if settings.issuers is not None else {}
    if not settings.auth:
        _warn_auth_off(settings)
    mappings = load_mappings()
    engine = make_engine(settings.database_url)
    init_db(engine)
    model = runtime if runtime is not None else _load_runtime(settings)
    queries = build_queries(mappings)
    jwks = JwksCache(
        ttl_s=settings.jwks_cache_s,
        refetch_s=settings.jwks_refetch_s,
        timeout_s=settings.jwks_timeout_ms / 1000.0,
    )
    authenticator = Authenticator(settings, issuers, jwks, engine)
    deps = PipelineDeps(
        settings=settings,
        mappings=mappings,
        runtime=model,
        queries=queries,
        engine=engine,
        authenticator=authenticator,
        executor=concurrent.futures.ThreadPoolExecutor(
            max_workers=max(4, 2 * settings.threads), thread_name_prefix="ecglab-hook"
        ),
        fhir_executor=concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="ecglab-fhir"),
    )
    state = ServiceState(
        settings=settings,
        mappings=mappings,
        runtime=model,
        engine=engine,
        issuers=issuers,
        jwks=jwks,
        authenticator=authenticator,
        pipeline=HookPipeline(deps),
        queries=queries,
        discovery=build_discovery(queries, model),
    )
    app = Flask("cds_service")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_mb * 1024 * 1024
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["ecglab"] = state
    _register(app, state)
    if settings.demo:
        from cds_service.demo_page import create_demo_blueprint

        app.register_blueprint(create_demo_blueprint(settings.dev_fhir_servers[0]))
        log.warning(
            "ECGLAB_DEMO=on: the /demo page lists and reads patients of %s", settings.dev_fhir_servers[0]
        )
    log.info(
        "ecglab service ready: model %s (%s), %d issuers, auth %s, public URL %s",
        model.version,
        getattr(model, "provider", "?"),
        len(issuers),
        "on" if settings.auth else "OFF",
        settings.public_url,
    )
    return app


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
    """The metrics label for a path: discovery, service, feedback, healthz, metrics or other."""
    if path == CDS_PREFIX or path == CDS_PREFIX + "/":
        return "discovery"
    if path.startswith(CDS_PREFIX + "/"):
        return "feedback" if path.endswith("/feedback") else "service"
    if path in ("/healthz", "/metrics"):
        return path.lstrip("/")
    return "other"


def _register(app: Flask, state: ServiceState) -> None:
    """Attach the hooks, error handlers and routes of the service to ``app``."""
    settings = state.settings

    def cors_origin() -> str | None:
        """The ``Access-Control-Allow-Origin`` value for this request, or ``None`` for a foreign origin."""
        if "*" in settings.cors_origins:
            return "*"
        origin = request.headers.get("Origin", "").rstrip("/")
        return origin if origin in settings.cors_origins else None

    def authenticate() -> Caller:
        """Verify the request's JWT (raises AuthError → 401) and remember the caller on ``g``."""
        caller = state.authenticator.authenticate(request.headers.get("Authorization"), request.path)
        g.caller = caller
        return caller

    @app.before_request
    def _start() -> Response | None:
        """Start the request timer; answer CORS preflights here, before any authentication."""
        g.started = time.perf_counter()
        if request.method == "OPTIONS" and request.path.startswith(CDS_PREFIX):
            response = Response(status=204)
            del response.headers["Content-Type"]
            response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
            return response
        return None

    @app.after_request
    def _finish(response: Response) -> Response:
        """Add CORS headers and record request count and latency metrics."""
        origin = cors_origin()
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            if origin != "*":
                response.vary.add("Origin")
        kind = "preflight" if request.method == "OPTIONS" else _endpoint_kind(request.path)
        service_id = (request.view_args or {}).get("service_id", "-")
        service_label = service_id if service_id in SERVICES or service_id == "-" else "unknown"
        REQUESTS.labels(kind, service_label, str(response.status_code)).inc()
        REQUEST_SECONDS.labels(kind, service_label).observe(
            time.perf_counter() - g.get("started", time.perf_counter())
        )
        return response

    @app.errorhandler(AuthError)
    def _auth_failed(exc: AuthError) -> Response:
        """Log why a token was refused (iss and jti only) and answer a bare 401."""
        log.warning(
            "401 on %s: %s (iss=%s jti=%s)", request.path, exc.reason, log_safe(exc.iss), log_safe(exc.jti)
        )
        return _unauthorized()

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        """Werkzeug HTTP errors (404 route, 405, 413) as OperationOutcome bodies."""
        status = exc.code or 500
        return _outcome_response(status, exc.name, code="not-found" if status == 404 else "processing")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        """Any unhandled exception: logged with its trace, answered as a 500 without one."""
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _outcome_response(500, "Internal error; the service log has the details.", code="exception")

    @app.get(CDS_PREFIX)
    def discovery() -> Response:
        """``GET /cds-services``: the discovery document (JWT required)."""
        caller = authenticate()
        log.info("discovery (iss=%s jti=%s)", log_safe(caller.iss), log_safe(caller.jti))
        return jsonify(state.discovery)

    @app.post(f"{CDS_PREFIX}/<service_id>")
    def hook(service_id: str) -> Response:
        """``POST /cds-services/{id}``: run the hook pipeline and answer cards or an OperationOutcome."""
        caller = authenticate()
        service = SERVICES.get(service_id)
        if service is None:
            return _outcome_response(404, f"No CDS service with id {log_safe(service_id)}", code="not-found")
        body, problem = _json_body()
        hook_instance = body.get("hookInstance") if isinstance(body, dict) else None
        log_context = bind_request(service.id, hook_instance if isinstance(hook_instance, str) else "-")
        try:
            started = time.perf_counter()
            if problem is not None:
                result_status, payload, outcome = (
                    400,
                    operation_outcome(problem, code="invalid"),
                    "bad_request",
                )
            else:
                result = state.pipeline.handle(service, body, caller)
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

    @app.post(f"{CDS_PREFIX}/<service_id>/feedback")
    def feedback(service_id: str) -> Response:
        """``POST /cds-services/{id}/feedback``: parse and store clinician feedback idempotently."""
        caller = authenticate()
        if service_id not in SERVICES:
            return _outcome_response(404, f"No CDS service with id {log_safe(service_id)}", code="not-found")
        body, problem = _json_body()
        if problem is not None:
            log.info("feedback rejected: %s", problem)
            return _outcome_response(400, problem, code="invalid")
        try:
            items = parse_feedback(body)
        except FeedbackError as exc:
            log.info("feedback rejected: %s", exc)
            return _outcome_response(400, str(exc), code="invalid")
        added = store_feedback(state.engine, service_id, items, issuer=caller.iss)
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

    @app.get("/healthz")
    def healthz() -> Response:
        """``GET /healthz``: 200 when the model is loaded and the database answers, else 503."""
        runtime = state.runtime
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
            "auth": "on" if settings.auth else "off",
        }
        response = jsonify(body)
        response.status_code = 200 if database_ok and model_ok else 503
        return response

    if settings.metrics:

        @app.get("/metrics")
        def metrics() -> Response:
            """``GET /metrics``: the Prometheus exposition (all workers' samples in multiprocess mode)."""
            payload, content_type = render_metrics()
            return Response(payload, status=200, content_type=content_type)
