"""Inbound JWT authentication of the calling EHR (CDS Hooks 2.0 "Trusting CDS Clients" + BP).

Every request except a CORS preflight carries ``Authorization: Bearer <JWT>`` signed by the EHR.
:meth:`Authenticator.authenticate` accepts it only when all of these hold, in this order:

1. ``alg`` is ES384 or RS384 (never ``none``, never HMAC: a shared-secret algorithm would let
   anyone holding the public key forge tokens) and the header names a ``kid``;
2. ``iss`` is in the issuers file (``ECGLAB_ISSUERS``);
3. the signing key is found: from the token's ``jku`` when that header is a well-formed URL
   (:func:`~cds_service.issuers.checked_jku`) on the issuer's ``jku_allow`` list (any other
   ``jku`` is refused outright, never fetched), else from the issuer's static ``jwks_file`` or
   fixed ``jwks_url``; downloads are cached and rate limited per URL and per issuer
   (:class:`~cds_service.issuers.JwksCache`). Keys embedded in the header (``jwk``, ``x5c``,
   ``x5u``) are never used;
4. the signature verifies and ``aud`` (string or array) names the endpoint URL called,
   ``{ECGLAB_PUBLIC_URL}`` + the request path (CDS Hooks 2.0: ``.../cds-services/{id}`` for a
   hook, ``.../cds-services/{id}/feedback`` for feedback, ``.../cds-services`` for discovery).
   Only an issuer with ``aud_allow_base: true`` may instead name the base URL (with or without a
   trailing slash) or the discovery URL, for EHRs configured by hand (e.g. Epic) that send one
   ``aud`` for every call;
5. ``exp``, ``iat`` and ``nbf`` hold within ``ECGLAB_JWT_LEEWAY_S``, and ``exp`` is no more than
   ``ECGLAB_JWT_MAX_LIFETIME_S`` ahead (which bounds the replay cache);
6. ``jti`` was not seen before: the hash of ``iss`` + ``jti`` goes into the database table shared
   by every worker and instance, refused while the earlier token is unexpired. It is recorded only
   after the signature verified, so forged tokens cannot fill the cache.

Any failure raises :class:`AuthError`; the HTTP layer answers 401 with a generic body. The reason
is logged with ``iss`` and ``jti`` only, never the token.

With ``ECGLAB_AUTH=off`` (development) no token is checked and the caller may only send the
service to ``ECGLAB_DEV_FHIR_SERVERS`` or, when that is empty, to loopback FHIR servers.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from sqlalchemy import Engine

from cds_service.db import purge_expired_tokens, remember_token
from cds_service.issuers import (
    IssuerConfig,
    JwksCache,
    JwksError,
    checked_jku,
    find_key,
)
from cds_service.observability import log_safe
from cds_service.settings import Settings
from cds_service.url_rules import is_loopback_url, url_has_prefix
from fhir_mappings.errors import EcglabError

log = logging.getLogger(__name__)

ALLOWED_ALGORITHMS = frozenset({"ES384", "RS384"})
MAX_TOKEN_CHARS = 16_384
PURGE_INTERVAL_S = 60.0


class AuthError(EcglabError):
    """The request is not authenticated; ``reason`` is for the log only, never for the response."""

    def __init__(self, reason: str, *, iss: str | None = None, jti: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.iss = iss
        self.jti = jti


@dataclass(frozen=True)
class Caller:
    """The authenticated client of one request (all ``None`` when auth is off)."""

    iss: str | None
    jti: str | None
    tenant: str | None
    issuer: IssuerConfig | None


class Authenticator:
    """Verifies inbound JWTs and decides which FHIR servers a caller may send the service to."""

    def __init__(
        self,
        settings: Settings,
        issuers: Mapping[str, IssuerConfig],
        jwks: JwksCache,
        engine: Engine,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.issuers = dict(issuers)
        self.jwks = jwks
        self.engine = engine
        self._clock = clock
        self._last_purge = 0.0
        self._purge_lock = threading.Lock()

    # -- audiences ----------------------------------------------------------------------------
    def audiences(self, path: str, issuer: IssuerConfig) -> list[str]:
        """The ``aud`` values ``issuer`` may send for a request to ``path`` (e.g. ``/cds-services/x``)."""
        base = self.settings.public_url
        accepted = [base + path]
        if issuer.aud_allow_base:
            accepted += [base, base + "/", base + "/cds-services"]
        return accepted

    # -- authentication -------------------------------------------------------------------------
    def authenticate(self, authorization: str | None, path: str) -> Caller:
        """Check the ``Authorization`` header of a request to ``path``; :class:`AuthError` if not valid."""
        if not self.settings.auth:
            return Caller(None, None, None, None)
        token = _bearer_token(authorization)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed JWT header") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise AuthError(f"alg {log_safe(alg)} not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("JWT header lacks kid")
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError("malformed JWT payload") from None
        iss = unverified.get("iss")
        jti = unverified.get("jti")
        jti_text = jti if isinstance(jti, str) else None
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthError("iss not in the issuers file", iss=log_safe(iss), jti=jti_text)
        key = self._signing_key(issuer, header, kid, alg, jti_text)
        claims = self._verify(token, key, alg, issuer, path, jti_text)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise AuthError("jti missing or empty", iss=issuer.iss)
        exp = float(claims["exp"])
        now = self._clock()
        if exp - now > self.settings.jwt_max_lifetime_s + self.settings.jwt_leeway_s:
            raise AuthError("exp lies beyond the allowed token lifetime", iss=issuer.iss, jti=jti)
        self._maybe_purge(now)
        token_key = hashlib.sha256(f"{issuer.iss}\x00{jti}".encode()).hexdigest()
        if not remember_token(self.engine, token_key, exp + self.settings.jwt_leeway_s, now=now):
            raise AuthError("replayed jti", iss=issuer.iss, jti=jti)
        tenant = claims.get("tenant")
        return Caller(issuer.iss, jti, tenant if isinstance(tenant, str) else None, issuer)

    def _signing_key(
        self, issuer: IssuerConfig, header: Mapping[str, Any], kid: str, alg: str, jti: str | None
    ) -> jwt.PyJWK:
        """The public key that must have signed the token (jku on the allow list, else the configured JWKS)."""
        jku = header.get("jku")
        try:
            if jku is not None:
                url = checked_jku(jku)
                if not issuer.jku_allowed(url):
                    raise AuthError("jku not on the issuer's jku_allow list", iss=issuer.iss, jti=jti)
                return self.jwks.key_for(url, kid, alg, issuer=issuer.iss)
            if issuer.static_jwks is not None:
                key = find_key(issuer.static_jwks, kid, alg)
                if key is None:
                    raise AuthError("kid not in the issuer's jwks_file", iss=issuer.iss, jti=jti)
                return key
            if issuer.jwks_url is not None:
                return self.jwks.key_for(issuer.jwks_url, kid, alg, issuer=issuer.iss)
        except JwksError as exc:
            raise AuthError(f"no signing key: {exc}", iss=issuer.iss, jti=jti) from None
        raise AuthError("token has no jku and the issuer has no jwks_file/jwks_url", iss=issuer.iss, jti=jti)

    def _verify(
        self, token: str, key: jwt.PyJWK, alg: str, issuer: IssuerConfig, path: str, jti: str | None
    ) -> dict[str, Any]:
        """Verify signature, ``aud``, ``iss`` and the time claims with PyJWT, for exactly the header's algorithm."""
        try:
            return jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=self.audiences(path, issuer),
                issuer=issuer.iss,
                leeway=self.settings.jwt_leeway_s,
                options={"require": ["iss", "aud", "exp", "iat", "jti"]},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(f"JWT rejected: {type(exc).__name__}", iss=issuer.iss, jti=jti) from None

    def _maybe_purge(self, now: float) -> None:
        """Drop expired replay-cache rows, at most once a minute per process."""
        with self._purge_lock:
            if now - self._last_purge < PURGE_INTERVAL_S:
                return
            self._last_purge = now
        removed = purge_expired_tokens(self.engine, now=now)
        if removed:
            log.debug("purged %d expired replay-cache entries", removed)

    # -- where the caller may send us -------------------------------------------------------------
    def fhir_server_allowed(self, caller: Caller, url: str) -> bool:
        """Whether the service may contact ``url`` (the request's ``fhirServer``) for this caller."""
        if caller.issuer is not None:
            return caller.issuer.fhir_server_allowed(url)
        if self.settings.auth:
            return False
        if self.settings.dev_fhir_servers:
            return any(url_has_prefix(url, prefix) for prefix in self.settings.dev_fhir_servers)
        return is_loopback_url(url)


def _bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header; AuthError when absent, malformed or huge."""
    if not authorization:
        raise AuthError("no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("Authorization is not a Bearer token")
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthError("token too long")
    return token
