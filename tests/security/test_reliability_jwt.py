"""Hostile JWTs: every forged, stale, misdirected or malformed token gets the same bare 401.

cdshooks.md §8 (and §0.5, §10): every call — discovery and feedback included — needs the EHR's
JWT; on any failure the service answers 401 "without details" [BP]. Each case below is sent to all
three endpoints with a request that *would* produce cards, call the FHIR server or store feedback
if it got through, and the test checks that nothing of that happened: the body is the one generic
OperationOutcome, the model was not called, no FHIR request left the service, no feedback row was
written (the feedback names a card really issued to the static-JWKS issuer, so a token that got
through would store a row), and the log names the reason without the token. CORS preflights still answer without a
token (§8 "CORS").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select

from cds_service.db import Feedback
from tests.figures import record_figure
from tests.issued_cards import issue_card
from tests.service_fixtures import (
    EHR_FHIR,
    EHR_ISS,
    FHIR_TOKEN,
    JKU_ISS,
    JKU_URL,
    PUBLIC_URL,
    MockFhir,
    ServiceEnv,
    clinical_record,
    hook_request,
    jwks,
    positive_runtime,
    prefetch_from,
)

DISCOVERY = "/cds-services"
HOOK = "/cds-services/ecglab-patient-view"
FEEDBACK = "/cds-services/ecglab-patient-view/feedback"
ENDPOINTS = {"discovery": DISCOVERY, "hook": HOOK, "feedback": FEEDBACK}
GENERIC_401 = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "login", "details": {"text": "Unauthorized"}}],
}


# -- token makers -------------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    """base64url without padding (JWS compact encoding)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A compact JWS assembled by hand (for tokens PyJWT refuses to produce)."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"


def claims(path: str, **changes: Any) -> dict[str, Any]:
    """A valid payload for ``path`` from the static-JWKS issuer; ``None`` values delete a claim."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": EHR_ISS,
        "aud": PUBLIC_URL + path,
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def signed(
    env: ServiceEnv, path: str, *, key: str = "ec", alg: str | None = None, header: Any = None, **changes: Any
) -> str:
    """A token signed by ``env.keys[key]`` (its kid unless ``header`` overrides) with ``claims(path)``."""
    signing = env.keys[key]
    headers = {"kid": signing.kid, "typ": "JWT", **(header or {})}
    return jwt.encode(claims(path, **changes), signing.private, algorithm=alg or signing.alg, headers=headers)


def public_pem(env: ServiceEnv, key: str) -> bytes:
    """The PEM encoding of a key's public half (what an attacker can read from the JWKS)."""
    return (
        env.keys[key]
        .private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def hs256_with_public_key(env: ServiceEnv, path: str) -> str:
    """The classic algorithm-confusion forgery: HMAC-SHA256 keyed with the issuer's public key."""
    header = {"alg": "HS256", "typ": "JWT", "kid": env.keys["ec"].kid}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims(path)).encode())}"
    signature = hmac.new(public_pem(env, "ec"), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def tampered(env: ServiceEnv, path: str) -> str:
    """A valid token whose payload was edited after signing (iss kept, jti and exp changed)."""
    header, _, signature = signed(env, path).split(".")
    forged = claims(path, exp=int(time.time()) + 3000, tenant="admin")
    return f"{header}.{b64(json.dumps(forged).encode())}.{signature}"


def bearer(token: str) -> dict[str, str]:
    """An ``Authorization: Bearer`` header."""
    return {"Authorization": f"Bearer {token}"}


HeaderMaker = Callable[[ServiceEnv, str], dict[str, str]]

#: Hostile Authorization headers by case name: each refused for the reason its name gives.
HOSTILE: dict[str, HeaderMaker] = {
    "no Authorization header": lambda env, path: {},
    "Bearer keyword missing": lambda env, path: {"Authorization": signed(env, path)},
    "Bearer with empty token": lambda env, path: {"Authorization": "Bearer "},
    "Basic credentials": lambda env, path: {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="},
    "garbage token": lambda env, path: bearer("this-is.not-a.jwt"),
    "garbage base64 segments": lambda env, path: bearer("e30.e30.e30.e30"),
    "token too long": lambda env, path: bearer(signed(env, path, padding="x" * 20_000)),
    "alg none": lambda env, path: bearer(
        compact({"alg": "none", "typ": "JWT", "kid": "ec-key-1"}, claims(path))
    ),
    "HS256 signed with the public key": lambda env, path: bearer(hs256_with_public_key(env, path)),
    "RS256 instead of RS384": lambda env, path: bearer(signed(env, path, key="rsa", alg="RS256")),
    "RS384 named on an EC key": lambda env, path: bearer(
        compact({"alg": "RS384", "typ": "JWT", "kid": "ec-key-1"}, claims(path), b"\x01" * 256)
    ),
    "no kid": lambda env, path: bearer(
        jwt.encode(claims(path), env.keys["ec"].private, algorithm="ES384", headers={"typ": "JWT"})
    ),
    "expired": lambda env, path: bearer(
        signed(env, path, iat=int(time.time()) - 900, exp=int(time.time()) - 300)
    ),
    "not yet valid (nbf)": lambda env, path: bearer(signed(env, path, nbf=int(time.time()) + 600)),
    "issued in the future": lambda env, path: bearer(
        signed(env, path, iat=int(time.time()) + 600, exp=int(time.time()) + 900)
    ),
    "lifetime beyond the limit": lambda env, path: bearer(signed(env, path, exp=int(time.time()) + 86_400)),
    "exp not a number": lambda env, path: bearer(signed(env, path, exp="tomorrow")),
    "wrong aud (string)": lambda env, path: bearer(
        signed(env, path, aud="https://other.example.org/cds-services")
    ),
    "wrong aud (array)": lambda env, path: bearer(
        signed(env, path, aud=["https://other.example.org/cds-services", PUBLIC_URL + "/elsewhere"])
    ),
    "aud of another service": lambda env, path: bearer(
        signed(env, path, aud=PUBLIC_URL + "/cds-services/ecglab-order-sign")
    ),
    "issuer not allowed": lambda env, path: bearer(signed(env, path, iss="https://rogue.example.org")),
    "iss missing": lambda env, path: bearer(signed(env, path, iss=None)),
    "jku not on the issuer's list": lambda env, path: bearer(
        signed(env, path, key="rsa", iss=JKU_ISS, header={"jku": "https://attacker.example.com/jwks.json"})
    ),
    "jku on a look-alike host": lambda env, path: bearer(
        signed(
            env,
            path,
            key="rsa",
            iss=JKU_ISS,
            header={"jku": "https://jku.example.net.evil.io/keys/jwks.json"},
        )
    ),
    "tampered payload": lambda env, path: bearer(tampered(env, path)),
    "signed by another key under a known kid": lambda env, path: bearer(
        signed(env, path, key="ec2", header={"kid": "ec-key-1"})
    ),
    "unknown kid in a static JWKS": lambda env, path: bearer(signed(env, path, key="ec2")),
    "unknown kid, JWKS refetched, still unknown": lambda env, path: bearer(
        signed(env, path, key="ec2", iss=JKU_ISS, header={"jku": JKU_URL})
    ),
    "jti missing": lambda env, path: bearer(signed(env, path, jti=None)),
    "exp missing": lambda env, path: bearer(signed(env, path, exp=None)),
    "iat missing": lambda env, path: bearer(signed(env, path, iat=None)),
}


# -- what a request would have done had it got through -------------------------------------------------------


def request_body(endpoint: str, card: str | None = None) -> Any:
    """A body that would yield cards (hook) or a stored row (feedback on ``card``) if authentication let it in."""
    if endpoint == "hook":
        return hook_request(
            "patient-view", prefetch=prefetch_from(clinical_record()), fhir_server=EHR_FHIR, token=FHIR_TOKEN
        )
    if endpoint == "feedback":
        return {
            "feedback": [
                {
                    "card": card or str(uuid.uuid4()),
                    "outcome": "overridden",
                    "outcomeTimestamp": "2026-01-01T10:00:00Z",
                }
            ]
        }
    return None


def send(app: Any, endpoint: str, headers: dict[str, str], *, iss: str = EHR_ISS) -> Any:
    """Call ``endpoint`` (discovery GET, hook or feedback POST) with ``headers``.

    Feedback names a card first recorded as issued by the patient-view service to ``iss``.
    """
    client = app.test_client()
    if endpoint == "discovery":
        return client.get(DISCOVERY, headers=headers)
    card = issue_card(app, service_id="ecglab-patient-view", issuer=iss) if endpoint == "feedback" else None
    return client.post(ENDPOINTS[endpoint], json=request_body(endpoint, card), headers=headers)


def feedback_rows(app: Any) -> int:
    """Rows in the feedback table of ``app``'s database."""
    with app.extensions["ecglab"].engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Feedback)).scalar_one())


def assert_bare_401(response: Any) -> None:
    """The one generic 401: OperationOutcome body, Bearer challenge, nothing about the reason."""
    assert response.status_code == 401
    assert response.mimetype == "application/fhir+json"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.get_json() == GENERIC_401


# -- the hostile cases ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_token_gets_a_bare_401_and_nothing_else(
    make_app, service_env: ServiceEnv, caplog: pytest.LogCaptureFixture, case: str, endpoint: str
) -> None:
    """§8 + BP: a bad token on any endpoint → 401 with no reason; no model call, FHIR call or stored row."""
    runtime, fhir = positive_runtime(), MockFhir([])
    app = make_app(runtime=runtime, fhir=fhir)
    headers = HOSTILE[case](service_env, ENDPOINTS[endpoint])
    with caplog.at_level(logging.DEBUG):
        response = send(app, endpoint, headers)
    assert_bare_401(response)
    assert runtime.seen == [] and fhir.requests == []
    assert feedback_rows(app) == 0
    assert any(r.getMessage().startswith("401 on ") for r in caplog.records), "the reason is logged"
    credential = headers.get("Authorization", "").removeprefix("Bearer ").strip()
    for secret in [credential, *credential.split(".")]:
        assert len(secret) < 12 or secret not in caplog.text, "the token is never logged"


def test_hostile_case_catalogue_is_complete() -> None:
    """§10 "suggested pytest coverage" + the issue: at least 15 distinct hostile-token cases are exercised."""
    assert len(HOSTILE) >= 15
    record_figure("jwt: hostile token cases x endpoints", f"{len(HOSTILE)} x {len(ENDPOINTS)}")


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_replayed_jti_is_refused_after_one_use(make_app, service_env: ServiceEnv, endpoint: str) -> None:
    """§8 BP step 6: the same token twice → the first call is served, the replay is a bare 401."""
    runtime = positive_runtime()
    app = make_app(runtime=runtime, fhir=MockFhir([]))
    headers = bearer(signed(service_env, ENDPOINTS[endpoint]))
    assert send(app, endpoint, headers).status_code == 200
    seen, rows = len(runtime.seen), feedback_rows(app)
    replay = send(app, endpoint, headers)
    assert_bare_401(replay)
    assert len(runtime.seen) == seen and feedback_rows(app) == rows


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_unknown_kid_triggers_one_jwks_refetch_and_is_accepted_once_published(
    make_app, service_env: ServiceEnv, endpoint: str
) -> None:
    """§0.5 "refetching on an unknown kid": refused while the JWKS lacks the kid, accepted once it appears."""
    app = make_app(runtime=positive_runtime(), fhir=MockFhir([]))
    path = ENDPOINTS[endpoint]

    def rotated() -> dict[str, str]:
        return bearer(signed(service_env, path, key="ec2", iss=JKU_ISS, header={"jku": JKU_URL}))

    first = bearer(signed(service_env, path, key="rsa", iss=JKU_ISS, header={"jku": JKU_URL}))
    assert send(app, endpoint, first, iss=JKU_ISS).status_code == 200
    assert service_env.jku_fetches == [JKU_URL]
    assert_bare_401(send(app, endpoint, rotated(), iss=JKU_ISS))
    assert service_env.jku_fetches == [JKU_URL] * 2, "an unknown kid forces one refetch"
    service_env.jku_jwks = jwks(service_env.keys["rsa"], service_env.keys["ec2"])  # the EHR publishes ec2
    assert send(app, endpoint, rotated(), iss=JKU_ISS).status_code == 200
    assert service_env.jku_fetches == [JKU_URL] * 3


def test_jku_outside_the_allow_list_is_never_fetched(make_app, service_env: ServiceEnv) -> None:
    """§8: a jku off the issuer's list is refused before any download (no SSRF through the header)."""
    app = make_app()
    for case in ("jku not on the issuer's list", "jku on a look-alike host"):
        assert_bare_401(send(app, "discovery", HOSTILE[case](service_env, DISCOVERY)))
    assert service_env.jku_fetches == []


def test_valid_tokens_still_open_every_endpoint(make_app, service_env: ServiceEnv) -> None:
    """Control: the same requests with good ES384 and RS384 tokens are served (so the 401s above mean refusal)."""
    runtime = positive_runtime()
    app = make_app(runtime=runtime, fhir=MockFhir([]))
    for key in ("ec", "rsa"):
        assert send(app, "discovery", bearer(signed(service_env, DISCOVERY, key=key))).status_code == 200
        hook = send(app, "hook", bearer(signed(service_env, HOOK, key=key)))
        assert hook.status_code == 200 and hook.get_json()["cards"]
        assert send(app, "feedback", bearer(signed(service_env, FEEDBACK, key=key))).status_code == 200
    assert len(runtime.seen) == 2 and feedback_rows(app) == 2


@pytest.mark.parametrize("path", list(ENDPOINTS.values()))
@pytest.mark.parametrize("authorization", [None, "Bearer garbage"])
def test_cors_preflight_answers_without_a_token(make_app, path: str, authorization: str | None) -> None:
    """§8 "CORS": OPTIONS preflights carry no Authorization and must still be answered (204 + CORS headers)."""
    headers = {
        "Origin": "https://sandbox.cds-hooks.org",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    if authorization:
        headers["Authorization"] = authorization
    response = make_app(cors_origins="*").test_client().options(path, headers=headers)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    assert response.get_data() == b""


def test_a_401_still_carries_cors_headers(make_app) -> None:
    """§8 "CORS": a browser client must be able to read the 401 (else it sees an opaque network error)."""
    app = make_app(cors_origins="https://sandbox.cds-hooks.org")
    response = app.test_client().get(DISCOVERY, headers={"Origin": "https://sandbox.cds-hooks.org"})
    assert_bare_401(response)
    assert response.headers["Access-Control-Allow-Origin"] == "https://sandbox.cds-hooks.org"


def test_other_tokens_in_the_request_do_not_authenticate(make_app, service_env: ServiceEnv) -> None:
    """§8 (Epic quirk): the fhirAuthorization access token (itself often a JWT) is not the client JWT."""
    runtime = positive_runtime()
    app = make_app(runtime=runtime, fhir=MockFhir([]))
    body = request_body("hook")
    body["fhirAuthorization"]["access_token"] = signed(service_env, HOOK)  # a perfectly valid client JWT
    response = app.test_client().post(HOOK, json=body)
    assert_bare_401(response)
    assert runtime.seen == []
