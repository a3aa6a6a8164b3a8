"""Inbound JWT authentication (cdshooks.md §0.5 and §8, CDS Hooks 2.0 "Trusting CDS Clients").

Keys are generated in the tests with ``cryptography``; JWKS downloads go to an
``httpx.MockTransport``, so nothing touches the network. Every rejection must be a bare 401 whose
body says nothing about the reason.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import pytest

from cds_service.db import SeenToken, init_db, make_engine, purge_expired_tokens, remember_token
from cds_service.url_rules import url_has_prefix
from tests.issued_cards import issue_card
from tests.service_fixtures import (
    EHR_ISS,
    JKU_ISS,
    JKU_URL,
    PUBLIC_URL,
    ServiceEnv,
    hook_request,
    jwks,
    load_sample,
    mint,
)

pytest_plugins = ["tests.pg"]


DISCOVERY = "/cds-services"
HOOK = "/cds-services/ecglab-patient-view"
FEEDBACK = "/cds-services/ecglab-patient-view/feedback"


def b64(data: bytes) -> str:
    """base64url without padding (JWS encoding)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A compact JWS assembled by hand (for algorithms PyJWT refuses to produce)."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"


def claims(path: str = DISCOVERY, **extra: Any) -> dict[str, Any]:
    """A valid payload for ``path`` from the static-JWKS issuer."""
    now = int(time.time())
    return {
        "iss": EHR_ISS,
        "aud": PUBLIC_URL + path,
        "iat": now,
        "exp": now + 300,
        "jti": f"jti-{now}-{id(extra)}",
        **extra,
    }


def get(app: Any, token: str, path: str = DISCOVERY) -> Any:
    """GET ``path`` with ``token`` as the bearer."""
    return app.test_client().get(path, headers={"Authorization": f"Bearer {token}"})


def assert_bare_401(response: Any) -> None:
    """The response is the generic 401: no reason, a Bearer challenge."""
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.get_json() == {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "login", "details": {"text": "Unauthorized"}}],
    }


# -- accepted tokens --------------------------------------------------------------------------------------------


def test_valid_es384_token_is_accepted_on_every_endpoint(make_app, service_env: ServiceEnv) -> None:
    """§8: an ES384 token from an allowlisted iss (static jwks_file) opens discovery, hooks and feedback."""
    app = make_app()
    client = app.test_client()
    assert client.get(DISCOVERY, headers=service_env.bearer(DISCOVERY)).status_code == 200
    hook = client.post(HOOK, json=hook_request("patient-view"), headers=service_env.bearer(HOOK))
    assert hook.status_code == 412  # authenticated; the request itself lacks data
    body = load_sample("spec/feedback.overridden-no-reason.json")
    issue_card(app, service_id="ecglab-patient-view", issuer=EHR_ISS, card_uuid=body["feedback"][0]["card"])
    feedback = client.post(FEEDBACK, json=body, headers=service_env.bearer(FEEDBACK))
    assert feedback.status_code == 200


def test_valid_rs384_token_with_jku_is_accepted_and_jwks_cached(make_app, service_env: ServiceEnv) -> None:
    """§8 (Epic style): RS384 with a jku on the issuer's jku_allow list; the JWKS is fetched once and cached."""
    app = make_app()
    for _ in range(2):
        token = mint(service_env.keys["rsa"], iss=JKU_ISS, aud=PUBLIC_URL + DISCOVERY, jku=JKU_URL)
        assert get(app, token).status_code == 200
    assert service_env.jku_fetches == [JKU_URL]


def test_aud_may_be_an_array_naming_the_endpoint(make_app, service_env: ServiceEnv) -> None:
    """§8: aud is a string or an array; one of its values must be the endpoint URL called."""
    aud = [PUBLIC_URL + DISCOVERY, "https://other.example.org"]
    assert get(make_app(), mint(service_env.keys["ec"], iss=EHR_ISS, aud=aud)).status_code == 200


def test_unknown_kid_forces_a_jwks_refetch(make_app, service_env: ServiceEnv) -> None:
    """§10 "unknown kid (forces a JWKS refetch)": a rotated key is found after one more download."""
    app = make_app()
    first = mint(service_env.keys["rsa"], iss=JKU_ISS, aud=PUBLIC_URL + DISCOVERY, jku=JKU_URL)
    assert get(app, first).status_code == 200
    service_env.jku_jwks = jwks(service_env.keys["rsa"], service_env.keys["ec2"])  # the EHR rotates in ec2
    rotated = mint(service_env.keys["ec2"], iss=JKU_ISS, aud=PUBLIC_URL + DISCOVERY, jku=JKU_URL)
    assert get(app, rotated).status_code == 200
    assert len(service_env.jku_fetches) == 2


def test_unknown_kid_refetch_is_rate_limited(make_app, service_env: ServiceEnv) -> None:
    """Forged kids cannot make the service download the JWKS on every request (ECGLAB_JWKS_REFETCH_S)."""
    app = make_app(jwks_refetch_s=3600)
    assert (
        get(
            app, mint(service_env.keys["rsa"], iss=JKU_ISS, aud=PUBLIC_URL + DISCOVERY, jku=JKU_URL)
        ).status_code
        == 200
    )
    for _ in range(3):
        forged = mint(service_env.keys["ec2"], iss=JKU_ISS, aud=PUBLIC_URL + DISCOVERY, jku=JKU_URL)
        assert_bare_401(get(app, forged))
    assert len(service_env.jku_fetches) == 1


# -- rejected tokens ---------------------------------------------------------------------------------------------


def test_missing_or_non_bearer_authorization_is_401(make_app) -> None:
    """§0.5: every call except preflight needs the JWT, discovery included."""
    client = make_app().test_client()
    assert_bare_401(client.get(DISCOVERY))
    assert_bare_401(client.get(DISCOVERY, headers={"Authorization": "Basic dXNlcjpwYXNz"}))
    assert_bare_401(client.post(FEEDBACK, json=load_sample("spec/feedback.accepted.json")))


def test_alg_none_is_401(make_app) -> None:
    """§8: alg none SHALL NOT be accepted."""
    token = unsigned_token({"alg": "none", "typ": "JWT", "kid": "ec-key-1"}, claims())
    assert_bare_401(get(make_app(), token))


def test_hs256_signed_with_the_public_key_is_401(make_app, service_env: ServiceEnv) -> None:
    """§8: no symmetric algorithms (the classic attack: HMAC keyed with the issuer's public key)."""
    public_pem = json.dumps(service_env.keys["ec"].public_jwk()).encode()
    header = {"alg": "HS256", "typ": "JWT", "kid": "ec-key-1"}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    assert_bare_401(get(make_app(), f"{signing_input}.{b64(signature)}"))


def test_es256_is_401(make_app, service_env: ServiceEnv) -> None:
    """§0.5: only ES384 and RS384 are accepted."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    token = jwt.encode(
        claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "ec-key-1"}
    )
    assert_bare_401(get(make_app(), token))


TIME_CASES: dict[str, dict[str, Any]] = {
    "expired": {"exp": -120, "iat": -420},
    "not yet valid (nbf)": {"nbf": 600},
    "issued in the future": {"iat": 600, "exp": 900},
    "lifetime beyond the limit": {"exp": 7200},
}


@pytest.mark.parametrize("case", [*TIME_CASES, "no jti"])
def test_time_claims_and_jti_are_checked(make_app, service_env: ServiceEnv, case: str) -> None:
    """§8 BP step 3/6: exp, nbf and iat hold (small leeway), lifetime is bounded, jti is required."""
    import jwt

    payload = claims()
    now = int(time.time())
    payload.update({name: now + offset for name, offset in TIME_CASES.get(case, {}).items()})
    if case == "no jti":
        del payload["jti"]

    token = jwt.encode(
        payload, service_env.keys["ec"].private, algorithm="ES384", headers={"kid": "ec-key-1"}
    )
    assert_bare_401(get(make_app(), token))


@pytest.mark.parametrize(
    "aud",
    [
        PUBLIC_URL + "/cds-services/ecglab-order-sign",
        "https://elsewhere.example.org/cds-services",
        ["https://elsewhere.example.org/cds-services", PUBLIC_URL + "/cds-services/other"],
    ],
)
def test_wrong_aud_is_401(make_app, service_env: ServiceEnv, aud: Any) -> None:
    """§8: aud (string or array) must name the endpoint called."""
    assert_bare_401(get(make_app(), mint(service_env.keys["ec"], iss=EHR_ISS, aud=aud)))


def test_replayed_jti_is_401(make_app, service_env: ServiceEnv) -> None:
    """§8 BP step 6: a jti already seen is refused."""
    app = make_app()
    token = mint(service_env.keys["ec"], iss=EHR_ISS, aud=PUBLIC_URL + DISCOVERY)
    assert get(app, token).status_code == 200
    assert_bare_401(get(app, token))


def test_replay_cache_is_shared_by_instances_on_postgresql(
    make_app, service_env: ServiceEnv, pg_url: str
) -> None:
    """The jti cache lives in the database: a token used on one instance is refused by another."""
    first, second = make_app(database_url=pg_url), make_app(database_url=pg_url)
    token = mint(service_env.keys["ec"], iss=EHR_ISS, aud=PUBLIC_URL + DISCOVERY)
    assert get(first, token).status_code == 200
    assert_bare_401(get(second, token))


def test_unknown_iss_is_401(make_app, service_env: ServiceEnv) -> None:
    """§8 BP step 1: iss must be in the issuers file."""
    token = mint(service_env.keys["ec"], iss="https://rogue.example.org", aud=PUBLIC_URL + DISCOVERY)
    assert_bare_401(get(make_app(), token))


@pytest.mark.parametrize(
    "jku",
    [
        "https://attacker.example.com/jwks.json",
        "https://jku.example.net.attacker.com/keys/jwks.json",
        "https://jku.example.net/other/jwks.json",
        "https://jku.example.net/keys/../evil/jwks.json",
    ],
)
def test_jku_outside_the_allow_list_is_401_and_not_fetched(
    make_app, service_env: ServiceEnv, jku: str
) -> None:
    """§8: jku must lie under the issuer's jku_allow prefixes; nothing is downloaded otherwise."""
    token = mint(service_env.keys["rsa"], iss=JKU_ISS, aud=PUBLIC_URL + DISCOVERY, jku=jku)
    assert_bare_401(get(make_app(), token))
    assert service_env.jku_fetches == []


def test_token_signed_by_another_key_is_401(make_app, service_env: ServiceEnv) -> None:
    """The signature must verify with the issuer's key named by kid."""
    token = mint(service_env.keys["ec2"], iss=EHR_ISS, aud=PUBLIC_URL + DISCOVERY, header={"kid": "ec-key-1"})
    assert_bare_401(get(make_app(), token))


def test_spec_example_jwt_is_rejected_as_expired(
    make_app, service_env: ServiceEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """README test vector: the spec's ES384 JWT verifies against its JWKS (served at its jku) but expired in 2015."""
    import httpx

    vector = load_sample("spec/jwt.example.json")
    issuers = service_env.tmp / "spec-issuers.yaml"
    issuers.write_text(
        f'issuers:\n  "{vector["payload"]["iss"]}":\n    jku_allow: ["https://fhir-ehr.example.com/"]\n'
    )
    app = make_app(issuers=str(issuers), public_url="https://cds.example.org")
    served = httpx.MockTransport(lambda request: httpx.Response(200, json=vector["jwks_public"]))
    app.extensions["ecglab"].jwks.transport = served
    with caplog.at_level(logging.WARNING):
        response = app.test_client().post(
            "/cds-services/some-service",
            json={},
            headers={"Authorization": f"Bearer {vector['compact_jwt']}"},
        )
    assert_bare_401(response)
    assert "ExpiredSignatureError" in caplog.text  # signature and key lookup passed; only exp failed


def test_rejection_reason_is_logged_without_the_token(
    make_app, service_env: ServiceEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """§8: log iss and jti with the reason; never the token."""
    token = mint(
        service_env.keys["ec"], iss=EHR_ISS, aud="https://elsewhere.example.org", jti="jti-for-the-log"
    )
    with caplog.at_level(logging.WARNING):
        assert_bare_401(get(make_app(), token))
    assert "InvalidAudienceError" in caplog.text and "jti=jti-for-the-log" in caplog.text
    assert token not in caplog.text and token.split(".")[2] not in caplog.text


# -- replay cache mechanics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_replay_cache_refuses_live_duplicates_and_purges_expired(
    backend: str, tmp_path: Any, request: Any
) -> None:
    """remember_token refuses an unexpired duplicate, accepts it again once expired; purge drops expired rows."""
    url = f"sqlite:///{tmp_path / 'r.sqlite3'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    engine = make_engine(url)
    init_db(engine)
    try:
        assert remember_token(engine, "k1", expires_at=1000.0, now=500.0)
        assert not remember_token(engine, "k1", expires_at=1100.0, now=600.0)
        assert remember_token(engine, "k1", expires_at=2000.0, now=1500.0)  # old entry expired
        assert remember_token(engine, "k2", expires_at=1200.0, now=600.0)
        assert purge_expired_tokens(engine, now=1800.0) == 1
        with engine.connect() as conn:
            assert [r.token_key for r in conn.execute(SeenToken.__table__.select())] == ["k1"]
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "prefix", "expected"),
    [
        ("https://ehr.example.org/keys/a.json", "https://ehr.example.org/keys/", True),
        ("https://ehr.example.org/keys", "https://ehr.example.org/keys/", True),
        ("https://ehr.example.org:443/x", "https://ehr.example.org", True),
        ("https://ehr.example.org/keysX/a.json", "https://ehr.example.org/keys", False),
        ("https://ehr.example.org.evil.net/keys/a", "https://ehr.example.org", False),
        ("http://ehr.example.org/keys/a", "https://ehr.example.org/", False),
        ("https://ehr.example.org:8443/keys/a", "https://ehr.example.org/", False),
        ("https://user:pw@ehr.example.org/keys/a", "https://ehr.example.org/", False),
        ("https://ehr.example.org/keys/../admin", "https://ehr.example.org/keys/", False),
        ("not a url", "https://ehr.example.org/", False),
    ],
)
def test_url_prefixes_match_structurally(url: str, prefix: str, expected: bool) -> None:
    """jku_allow / fhir_servers prefixes compare scheme, host, port and path segments, not raw strings."""
    assert url_has_prefix(url, prefix) is expected
