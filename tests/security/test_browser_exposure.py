"""Issue 14, browser exposure: what a web page on another site can make a user's browser do.

A page can make the browser send a "simple" cross-site POST (``text/plain``,
``application/x-www-form-urlencoded`` or ``multipart/form-data``, no ``Authorization``) without a
preflight, and read any answer that carries CORS headers. So, through the HTTP interface:

* hook and feedback endpoints take only JSON (``application/json`` or ``application/fhir+json``,
  UTF-8); anything else is a 415 OperationOutcome with no side effect: no FHIR call, no model
  call, no stored feedback, no ``jti`` spent, no key download; and the 415 comes before the JWT
  check, so it is the same answer whatever the token;
* CORS headers appear only on discovery, hooks, feedback and their preflights, only for a listed
  origin, never on ``/metrics``, ``/healthz``, ``/demo`` or the model card; with no origins
  configured (the default) there are none at all, and ``*`` is refused with auth off.
"""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from cds_service.db import Feedback
from cds_service.hook_request import SERVICES
from fhir_mappings.errors import ConfigError
from tests.issued_cards import issue_card
from tests.service_fixtures import (
    EHR_FHIR,
    EHR_ISS,
    FHIR_TOKEN,
    JKU_ISS,
    JKU_URL,
    PUBLIC_URL,
    FakeRuntime,
    MockFhir,
    ServiceEnv,
    clinical_record,
    hook_request,
    mint,
    prediction,
)

SANDBOX = "https://sandbox.cds-hooks.org"
EVIL = "https://evil.example.com"
DEV = {"auth": False, "issuers": "", "dev_fhir_servers": EHR_FHIR}
HOOK_OF = {service.id: service.hook for service in SERVICES.values()}
#: Content types a hook or feedback body may not have: the three a cross-site page can send without
#: a preflight (with and without parameters), none at all, and JSON-looking or non-UTF-8 variants.
REFUSED_TYPES = [
    "text/plain",
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=ecglab",
    None,
    "text/json",
    "application/xml",
    "application/json; charset=iso-8859-1",
    "application/fhir+json; charset=utf-16",
]
ACCEPTED_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "APPLICATION/JSON; Charset=UTF-8",
    "application/fhir+json",
    "application/fhir+json; charset=utf-8",
]
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def hook_path(service_id: str) -> str:
    """The hook endpoint of a service."""
    return f"/cds-services/{service_id}"


def feedback_path(service_id: str) -> str:
    """The feedback endpoint of a service."""
    return f"/cds-services/{service_id}/feedback"


def cds_endpoints() -> list[str]:
    """Every CDS Hooks endpoint: discovery, each service's hook and feedback."""
    services = list(SERVICES)
    return ["/cds-services", *map(hook_path, services), *map(feedback_path, services)]


def cors_headers(response: Any) -> dict[str, str]:
    """The ``Access-Control-*`` headers of an answer."""
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


def feedback_rows(app: Flask) -> int:
    """Rows in the feedback table of ``app``'s database."""
    with app.extensions["ecglab"].engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Feedback)).scalar_one())


def assert_415(response: Any) -> dict[str, Any]:
    """A 415 answered with an ``application/fhir+json`` OperationOutcome; returns the body."""
    assert response.status_code == 415, response.get_data(as_text=True)[:300]
    assert response.mimetype == "application/fhir+json"
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error" and body["issue"][0]["code"] == "not-supported"
    assert "WWW-Authenticate" not in response.headers
    return dict(body)


def bodies(app: Flask, service_id: str) -> tuple[bytes, bytes]:
    """A hook body that needs FHIR reads, and a feedback body on a card issued with auth off."""
    hook = hook_request(HOOK_OF[service_id], fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    feedback = feedback_on(issue_card(app, service_id=service_id, issuer=None))
    return app.json.dumps(hook).encode(), app.json.dumps(feedback).encode()


def feedback_on(card: str) -> dict[str, Any]:
    """A feedback body overriding ``card``."""
    return {"feedback": [{"card": card, "outcome": "overridden", "outcomeTimestamp": "2026-03-01T08:00:00Z"}]}


def record_fhir() -> MockFhir:
    """A FHIR server holding one patient's record, so that a JSON hook call reads it."""
    return MockFhir([r for resources in clinical_record().values() for r in resources])


# -- JSON only ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", REFUSED_TYPES)
def test_a_non_json_body_is_a_415_with_no_side_effect(make_app, content_type: str | None) -> None:
    """Every hook and feedback endpoint: 415 OperationOutcome; no FHIR or model call, nothing stored."""
    fhir = record_fhir()
    runtime = FakeRuntime([prediction("ntprobnp", 0.95)])
    app = make_app(runtime=runtime, fhir=fhir, **DEV)
    client = app.test_client()
    for service_id in SERVICES:
        hook_body, feedback_body = bodies(app, service_id)
        assert_415(client.post(hook_path(service_id), data=hook_body, content_type=content_type))
        assert_415(client.post(feedback_path(service_id), data=feedback_body, content_type=content_type))
    assert fhir.requests == [] and runtime.seen == [] and feedback_rows(app) == 0
    # The same bodies declared as JSON do reach the FHIR server, the model and the database.
    for service_id in SERVICES:
        hook_body, feedback_body = bodies(app, service_id)
        hook = client.post(hook_path(service_id), data=hook_body, content_type="application/json")
        assert hook.status_code == 200 and hook.get_json()["cards"]
        answer = client.post(feedback_path(service_id), data=feedback_body, content_type="application/json")
        assert answer.get_json() == {"received": 1, "stored": 1}
    assert fhir.requests and len(runtime.seen) == len(SERVICES) and feedback_rows(app) == len(SERVICES)


@pytest.mark.parametrize("content_type", ACCEPTED_TYPES)
def test_json_bodies_are_accepted_with_or_without_a_utf8_charset(make_app, content_type: str) -> None:
    """application/json (what CDS Hooks clients send) and application/fhir+json, UTF-8 or no charset."""
    app = make_app(runtime=FakeRuntime([prediction("ntprobnp", 0.95)]), fhir=record_fhir(), **DEV)
    client = app.test_client()
    service_id = next(iter(SERVICES))
    hook_body, feedback_body = bodies(app, service_id)
    hook = client.post(hook_path(service_id), data=hook_body, content_type=content_type)
    assert hook.status_code == 200 and hook.get_json()["cards"]
    feedback = client.post(feedback_path(service_id), data=feedback_body, content_type=content_type)
    assert feedback.get_json() == {"received": 1, "stored": 1}


@pytest.mark.parametrize("path", [hook_path("ecglab-patient-view"), feedback_path("ecglab-patient-view")])
def test_the_415_comes_before_authentication_and_says_nothing_about_the_token(
    make_app, service_env: ServiceEnv, path: str
) -> None:
    """Auth on: no token, a garbage one, a valid one, a jku one: the same 415; no key fetched, no jti spent."""
    runtime = FakeRuntime([prediction("ntprobnp", 0.95)])
    fhir = record_fhir()
    app = make_app(runtime=runtime, fhir=fhir)
    client = app.test_client()
    valid = service_env.bearer(path)
    jku_token = mint(service_env.keys["rsa"], iss=JKU_ISS, aud=PUBLIC_URL + path, jku=JKU_URL)
    attempts: list[dict[str, str]] = [{}, {"Authorization": "Bearer garbage"}, valid]
    attempts.append({"Authorization": f"Bearer {jku_token}"})
    answers = [client.post(path, data=b"{}", content_type="text/plain", headers=h) for h in attempts]
    assert len({a.get_data() for a in answers}) == 1
    for answer in answers:
        assert_415(answer)
    assert service_env.jku_fetches == [] and runtime.seen == [] and fhir.requests == []
    # The valid token was not spent: it still authenticates the same call sent as JSON.
    if path.endswith("/feedback"):
        body: Any = feedback_on(issue_card(app, service_id="ecglab-patient-view", issuer=EHR_ISS))
    else:
        body = hook_request("patient-view", fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    assert client.post(path, json=body, headers=valid).status_code == 200
    # A JSON body without a token is a 401 as before: the media type is the only earlier check.
    assert client.post(path, json=body).status_code == 401


# -- CORS only on the CDS Hooks endpoints -------------------------------------------------------------------


def exposure_app(make_app: Any, **settings: Any) -> Flask:
    """An auth-off app with every optional path on: /metrics, /demo, and a FHIR server with data."""
    values = {**DEV, "metrics": True, "demo": True, **settings}
    return make_app(runtime=FakeRuntime([prediction("ntprobnp", 0.95)]), fhir=record_fhir(), **values)


def cds_calls(app: Flask, origin: str) -> list[tuple[str, Any]]:
    """Discovery, a hook and a feedback call per service, and a preflight of each, all from ``origin``."""
    client = app.test_client()
    calls = [("GET /cds-services", client.get("/cds-services", headers={"Origin": origin}))]
    for service_id in SERVICES:
        hook_body, feedback_body = bodies(app, service_id)
        for path, body in ((hook_path(service_id), hook_body), (feedback_path(service_id), feedback_body)):
            answer = client.post(path, data=body, content_type="application/json", headers={"Origin": origin})
            assert answer.status_code == 200, answer.get_json()
            calls.append((f"POST {path}", answer))
    for path in cds_endpoints():
        preflight = client.options(path, headers={"Origin": origin, **PREFLIGHT})
        assert preflight.status_code == 204 and preflight.get_data() == b""
        calls.append((f"OPTIONS {path}", preflight))
    return calls


def other_calls(app: Flask, origin: str) -> list[tuple[str, Any]]:
    """GET and a preflight of every path that is not a CDS Hooks endpoint, from ``origin``."""
    client = app.test_client()
    calls = []
    for path in (
        "/metrics",
        "/healthz",
        "/demo/",
        "/demo/api/patients",
        "/model-card",
        "/cds-services/model-card",
    ):
        calls.append((f"GET {path}", client.get(path, headers={"Origin": origin})))
        calls.append((f"OPTIONS {path}", client.options(path, headers={"Origin": origin, **PREFLIGHT})))
    assert dict(calls)["GET /metrics"].status_code == 200 and dict(calls)["GET /demo/"].status_code == 200
    return calls


def test_a_listed_origin_gets_cors_on_every_cds_endpoint_and_its_preflight(make_app) -> None:
    """Discovery, hooks, feedback and their preflights name the origin (never ``*`` or credentials)."""
    app = exposure_app(make_app, cors_origins=SANDBOX)
    for call, answer in cds_calls(app, SANDBOX):
        headers = cors_headers(answer)
        assert headers.get("Access-Control-Allow-Origin") == SANDBOX, call
        assert "Origin" in answer.headers.get("Vary", ""), call
        assert "Access-Control-Allow-Credentials" not in headers, call
        if call.startswith("OPTIONS"):
            assert {"POST", "GET"} <= {m.strip() for m in headers["Access-Control-Allow-Methods"].split(",")}
            assert {"Authorization", "Content-Type"} <= {
                h.strip() for h in headers["Access-Control-Allow-Headers"].split(",")
            }


def test_an_unlisted_origin_gets_no_cors_header(make_app) -> None:
    """Another origin: the calls are answered, but without any Access-Control header; caches are told."""
    app = exposure_app(make_app, cors_origins=SANDBOX)
    for call, answer in cds_calls(app, EVIL):
        assert cors_headers(answer) == {}, call
        assert "Origin" in answer.headers.get("Vary", ""), call


def test_metrics_healthz_demo_and_model_card_never_carry_cors(make_app) -> None:
    """/metrics, /healthz, /demo and the model card (HTML and JSON): no CORS, even for a listed origin."""
    app = exposure_app(make_app, cors_origins=SANDBOX)
    for call, answer in other_calls(app, SANDBOX):
        assert cors_headers(answer) == {}, call


def test_any_origin_with_auth_on_still_only_covers_the_cds_endpoints(make_app) -> None:
    """Auth on, '*': discovery answers ``*`` (the bearer JWT guards it), /metrics and the rest nothing."""
    client = make_app(cors_origins="*").test_client()
    discovery = client.get("/cds-services", headers={"Origin": EVIL})
    assert discovery.status_code == 401 and cors_headers(discovery) == {"Access-Control-Allow-Origin": "*"}
    for path in ("/metrics", "/healthz", "/model-card", "/cds-services/model-card"):
        answer = client.get(path, headers={"Origin": EVIL})
        assert answer.status_code < 500 and cors_headers(answer) == {}, path


def test_auth_off_without_origins_has_no_cors_anywhere(make_app) -> None:
    """The default (no ECGLAB_CORS_ORIGINS): no Access-Control header on any path, preflights included."""
    app = exposure_app(make_app)
    assert app.extensions["ecglab"].settings.cors_origins == ()
    for call, answer in [*cds_calls(app, SANDBOX), *other_calls(app, SANDBOX)]:
        assert cors_headers(answer) == {}, call


def test_any_origin_is_refused_with_auth_off(make_app) -> None:
    """'*' with auth off would let every web page read an unauthenticated service: start-up stops."""
    with pytest.raises(ConfigError, match="ECGLAB_CORS_ORIGINS"):
        make_app(cors_origins="*", **DEV)


def test_a_415_to_a_listed_origin_is_readable(make_app) -> None:
    """A browser client that sends the wrong type can read why (the 415 carries the CORS header)."""
    app = exposure_app(make_app, cors_origins=SANDBOX)
    answer = app.test_client().post(
        hook_path("ecglab-patient-view"), data=b"{}", content_type="text/plain", headers={"Origin": SANDBOX}
    )
    assert_415(answer)
    assert answer.headers["Access-Control-Allow-Origin"] == SANDBOX


def test_private_network_preflight_is_allowed_for_a_listed_origin_only(make_app) -> None:
    """Chrome's Private Network Access preflight (public Sandbox → service on localhost): listed origin only."""
    app = exposure_app(make_app, cors_origins=SANDBOX)
    client = app.test_client()
    asked = {**PREFLIGHT, "Access-Control-Request-Private-Network": "true"}
    allowed = client.options("/cds-services/ecglab-patient-view", headers={"Origin": SANDBOX, **asked})
    assert allowed.headers["Access-Control-Allow-Private-Network"] == "true"
    refused = client.options("/cds-services/ecglab-patient-view", headers={"Origin": EVIL, **asked})
    assert cors_headers(refused) == {}
