"""Secrets: no token, JWT or patient id in any log line, whatever path a hook call takes.

cdshooks.md §0.8 and §8: never log the client JWT or the ``fhirAuthorization.access_token`` [BP];
the brief adds patient identifiers. The service is run with auth on (an ES384 client JWT per call,
the fake FHIR upstream on the issuer's ``fhir_servers`` list) and **every logger at DEBUG** —
``cds_service``, ``httpx``, ``httpcore``, ``werkzeug``, ``gunicorn``, ``sqlalchemy`` and any other
that exists — which is stricter than production, where ``ecglab serve`` keeps the chatty libraries
at WARNING and adds a redacting filter. Calls go through prefetch and through FHIR fetching
(success, 401, malformed, slow, a 50 MB attachment), feedback, a replayed JWT and a model failure;
then every captured record, its traceback included, is searched for the secrets. The gunicorn
side (a subprocess's stderr) is scanned by the load test.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from cds_service.app import create_app
from tests.fake_upstream import FakeUpstream
from tests.service_fixtures import (
    FHIR_TOKEN,
    PATIENT_ID,
    PUBLIC_URL,
    FakeRuntime,
    clinical_record,
    hook_request,
    jwks,
    mint,
    prediction,
    prefetch_from,
    session_keys,
)

ISS = "https://ehr.secrets.example.org"
HOOK = "/cds-services/ecglab-patient-view"
FEEDBACK = HOOK + "/feedback"
#: The fhirAuthorization token of these calls: itself a JWT, as Epic's is (cdshooks.md §8).
ACCESS_JWT_PARTS = (
    "eyJhbGciOiJSUzM4NCJ9",
    "eyJzdWIiOiJmaGlyLXVzZXItc2VjcmV0In0",
    "QWNjZXNzVG9rZW5TaWduYXR1cmVTZWNyZXQ",
)
ACCESS_JWT = ".".join(ACCESS_JWT_PARTS)
NOISY_LOGGERS = (
    "httpx",
    "httpcore",
    "werkzeug",
    "gunicorn",
    "gunicorn.error",
    "gunicorn.access",
    "sqlalchemy",
    "urllib3",
)


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    """The fake FHIR server with the patient's record."""
    record = clinical_record()
    with FakeUpstream([r for rs in record.values() for r in rs], delay_s=2.0) as server:
        yield server


@pytest.fixture
def app(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Flask]:
    """A service with auth on: one issuer (static JWKS) whose fhir_servers list holds the upstream."""
    keys = session_keys()
    (tmp_path / "ehr.jwks.json").write_text(json.dumps(jwks(keys["ec"], keys["rsa"])))
    issuers = tmp_path / "issuers.yaml"
    issuers.write_text(
        f'issuers:\n  "{ISS}":\n    jwks_file: ehr.jwks.json\n    fhir_servers: ["{upstream.base_url}"]\n'
    )
    built = create_app(
        {
            "public_url": PUBLIC_URL,
            "auth": True,
            "issuers": str(issuers),
            "audit_key": "reliability-secrets-audit-key-of-32-bytes",
            "database_url": f"sqlite:///{tmp_path / 'secrets.sqlite3'}",
            "budget_ms": 700,
            "fhir_timeout_ms": 400,
            "log_level": "DEBUG",
            "prediction_cache_s": 0,  # the model runs on every call (one of them fails)
        },
        runtime=FakeRuntime([prediction("ntprobnp", 0.95)]),
    )
    yield built
    built.extensions["ecglab"].close()


def every_logger_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """Root, every logger created so far and the usual noisy libraries: all at DEBUG (restored afterwards).

    The FHIR client module is imported first: importing it sets ``httpx``/``httpcore`` to WARNING,
    which would otherwise undo this on the first FHIR call.
    """
    import cds_service.fhir_client  # noqa: F401  (import side effect: its logger levels)

    caplog.set_level(logging.DEBUG)
    names = set(logging.root.manager.loggerDict) | set(NOISY_LOGGERS)
    for name in sorted(names):
        caplog.set_level(logging.DEBUG, logger=name)


def bearer(path: str, **claims: Any) -> dict[str, str]:
    """A fresh ES384 client JWT for ``path``; the header also carries the token (to find it if logged)."""
    audience = claims.pop("aud", PUBLIC_URL + path)
    token = mint(session_keys()["ec"], iss=ISS, aud=audience, **claims)
    return {"Authorization": f"Bearer {token}"}


def test_no_token_jwt_or_patient_id_is_ever_logged(
    app: Flask, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """§0.8 + §8: across prefetch, FHIR fetching, its failures, feedback, refusals and errors, no log line holds a secret."""
    every_logger_at_debug(caplog)
    client = app.test_client()
    used_jwts: list[str] = []
    answers: list[Any] = []

    def call(path: str, body: Any, **claims: Any) -> Any:
        headers = bearer(path, **claims)
        used_jwts.append(headers["Authorization"].removeprefix("Bearer "))
        response = client.post(path, json=body, headers=headers)
        answers.append(response)
        return response

    full = prefetch_from(clinical_record())
    assert (
        call(
            HOOK, hook_request("patient-view", prefetch=full, fhir_server=upstream.base_url, token=ACCESS_JWT)
        ).status_code
        == 200
    )
    fetched = call(HOOK, hook_request("patient-view", fhir_server=upstream.base_url, token=ACCESS_JWT))
    assert fetched.status_code == 200 and fetched.get_json()["cards"], "the FHIR path really ran"
    assert any(r.headers.get("authorization") == f"Bearer {ACCESS_JWT}" for r in upstream.requests)
    partial = {k: v for k, v in full.items() if k not in ("labs", "orders")}
    for mode in ("http_401", "malformed_json", "slow", "huge_attachment", "endless_next"):
        with upstream.switched(mode):
            call(
                HOOK,
                hook_request(
                    "patient-view",
                    prefetch=partial if mode != "huge_attachment" else None,
                    fhir_server=upstream.base_url,
                    token=ACCESS_JWT,
                ),
            )
    call(HOOK, hook_request("patient-view", token=ACCESS_JWT))  # no fhirServer: 412
    call(
        HOOK,
        hook_request("patient-view", fhir_server="https://not-allowed.example.org/fhir", token=ACCESS_JWT),
    )
    call(
        FEEDBACK,
        {
            "feedback": [
                {
                    "card": fetched.get_json()["cards"][0]["uuid"],  # feedback is taken only on issued cards
                    "outcome": "overridden",
                    "outcomeTimestamp": "2026-01-01T00:00:00Z",
                }
            ]
        },
    )
    replayed = bearer(HOOK)
    used_jwts.append(replayed["Authorization"].removeprefix("Bearer "))
    for _ in range(2):
        answers.append(client.post(HOOK, json=hook_request("patient-view", prefetch=full), headers=replayed))
    call(HOOK, hook_request("patient-view", prefetch=full), aud="https://wrong.example.org")
    answers.append(
        client.get("/cds-services", headers={"Authorization": f"Bearer {ACCESS_JWT}"})
    )  # wrong token kind
    app.extensions["ecglab"].pipeline.deps.runtime.raises = RuntimeError("model failed")
    failed = call(
        HOOK, hook_request("patient-view", prefetch=full, fhir_server=upstream.base_url, token=ACCESS_JWT)
    )
    assert failed.status_code == 500

    statuses = sorted({a.status_code for a in answers})
    assert statuses == [200, 401, 412, 500], statuses
    secrets = {
        "fhirAuthorization token": ACCESS_JWT,
        **{f"fhirAuthorization token part {i}": part for i, part in enumerate(ACCESS_JWT_PARTS)},
        "legacy test token": FHIR_TOKEN,
        "patient id": PATIENT_ID,
    }
    for n, token in enumerate(used_jwts):
        secrets[f"client JWT {n}"] = token
        secrets[f"client JWT {n} signature"] = token.split(".")[2]
        secrets[f"client JWT {n} payload"] = token.split(".")[1]
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    lines = [formatter.format(record) for record in caplog.records]
    assert len(lines) > 50, "the run logged (DEBUG everywhere); an empty capture proves nothing"
    assert any(
        record.name.startswith("httpx") or record.name.startswith("httpcore") for record in caplog.records
    )
    leaks = [(name, line[:300]) for line in lines for name, secret in secrets.items() if secret in line]
    assert leaks == [], leaks[:5]
    for answer in answers:  # nor does any response echo them back
        text = answer.get_data(as_text=True)
        assert ACCESS_JWT not in text and FHIR_TOKEN not in text and not any(t in text for t in used_jwts)
