"""Allowed JWT issuers (the ``ECGLAB_ISSUERS`` YAML file) and their signing keys (JWKS cache).

The issuers file names every EHR (JWT ``iss``) that may call the service, where its public keys
come from and which FHIR servers it may send us to::

    issuers:
      "https://sandbox.cds-hooks.org":        # the JWT iss, verbatim
        jwks_file: keys/sandbox.jwks.json     # or jwks_url: https://.../jwks.json
        jku_allow: ["https://sandbox.cds-hooks.org/"]   # URL prefixes a jku header may name
        fhir_servers: ["https://launch.smarthealthit.org/"]  # origins this issuer may send as fhirServer

A relative ``jwks_file`` is resolved against the issuers file's folder. An issuer needs at least
one key source: ``jwks_file``, ``jwks_url`` or a non-empty ``jku_allow``.

URL prefixes (``jku_allow``, ``fhir_servers``) are matched structurally, never as plain string
prefixes: scheme, host and port must be equal and the path must start with the prefix's path at a
``/`` boundary, so ``https://ehr.example.org`` does not admit ``https://ehr.example.org.evil.net``.

:class:`JwksCache` fetches a JWKS with httpx (no redirects, size-capped, short timeout), keeps it
for ``ECGLAB_JWKS_CACHE_S`` and fetches again when a token names an unknown ``kid``, at most once
per ``ECGLAB_JWKS_REFETCH_S`` per URL so that forged ``kid`` values cannot turn the service into a
request amplifier.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import yaml

from fhir_mappings.errors import ConfigError, EcglabError

log = logging.getLogger(__name__)

ISSUER_KEYS = frozenset({"jwks_file", "jwks_url", "jku_allow", "fhir_servers"})
MAX_JWKS_BYTES = 256 * 1024
ALLOWED_KEY_TYPES = frozenset({"EC", "RSA"})


class JwksError(EcglabError):
    """No usable public key for a token (unknown kid, fetch failed, malformed JWKS)."""


@dataclass(frozen=True)
class IssuerConfig:
    """One allowed issuer: where its keys come from and which FHIR servers it may name."""

    iss: str
    jwks_file: Path | None
    jwks_url: str | None
    jku_allow: tuple[str, ...]
    fhir_servers: tuple[str, ...]
    static_jwks: Mapping[str, Any] | None

    def jku_allowed(self, jku: str) -> bool:
        """Whether a token's ``jku`` header lies under one of this issuer's ``jku_allow`` prefixes."""
        return any(url_has_prefix(jku, prefix) for prefix in self.jku_allow)

    def fhir_server_allowed(self, url: str) -> bool:
        """Whether ``url`` (a request's ``fhirServer``) is one of this issuer's FHIR servers."""
        return any(url_has_prefix(url, prefix) for prefix in self.fhir_servers)


def url_has_prefix(url: str, prefix: str) -> bool:
    """Structural URL prefix test: same scheme, host and port; path under the prefix's path.

    Rejects URLs with credentials and ``..`` path segments, which a server could resolve outside
    the allowed path.
    """
    try:
        u, p = urlsplit(url), urlsplit(prefix)
        u_port, p_port = u.port, p.port
    except ValueError:
        return False
    if u.scheme not in ("http", "https") or u.username or u.password or not u.hostname:
        return False
    if ".." in u.path.split("/"):
        return False
    default = {"http": 80, "https": 443}
    if (u.scheme, u.hostname, u_port or default[u.scheme]) != (
        p.scheme,
        p.hostname,
        p_port or default.get(p.scheme, 0),
    ):
        return False
    base = p.path if p.path.endswith("/") else p.path + "/"
    path = u.path if u.path.endswith("/") else u.path + "/"
    return path.startswith(base)


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` is an http(s) URL on this machine (localhost, 127.0.0.0/8 or ::1)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_issuers(path: Path) -> dict[str, IssuerConfig]:
    """Read and validate the issuers file; :class:`ConfigError` names the file and the key at fault."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"ECGLAB_ISSUERS: cannot read {path} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"ECGLAB_ISSUERS: {path} is not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or set(raw) != {"issuers"} or not isinstance(raw["issuers"], dict):
        raise ConfigError(
            f"ECGLAB_ISSUERS: {path} must hold exactly one top-level key 'issuers' mapping iss -> settings"
        )
    issuers: dict[str, IssuerConfig] = {}
    for iss, entry in raw["issuers"].items():
        where = f"{path}: issuers.{iss!r}"
        if not isinstance(iss, str) or not iss:
            raise ConfigError(f"{path}: issuer names must be non-empty strings, got {iss!r}")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping of {sorted(ISSUER_KEYS)}")
        unknown = set(entry) - ISSUER_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(ISSUER_KEYS)}")
        jku_allow = _url_list(entry.get("jku_allow", []), f"{where}.jku_allow")
        fhir_servers = _url_list(entry.get("fhir_servers", []), f"{where}.fhir_servers")
        jwks_url = entry.get("jwks_url")
        if jwks_url is not None:
            jwks_url = _url_list([jwks_url], f"{where}.jwks_url")[0]
        jwks_file: Path | None = None
        static_jwks: Mapping[str, Any] | None = None
        if entry.get("jwks_file") is not None:
            if not isinstance(entry["jwks_file"], str):
                raise ConfigError(f"{where}.jwks_file: expected a path string")
            jwks_file = Path(entry["jwks_file"])
            if not jwks_file.is_absolute():
                jwks_file = path.parent / jwks_file
            static_jwks = _read_jwks_file(jwks_file, f"{where}.jwks_file")
        if jwks_file is not None and jwks_url is not None:
            raise ConfigError(f"{where}: give jwks_file or jwks_url, not both")
        if jwks_file is None and jwks_url is None and not jku_allow:
            raise ConfigError(f"{where}: needs a key source: jwks_file, jwks_url or jku_allow")
        issuers[iss] = IssuerConfig(iss, jwks_file, jwks_url, jku_allow, fhir_servers, static_jwks)
    if not issuers:
        raise ConfigError(f"ECGLAB_ISSUERS: {path} lists no issuers")
    return issuers


def _url_list(value: Any, where: str) -> tuple[str, ...]:
    """A list of http(s) URL strings without credentials; ConfigError naming ``where`` otherwise."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of URL strings")
    for item in value:
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            raise ConfigError(f"{where}: {item!r} is not an http(s) URL without credentials")
    return tuple(value)


def _read_jwks_file(path: Path, where: str) -> Mapping[str, Any]:
    """Load and check a static JWKS file named by an issuer's ``jwks_file``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path} ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: {path} is not JSON ({exc.msg})") from None
    try:
        return validate_jwks(data)
    except JwksError as exc:
        raise ConfigError(f"{where}: {path}: {exc}") from None


def validate_jwks(data: Any) -> Mapping[str, Any]:
    """Check a JWKS document: ``{"keys": [...]}`` with public EC/RSA keys only, each with a kid."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError("a JWKS must be an object with a 'keys' list")
    for key in data["keys"]:
        if not isinstance(key, dict):
            raise JwksError("every JWKS key must be an object")
        if not isinstance(key.get("kty"), str) or key["kty"] not in ALLOWED_KEY_TYPES:
            raise JwksError(f"key type {key.get('kty')!r} is not allowed (EC or RSA public keys only)")
        if "d" in key:
            raise JwksError("the JWKS holds a private key; publish public keys only")
    checked: Mapping[str, Any] = data
    return checked


def find_key(jwks: Mapping[str, Any], kid: str, alg: str) -> jwt.PyJWK | None:
    """The key with ``kid`` usable for ``alg``, or ``None``; a key whose own ``alg`` differs is skipped."""
    for key in jwks.get("keys", []):
        if key.get("kid") != kid:
            continue
        if key.get("alg") not in (None, alg) or key.get("use") not in (None, "sig"):
            continue
        try:
            return jwt.PyJWK(key, algorithm=alg)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            return None
    return None


@dataclass
class _CachedJwks:
    """A downloaded JWKS and when it was fetched (monotonic seconds)."""

    jwks: Mapping[str, Any]
    fetched_at: float


class JwksCache:
    """Thread-safe JWKS cache keyed by URL, with kid-miss refetch and a per-URL rate limit."""

    def __init__(
        self,
        *,
        ttl_s: float,
        refetch_s: float,
        timeout_s: float,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.refetch_s = refetch_s
        self.timeout_s = timeout_s
        self.transport = transport
        self._clock = clock
        self._cache: dict[str, _CachedJwks] = {}
        self._last_attempt: dict[str, float] = {}
        self._lock = threading.Lock()

    def key_for(self, url: str, kid: str, alg: str) -> jwt.PyJWK:
        """The signing key ``kid`` from the JWKS at ``url``; refetches once when ``kid`` is unknown."""
        now = self._clock()
        with self._lock:
            cached = self._cache.get(url)
        if cached is not None and now - cached.fetched_at <= self.ttl_s:
            key = find_key(cached.jwks, kid, alg)
            if key is not None:
                return key
            if not self._may_refetch(url, now):
                raise JwksError("unknown kid and the JWKS was fetched moments ago")
        jwks = self._fetch(url)
        key = find_key(jwks, kid, alg)
        if key is None:
            raise JwksError("kid not in the issuer's JWKS")
        return key

    def _may_refetch(self, url: str, now: float) -> bool:
        """Whether the per-URL rate limit allows another download now."""
        with self._lock:
            last = self._last_attempt.get(url)
        return last is None or now - last >= self.refetch_s

    def _fetch(self, url: str) -> Mapping[str, Any]:
        """Download, size-check, validate and cache the JWKS at ``url`` (no redirects)."""
        now = self._clock()
        with self._lock:
            self._last_attempt[url] = now
        try:
            with (
                httpx.Client(
                    transport=self.transport, timeout=self.timeout_s, follow_redirects=False
                ) as client,
                client.stream("GET", url, headers={"Accept": "application/json"}) as response,
            ):
                if response.status_code != 200:
                    raise JwksError(f"JWKS download answered HTTP {response.status_code}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body.extend(chunk)
                    if len(body) > MAX_JWKS_BYTES:
                        raise JwksError("JWKS download is too large")
        except httpx.HTTPError as exc:
            raise JwksError(f"JWKS download failed ({type(exc).__name__})") from None
        try:
            jwks = validate_jwks(json.loads(bytes(body)))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise JwksError("JWKS download is not JSON") from None
        with self._lock:
            self._cache[url] = _CachedJwks(jwks, now)
        log.info("fetched JWKS from %s (%d keys)", url, len(jwks["keys"]))
        return jwks
