"""The card-preview page of demo mode (``/demo``): pick a patient and a hook, see inputs and cards.

It plays the EHR the way the CDS Hooks Sandbox does (cdshooks.md §9.1), without leaving the
service: the page lists the FHIR server's patients, shows what the model would read for one of
them (the metadata features with their units and the Observation that supplied each, and the
12-lead ECG as the model sees it after :func:`cds_service.ecg.prepare.prepare_ecg`), fires a hook for
them and renders the answer as cards. It exists so that a person can judge the cards, their
wording and the inputs behind them in a browser in a minute, with nothing but ``ecglab demo``.

The lead registers it in ``create_app`` only when demo mode is on: it reads patient data with a
demo token and would otherwise be an unauthenticated window onto the FHIR server.

JSON endpoints (all under the blueprint's ``/demo`` prefix):

=================================  ============================================================
``GET  /demo/api/patients``        ``{"fhirServer", "patients": [{id, name, gender, birthDate}]}``
``GET  /demo/api/patients/<id>/inputs``  features, ECG plot data (≤ 500 points per lead) and any
                                   ECG problem (``no_ecg``, ``ecg_rejected``, ``bad_signal``)
``POST /demo/api/fire``            ``{patient, hook}`` → ``{request, response, status, ...}``
=================================  ============================================================

Errors come back as ``{"error": {"kind", "message"}}`` with 400 (bad input), 404 (unknown
patient), 502 (FHIR server or service unreachable or failing). A service that *answers* with an
error (412, 500 with an OperationOutcome) is not an error of the page: ``fire`` returns 200 with
that status and body, so the page can show the OperationOutcome text.

The hook goes to the service's own ``/cds-services/{id}``: over HTTP to ``service_base`` when
given, else in-process through the current app's WSGI callable (no socket; this works under
gunicorn with any number of workers and threads, and never depends on the public URL being
reachable from the server itself). Either way it passes through the full request path (auth
check, metrics, logging) like an EHR's call.

Patient ids are shown in the page (it is a demo UI) but never written to the log.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from flask import Blueprint, Response, current_app, jsonify, redirect, request, send_from_directory, url_for
from werkzeug.wrappers import Response as WerkzeugResponse

from fhir_mappings.errors import InputError

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static" / "demo"
"""HTML, CSS and JavaScript of the page (plain files, no build step, no CDN)."""

HOOKS: tuple[str, ...] = ("patient-view", "order-select", "order-sign")
"""The hooks the page can fire (the service answers all three)."""

MAX_PLOT_POINTS = 500
"""Most samples per lead sent to the browser for the ECG plot."""

MAX_PATIENTS = 200
"""``_count`` of the patient search (the demo seeds a dozen)."""

SERVICE_TIMEOUT_S = 60.0
"""How long ``fire`` waits for the service (its own budget is far shorter)."""

INTERNAL_BASE = "http://ecglab-demo.internal"
"""Base URL of in-process calls (never resolved: the WSGI transport ignores the host)."""

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")

#: A strict policy: the page loads nothing from elsewhere and runs no inline script, so even a
#: card detail that slipped through the Markdown escaping could not run code.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

#: UCUM codes as clinicians read them.
READABLE_UNITS = {"a": "years", "[degF]": "°F", "mm[Hg]": "mmHg", "kg/m2": "kg/m²", "/min": "/min", "%": "%"}


class DemoPageError(Exception):
    """A failure the page shows: ``kind`` for the page's logic, ``message`` for people, HTTP status."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


# -- pure helpers (unit-tested) -------------------------------------------------------------------------


def decimate_for_plot(signal: npt.ArrayLike, max_points: int = MAX_PLOT_POINTS) -> npt.NDArray[np.float32]:
    """(T, C) → (≤ max_points, C): one sample per bucket of ``ceil(T / max_points)`` samples.

    Each bucket keeps its sample furthest from the lead's median rather than its first one, so
    QRS peaks survive the thinning (plain striding would drop every other R peak top at 2:1).
    """
    arr = np.asarray(signal, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"signal must be (samples, leads), got shape {arr.shape}")
    n = arr.shape[0]
    step = max(1, math.ceil(n / max_points))
    if step == 1:
        return arr
    buckets = math.ceil(n / step)
    pad = buckets * step - n
    baseline = np.median(arr, axis=0)
    padded = np.pad(arr, ((0, pad), (0, 0)), mode="edge").reshape(buckets, step, arr.shape[1])
    pick = np.abs(padded - baseline).argmax(axis=1)  # (buckets, C)
    return np.take_along_axis(padded, pick[:, np.newaxis, :], axis=1)[:, 0, :]


def patient_summary(resource: dict[str, Any]) -> dict[str, Any]:
    """The fields of a FHIR Patient the picker shows: id, a display name, gender, birth date."""
    names: Any = resource.get("name")
    display = ""
    for name in names if isinstance(names, list) else []:
        if not isinstance(name, dict):
            continue
        given = [g for g in name.get("given") or [] if isinstance(g, str)]
        family: Any = name.get("family")
        text: Any = name.get("text")
        display = text if isinstance(text, str) and text.strip() else ""
        display = display or " ".join([*given, family if isinstance(family, str) else ""]).strip()
        if display:
            break
    rid = str(resource.get("id", ""))
    return {
        "id": rid,
        "name": display or rid,
        "gender": resource.get("gender"),
        "birthDate": resource.get("birthDate"),
    }


def format_value(value: float, unit: str | None) -> str:
    """A canonical feature value as text: whole years for age (UCUM ``a``), one decimal otherwise."""
    return f"{value:.0f}" if unit == "a" else f"{value:.1f}"


def feature_rows(
    metadata: dict[str, float | None], sources: dict[str, str], mappings: Any
) -> list[dict[str, Any]]:
    """One row per model feature, in model order: display name, value as text, unit, source."""
    rows = []
    for spec in mappings.features:
        value = metadata.get(spec.key)
        shown: str | None = None
        if value is not None:
            if spec.kind == "categorical" and spec.categories:
                index = round(value)
                shown = spec.categories[index] if 0 <= index < len(spec.categories) else str(value)
            else:
                shown = format_value(float(value), spec.unit)
        rows.append(
            {
                "key": spec.key,
                "display": spec.display,
                "kind": spec.kind,
                "value": value,
                "shown": shown,
                "unit": READABLE_UNITS.get(spec.unit or "", spec.unit or "")
                if spec.kind == "continuous"
                else "",
                "source": sources.get(spec.key),
                "missing": value is None,
                "missingIndicator": bool(spec.missing_indicator),
            }
        )
    return rows


def outcome_text(body: Any) -> str | None:
    """The human text of an OperationOutcome (each issue's details.text, then diagnostics)."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return None
    parts: list[str] = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        details: Any = issue.get("details")
        detail_text = details.get("text") if isinstance(details, dict) else None
        for text in (detail_text, issue.get("diagnostics")):
            if isinstance(text, str) and text.strip() and text not in parts:
                parts.append(text.strip())
    return " — ".join(parts) or None


def _check_patient_id(value: Any) -> str:
    if not isinstance(value, str) or not _FHIR_ID.fullmatch(value):
        raise DemoPageError(
            400, "bad_request", "patient must be a FHIR id (1-64 characters of A-Z, a-z, 0-9, '-', '.')"
        )
    return value


# -- the blueprint -----------------------------------------------------------------------------------------


def create_demo_blueprint(
    fhir_base: str,
    service_base: str | None = None,
    *,
    fhir_transport: httpx.BaseTransport | None = None,
    service_transport: httpx.BaseTransport | None = None,
    fhir_timeout_s: float = 10.0,
) -> Blueprint:
    """The ``/demo`` blueprint for one FHIR server.

    Args:
        fhir_base: the FHIR R4 base the page lists patients from and names as the hooks'
            ``fhirServer`` (in ``ecglab demo``: ``ECGLAB_DEV_FHIR_SERVERS``).
        service_base: where the CDS service answers (before ``/cds-services``); ``None`` calls
            the current app in-process (recommended: no self-connection, any worker count).
        fhir_transport: httpx transport for the FHIR reads (tests pass a MockTransport).
        service_transport: httpx transport for the hook calls over HTTP (tests).
        fhir_timeout_s: timeout of one FHIR request; generous, a person is waiting, not an EHR.
    """
    fhir_base = fhir_base.rstrip("/")
    bp = Blueprint("ecglab_demo", __name__, url_prefix="/demo", static_folder=None)

    @contextmanager
    def fhir_client() -> Iterator[Any]:
        from cds_service.demo import DEMO_TOKEN
        from cds_service.fhir_client import FhirClient

        with FhirClient(fhir_base, DEMO_TOKEN, timeout=fhir_timeout_s, transport=fhir_transport) as client:
            yield client

    @bp.errorhandler(DemoPageError)
    def _page_error(exc: DemoPageError) -> Response:
        response = jsonify({"error": {"kind": exc.kind, "message": exc.message}})
        response.status_code = exc.status
        return response

    @bp.after_request
    def _headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    # -- page and assets ------------------------------------------------------------------------------
    @bp.get("")
    def bare() -> WerkzeugResponse:
        # Relative asset and API URLs in the page need the trailing slash.
        return redirect(url_for(".index"), code=308)

    @bp.get("/")
    def index() -> Response:
        return send_from_directory(STATIC_DIR, "index.html", mimetype="text/html")

    @bp.get("/static/<path:filename>")
    def asset(filename: str) -> Response:
        return send_from_directory(STATIC_DIR, filename)

    # -- JSON API ------------------------------------------------------------------------------------
    @bp.get("/api/patients")
    def patients() -> Response:
        with fhir_client() as client, _fhir_errors("listing patients"):
            found = client.search("Patient", [("_count", str(MAX_PATIENTS))])
        rows = sorted((patient_summary(p) for p in found if p.get("id")), key=lambda r: (r["name"], r["id"]))
        return jsonify({"fhirServer": fhir_base, "patients": rows})

    @bp.get("/api/patients/<patient_id>/inputs")
    def inputs(patient_id: str) -> Response:
        return jsonify(_inputs(_check_patient_id(patient_id), fhir_client))

    @bp.post("/api/fire")
    def fire() -> Response:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise DemoPageError(400, "bad_request", 'send a JSON object {"patient": ..., "hook": ...}')
        patient_id = _check_patient_id(body.get("patient"))
        hook = body.get("hook")
        if hook not in HOOKS:
            raise DemoPageError(400, "bad_request", f"hook must be one of {', '.join(HOOKS)}")
        return jsonify(_fire(str(hook), patient_id, fhir_base, service_base, service_transport))

    return bp


@contextmanager
def _fhir_errors(what: str) -> Iterator[None]:
    """FHIR client failures → DemoPageError with a message a person can act on (no patient id)."""
    from cds_service.fhir_client import (
        FhirConnectionError,
        FhirError,
        FhirNotFound,
        FhirTimeout,
    )

    try:
        yield
    except FhirNotFound as exc:
        raise DemoPageError(404, "not_found", f"{what}: the FHIR server has no such patient") from exc
    except (FhirConnectionError, FhirTimeout) as exc:
        log.warning("demo page: %s failed: %s", what, type(exc).__name__)
        raise DemoPageError(
            502, "fhir_unreachable", f"{what}: the FHIR server does not answer ({exc}). Is it running?"
        ) from exc
    except FhirError as exc:
        log.warning("demo page: %s failed: %s (HTTP %s)", what, type(exc).__name__, exc.status)
        raise DemoPageError(502, "fhir_error", f"{what}: the FHIR server failed: {exc}") from exc
    except InputError as exc:
        raise DemoPageError(400, "bad_request", str(exc)) from exc


def _inputs(patient_id: str, fhir_client: Any) -> dict[str, Any]:
    """What the model would read for the patient: features, ECG plot data, or the ECG's problem.

    The data comes through the hooks' own path (:func:`cds_service.fetch.gather_patient_data` with
    every prefetch key fetched, then :func:`cds_service.fetch.model_inputs`), so the page shows
    what a hook call without prefetch would feed the model.
    """
    from cds_service.ecg.prepare import prepare_ecg
    from cds_service.ecg.record import EcgRejected
    from cds_service.features import NoEcgError, extract_metadata
    from cds_service.fetch import gather_patient_data, model_inputs
    from cds_service.prefetch import build_queries
    from fhir_mappings import load_mappings
    from fhir_mappings.signal_spec import MODEL_LEADS, TARGET_FS

    mappings = load_mappings()
    now = datetime.now(UTC)
    with fhir_client() as client:
        with _fhir_errors("reading the patient's data"):
            data = gather_patient_data(build_queries(mappings), patient_id, now=now, client=client)
        problem: dict[str, str] | None = None
        ecg: dict[str, Any] | None = None
        try:
            with _fhir_errors("reading the ECG attachment"):
                inputs = model_inputs(data, mappings=mappings, now=now, client=client)
        except NoEcgError as exc:
            problem = {"kind": "no_ecg", "message": f"No usable ECG: {exc}"}
        except EcgRejected as exc:
            problem = {"kind": "ecg_rejected", "message": f"The ECG was rejected ({exc.reason}): {exc}"}
    if problem is not None:
        # No ECG time to anchor the windows on: show the features as of now.
        metadata, sources = extract_metadata(data.patient, data.observations, mappings, now)
        anchor = now
    else:
        metadata, sources = inputs.metadata, inputs.sources
        record = inputs.ecg
        anchor = record.recorded_at
        ecg = {
            "reference": record.reference,
            "carrier": record.carrier,
            "recordedAt": record.recorded_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "sourceFs": float(record.fs),
            "sourceLeads": list(record.lead_names),
            "sourceSamples": int(record.signal.shape[0]),
        }
        try:
            prepared = prepare_ecg(record.signal, record.fs, record.lead_names, mappings.ecg.lead_aliases)
        except EcgRejected as exc:
            problem = {"kind": "bad_signal", "message": f"The ECG cannot be prepared ({exc.reason}): {exc}"}
        else:
            plot = decimate_for_plot(prepared)
            step = prepared.shape[0] / plot.shape[0]
            ecg.update(
                leads=list(MODEL_LEADS),
                fs=TARGET_FS / step,
                durationS=prepared.shape[0] / TARGET_FS,
                units="mV",
                signals=[[round(float(v), 4) for v in plot[:, i]] for i in range(plot.shape[1])],
            )
    return {
        "patient": patient_summary(data.patient or {"id": patient_id}),
        "anchor": anchor.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "features": feature_rows(metadata, sources, mappings),
        "ecg": ecg,
        "ecgProblem": problem,
        "counts": {
            "observations": len(data.observations),
            "ecgResources": len(data.ecgs),
            "labResults": len(data.lab_results),
            "serviceRequests": len(data.service_requests),
        },
    }


def _service_client(service_base: str | None, transport: httpx.BaseTransport | None) -> httpx.Client:
    """HTTP to ``service_base``, or the current app called in-process when it is ``None``."""
    if service_base is None:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        return httpx.Client(
            transport=httpx.WSGITransport(app=app), base_url=INTERNAL_BASE, timeout=SERVICE_TIMEOUT_S
        )
    return httpx.Client(base_url=service_base.rstrip("/"), transport=transport, timeout=SERVICE_TIMEOUT_S)


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"text": response.text[:2000]}


def _fire(
    hook: str,
    patient_id: str,
    fhir_base: str,
    service_base: str | None,
    transport: httpx.BaseTransport | None,
) -> dict[str, Any]:
    """Discover the service for ``hook``, post it the request an EHR would send, report both."""
    from cds_service.demo import hook_request

    body = hook_request(hook, patient_id, fhir_base)
    where = "the CDS service" if service_base is None else f"the CDS service at {service_base}"
    with _service_client(service_base, transport) as client:
        try:
            discovery = client.get("/cds-services", headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            log.warning("demo page: discovery failed: %s", type(exc).__name__)
            raise DemoPageError(502, "service_unreachable", f"{where} does not answer ({exc}).") from exc
        listing = _json_or_text(discovery)
        if discovery.status_code != 200:
            detail = outcome_text(listing) or f"HTTP {discovery.status_code}"
            raise DemoPageError(502, "service_error", f"discovery at {where} failed: {detail}")
        services = listing.get("services") if isinstance(listing, dict) else None
        service_id = next(
            (s.get("id") for s in services or [] if isinstance(s, dict) and s.get("hook") == hook), None
        )
        if not isinstance(service_id, str):
            raise DemoPageError(502, "service_error", f"the discovery of {where} lists no {hook} service")
        started = time.perf_counter()
        try:
            answer = client.post(f"/cds-services/{service_id}", json=body)
        except httpx.HTTPError as exc:
            log.warning("demo page: %s call failed: %s", hook, type(exc).__name__)
            raise DemoPageError(502, "service_unreachable", f"{where} does not answer ({exc}).") from exc
        elapsed_ms = 1000 * (time.perf_counter() - started)
    payload = _json_or_text(answer)
    log.info("demo page: fired %s → HTTP %d in %.0f ms", hook, answer.status_code, elapsed_ms)
    return {
        "hook": hook,
        "serviceId": service_id,
        "request": body,
        "status": answer.status_code,
        "response": payload,
        "outcomeText": outcome_text(payload),
        "elapsedMs": round(elapsed_ms, 1),
    }
