"""SMART Backend Services: the service gets its own FHIR access token when the EHR sends none.

Many EHRs call a CDS service with ``fhirServer`` but without ``fhirAuthorization``. For an issuer
whose entry in the issuers file has a ``smart_backend`` client
(:class:`~cds_service.smart_backend_config.SmartBackendConfig`), :class:`SmartBackendClient` asks
the FHIR server's authorization server for a token exactly as the SMART App Launch "Backend
Services" profile says: an OAuth2 ``client_credentials`` grant (form fields ``grant_type``,
``scope``, ``client_assertion_type``, ``client_assertion``) authenticated with a
``private_key_jwt`` client assertion (RFC 7523) whose header holds ``alg``, ``kid`` and
``typ: JWT`` (and ``jku`` when ``jwks_url`` is set) and whose claims are ``iss`` = ``sub`` = the
client id, ``aud`` = the token URL, ``exp`` four minutes ahead and a fresh random ``jti``.

Why it is built this way:

* **Caching.** A token is kept per (token URL, client id, scope) until shortly before it expires
  (``expires_in``; :data:`DEFAULT_LIFETIME_S` when absent, capped at :data:`MAX_LIFETIME_S`).
* **One request, whatever the load.** Concurrent hook calls needing a token wait for one fetch
  (single flight). The fetch runs on its own thread, bounded by ``fetch_timeout_s``; each caller
  waits only until its own deadline (the hook budget), so a slow token endpoint costs a hook call
  its budget, never more, and a token that arrives late is still cached for the next call.
* **No hammering.** After a failed fetch the key is not tried again for a back-off delay that
  doubles with each failure (:data:`MIN_BACKOFF_S` to :data:`MAX_BACKOFF_S`); calls meanwhile fail
  at once with :class:`TokenBackoff`.
* **Secrets stay secret.** The token and the assertion are never logged nor put into an error
  message; a refusal is reported by its OAuth ``error`` code (and a sanitised, shortened
  ``error_description``), never the body verbatim. The answer is read with a size cap, without
  redirects and without content coding.
* **Sent to its own server only.** :meth:`SmartBackendClient.token_for` issues the token only for a
  FHIR server on the issuer's ``fhir_servers`` list (same scheme, host and port, path at or under
  the entry's path), which is the server the caller then sends it to.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import jwt

from cds_service.smart_backend_config import CacheKey, SmartBackendConfig
from cds_service.url_rules import url_has_prefix
from fhir_mappings.errors import ConfigError, EcglabError

log = logging.getLogger(__name__)

CLIENT_ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Seconds the client assertion is valid; SMART allows at most five minutes, this leaves room for skew.
ASSERTION_LIFETIME_S: Final = 240
#: Token lifetime assumed when the answer has no ``expires_in`` (SMART's recommended lifetime).
DEFAULT_LIFETIME_S: Final = 300.0
#: Longest a token is kept, whatever ``expires_in`` says.
MAX_LIFETIME_S: Final = 3600.0
#: A token is dropped this long before it expires (a quarter of its lifetime when that is shorter).
EXPIRY_MARGIN_S: Final = 30.0
MIN_BACKOFF_S: Final = 2.0
MAX_BACKOFF_S: Final = 60.0
DEFAULT_FETCH_TIMEOUT_S: Final = 10.0
MAX_RESPONSE_BYTES: Final = 64 * 1024
MAX_TOKEN_CHARS: Final = 16_384

_ACCESS_TOKEN = re.compile(rf"[\x21-\x7e]{{1,{MAX_TOKEN_CHARS}}}")
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_ERROR_DESCRIPTION = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §5.2 charset

__all__ = [
    "FhirServerNotAllowed",
    "IssuedToken",
    "SmartBackendClient",
    "SmartBackendConfig",
    "SmartBackendError",
    "TokenBackoff",
    "TokenCache",
    "TokenEndpointError",
    "TokenRefused",
    "TokenTimeout",
]


# -- errors ---------------------------------------------------------------------------------------


class SmartBackendError(EcglabError):
    """No access token could be had; ``code`` is a short machine-readable reason, safe to log."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code

    def again(self) -> SmartBackendError:
        """A fresh copy, for raising the outcome of one fetch in every thread that waited for it."""
        return type(self)(str(self), code=self.code)


class FhirServerNotAllowed(SmartBackendError):
    """A token was asked for a FHIR server that is not on the issuer's ``fhir_servers`` list."""


class TokenRefused(SmartBackendError):
    """The token endpoint refused the request (HTTP 400/401 with an OAuth ``error``, the ``code``)."""

    def __init__(self, message: str, *, code: str, description: str | None = None) -> None:
        super().__init__(message, code=code)
        self.description = description

    def again(self) -> TokenRefused:
        """A fresh copy carrying the same OAuth error code and description."""
        return type(self)(str(self), code=self.code, description=self.description)


class TokenEndpointError(SmartBackendError):
    """The token endpoint could not be reached or gave an unusable answer (``code`` says which)."""


class TokenTimeout(SmartBackendError):
    """The caller's deadline passed before a token was there."""


class TokenBackoff(SmartBackendError):
    """A recent fetch failed and the back-off delay is not over; no request was sent."""


# -- token cache ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedToken:
    """An access token as the token endpoint gave it; the token is left out of ``repr``."""

    access_token: str = field(repr=False)
    lifetime_s: float


@dataclass
class _Entry:
    """The state of one cache key; guarded by the cache's condition lock."""

    token: str | None = None
    usable_until: float = 0.0
    fetching: bool = False
    generation: int = 0
    failure: SmartBackendError | None = None
    failures: int = 0
    retry_at: float = 0.0


class TokenCache:
    """Thread-safe token cache with single-flight fetches and per-key back-off (module docstring).

    ``clock`` (seconds, monotonic) times expiry and back-off; tests inject a fake one. Callers'
    deadlines are always :func:`time.monotonic` instants. One cache may be shared by several
    clients, so that issuers using the same backend client share its token.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_backoff_s: float = MIN_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        self.clock = clock
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self._entries: dict[CacheKey, _Entry] = {}
        self._cond = threading.Condition()

    def get(self, key: CacheKey, fetch: Callable[[], IssuedToken], deadline: float) -> str:
        """The cached token for ``key``, else one from ``fetch`` (run once on a thread of its own).

        Raises:
            TokenTimeout: ``deadline`` passed first (the fetch goes on and caches its answer).
            TokenBackoff: an earlier fetch failed and its back-off delay is not over.
            SmartBackendError: the fetch this call waited for failed (its own error, copied).
        """
        with self._cond:
            entry = self._entries.setdefault(key, _Entry())
            while True:
                now = self.clock()
                if entry.token is not None and now < entry.usable_until:
                    return entry.token
                if not entry.fetching:
                    if now < entry.retry_at:
                        code = entry.failure.code if entry.failure is not None else "backoff"
                        raise TokenBackoff(
                            f"the last token request failed ({code}); next attempt in {entry.retry_at - now:.0f} s",
                            code=code,
                        )
                    if deadline <= time.monotonic():
                        raise TokenTimeout("the deadline passed before a token was asked for", code="timeout")
                    worker = threading.Thread(
                        target=self._run_fetch,
                        args=(key, entry, fetch),
                        name="smart-backend-token",
                        daemon=True,
                    )
                    try:
                        worker.start()
                    except RuntimeError:
                        raise TokenEndpointError(
                            "no thread for the token fetch", code="internal_error"
                        ) from None
                    entry.fetching = True
                waiting_for = entry.generation
                while entry.generation == waiting_for:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TokenTimeout("no token before the deadline", code="timeout")
                    self._cond.wait(left)
                if entry.failure is not None:
                    raise entry.failure.again()
                if entry.token is not None:
                    return entry.token

    def invalidate(self, key: CacheKey, token: str) -> None:
        """Forget ``token`` if it is still the cached one (e.g. the FHIR server answered 401 to it)."""
        with self._cond:
            entry = self._entries.get(key)
            if (
                entry is not None
                and entry.token is not None
                and secrets.compare_digest(entry.token.encode(), token.encode())
            ):
                entry.token = None
                entry.usable_until = 0.0

    def _run_fetch(self, key: CacheKey, entry: _Entry, fetch: Callable[[], IssuedToken]) -> None:
        """Body of the fetch thread: get a token, record the outcome, wake every waiter."""
        started = self.clock()
        issued: IssuedToken | None = None
        failure: SmartBackendError | None = None
        try:
            issued = fetch()
        except SmartBackendError as exc:
            failure = exc
        except Exception:
            log.exception("SMART backend token fetch failed unexpectedly")
            failure = TokenEndpointError("the token fetch failed unexpectedly", code="internal_error")
        with self._cond:
            entry.fetching = False
            entry.generation += 1
            entry.failure = failure
            if issued is not None:
                lifetime = issued.lifetime_s
                entry.token = issued.access_token
                entry.usable_until = started + lifetime - min(EXPIRY_MARGIN_S, lifetime / 4)
                entry.failures = 0
                entry.retry_at = 0.0
            else:
                entry.failures += 1
                delay = min(self.min_backoff_s * 2 ** (entry.failures - 1), self.max_backoff_s)
                entry.retry_at = self.clock() + delay
                log.warning(
                    "SMART backend token request to %s failed (%s: %s); not retried for %.0f s",
                    key[0],
                    failure.code if failure is not None else "unknown",
                    getattr(failure, "description", None) or "-",
                    delay,
                )
            self._cond.notify_all()


# -- client --------------------------------------------------------------------------------------


class SmartBackendClient:
    """Gets, caches and hands out access tokens of one backend client for one issuer's FHIR servers.

    Args:
        config: the client's settings and signing key.
        fhir_servers: the issuer's ``fhir_servers`` (base URLs or prefixes) the token may be used for.
        cache: a shared :class:`TokenCache`; a private one when not given.
        transport: an httpx transport (tests may inject one).
        fetch_timeout_s: the most one token request may take in all, whoever waits for it.
    """

    def __init__(
        self,
        config: SmartBackendConfig,
        *,
        fhir_servers: Sequence[str],
        cache: TokenCache | None = None,
        transport: httpx.BaseTransport | None = None,
        fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
    ) -> None:
        if isinstance(fhir_servers, str) or not fhir_servers:
            raise ConfigError(f"{config.where}: the issuer needs a fhir_servers list to use the token with")
        self.config = config
        self.fhir_servers = tuple(fhir_servers)
        self.cache = cache if cache is not None else TokenCache()
        self.fetch_timeout_s = float(fetch_timeout_s)
        self._transport = transport

    def __repr__(self) -> str:
        return f"SmartBackendClient({self.config.token_url!r}, client_id={self.config.client_id!r})"

    def covers(self, fhir_server: str) -> bool:
        """Whether :meth:`token_for` would give a token for ``fhir_server``."""
        return any(url_has_prefix(fhir_server, base) for base in self.fhir_servers)

    def token_for(self, fhir_server: str, deadline: float) -> str:
        """An access token to send to ``fhir_server``, by ``deadline`` (a :func:`time.monotonic` instant).

        Raises:
            FhirServerNotAllowed: ``fhir_server`` is not on the issuer's list (nothing is sent).
            TokenTimeout, TokenBackoff, TokenRefused, TokenEndpointError: no token (see the classes).
        """
        if not self.covers(fhir_server):
            raise FhirServerNotAllowed(
                "the FHIR server is not on the issuer's fhir_servers list", code="fhir_server_not_allowed"
            )
        return self.cache.get(self.config.cache_key, self._request_token, deadline)

    def invalidate(self, token: str) -> None:
        """Drop ``token`` from the cache (the FHIR server refused it); the next call asks for a new one."""
        self.cache.invalidate(self.config.cache_key, token)

    def client_assertion(self) -> str:
        """A freshly signed ``private_key_jwt`` client assertion (SMART Backend Services)."""
        cfg = self.config
        claims = {
            "iss": cfg.client_id,
            "sub": cfg.client_id,
            "aud": cfg.token_url,
            "exp": int(time.time()) + ASSERTION_LIFETIME_S,
            "jti": secrets.token_urlsafe(32),
        }
        headers: dict[str, Any] = {"kid": cfg.kid, "typ": "JWT"}
        if cfg.jwks_url is not None:
            headers["jku"] = cfg.jwks_url
        return jwt.encode(claims, cfg.private_key, algorithm=cfg.alg, headers=headers)

    def _request_token(self) -> IssuedToken:
        """POST the ``client_credentials`` grant; the checked token, or a :class:`SmartBackendError`."""
        cfg = self.config
        limit = time.monotonic() + self.fetch_timeout_s
        form = {
            "grant_type": "client_credentials",
            "scope": cfg.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.client_assertion(),
        }
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        try:
            with (
                httpx.Client(
                    transport=self._transport, timeout=self.fetch_timeout_s, follow_redirects=False
                ) as http,
                http.stream("POST", cfg.token_url, data=form, headers=headers) as response,
            ):
                body = _read_capped(response, limit)
                status = response.status_code
        except httpx.TimeoutException:
            raise TokenEndpointError(
                f"the token endpoint did not answer within {self.fetch_timeout_s:.0f} s",
                code="endpoint_timeout",
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, OSError, ValueError) as exc:
            raise TokenEndpointError(
                f"the token endpoint could not be reached ({type(exc).__name__})", code="unreachable"
            ) from None
        issued = _parse_answer(status, body)
        log.info(
            "SMART backend: got an access token for client %s from %s, kept up to %.0f s",
            cfg.client_id,
            cfg.token_url,
            issued.lifetime_s,
        )
        return issued


def _read_capped(response: httpx.Response, limit: float) -> bytes:
    """The raw body, refused when content-coded, over :data:`MAX_RESPONSE_BYTES` or still arriving at ``limit``."""
    if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
        raise TokenEndpointError("the token endpoint answered content-encoded", code="encoded_response")
    declared = response.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_RESPONSE_BYTES):
        raise TokenEndpointError("the token endpoint answer is too large", code="too_large")
    body = bytearray()
    for chunk in response.iter_raw():
        body.extend(chunk)
        if len(body) > MAX_RESPONSE_BYTES:
            raise TokenEndpointError("the token endpoint answer is too large", code="too_large")
        if time.monotonic() > limit:
            raise TokenEndpointError("the token endpoint answer was still arriving", code="endpoint_timeout")
    return bytes(body)


def _json_object(body: bytes) -> dict[str, Any] | None:
    """``body`` as a JSON object, or ``None``."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _parse_answer(status: int, body: bytes) -> IssuedToken:
    """The token of a 200 answer; a typed error for a refusal or anything unusable."""
    data = _json_object(body)
    if status in (400, 401) and data is not None and isinstance(data.get("error"), str):
        code = data["error"] if _ERROR_CODE.fullmatch(data["error"]) else "unrecognised_error"
        raw = data.get("error_description")
        description = raw[:160] if isinstance(raw, str) and _ERROR_DESCRIPTION.fullmatch(raw) else None
        raise TokenRefused(
            f"the token endpoint refused the request: {code}", code=code, description=description
        )
    if 300 <= status < 400:
        raise TokenEndpointError(
            f"the token endpoint redirected (HTTP {status}); not followed", code="redirect"
        )
    if status != 200:
        raise TokenEndpointError(f"the token endpoint answered HTTP {status}", code=f"http_{status}")
    if data is None:
        raise TokenEndpointError("the token answer is not a JSON object", code="malformed_response")
    token = data.get("access_token")
    if not isinstance(token, str) or not _ACCESS_TOKEN.fullmatch(token):
        raise TokenEndpointError("the token answer has no usable access_token", code="malformed_response")
    token_type = data.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenEndpointError("the token answer's token_type is not bearer", code="malformed_response")
    expires_in = data.get("expires_in", DEFAULT_LIFETIME_S)
    # ``not > 0`` also catches NaN; huge integers and Infinity are cut to the cap before float().
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or not expires_in > 0:
        raise TokenEndpointError(
            "the token answer's expires_in is not a positive number", code="malformed_response"
        )
    return IssuedToken(token, MAX_LIFETIME_S if expires_in > MAX_LIFETIME_S else float(expires_in))
