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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from authlib.integrations.flask_oauth2 import AuthorizationServer  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749 import ClientMixin, InvalidClientError  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant  # type: ignore[import-untyped]
from authlib.oauth2.rfc6750 import BearerTokenGenerator  # type: ignore[import-untyped]
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask, request
from joserfc import jwk as jose_jwk
from joserfc import jwt as jose_jwt
from joserfc.errors import JoseError
from werkzeug.serving import make_server

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

FHIR = "https://fhir.example.org/r4"
SCOPE = "system/Patient.rs system/Observation.rs"
ALGS = {"RS384": "rsa", "ES384": "ec"}


# -- keys --------------------------------------------------------------------------------------------


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEM files: 'rsa' (2048), 'ec' (P-384), 'rsa_other', 'ec_other', 'p256', 'rsa_small', 'encrypted'."""
    folder = tmp_path_factory.mktemp("keys")
    made: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa_other": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa_small": rsa.generate_private_key(public_exponent=65537, key_size=1024),
        "ec": ec.generate_private_key(ec.SECP384R1()),
        "ec_other": ec.generate_private_key(ec.SECP384R1()),
        "p256": ec.generate_private_key(ec.SECP256R1()),
    }
    paths = {}
    for name, key in made.items():
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(_pem(key))
    paths["encrypted"] = folder / "encrypted.pem"
    paths["encrypted"].write_bytes(_pem(made["ec"], password=b"secret"))
    return paths


def _public_pem(path: Path) -> bytes:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _jose_public_key(public_pem: bytes, kid: str | None = None) -> Any:
    """joserfc's own reading of a public key (an implementation independent of ours)."""
    public = serialization.load_pem_public_key(public_pem)
    parameters: Any = {"kid": kid} if kid else None
    if isinstance(public, rsa.RSAPublicKey):
        return jose_jwk.import_key(public_pem, "RSA", parameters=parameters)
    return jose_jwk.import_key(public_pem, "EC", parameters=parameters)


# -- the token endpoint ------------------------------------------------------------------------------


@dataclass
class _Client(ClientMixin):
    """A registered backend client: its id and public key (kid = joserfc's RFC 7638 thumbprint)."""

    client_id: str
    key: Any

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None

    def get_allowed_scope(self, scope: str) -> str:
        return scope

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return False

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "private_key_jwt" and endpoint == "token"

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"


@dataclass
class TokenServer:
    """What the endpoint knows and saw; tests change ``delay_s`` and ``expires_in`` between calls."""

    token_url: str = ""
    clients: dict[str, _Client] = field(default_factory=dict)
    delay_s: float = 0.0
    expires_in: int = 120
    requests: int = 0
    forms: list[dict[str, str]] = field(default_factory=list)
    assertions: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    seen_jti: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, client_id: str, public_pem: bytes, kid: str | None = None) -> None:
        """Register a client's public key under ``kid`` (default: its RFC 7638 thumbprint)."""
        key = _jose_public_key(public_pem)
        key = _jose_public_key(public_pem, kid=kid or key.thumbprint())
        self.clients[client_id] = _Client(client_id, key)


class _PrivateKeyJwt(JWTBearerClientAssertion):
    """RFC 7523 client authentication as SMART Backend Services uses it (RS384 / ES384, exp ≤ 5 min)."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, state: TokenServer) -> None:
        super().__init__(validate_jti=True, leeway=5)
        self.state = state

    def get_audiences(self) -> list[str]:
        return [self.state.token_url]

    def validate_jti(self, claims: Any, jti: str) -> bool:
        with self.state.lock:
            if jti in self.state.seen_jti:
                return False
            self.state.seen_jti.add(jti)
            return True

    def resolve_client_public_key(self, client: _Client) -> Any:
        return jose_jwk.KeySet([client.key])

    def process_assertion_claims(self, assertion: str, resolve_key: Any) -> Any:
        try:
            token = jose_jwt.decode(assertion, resolve_key, algorithms=["RS384", "ES384"])
        except JoseError as exc:
            raise InvalidClientError(description=exc.description) from exc
        self.verify_claims(token.claims)
        if token.claims["exp"] - time.time() > 300:
            raise InvalidClientError(description="exp is more than five minutes ahead")
        with self.state.lock:
            self.state.assertions.append((dict(token.header), dict(token.claims)))
        return token.claims


class _BackendGrant(ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["private_key_jwt"]  # noqa: RUF012  (authlib's class attribute)


def _token_app(state: TokenServer) -> Flask:
    app = Flask("token-endpoint")

    def save_token(token: dict[str, Any], req: Any) -> None:
        with state.lock:
            state.issued.append(token["access_token"])

    server = AuthorizationServer(app, query_client=state.clients.get, save_token=save_token)
    server.register_token_generator(
        "default",
        BearerTokenGenerator(
            lambda **_: f"tok-{len(state.issued)}-{time.monotonic_ns()}",
            expires_generator=lambda client, grant_type: state.expires_in,
        ),
    )
    server.register_grant(_BackendGrant)
    server.register_client_auth_method("private_key_jwt", _PrivateKeyJwt(state))

    @app.post("/oauth2/token")
    def token() -> Any:
        with state.lock:
            state.requests += 1
            state.forms.append(dict(request.form))
        if state.delay_s:
            time.sleep(state.delay_s)
        return server.create_token_response()

    return app


@pytest.fixture
def endpoint() -> Iterator[TokenServer]:
    state = TokenServer()
    httpd = make_server("127.0.0.1", 0, _token_app(state), threaded=True)
    state.token_url = f"http://127.0.0.1:{httpd.server_port}/oauth2/token"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    thread.join(timeout=5)


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
    endpoint.register("ecglab", _public_pem(key_file))
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
    endpoint.register("ecglab", _public_pem(key_file))
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
    endpoint.register("ecglab", _public_pem(keys["ec"]))
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
    endpoint.register("ecglab", _public_pem(keys["rsa_other"]), kid=config.kid)
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
    assert jwk["kid"] == config.kid == _jose_public_key(_public_pem(keys["ec"])).thumbprint()
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
        client.client_assertion(), _jose_public_key(_public_pem(keys["ec"])), algorithms=["ES384"]
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
