"""SMART Backend Services client against a real OAuth2 token endpoint run in the tests.

The token endpoint is authlib's ``AuthorizationServer`` with its ``ClientCredentialsGrant`` and
RFC 7523 ``private_key_jwt`` client authentication (``JWTBearerClientAssertion``), on a Flask app
served by werkzeug on 127.0.0.1. It registers the client's public key with the RFC 7638
thumbprint joserfc computes as ``kid``, accepts RS384 and ES384, refuses a reused ``jti`` and an
assertion that lives longer than SMART's five minutes, and records what it was sent.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwk as jose_jwk
from joserfc import jwt as jose_jwt

from cds_service.smart_backend import (
    CLIENT_ASSERTION_TYPE,
    FhirServerNotAllowed,
    SmartBackendClient,
    SmartBackendError,
    TokenBackoff,
    TokenCache,
    TokenEndpointError,
    TokenRefused,
    TokenTimeout,
)
from cds_service.smart_backend_config import SmartBackendConfig, jwk_thumbprint
from fhir_mappings.errors import ConfigError
from tests.oauth_server import TokenServer, jose_public_key, public_pem_of

FHIR = "https://fhir.example.org/r4"
SCOPE = "system/Patient.rs system/Observation.rs"
ALGS = {"RS384": "rsa", "ES384": "ec"}


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _config(endpoint: TokenServer, key_file: Path, alg: str, client_id: str = "ecglab") -> SmartBackendConfig:
    return SmartBackendConfig(
        token_url=endpoint.token_url, client_id=client_id, private_key_file=key_file, alg=alg, scope=SCOPE
    )


def _client(
    endpoint: TokenServer, keys: dict[str, Path], alg: str = "ES384", *, clock: FakeClock | None = None
) -> SmartBackendClient:
    key_file = keys[ALGS[alg]]
    endpoint.register("ecglab", public_pem_of(key_file))
    cache = TokenCache(clock=clock) if clock is not None else None
    return SmartBackendClient(_config(endpoint, key_file, alg), fhir_servers=[FHIR], cache=cache)


def _soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def _our_log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record except the test server's own (authlib logs the tokens it issues)."""
    return "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''}"
        for r in caplog.records
        if not r.name.startswith("authlib")
    )


def _capture_everything(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "cds_service"):
        caplog.set_level(logging.DEBUG, logger=name)


# -- getting a token ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_token_with_a_signed_assertion_the_endpoint_verifies(
    endpoint: TokenServer, keys: dict[str, Path], alg: str, caplog: pytest.LogCaptureFixture
) -> None:
    _capture_everything(caplog)
    client = _client(endpoint, keys, alg)
    before = time.time()

    token = client.token_for(FHIR, _soon())

    assert endpoint.requests == 1 and endpoint.issued == [token]
    form = endpoint.forms[0]
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == SCOPE
    assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    assert set(form) == {"grant_type", "scope", "client_assertion_type", "client_assertion"}
    header, claims = endpoint.assertions[0]
    thumbprint = endpoint.clients["ecglab"].key.kid
    assert header == {"alg": alg, "kid": thumbprint, "typ": "JWT"}
    assert client.config.kid == thumbprint
    assert claims["iss"] == claims["sub"] == "ecglab"
    assert claims["aud"] == endpoint.token_url
    assert before < claims["exp"] <= time.time() + 300
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 32
    log_text = _our_log_text(caplog)
    assert "POST" in log_text and "httpx" in log_text  # httpx's own request line was captured
    assert token not in log_text
    assert form["client_assertion"] not in log_text


def test_cached_until_shortly_before_expiry(endpoint: TokenServer, keys: dict[str, Path]) -> None:
    clock = FakeClock()
    client = _client(endpoint, keys, clock=clock)
    endpoint.expires_in = 120

    first = client.token_for(FHIR, _soon())
    assert client.token_for(FHIR, _soon()) == first
    clock.advance(89)  # 120 s lifetime, 30 s margin: usable for 90 s
    assert client.token_for(FHIR, _soon()) == first
    assert endpoint.requests == 1
    clock.advance(2)
    second = client.token_for(FHIR, _soon())

    assert second != first and endpoint.requests == 2
    assert endpoint.assertions[0][1]["jti"] != endpoint.assertions[1][1]["jti"]


@pytest.mark.parametrize(("expires_in", "usable_s"), [(0, 270.0), (864_000, 3570.0)])
def test_lifetime_default_and_cap(
    endpoint: TokenServer, keys: dict[str, Path], expires_in: int, usable_s: float
) -> None:
    """No expires_in (authlib omits a zero): 300 s assumed; a ten-day token is kept one hour at most."""
    clock = FakeClock()
    client = _client(endpoint, keys, clock=clock)
    endpoint.expires_in = expires_in

    first = client.token_for(FHIR, _soon())
    clock.advance(usable_s - 1)
    assert client.token_for(FHIR, _soon()) == first and endpoint.requests == 1
    clock.advance(2)
    assert client.token_for(FHIR, _soon()) != first and endpoint.requests == 2


def test_invalidate_drops_a_refused_token(endpoint: TokenServer, keys: dict[str, Path]) -> None:
    client = _client(endpoint, keys)
    first = client.token_for(FHIR, _soon())
    client.invalidate("some-other-token")
    assert client.token_for(FHIR, _soon()) == first

    client.invalidate(first)

    assert client.token_for(FHIR, _soon()) != first and endpoint.requests == 2


def test_single_flight_under_concurrent_callers(endpoint: TokenServer, keys: dict[str, Path]) -> None:
    client = _client(endpoint, keys)
    endpoint.delay_s = 0.3
    barrier = threading.Barrier(8)
    tokens: list[str] = []
    errors: list[BaseException] = []

    def call() -> None:
        barrier.wait()
        try:
            tokens.append(client.token_for(FHIR, _soon()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)

    assert not errors
    assert len(tokens) == 8 and len(set(tokens)) == 1
    assert endpoint.requests == 1


def test_slow_endpoint_costs_the_caller_its_deadline_only(
    endpoint: TokenServer, keys: dict[str, Path]
) -> None:
    client = _client(endpoint, keys)
    endpoint.delay_s = 1.0
    started = time.monotonic()
    deadline = started + 0.3

    with pytest.raises(TokenTimeout) as caught:
        client.token_for(FHIR, deadline)

    assert time.monotonic() <= deadline + 0.15
    assert caught.value.code == "timeout"
    # The fetch went on and its late answer is cached: the next call gets it without a new request.
    token = client.token_for(FHIR, _soon())
    assert token == endpoint.issued[0] and endpoint.requests == 1


def test_fetch_timeout_bounds_the_request_itself(endpoint: TokenServer, keys: dict[str, Path]) -> None:
    key_file = keys["ec"]
    endpoint.register("ecglab", public_pem_of(key_file))
    client = SmartBackendClient(
        _config(endpoint, key_file, "ES384"), fhir_servers=[FHIR], fetch_timeout_s=0.2
    )
    endpoint.delay_s = 1.0

    with pytest.raises(TokenEndpointError) as caught:
        client.token_for(FHIR, _soon())

    assert caught.value.code == "endpoint_timeout"


# -- refusals ----------------------------------------------------------------------------------------


def _refused(client: SmartBackendClient, caplog: pytest.LogCaptureFixture) -> TokenRefused:
    _capture_everything(caplog)
    with pytest.raises(TokenRefused) as caught:
        client.token_for(FHIR, _soon())
    return caught.value


def test_unknown_client_is_refused_with_invalid_client(
    endpoint: TokenServer, keys: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    endpoint.register("ecglab", public_pem_of(keys["ec"]))
    config = _config(endpoint, keys["ec"], "ES384", client_id="not-registered")
    client = SmartBackendClient(config, fhir_servers=[FHIR], cache=TokenCache(clock=clock))

    error = _refused(client, caplog)

    assert error.code == "invalid_client" and endpoint.requests == 1 and not endpoint.issued
    assertion = endpoint.forms[0]["client_assertion"]
    assert assertion not in _our_log_text(caplog) and assertion not in str(error)
    assert "invalid_client" in _our_log_text(caplog)
    # Backed off: the next call fails at once without asking the endpoint again.
    with pytest.raises(TokenBackoff) as backoff:
        client.token_for(FHIR, _soon())
    assert backoff.value.code == "invalid_client" and endpoint.requests == 1
    clock.advance(2.5)
    with pytest.raises(TokenRefused):
        client.token_for(FHIR, _soon())
    assert endpoint.requests == 2
    clock.advance(2.5)  # the second failure doubled the delay to 4 s
    with pytest.raises(TokenBackoff):
        client.token_for(FHIR, _soon())
    assert endpoint.requests == 2


def test_bad_signature_is_refused_with_invalid_client(
    endpoint: TokenServer, keys: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(endpoint, keys["rsa"], "RS384")
    # Registered under the client's kid, but with another key: the signature cannot verify.
    endpoint.register("ecglab", public_pem_of(keys["rsa_other"]), kid=config.kid)
    client = SmartBackendClient(config, fhir_servers=[FHIR])

    error = _refused(client, caplog)

    assert error.code == "invalid_client" and not endpoint.issued
    assert endpoint.forms[0]["client_assertion"] not in _our_log_text(caplog)


def _answering(status: int, body: bytes, headers: dict[str, str] | None = None) -> httpx.MockTransport:
    """A transport answering every request with a streamed body, as a real server would."""
    return httpx.MockTransport(
        lambda req: httpx.Response(status, headers=headers or {}, stream=httpx.ByteStream(body))
    )


@pytest.mark.parametrize(
    ("status", "body", "headers", "error", "code"),
    [
        (401, b'{"error": "invalid_client\\nFORGED LOG LINE"}', None, TokenRefused, "unrecognised_error"),
        (
            400,
            b'{"error": "invalid_scope", "error_description": "no\\u0007bell"}',
            None,
            TokenRefused,
            "invalid_scope",
        ),
        (400, b"<html>bad request</html>", None, TokenEndpointError, "http_400"),
        (503, b"", None, TokenEndpointError, "http_503"),
        (302, b"", {"location": "https://elsewhere.example.org/token"}, TokenEndpointError, "redirect"),
        (200, b"not json", None, TokenEndpointError, "malformed_response"),
        (
            200,
            b'{"access_token": "abc", "token_type": "mac"}',
            None,
            TokenEndpointError,
            "malformed_response",
        ),
        (
            200,
            b'{"access_token": "a b", "token_type": "bearer"}',
            None,
            TokenEndpointError,
            "malformed_response",
        ),
        (
            200,
            b'{"access_token": "abc", "token_type": "bearer", "expires_in": NaN}',
            None,
            TokenEndpointError,
            "malformed_response",
        ),
        (200, b'{"access_token": "' + b"a" * 70_000 + b'"}', None, TokenEndpointError, "too_large"),
        (200, b"{}", {"content-encoding": "gzip"}, TokenEndpointError, "encoded_response"),
    ],
)
def test_unusable_answers_raise_typed_errors(
    keys: dict[str, Path],
    status: int,
    body: bytes,
    headers: dict[str, str] | None,
    error: type[SmartBackendError],
    code: str,
) -> None:
    config = SmartBackendConfig(
        token_url="https://auth.example.org/token",
        client_id="ecglab",
        private_key_file=keys["ec"],
        alg="ES384",
        scope=SCOPE,
    )
    client = SmartBackendClient(config, fhir_servers=[FHIR], transport=_answering(status, body, headers))

    with pytest.raises(error) as caught:
        client.token_for(FHIR, _soon())

    assert caught.value.code == code
    if isinstance(caught.value, TokenRefused) and code == "invalid_scope":
        assert caught.value.description is None  # a control character: not passed on


def test_expires_in_as_big_integer_is_capped(keys: dict[str, Path]) -> None:
    body = b'{"access_token": "abc", "token_type": "Bearer", "expires_in": 1' + b"0" * 400 + b"}"
    config = SmartBackendConfig(
        token_url="https://auth.example.org/token",
        client_id="ecglab",
        private_key_file=keys["ec"],
        alg="ES384",
        scope=SCOPE,
    )
    clock = FakeClock()
    client = SmartBackendClient(
        config, fhir_servers=[FHIR], cache=TokenCache(clock=clock), transport=_answering(200, body)
    )

    assert client.token_for(FHIR, _soon()) == "abc"
    clock.advance(3569)
    assert client.token_for(FHIR, _soon()) == "abc"


# -- where the token may go --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        (FHIR, True),
        (FHIR + "/", True),
        (FHIR + "/tenant-a", True),
        ("https://fhir.example.org:443/r4", True),
        ("https://FHIR.example.org/r4", True),
        ("https://fhir.example.org/r4x", False),
        ("https://fhir.example.org/", False),
        ("http://fhir.example.org/r4", False),
        ("https://fhir.example.org:8443/r4", False),
        ("https://fhir.example.org.evil.net/r4", False),
        ("https://user:pw@fhir.example.org/r4", False),
        ("https://fhir.example.org/r4/../admin", False),
        ("https://fhir.example.org/r4/%2e%2e/admin", False),
        ("https://fhir.example.org/r4?x=1", False),
        ("https://other.example.org/r4", False),
        ("not a url", False),
    ],
)
def test_token_only_for_configured_fhir_servers(
    endpoint: TokenServer, keys: dict[str, Path], url: str, allowed: bool
) -> None:
    client = _client(endpoint, keys)

    assert client.covers(url) is allowed
    if allowed:
        assert client.token_for(url, _soon())
    else:
        with pytest.raises(FhirServerNotAllowed):
            client.token_for(url, _soon())
        assert endpoint.requests == 0


def test_client_needs_fhir_servers(keys: dict[str, Path]) -> None:
    config = SmartBackendConfig(
        token_url="https://auth.example.org/token",
        client_id="ecglab",
        private_key_file=keys["ec"],
        alg="ES384",
        scope=SCOPE,
    )
    with pytest.raises(ConfigError, match="fhir_servers"):
        SmartBackendClient(config, fhir_servers=[])


# -- configuration -----------------------------------------------------------------------------------


def _entry(keys: dict[str, Path], **changes: Any) -> dict[str, Any]:
    entry = {
        "token_url": "https://auth.example.org/token",
        "client_id": "ecglab",
        "private_key_file": str(keys["ec"]),
        "alg": "ES384",
        "scope": SCOPE,
    }
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


WHERE = "issuers.yaml: issuers['https://ehr'].smart_backend"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"token_url": "http://auth.example.org/token"}, r"\.token_url: .*must use https"),
        ({"token_url": "https://user:pw@auth.example.org/token"}, r"\.token_url: .*credentials"),
        ({"token_url": "https://auth.example.org/token?x=1"}, r"\.token_url: .*query"),
        ({"token_url": "ftp://auth.example.org/token"}, r"\.token_url: .*http\(s\)"),
        ({"jwks_url": "http://ecglab.example.org/jwks.json"}, r"\.jwks_url: .*https"),
        ({"alg": "RS256"}, r"\.alg: expected one of RS384, ES384"),
        ({"alg": "RS384"}, r"\.private_key_file: alg RS384 needs an RSA private key; .* EC key"),
        ({"private_key_file": "rsa"}, r"\.private_key_file: alg ES384 needs an EC P-384 .* RSA key"),
        ({"private_key_file": "p256"}, r"\.private_key_file: alg ES384 needs an EC P-384 .*secp256r1"),
        ({"private_key_file": "rsa_small", "alg": "RS384"}, r"\.private_key_file: .*1024 bits"),
        ({"private_key_file": "encrypted"}, r"\.private_key_file: .* is encrypted"),
        ({"private_key_file": "/nonexistent/key.pem"}, r"\.private_key_file: .* does not exist"),
        ({"scope": "patient/Observation.rs"}, r"\.scope: .*system/ scopes only"),
        ({"scope": "  "}, r"\.scope: name at least one scope"),
        ({"scope": 'system/"x"'}, r"\.scope: .*not a valid OAuth scope"),
        ({"client_id": "has space"}, r"\.client_id: "),
        ({"client_id": None}, r"\.client_id: required"),
        ({"kid": 7}, r"\.kid: expected a string"),
        ({"secret": "x"}, r"unknown key\(s\) \['secret'\]"),
    ],
)
def test_config_errors_name_the_key(keys: dict[str, Path], changes: dict[str, Any], message: str) -> None:
    if changes.get("private_key_file") in keys:
        changes["private_key_file"] = str(keys[changes["private_key_file"]])

    with pytest.raises(
        ConfigError, match=r"^" + r"issuers\.yaml: issuers\['https://ehr'\]\.smart_backend.*" + message
    ):
        SmartBackendConfig.from_mapping(_entry(keys, **changes), base_dir=Path("/"), where=WHERE)


def test_config_errors_for_non_pem_files(tmp_path: Path, keys: dict[str, Path]) -> None:
    garbage = tmp_path / "key.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match=r"\.private_key_file: .* is not a PEM private key"):
        SmartBackendConfig.from_mapping(
            _entry(keys, private_key_file=str(garbage)), base_dir=tmp_path, where=WHERE
        )
    with pytest.raises(ConfigError, match=r"smart_backend: expected a mapping"):
        SmartBackendConfig.from_mapping(["token_url"], base_dir=tmp_path, where=WHERE)


def test_relative_key_path_resolves_against_the_issuers_folder(keys: dict[str, Path]) -> None:
    folder = keys["ec"].parent
    config = SmartBackendConfig.from_mapping(
        _entry(keys, private_key_file="ec.pem", scope="  system/Observation.rs   system/Patient.rs "),
        base_dir=folder,
        where=WHERE,
    )

    assert config.private_key_file == folder / "ec.pem"
    assert config.scope == "system/Observation.rs system/Patient.rs"
    assert config.cache_key == ("https://auth.example.org/token", "ecglab", config.scope)
    jwk = config.public_jwk()
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-384" and "d" not in jwk
    assert jwk["kid"] == config.kid == jose_public_key(public_pem_of(keys["ec"])).thumbprint()
    assert config.public_jwks() == {"keys": [jwk]}
    assert "PRIVATE" not in repr(config) and "private_key=" not in repr(config)


def test_explicit_kid_and_jwks_url_go_into_the_assertion_header(keys: dict[str, Path]) -> None:
    config = SmartBackendConfig.from_mapping(
        _entry(keys, kid="ecglab-2026", jwks_url="https://ecglab.example.org/jwks.json"),
        base_dir=Path("/"),
        where=WHERE,
    )
    client = SmartBackendClient(config, fhir_servers=[FHIR])

    header = jose_jwt.decode(
        client.client_assertion(), jose_public_key(public_pem_of(keys["ec"])), algorithms=["ES384"]
    ).header

    assert header == {
        "alg": "ES384",
        "kid": "ecglab-2026",
        "typ": "JWT",
        "jku": "https://ecglab.example.org/jwks.json",
    }


def test_thumbprint_matches_rfc_7638_example() -> None:
    """The worked example of RFC 7638 §3.1."""
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY"
        "368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0f"
        "M4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    public_key = jose_jwk.RSAKey.import_key({"kty": "RSA", "n": n, "e": "AQAB"}).public_key

    assert jwk_thumbprint(public_key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
