"""The card-preview page's server side (``cds_service.demo_page``), through Flask's test client.

The app is the real service (``create_app``, auth off as in demo mode) with the page's blueprint
registered; FHIR is :class:`tests.service_fixtures.MockFhir`, the model :class:`PerEcgRuntime`
(``tests/browser.py``). Rules pinned: the page and its assets (offline, strict CSP), the three
JSON endpoints and their error states, the hook request it builds (``cds_service.demo.hook_request``,
cdshooks.md §3), the ECG plot data (model lead order, ≤ 500 points) and that patient ids never
reach the log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds_service.demo_page import (
    MAX_PLOT_POINTS,
    STATIC_DIR,
    create_demo_blueprint,
    decimate_for_plot,
    outcome_text,
    patient_summary,
)
from fhir_mappings.signal_spec import MODEL_LEADS
from tests.browser import DEMO_FHIR, DemoWorld, build_demo_app, demo_world, dispose_app
from tests.service_fixtures import MockFhir


@pytest.fixture
def world() -> DemoWorld:
    return demo_world()


@pytest.fixture
def app(tmp_path: Path, world: DemoWorld) -> Iterator[Flask]:
    built, _ = build_demo_app(tmp_path, world)
    yield built
    dispose_app(built)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _refusing_transport() -> httpx.MockTransport:
    """A transport whose every request fails to connect (a server that is down)."""

    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    return httpx.MockTransport(handle)


# -- page and assets -----------------------------------------------------------------------------------


def test_bare_demo_path_redirects_to_trailing_slash(client: FlaskClient) -> None:
    """The page's asset and API URLs are relative, so ``/demo`` must become ``/demo/``."""
    response = client.get("/demo")
    assert response.status_code == 308
    assert response.headers["Location"].endswith("/demo/")


def test_page_is_served_with_a_strict_content_security_policy(client: FlaskClient) -> None:
    """Card text is untrusted: the page allows scripts and styles from itself only, nothing inline."""
    response = client.get("/demo/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert b'id="patient"' in response.data and b'id="fire"' in response.data
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "default-src 'self'" in policy
    assert "unsafe-inline" not in policy


def test_page_loads_only_local_assets_that_exist(client: FlaskClient) -> None:
    """The page must work offline: every script and stylesheet is a local file, none from a CDN."""
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    referenced = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert referenced, "index.html references no assets"
    for url in referenced:
        assert not re.match(r"^(?:[a-z]+:)?//", url), f"{url} is not local"
        assert client.get(f"/demo/{url}").status_code == 200, url
    for asset in STATIC_DIR.iterdir():
        text = asset.read_text(encoding="utf-8")
        assert not re.search(r"""(?:src|href)\s*=\s*["']https?://""", text), (
            f"{asset.name} loads a remote asset"
        )
        assert "import(" not in text and "@import" not in text, asset.name


# -- patients --------------------------------------------------------------------------------------------


def test_patients_lists_every_fhir_patient_sorted_by_name(client: FlaskClient) -> None:
    """``GET /demo/api/patients`` reads ``Patient?_count=200`` and names each patient."""
    body = client.get("/demo/api/patients").get_json()
    assert body["fhirServer"] == DEMO_FHIR
    assert [p["name"] for p in body["patients"]] == ["Ada Quinn", "Ben Ortiz", "Cyd Park", "Dee Novak"]
    assert body["patients"][0] == {
        "id": "pat-ada",
        "name": "Ada Quinn",
        "gender": "female",
        "birthDate": "1951-06-02",
    }


def test_patient_summary_prefers_name_text_and_falls_back_to_the_id() -> None:
    """A display name: ``name.text``, else given + family, else the id."""
    assert patient_summary({"id": "p1", "name": [{"text": "Dr. X Y", "given": ["X"]}]})["name"] == "Dr. X Y"
    assert patient_summary({"id": "p2", "name": [{"given": ["A", "B"], "family": "C"}]})["name"] == "A B C"
    assert patient_summary({"id": "p3"})["name"] == "p3"


def test_patients_reports_an_unreachable_fhir_server_as_502(tmp_path: Path, world: DemoWorld) -> None:
    """FHIR down: a 502 whose message says the FHIR server does not answer."""
    app, _ = build_demo_app(tmp_path, world, fhir_transport=_refusing_transport())
    try:
        response = app.test_client().get("/demo/api/patients")
    finally:
        dispose_app(app)
    assert response.status_code == 502
    error = response.get_json()["error"]
    assert error["kind"] == "fhir_unreachable"
    assert "FHIR server does not answer" in error["message"]


def test_patients_reports_a_failing_fhir_server_as_502(tmp_path: Path, world: DemoWorld) -> None:
    """FHIR answering 5xx: a 502 naming the HTTP status."""
    app, _ = build_demo_app(tmp_path, world, fhir=MockFhir(world.resources, status=503))
    try:
        response = app.test_client().get("/demo/api/patients")
    finally:
        dispose_app(app)
    assert response.status_code == 502
    assert response.get_json()["error"]["kind"] == "fhir_error"
    assert "503" in response.get_json()["error"]["message"]


# -- inputs ----------------------------------------------------------------------------------------------


def test_inputs_list_every_feature_with_value_unit_and_source(client: FlaskClient) -> None:
    """Features in model order, in canonical units (°C → °F), each with the resource that supplied it."""
    body = client.get("/demo/api/patients/pat-ada/inputs").get_json()
    rows = {row["key"]: row for row in body["features"]}
    assert [row["key"] for row in body["features"]][:3] == ["sex", "race", "age"]
    assert rows["sex"]["shown"] == "female" and rows["race"]["shown"] == "white"
    assert rows["heart_rate"]["shown"] == "112.0" and rows["heart_rate"]["unit"] == "/min"
    assert rows["heart_rate"]["source"] == "Observation/hr-ada"
    assert rows["temperature"]["shown"] == "100.2" and rows["temperature"]["unit"] == "°F"
    assert rows["bmi"]["source"].startswith("computed from Observation/wt-ada")
    assert rows["age"]["source"] == "Patient/pat-ada"
    assert body["ecgProblem"] is None


def test_inputs_ecg_has_twelve_leads_in_model_order_and_at_most_500_points(client: FlaskClient) -> None:
    """The plot data is the prepared (1000, 12) signal, thinned to ≤ 500 points per lead."""
    ecg = client.get("/demo/api/patients/pat-ada/inputs").get_json()["ecg"]
    assert ecg["leads"] == list(MODEL_LEADS)
    assert len(ecg["signals"]) == 12
    assert all(0 < len(lead) <= MAX_PLOT_POINTS for lead in ecg["signals"])
    assert ecg["reference"] == "Observation/ecg-ada" and ecg["units"] == "mV"
    assert ecg["fs"] * ecg["durationS"] == pytest.approx(len(ecg["signals"][0]))
    assert max(abs(v) for lead in ecg["signals"] for v in lead) <= 3.0


def test_inputs_without_an_ecg_report_no_ecg_and_still_list_features(client: FlaskClient) -> None:
    """No ECG: the page says so (the service will give no cards) and still shows the vitals."""
    body = client.get("/demo/api/patients/pat-dee/inputs").get_json()
    assert body["ecg"] is None
    assert body["ecgProblem"]["kind"] == "no_ecg"
    rows = {row["key"]: row for row in body["features"]}
    assert rows["heart_rate"]["shown"] == "64.0"
    assert rows["temperature"]["missing"] is True


def test_inputs_read_the_patient_with_the_hooks_prefetch_queries(tmp_path: Path, world: DemoWorld) -> None:
    """The page reads through the hooks' data path: one request per prefetch key, each its bound query."""
    from cds_service.prefetch import build_queries
    from fhir_mappings import load_mappings

    app, mock = build_demo_app(tmp_path, world)
    try:
        assert app.test_client().get("/demo/api/patients/pat-ada/inputs").status_code == 200
    finally:
        dispose_app(app)
    queries = build_queries(load_mappings())
    assert len(mock.requests) == len(queries)
    sent = sorted((r.url.path.rsplit("/", 1)[-1], tuple(r.url.params.keys())) for r in mock.requests)
    now = datetime.now(UTC)
    expected = sorted(
        ("pat-ada", ()) if q.read else (q.resource_type, tuple(name for name, _ in q.bind("pat-ada", now)))
        for q in queries
    )
    assert sent == expected
    filters = [r.url.params.get("date") or r.url.params.get("created") for r in mock.requests]
    assert sum(1 for f in filters if f and f.startswith("ge")) == sum(1 for q in queries if q.since)


def test_inputs_of_an_unknown_patient_are_404(client: FlaskClient) -> None:
    response = client.get("/demo/api/patients/pat-nobody/inputs")
    assert response.status_code == 404
    assert response.get_json()["error"]["kind"] == "not_found"


def test_inputs_refuse_a_patient_id_that_is_not_a_fhir_id(client: FlaskClient) -> None:
    """FHIR ids are [A-Za-z0-9-.]{1,64}; anything else would change the FHIR request path."""
    response = client.get("/demo/api/patients/a$b/inputs")
    assert response.status_code == 400
    assert "FHIR id" in response.get_json()["error"]["message"]


# -- fire ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hook", ["patient-view", "order-select", "order-sign"])
def test_fire_sends_the_demo_hook_request_and_returns_the_cards(client: FlaskClient, hook: str) -> None:
    """The request is ``demo.hook_request`` (no prefetch; fhirServer + fhirAuthorization, §3)."""
    result = client.post("/demo/api/fire", json={"patient": "pat-ada", "hook": hook}).get_json()
    request = result["request"]
    assert request["hook"] == hook
    assert request["fhirServer"] == DEMO_FHIR
    assert request["context"]["patientId"] == "pat-ada"
    assert "prefetch" not in request and request["fhirAuthorization"]["token_type"] == "Bearer"
    assert ("draftOrders" in request["context"]) == (hook != "patient-view")
    assert ("selections" in request["context"]) == (hook == "order-select")
    assert result["status"] == 200
    assert result["serviceId"] == f"ecglab-{hook}"
    cards = result["response"]["cards"]
    assert {c["indicator"] for c in cards} == {"info", "warning", "critical"}
    create = cards[0]["suggestions"][0]["actions"][0]
    assert create["type"] == "create" and create["resource"]["resourceType"] == "ServiceRequest"


def test_fire_with_no_findings_returns_an_empty_card_list(client: FlaskClient) -> None:
    result = client.post("/demo/api/fire", json={"patient": "pat-ben", "hook": "patient-view"}).get_json()
    assert result["status"] == 200 and result["response"] == {"cards": []}


def test_fire_passes_on_a_service_error_with_its_operation_outcome_text(client: FlaskClient) -> None:
    """A failing service is shown, not hidden: status 500 and the OperationOutcome's text."""
    response = client.post("/demo/api/fire", json={"patient": "pat-cyd", "hook": "patient-view"})
    assert response.status_code == 200
    result = response.get_json()
    assert result["status"] == 500
    assert result["response"]["resourceType"] == "OperationOutcome"
    assert result["outcomeText"] == "Internal error; the service log has the details."


def test_fire_over_http_calls_discovery_then_the_service_at_service_base(
    tmp_path: Path, world: DemoWorld
) -> None:
    """With ``service_base`` the hook goes over HTTP to ``{service_base}/cds-services/{id}``."""
    seen: list[str] = []
    holder: dict[str, Flask] = {}

    def forward(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url}")
        return httpx.WSGITransport(app=holder["app"]).handle_request(request)

    app, _ = build_demo_app(
        tmp_path, world, service_base="http://cds.test:8092/", service_transport=httpx.MockTransport(forward)
    )
    holder["app"] = app
    try:
        result = app.test_client().post("/demo/api/fire", json={"patient": "pat-ada", "hook": "order-sign"})
    finally:
        dispose_app(app)
    assert result.get_json()["status"] == 200
    assert seen == [
        "GET http://cds.test:8092/cds-services",
        "POST http://cds.test:8092/cds-services/ecglab-order-sign",
    ]


def test_fire_reports_an_unreachable_service_as_502(tmp_path: Path, world: DemoWorld) -> None:
    app, _ = build_demo_app(
        tmp_path, world, service_base="http://cds.test:8092", service_transport=_refusing_transport()
    )
    try:
        response = app.test_client().post(
            "/demo/api/fire", json={"patient": "pat-ada", "hook": "patient-view"}
        )
    finally:
        dispose_app(app)
    assert response.status_code == 502
    error = response.get_json()["error"]
    assert error["kind"] == "service_unreachable" and "http://cds.test:8092" in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"patient": "pat-ada", "hook": "encounter-start"},
        {"patient": "pat ada", "hook": "patient-view"},
        {"hook": "patient-view"},
        ["pat-ada", "patient-view"],
    ],
)
def test_fire_rejects_an_unknown_hook_or_a_bad_patient_with_400(client: FlaskClient, body: object) -> None:
    response = client.post("/demo/api/fire", json=body)
    assert response.status_code == 400
    assert response.get_json()["error"]["kind"] == "bad_request"


# -- privacy --------------------------------------------------------------------------------------------


def test_patient_ids_never_reach_the_log(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    """Patient ids appear in the page, never in the log (house rule), whatever the outcome."""
    caplog.set_level(logging.DEBUG, logger="cds_service")
    client.get("/demo/api/patients")
    for pid in ("pat-ada", "pat-cyd", "pat-dee", "pat-nobody"):
        client.get(f"/demo/api/patients/{pid}/inputs")
        client.post("/demo/api/fire", json={"patient": pid, "hook": "order-select"})
    ours = [r for r in caplog.records if r.name.startswith("cds_service")]
    assert any(r.name == "cds_service.demo_page" for r in ours), "the page logged nothing to check"
    for record in ours:
        text = record.getMessage() + (record.exc_text or "")
        assert "pat-" not in text, f"{record.name}: {text}"


# -- helpers ---------------------------------------------------------------------------------------------


def test_decimation_keeps_every_r_peak_and_at_most_max_points() -> None:
    """Thinning 1000 → 500 samples keeps the sample furthest from baseline in each bucket."""
    signal = np.zeros((1000, 12), dtype=np.float32)
    peaks = np.arange(41, 1000, 83)  # odd indices: plain 2:1 striding would drop every one
    signal[peaks, :] = 1.5
    thinned = decimate_for_plot(signal)
    assert thinned.shape == (500, 12)
    assert int((thinned[:, 0] == 1.5).sum()) == len(peaks)
    assert decimate_for_plot(signal[:333]).shape == (333, 12)
    assert decimate_for_plot(np.zeros((5001, 3)), 500).shape[0] <= 500


def test_outcome_text_joins_issue_details_and_diagnostics() -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "processing", "details": {"text": "Required data is missing"}},
            {"severity": "error", "code": "processing", "diagnostics": "send prefetch"},
        ],
    }
    assert outcome_text(outcome) == "Required data is missing — send prefetch"
    assert outcome_text({"cards": []}) is None


def test_blueprint_mounts_under_demo_only() -> None:
    """The blueprint adds routes under ``/demo`` and nothing else (demo mode must not leak)."""
    app = Flask("probe")
    app.register_blueprint(create_demo_blueprint(DEMO_FHIR))
    rules = {r.rule for r in app.url_map.iter_rules() if r.endpoint != "static"}
    assert rules and all(rule.startswith("/demo") for rule in rules)
