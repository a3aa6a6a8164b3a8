"""Allowed JWT issuers (the ``ECGLAB_ISSUERS`` YAML file) and their signing keys (JWKS cache).

The issuers file names every EHR (JWT ``iss``) that may call the service, where its public keys
come from and which FHIR servers it may send us to::

    issuers:
      "https://sandbox.cds-hooks.org":        # the JWT iss, verbatim
        jwks_file: keys/sandbox.jwks.json     # or jwks_url: https://.../jwks.json
        jku_allow: ["https://sandbox.cds-hooks.org/"]   # jku URLs: a prefix (ends in /) or exact
        fhir_servers: ["https://launch.smarthealthit.org/"]  # origins this issuer may send as fhirServer
        aud_allow_base: false                 # true: aud may also be the base or discovery URL

A relative ``jwks_file`` is resolved against the issuers file's folder. An issuer needs at least
one key source: ``jwks_file``, ``jwks_url`` or a non-empty ``jku_allow``. Every URL of the file
(``jwks_url``, ``jku_allow``, ``fhir_servers``) must be ``https`` (plain ``http`` only on a
loopback host: localhost, 127.0.0.0/8, ::1) and carry no credentials, query, fragment or dot
segments; anything else stops start-up with a :class:`ConfigError` naming the key.

URL prefixes (``jku_allow``, ``fhir_servers``) are matched structurally, never as plain string
prefixes: scheme, host and port must be equal and the path must start with the prefix's path at a
``/`` boundary, so ``https://ehr.example.org`` does not admit ``https://ehr.example.org.evil.net``.
A ``jku_allow`` entry whose path ends in ``/`` (or is empty) admits every JWKS URL under it; any
other entry admits exactly that URL.

A token's ``jku`` header is attacker-controlled text, checked by :func:`checked_jku` before it is
compared with anything: a string of at most :data:`MAX_JKU_CHARS` printable URL characters, an
absolute ``https`` URL (``http`` on loopback only) without credentials, query, fragment or dot
segments (literal or percent-encoded). A query would let one allowed URL take endless cache keys.

:class:`JwksCache` downloads a JWKS with httpx (no redirects, no content coding, size capped while
streaming, short timeout) and bounds that work per issuer, so that forged tokens cannot turn the
service into a request amplifier or fill its memory:

* at most one download per URL per ``ECGLAB_JWKS_REFETCH_S``, failed downloads included;
* at most :data:`ISSUER_FETCH_BUDGET` downloads per issuer per :data:`ISSUER_BUDGET_WINDOW_S`
  (an issuer with a ``jku_allow`` prefix could otherwise name many URLs, each with its own limit);
* at most :data:`MAX_CACHED_URLS` JWKS kept, least recently used dropped first (the per-URL
  download times are kept for :data:`MAX_TRACKED_URLS` URLs the same way).

A JWKS is used without asking again for ``ECGLAB_JWKS_CACHE_S``; after that, or when a token names
an unknown ``kid``, it is downloaded again if the limits allow. When that download fails or is
not allowed, the last good keys keep working while their age is at most ``ECGLAB_JWKS_CACHE_S`` ×
:data:`STALE_GRACE` (and at least ``ECGLAB_JWKS_REFETCH_S``, the longest a download can be put
off), so a JWKS endpoint that is briefly down does not lock the EHR out; then they expire.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import yaml

from cds_service.smart_backend_config import SmartBackendConfig
from cds_service.url_rules import origin, url_has_prefix, url_problem
from fhir_mappings.errors import ConfigError, EcglabError

log = logging.getLogger(__name__)

ISSUER_KEYS = frozenset(
    {"jwks_file", "jwks_url", "jku_allow", "fhir_servers", "aud_allow_base", "smart_backend"}
)
MAX_JWKS_BYTES = 256 * 1024
MAX_JWKS_KEYS = 100
#: Largest RSA modulus accepted (base64url characters of ``n``: 8192 bits); verification cost grows with it.
MAX_RSA_MODULUS_CHARS = 1366
MAX_RSA_EXPONENT_CHARS = 8
ALLOWED_KEY_TYPES = frozenset({"EC", "RSA"})
MAX_JKU_CHARS = 2048
#: Keys stay usable up to ``ECGLAB_JWKS_CACHE_S`` × this when a refresh fails or is rate limited.
STALE_GRACE = 2.0
ISSUER_FETCH_BUDGET = 6
ISSUER_BUDGET_WINDOW_S = 60.0
MAX_CACHED_URLS = 64
MAX_TRACKED_URLS = 256
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")


class JwksError(EcglabError):
    """No usable public key for a token (bad jku, unknown kid, fetch failed, malformed JWKS)."""


@dataclass(frozen=True)
class IssuerConfig:
    """One allowed issuer: where its keys come from and which FHIR servers it may name."""

    iss: str
    jwks_file: Path | None
    jwks_url: str | None
    jku_allow: tuple[str, ...]
    fhir_servers: tuple[str, ...]
    static_jwks: Mapping[str, Any] | None
    aud_allow_base: bool = False
    smart_backend: SmartBackendConfig | None = None

    def jku_allowed(self, jku: str) -> bool:
        """Whether a (checked) ``jku`` is one of this issuer's exact URLs or lies under one of its prefixes."""
        return any(_jku_matches(jku, entry) for entry in self.jku_allow)

    def fhir_server_allowed(self, url: str) -> bool:
        """Whether ``url`` (a request's ``fhirServer``) is one of this issuer's FHIR servers."""
        return any(url_has_prefix(url, prefix) for prefix in self.fhir_servers)


def _jku_matches(jku: str, entry: str) -> bool:
    """A ``jku_allow`` entry admits ``jku``: under it when its path ends in ``/`` or is empty, else equal."""
    if entry.endswith("/") or not urlsplit(entry).path:
        return url_has_prefix(jku, entry)
    try:
        u, e = urlsplit(jku), urlsplit(entry)
        return origin(u) == origin(e) and u.path == e.path and not u.query and not u.fragment
    except ValueError:
        return False


def checked_jku(value: Any) -> str:
    """A token's ``jku`` header if it is a well-formed key-set URL (module docstring); JwksError otherwise."""
    if not isinstance(value, str):
        raise JwksError("jku is not a string")
    if not value or len(value) > MAX_JKU_CHARS or not _URL_CHARS.fullmatch(value):
        raise JwksError("jku is empty, too long or holds characters no URL has")
    problem = url_problem(value)
    if problem is not None:
        raise JwksError(f"jku {problem}")
    return value


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
        if not isinstance(iss, str) or not iss:
            raise ConfigError(f"{path}: issuer names must be non-empty strings, got {iss!r}")
        issuers[iss] = _issuer(iss, entry, path)
    if not issuers:
        raise ConfigError(f"ECGLAB_ISSUERS: {path} lists no issuers")
    return issuers


def _issuer(iss: str, entry: Any, path: Path) -> IssuerConfig:
    """One validated issuers-file entry."""
    where = f"{path}: issuers.{iss!r}"
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
    aud_allow_base = entry.get("aud_allow_base", False)
    if not isinstance(aud_allow_base, bool):
        raise ConfigError(f"{where}.aud_allow_base: expected true or false")
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
    smart_backend: SmartBackendConfig | None = None
    if entry.get("smart_backend") is not None:
        smart_backend = SmartBackendConfig.from_mapping(
            entry["smart_backend"], base_dir=path.parent, where=f"{where}.smart_backend"
        )
        if not fhir_servers:
            raise ConfigError(f"{where}.smart_backend: needs fhir_servers (the servers its token is for)")
    return IssuerConfig(
        iss, jwks_file, jwks_url, jku_allow, fhir_servers, static_jwks, aud_allow_base, smart_backend
    )


def _url_list(value: Any, where: str) -> tuple[str, ...]:
    """A list of URL strings each passing :func:`_url_problem`; ConfigError naming ``where`` otherwise."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of URL strings")
    for item in value:
        problem = url_problem(item)
        if problem is not None:
            raise ConfigError(f"{where}: {item!r} {problem}")
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
    """Check a JWKS document: ``{"keys": [...]}`` of at most :data:`MAX_JWKS_KEYS` public EC/RSA keys."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError("a JWKS must be an object with a 'keys' list")
    if len(data["keys"]) > MAX_JWKS_KEYS:
        raise JwksError(f"the JWKS holds more than {MAX_JWKS_KEYS} keys")
    for key in data["keys"]:
        if not isinstance(key, dict):
            raise JwksError("every JWKS key must be an object")
        if not isinstance(key.get("kty"), str) or key["kty"] not in ALLOWED_KEY_TYPES:
            raise JwksError(f"key type {key.get('kty')!r} is not allowed (EC or RSA public keys only)")
        if "d" in key:
            raise JwksError("the JWKS holds a private key; publish public keys only")
        if key["kty"] == "RSA" and (
            len(str(key.get("n", ""))) > MAX_RSA_MODULUS_CHARS
            or len(str(key.get("e", ""))) > MAX_RSA_EXPONENT_CHARS
        ):
            raise JwksError("an RSA key is larger than 8192 bits or has an oversized exponent")
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
    """Thread-safe JWKS cache keyed by URL, with kid-miss refetch and the limits of the module docstring."""

    def __init__(
        self,
        *,
        ttl_s: float,
        refetch_s: float,
        timeout_s: float,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        issuer_budget: int = ISSUER_FETCH_BUDGET,
        budget_window_s: float = ISSUER_BUDGET_WINDOW_S,
        max_urls: int = MAX_CACHED_URLS,
    ) -> None:
        self.ttl_s = ttl_s
        self.refetch_s = refetch_s
        self.timeout_s = timeout_s
        self.transport = transport
        self.issuer_budget = issuer_budget
        self.budget_window_s = budget_window_s
        self.max_urls = max_urls
        self.clock = clock
        self._cache: OrderedDict[str, _CachedJwks] = OrderedDict()
        self._last_attempt: OrderedDict[str, float] = OrderedDict()
        self._issuer_fetches: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @property
    def stale_limit_s(self) -> float:
        """The greatest age at which cached keys are still used when a refresh fails or is not allowed."""
        return max(self.ttl_s * STALE_GRACE, float(self.refetch_s))

    def cached_urls(self) -> list[str]:
        """The URLs whose JWKS is cached, least recently used first."""
        with self._lock:
            return list(self._cache)

    def key_for(self, url: str, kid: str, alg: str, *, issuer: str) -> jwt.PyJWK:
        """The signing key ``kid`` from the JWKS at ``url`` on behalf of ``issuer``; JwksError if none is usable."""
        now = self.clock()
        with self._lock:
            cached = self._cache.get(url)
            if cached is not None:
                self._cache.move_to_end(url)
        age = now - cached.fetched_at if cached is not None else float("inf")
        if cached is not None and age <= self.ttl_s:
            key = find_key(cached.jwks, kid, alg)
            if key is not None:
                return key
        refused = self._claim_download(url, issuer, now)
        if refused is None:
            try:
                jwks = self._download(url, now)
            except JwksError as exc:
                refused = str(exc)
                log.warning("JWKS download for iss=%s failed: %s", issuer, exc)
            else:
                key = find_key(jwks, kid, alg)
                if key is None:
                    raise JwksError("kid not in the issuer's JWKS")
                return key
        if cached is not None and age <= self.stale_limit_s:
            key = find_key(cached.jwks, kid, alg)
            if key is not None:
                log.debug("JWKS not refreshed (%s); using keys fetched %.0f s ago", refused, age)
                return key
        raise JwksError(f"no usable key: {refused}")

    def _claim_download(self, url: str, issuer: str, now: float) -> str | None:
        """Reserve a download of ``url`` for ``issuer`` under both rate limits; why not, or ``None`` if allowed."""
        with self._lock:
            last = self._last_attempt.get(url)
            if last is not None and now - last < self.refetch_s:
                return "this URL was tried moments ago (ECGLAB_JWKS_REFETCH_S)"
            window = self._issuer_fetches.setdefault(issuer, deque())
            while window and now - window[0] >= self.budget_window_s:
                window.popleft()
            if len(window) >= self.issuer_budget:
                return "the issuer's download budget is spent"
            window.append(now)
            self._last_attempt[url] = now
            self._last_attempt.move_to_end(url)
            while len(self._last_attempt) > MAX_TRACKED_URLS:
                self._last_attempt.popitem(last=False)
        return None

    def _download(self, url: str, now: float) -> Mapping[str, Any]:
        """Download, size-check, validate and cache the JWKS at ``url`` (no redirects, identity coding only)."""
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        try:
            with (
                httpx.Client(
                    transport=self.transport, timeout=self.timeout_s, follow_redirects=False
                ) as client,
                client.stream("GET", url, headers=headers) as response,
            ):
                if response.status_code != 200:
                    raise JwksError(f"JWKS download answered HTTP {response.status_code}")
                if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
                    raise JwksError("JWKS download came content-encoded although identity was asked for")
                declared = response.headers.get("content-length", "0")
                if not declared.isdigit() or int(declared) > MAX_JWKS_BYTES:
                    raise JwksError("JWKS download declares a bad or too large Content-Length")
                body = bytearray()
                for chunk in response.iter_bytes():  # identity coding enforced above: nothing inflates
                    body.extend(chunk)
                    if len(body) > MAX_JWKS_BYTES:
                        raise JwksError("JWKS download is too large")
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, ValueError, OSError) as exc:
            raise JwksError(f"JWKS download failed ({type(exc).__name__})") from None
        try:
            jwks = validate_jwks(json.loads(bytes(body)))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise JwksError("JWKS download is not JSON") from None
        with self._lock:
            self._cache[url] = _CachedJwks(jwks, now)
            self._cache.move_to_end(url)
            while len(self._cache) > self.max_urls:
                self._cache.popitem(last=False)
        log.info("fetched JWKS (%d keys)", len(jwks["keys"]))
        return jwks
