"""A real OAuth2 token endpoint for the tests: SMART Backend Services with ``private_key_jwt``.

authlib's ``AuthorizationServer`` with its ``ClientCredentialsGrant`` and RFC 7523 client
authentication (``JWTBearerClientAssertion``), on a Flask app served by werkzeug on 127.0.0.1. It
registers a client's public key under the RFC 7638 thumbprint joserfc computes as ``kid``, accepts
RS384 and ES384, refuses a reused ``jti`` and an assertion living longer than SMART's five
minutes, and records what it was sent. A pytest plugin (``tests/conftest.py``): the ``keys``
fixture writes an RSA and an EC private key, ``endpoint`` runs the server for one test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def public_pem_of(path: Path) -> bytes:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jose_public_key(public_pem: bytes, kid: str | None = None) -> Any:
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
        key = jose_public_key(public_pem)
        key = jose_public_key(public_pem, kid=kid or key.thumbprint())
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
