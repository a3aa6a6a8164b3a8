"""The Flask application factory of the CDS Hooks 2.0 service: settings → assembled service → app.

Endpoints (cdshooks.md §0.1):

====================================  =====================================================
``GET  /cds-services``                discovery (JWT required, as for every CDS call)
``POST /cds-services/{id}``           a hook call → ``{"cards": [...]}``
``POST /cds-services/{id}/feedback``  clinician feedback on our cards
``OPTIONS`` on the three above        CORS preflight, answered without a JWT
``GET  /healthz``                     200 when the model and the database are usable, else 503
``GET  /metrics``                     Prometheus metrics (``ECGLAB_METRICS``), with the newest
                                      monitor report's gauges (``ECGLAB_MONITOR_DIR``)
``GET  /cds-services/model-card``     the model card as JSON (no JWT, no patient data)
``GET  /model-card``                  the model card as an HTML page (no JWT, no CORS)
``/demo``                             card-preview page, only with ``ECGLAB_DEMO=on`` (auth off)
====================================  =====================================================

The routes, CORS, metrics and error answers are the blueprints of :mod:`cds_service.routes`.
Every non-2xx answer carries a FHIR OperationOutcome (``application/fhir+json``); a 401 says only
"unauthorized" (cdshooks.md §8, BP), and a 500 never contains a stack trace.

``create_app(config, *, runtime=None)`` takes a :class:`Settings`, a dict of settings (field or
``ECGLAB_*`` names; the environment is not read) or ``None`` (read the environment). ``runtime``
is the model: any object with ``version``, ``trained_on_synthetic``, ``provider`` and
``predict(ModelInputs) -> list[TargetPrediction]``; by default the newest manifest in
``ECGLAB_MODEL_DIR`` is loaded with :meth:`cds_service.inference.ModelRuntime.load`, and a model
that cannot be loaded stops startup (``ConfigError``).

Governance (README "Governance"): the kill-switch file (``ECGLAB_CONTROLS``, validated against
the manifest's labs and targets at start-up, then re-read when it changes), the audit trail
(``ECGLAB_AUDIT``, ``ECGLAB_AUDIT_KEY``, ``ECGLAB_AUDIT_RETENTION_DAYS``:
:mod:`cds_service.hook_audit`), the model card (``ECGLAB_SITE_INFO``) and the monitor gauges
(``ECGLAB_MONITOR_DIR``: :mod:`cds_service.governance`). A bad controls or site file, or a missing
audit key with auth on, stops startup (``ConfigError``).

The assembled pieces live in ``app.extensions["ecglab"]`` (:class:`ServiceState`); tests swap its
``jwks.transport`` and ``pipeline.deps.fhir_transport`` for ``httpx.MockTransport`` objects. The
app owns its thread pools, pooled FHIR connections (:class:`~cds_service.fhir_http.FhirConnections`),
audit and retention threads, prediction cache (``ECGLAB_PREDICTION_CACHE_S``), ECG decoder processes
(``ECGLAB_ECG_DECODE_PROCESSES``: :class:`~cds_service.ecg.isolation.Decoder`) and database engine:
:meth:`ServiceState.close` stops them (writing the queued audit rows first), and runs by itself
when the app is garbage-collected or the process exits (:func:`_close_when_collected`), so
neither callers nor tests shut anything down by hand.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from sqlalchemy import Engine

from cds_service.auth import Authenticator
from cds_service.controls import Controls, known_names
from cds_service.db import init_db, make_engine
from cds_service.ecg.isolation import Decoder
from cds_service.fhir_http import FhirConnections
from cds_service.governance import LatestReport, ModelCardSource
from cds_service.hook_audit import AuditTrail, resolve_audit_key
from cds_service.hook_request import SERVICES, USAGE
from cds_service.hooks import HookPipeline, ModelRuntimeLike, PipelineDeps
from cds_service.issuers import IssuerConfig, JwksCache, load_issuers
from cds_service.prediction_cache import PredictionCache, model_identity
from cds_service.prefetch import PrefetchQuery, build_queries, templates
from cds_service.routes import blueprint, metrics_blueprint
from cds_service.settings import Settings
from cds_service.site_info import load_site_info
from cds_service.smart_backend import SmartBackendClient, TokenCache
from fhir_mappings import Mappings, load_mappings

log = logging.getLogger(__name__)

DISCOVERY_EXTENSION = "org.ecglab.service"


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
    model_card: ModelCardSource
    monitor_report: LatestReport
    _closed: bool = field(default=False, init=False, repr=False)

    @property
    def audit(self) -> AuditTrail:
        """The audit trail of the hook calls."""
        return self.pipeline.deps.audit

    def close(self) -> None:
        """Stop the thread pools, close the pooled FHIR connections, write the queued audit rows and
        cached predictions, stop the ECG decoder's processes, close the database (idempotent).

        Only the first call does anything; the app's finalizer (:func:`_close_when_collected`)
        never calls it on the collecting thread.
        """
        if self._closed:
            return
        self._closed = True
        deps = self.pipeline.deps
        deps.executor.shutdown(wait=False, cancel_futures=True)
        deps.fhir_executor.shutdown(wait=False, cancel_futures=True)
        if deps.fhir_connections is not None:
            deps.fhir_connections.close()
        deps.audit.close()
        if deps.predictions is not None:
            deps.predictions.close()
        if deps.decoder is not None:
            deps.decoder.close()
        self.engine.dispose()


def _decoder(processes: int) -> Decoder | None:
    """The ECG decoder's worker processes, started in the background (``None`` for 0: in-process)."""
    if processes == 0:
        return None
    decoder = Decoder(processes)
    decoder.warm_up(background=True)
    return decoder


_exiting = threading.Event()
_exit_hook_registered = threading.Lock()


def _mark_exiting() -> None:
    """``atexit`` hook: from now on a collected app is closed on the calling thread."""
    _exiting.set()


def _close_when_collected(state: ServiceState) -> None:
    """The app's finalizer: close ``state`` on a thread of its own, or in place at exit.

    The garbage collector runs finalizers on whichever thread happened to allocate, possibly in
    the middle of ``ThreadPoolExecutor.submit`` with the pools' shared lock held; closing in place
    there (the audit flush submits a marker) deadlocks that thread and every later hook call. At
    interpreter exit a fresh thread would be killed before it wrote the queued audit rows, so the
    close runs in place: ``_mark_exiting`` is registered after :mod:`weakref`'s own exit hook and
    therefore runs before it.
    """
    if _exiting.is_set():
        state.close()
        return
    threading.Thread(target=state.close, name="ecglab-close", daemon=True).start()


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

    runtime = ModelRuntime.load(
        settings.model_dir,
        list(settings.onnx_providers) or None,
        variant=settings.model_variant,
        batch_max_wait_ms=settings.batch_max_wait_ms,
    )
    return runtime


def build_discovery(
    queries: tuple[PrefetchQuery, ...], runtime: ModelRuntimeLike, model_card_url: str | None = None
) -> dict[str, Any]:
    """The discovery document: one service per hook, all with the same prefetch templates.

    The extension names the model version, whether it is a demo model, and where its model card is.
    """
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
                        **({"modelCard": model_card_url} if model_card_url else {}),
                    }
                },
            }
        )
    return {"services": services}


def _controls(settings: Settings, runtime: ModelRuntimeLike) -> Controls:
    """The kill-switch file (``ECGLAB_CONTROLS``), its names checked against the manifest's labels."""
    manifest = getattr(runtime, "manifest", None)
    labs, targets = known_names(manifest.labels) if manifest is not None else (None, None)
    controls = Controls(settings.controls, known_labs=labs, known_targets=targets)
    if settings.controls is not None:
        log.info("controls file %s: %s", settings.controls, controls.current().describe())
    return controls


def _model_card(settings: Settings, runtime: ModelRuntimeLike, report: LatestReport) -> ModelCardSource:
    """The model card source: manifest, site file (``ECGLAB_SITE_INFO``) and evaluation figures."""
    model_path = getattr(runtime, "model_path", None)
    return ModelCardSource(
        getattr(runtime, "manifest", None),
        model_path.parent if model_path is not None else None,
        load_site_info(settings.site_info),
        report,
        settings.public_url,
    )


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


def smart_backend_clients(issuers: Mapping[str, IssuerConfig]) -> dict[str, SmartBackendClient]:
    """One SMART Backend Services client per issuer that configures one, sharing one token cache."""
    cache = TokenCache()
    return {
        iss: SmartBackendClient(cfg.smart_backend, fhir_servers=cfg.fhir_servers, cache=cache)
        for iss, cfg in issuers.items()
        if cfg.smart_backend is not None
    }


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
    audit_key = resolve_audit_key(settings)
    model = runtime if runtime is not None else _load_runtime(settings)
    controls = _controls(settings, model)
    monitor_report = LatestReport(settings.monitor_dir)
    model_card = _model_card(settings, model, monitor_report)
    audit = AuditTrail(engine, audit_key, model)
    audit.start_retention(settings.audit_retention_days)
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
        controls=controls,
        audit=audit,
        smart_backend=smart_backend_clients(issuers),
        fhir_connections=FhirConnections(),
        predictions=PredictionCache(engine, settings.prediction_cache_s, model_identity(model))
        if settings.prediction_cache_s > 0
        else None,
        decoder=_decoder(settings.ecg_decode_processes),
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
        discovery=build_discovery(queries, model, model_card.html_url),
        model_card=model_card,
        monitor_report=monitor_report,
    )
    app = Flask("cds_service")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_mb * 1024 * 1024
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["ecglab"] = state
    weakref.finalize(app, _close_when_collected, state)
    if _exit_hook_registered.acquire(blocking=False):  # once, after weakref's own exit hook
        atexit.register(_mark_exiting)
    app.register_blueprint(blueprint)
    if settings.metrics:
        app.register_blueprint(metrics_blueprint)
    if settings.demo:
        from cds_service.demo_page import create_demo_blueprint

        app.register_blueprint(create_demo_blueprint(settings.dev_fhir_servers[0]))
        log.warning(
            "ECGLAB_DEMO=on: the /demo page lists and reads patients of %s", settings.dev_fhir_servers[0]
        )
    log.info(
        "ecglab service ready: model %s (%s), %d issuers, auth %s, mode %s, audit %s, public URL %s",
        model.version,
        getattr(model, "provider", "?"),
        len(issuers),
        "on" if settings.auth else "OFF",
        state.pipeline.control_state().mode,
        "on" if audit.enabled else "off",
        settings.public_url,
    )
    return app
