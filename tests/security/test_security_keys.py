"""Key fetching, jku checks, issuers-file URLs and the audience rule (issue 14, "Key fetching", "Audience").

Every case goes through the HTTP interface with tokens minted here. JWKS downloads go to
:class:`JwksServer`, an ``httpx.MockTransport`` double that records each request (URL and
headers) and can fail, stream without end, declare a huge length or answer gzip-encoded; the
JWKS cache's clock is replaced by a hand-advanced one so that cache ages and rate-limit windows
are exact. What is pinned:

* downloads are bounded: one per URL per ``ECGLAB_JWKS_REFETCH_S`` with failures counted, a
  budget per issuer (one issuer spending it does not lock out another), an LRU-bounded cache;
* the last good keys keep working while a refresh fails, up to ``ECGLAB_JWKS_CACHE_S`` ×
  ``STALE_GRACE``, then expire;
* a JWKS body is capped while streaming, whatever length it declares, and never inflated;
* a ``jku`` is accepted only as an exact listed URL or under a listed prefix, and a malformed
  ``jku`` (not a string, not a URL, dot segments, userinfo, query, plain http off loopback, …) is
  a bare 401 with no download, never a 500;
* the issuers file refuses non-https URLs off loopback, queries, fragments and dot segments;
* ``aud`` must be the endpoint URL called, unless the issuer opts in with ``aud_allow_base``.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask

from cds_service.issuers import (
    ISSUER_BUDGET_WINDOW_S,
    ISSUER_FETCH_BUDGET,
    MAX_JWKS_BYTES,
    STALE_GRACE,
    load_issuers,
)
from fhir_mappings.errors import ConfigError
from tests.issued_cards import issue_card
from tests.service_fixtures import (
    EHR_ISS,
    PUBLIC_URL,
    ServiceEnv,
    clinical_record,
    hook_request,
    jwks,
    mint,
    prefetch_from,
)

DISCOVERY = "/cds-services"
HOOK = "/cds-services/ecglab-patient-view"
FEEDBACK = "/cds-services/ecglab-patient-view/feedback"
A_ISS = "https://a.example.net"
B_ISS = "https://b.example.net"
URL_ISS = "https://fixed.example.net"
LOOP_ISS = "https://loopback.example.net"
KEYS = "https://keys.example.net"
A_EXACT = f"{KEYS}/exact/jwks.json"
FIXED_URL = f"{KEYS}/fixed/jwks.json"
LOOPBACK_PREFIX = "http://127.0.0.1:8765/keys/"
CHUNK = 16 * 1024

ISSUERS = f"""issuers:
  "{A_ISS}":
    jku_allow: ["{KEYS}/a/", "{A_EXACT}"]
  "{B_ISS}":
    jku_allow: ["{KEYS}/b/"]
  "{URL_ISS}":
    jwks_url: "{FIXED_URL}"
  "{LOOP_ISS}":
    jku_allow: ["{LOOPBACK_PREFIX}"]
"""


class JwksServer:
    """A JWKS host double: serves ``document`` at every path in ``ok`` mode; records every request."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.mode = "ok"
        self.requests: list[httpx.Request] = []
        self.bytes_sent = 0
        self.transport = httpx.MockTransport(self.handle)

    def urls(self) -> list[str]:
        """The URL of every request, in order."""
        return [str(r.url) for r in self.requests]

    def _endless(self) -> Iterator[bytes]:
        """A JSON-looking body that never ends, counting what was pulled."""
        yield b'{"keys": [], "padding": "'
        while True:
            self.bytes_sent += CHUNK
            yield b"x" * CHUNK

    def handle(self, request: httpx.Request) -> httpx.Response:
        """Answer as :attr:`mode` says."""
        self.requests.append(request)
        if self.mode == "ok":
            return httpx.Response(200, json=self.document)
        if self.mode == "down":
            return httpx.Response(503, text="maintenance")
        if self.mode == "endless":
            return httpx.Response(200, content=self._endless(), headers={"Content-Type": "application/json"})
        if self.mode == "declared_huge":
            headers = {"Content-Type": "application/json", "Content-Length": str(10**9)}
            return httpx.Response(200, content=self._endless(), headers=headers)
        if self.mode == "gzip":
            body = gzip.compress(json.dumps(self.document).encode())
            return httpx.Response(200, content=body, headers={"Content-Encoding": "gzip"})
        if self.mode == "nested":
            return httpx.Response(200, content=b"[" * 100_000 + b"]" * 100_000)
        if self.mode == "unreachable":
            raise httpx.ConnectError("connection refused", request=request)
        raise AssertionError(self.mode)


class Clock:
    """A monotonic clock advanced by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


@pytest.fixture
def keys_env(service_env: ServiceEnv) -> tuple[ServiceEnv, Path, JwksServer]:
    """The shared env, an issuers file with jku / jwks_url issuers, and the JWKS server double."""
    path = service_env.tmp / "key-issuers.yaml"
    path.write_text(ISSUERS)
    return service_env, path, JwksServer(jwks(service_env.keys["ec"], service_env.keys["rsa"]))


def key_app(
    make_app: Any, keys_env: tuple[ServiceEnv, Path, JwksServer], **settings: Any
) -> tuple[Flask, Clock]:
    """An app on the key issuers file, its JWKS downloads going to the server double, with a hand clock."""
    _, path, server = keys_env
    app = make_app(issuers=str(path), **settings)
    clock = Clock()
    cache = app.extensions["ecglab"].jwks
    cache.transport, cache.clock = server.transport, clock
    return app, clock


def discover(
    app: Flask, env: ServiceEnv, iss: str, jku: Any = None, *, key: str = "ec", **header: Any
) -> int:
    """GET discovery with a fresh token of ``iss`` (its jku header when given); the status."""
    extra = dict(header)
    if jku is not None:
        extra["jku"] = jku
    token = mint(env.keys[key], iss=iss, aud=PUBLIC_URL + DISCOVERY, header=extra)
    return int(app.test_client().get(DISCOVERY, headers={"Authorization": f"Bearer {token}"}).status_code)


# -- rate limits and cache bounds -----------------------------------------------------------------------------


def test_a_failing_jwks_url_is_tried_once_per_refetch_interval(make_app, keys_env) -> None:
    """Failures count: five tokens naming a JWKS host that is down cause one download, not five."""
    env, _, server = keys_env
    app, clock = key_app(make_app, keys_env, jwks_refetch_s=30)
    server.mode = "down"
    jku = f"{KEYS}/a/jwks.json"
    assert [discover(app, env, A_ISS, jku) for _ in range(5)] == [401] * 5
    assert server.urls() == [jku]
    clock.advance(31)
    assert discover(app, env, A_ISS, jku) == 401
    assert len(server.requests) == 2, "one more try once the interval has passed"
    server.mode = "ok"
    assert discover(app, env, A_ISS, jku) == 401 and len(server.requests) == 2, "still inside the interval"
    clock.advance(31)
    assert discover(app, env, A_ISS, jku) == 200 and len(server.requests) == 3


def test_each_issuer_has_a_small_download_budget(make_app, keys_env) -> None:
    """A prefix admits many URLs; the issuer's budget bounds their downloads, and only that issuer's."""
    env, _, server = keys_env
    app, clock = key_app(make_app, keys_env, jwks_refetch_s=0)
    statuses = [discover(app, env, A_ISS, f"{KEYS}/a/k{n}.json") for n in range(ISSUER_FETCH_BUDGET + 10)]
    assert statuses == [200] * ISSUER_FETCH_BUDGET + [401] * 10
    assert len(server.requests) == ISSUER_FETCH_BUDGET
    assert discover(app, env, B_ISS, f"{KEYS}/b/jwks.json") == 200, "another issuer is not locked out"
    assert discover(app, env, A_ISS, f"{KEYS}/a/k0.json") == 200, "cached keys need no download"
    clock.advance(ISSUER_BUDGET_WINDOW_S)
    assert discover(app, env, A_ISS, f"{KEYS}/a/late.json") == 200
    assert len(server.requests) == ISSUER_FETCH_BUDGET + 2


def test_the_jwks_cache_is_bounded_least_recently_used_first(make_app, keys_env) -> None:
    """At most ``max_urls`` key sets are kept; the one used last survives an eviction."""
    env, _, server = keys_env
    app, _ = key_app(make_app, keys_env, jwks_refetch_s=0)
    cache = app.extensions["ecglab"].jwks
    cache.max_urls, cache.issuer_budget = 2, 100
    for name in ("one", "two", "three"):
        assert discover(app, env, A_ISS, f"{KEYS}/a/{name}.json") == 200
    assert cache.cached_urls() == [f"{KEYS}/a/two.json", f"{KEYS}/a/three.json"]
    assert discover(app, env, A_ISS, f"{KEYS}/a/two.json") == 200  # a hit: no download, now most recent
    assert discover(app, env, A_ISS, f"{KEYS}/a/four.json") == 200
    assert cache.cached_urls() == [f"{KEYS}/a/two.json", f"{KEYS}/a/four.json"]
    assert [u.rsplit("/", 1)[1] for u in server.urls()] == ["one.json", "two.json", "three.json", "four.json"]


def test_last_good_keys_outlive_a_failing_refresh_until_the_grace_ends(make_app, keys_env) -> None:
    """JWKS host down after a good download: keys work up to CACHE_S × STALE_GRACE, refreshes still rate limited."""
    env, _, server = keys_env
    ttl, refetch = 300, 30
    app, clock = key_app(make_app, keys_env, jwks_cache_s=ttl, jwks_refetch_s=refetch)
    assert discover(app, env, URL_ISS) == 200 and server.urls() == [FIXED_URL]
    server.mode = "down"
    clock.advance(ttl + 1)
    assert discover(app, env, URL_ISS) == 200, "stale but within the grace: still accepted"
    assert len(server.requests) == 2, "a refresh was tried"
    clock.advance(refetch - 5)
    assert discover(app, env, URL_ISS) == 200 and len(server.requests) == 2, "no retry inside the interval"
    clock.advance(ttl * STALE_GRACE - ttl - refetch + 3)  # age now just inside the grace
    assert discover(app, env, URL_ISS) == 200
    clock.advance(2)  # age past CACHE_S × STALE_GRACE
    assert discover(app, env, URL_ISS) == 401, "expired keys are not used"
    server.mode = "ok"
    clock.advance(refetch)
    assert discover(app, env, URL_ISS) == 200


def test_stale_keys_do_not_admit_an_unknown_kid(make_app, keys_env) -> None:
    """The grace keeps known keys only: a kid the last good JWKS lacks is refused while the host is down."""
    env, _, server = keys_env
    app, clock = key_app(make_app, keys_env, jwks_cache_s=300, jwks_refetch_s=0)
    assert discover(app, env, URL_ISS) == 200
    server.mode = "down"
    clock.advance(301)
    assert discover(app, env, URL_ISS, key="ec2") == 401


@pytest.mark.parametrize("mode", ["down", "unreachable", "nested", "gzip"])
def test_a_bad_jwks_answer_is_a_401_never_a_500(make_app, keys_env, mode: str) -> None:
    """Whatever the JWKS host answers (error, reset, JSON nested 100 000 deep, gzip), the token is a bare 401."""
    env, _, server = keys_env
    app, _ = key_app(make_app, keys_env)
    server.mode = mode
    assert discover(app, env, URL_ISS) == 401
    assert discover(app, env, A_ISS, A_EXACT) == 401


# -- size cap while streaming -----------------------------------------------------------------------------------


def test_an_endless_jwks_body_is_cut_off_at_the_cap(make_app, keys_env) -> None:
    """A body without Content-Length that never ends: reading stops just past MAX_JWKS_BYTES."""
    env, _, server = keys_env
    app, _ = key_app(make_app, keys_env)
    server.mode = "endless"
    assert discover(app, env, URL_ISS) == 401
    assert 0 < server.bytes_sent <= MAX_JWKS_BYTES + 2 * CHUNK


def test_a_declared_huge_jwks_body_is_not_read(make_app, keys_env) -> None:
    """Content-Length beyond the cap: refused before a byte of the body is pulled."""
    env, _, server = keys_env
    app, _ = key_app(make_app, keys_env)
    server.mode = "declared_huge"
    assert discover(app, env, URL_ISS) == 401
    assert server.bytes_sent == 0


def test_jwks_is_requested_without_content_coding(make_app, keys_env) -> None:
    """The download asks for identity coding (so nothing is ever inflated) and refuses an encoded answer."""
    env, _, server = keys_env
    app, _ = key_app(make_app, keys_env)
    server.mode = "gzip"
    assert discover(app, env, URL_ISS) == 401
    [request] = server.requests
    assert request.headers["accept-encoding"] == "identity"


# -- which jku values are accepted ----------------------------------------------------------------------------


def test_an_exact_jku_entry_admits_only_that_url(make_app, keys_env) -> None:
    """``jku_allow`` entries without a trailing slash are exact URLs; entries with one are prefixes."""
    env, _, server = keys_env
    app, _ = key_app(make_app, keys_env)
    assert discover(app, env, A_ISS, A_EXACT) == 200
    for near in (
        A_EXACT + "/more",
        A_EXACT.replace("jwks.json", "jwks.json.bak"),
        f"{KEYS}/exact/other.json",
    ):
        assert discover(app, env, A_ISS, near) == 401
    assert discover(app, env, A_ISS, f"{KEYS}/a/deeper/path/jwks.json") == 200
    assert server.urls() == [A_EXACT, f"{KEYS}/a/deeper/path/jwks.json"]


def test_plain_http_jku_is_accepted_on_loopback_only(make_app, keys_env) -> None:
    """A loopback issuer (a test or sidecar key server) may use http; the same path elsewhere may not."""
    env, _, server = keys_env
    app, _ = key_app(make_app, keys_env)
    assert discover(app, env, LOOP_ISS, LOOPBACK_PREFIX + "jwks.json") == 200
    assert discover(app, env, A_ISS, f"{KEYS}/a/jwks.json".replace("https:", "http:")) == 401
    assert server.urls() == [LOOPBACK_PREFIX + "jwks.json"]


MALFORMED_JKU: dict[str, Any] = {
    "a number": 123,
    "a list": [f"{KEYS}/a/jwks.json"],
    "an object": {"url": f"{KEYS}/a/jwks.json"},
    "true": True,
    "empty": "",
    "not a URL": "keys please",
    "relative": "/a/jwks.json",
    "no host": "https:///a/jwks.json",
    "dot-dot segment": f"{KEYS}/a/../a/jwks.json",
    "dot segment": f"{KEYS}/a/./jwks.json",
    "percent-encoded dot-dot": f"{KEYS}/a/%2e%2E/a/jwks.json",
    "half-encoded dot-dot": f"{KEYS}/a/.%2e/a/jwks.json",
    "backslash": f"{KEYS}/a\\..\\jwks.json",
    "userinfo": "https://user:secret@keys.example.net/a/jwks.json",
    "user only": "https://user@keys.example.net/a/jwks.json",
    "plain http": "http://keys.example.net/a/jwks.json",
    "ftp": "ftp://keys.example.net/a/jwks.json",
    "query": f"{KEYS}/a/jwks.json?v=2",
    "empty query": f"{KEYS}/a/jwks.json?",
    "fragment": f"{KEYS}/a/jwks.json#k",
    "bad port": "https://keys.example.net:99999/a/jwks.json",
    "port not a number": "https://keys.example.net:https/a/jwks.json",
    "broken IPv6 host": "https://[::1/a/jwks.json",
    "NUL": f"{KEYS}/a/jwks\x00.json",
    "newline": f"{KEYS}/a/jwks.json\r\nX-Injected: 1",
    "space": f"{KEYS}/a/my jwks.json",
    "non-ASCII host": "https://kéys.example.net/a/jwks.json",
    "very long": f"{KEYS}/a/" + "k" * 5000 + ".json",
    "look-alike host": "https://keys.example.net.evil.io/a/jwks.json",
}


@pytest.mark.parametrize("case", list(MALFORMED_JKU))
def test_a_malformed_jku_is_a_bare_401_and_never_fetched(make_app, keys_env, case: str) -> None:
    """The jku header is attacker text: anything but a clean https URL on the list is refused before any download."""
    env, _, server = keys_env
    app, _ = key_app(make_app, keys_env)
    token = mint(env.keys["ec"], iss=A_ISS, aud=PUBLIC_URL + DISCOVERY, header={"jku": MALFORMED_JKU[case]})
    response = app.test_client().get(DISCOVERY, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.get_json()["issue"][0]["code"] == "login"
    assert server.requests == []


def test_a_key_embedded_in_the_header_is_never_used(make_app, keys_env) -> None:
    """A token signed by the attacker's key and carrying it as ``jwk`` (and ``x5u``) in the header: 401."""
    env, _, server = keys_env
    app, _ = key_app(make_app, keys_env)
    attacker = env.keys["ec2"]
    header = {"jwk": attacker.public_jwk(), "x5u": f"{KEYS}/a/cert.pem"}
    assert discover(app, env, URL_ISS, key="ec2", **header) == 401
    assert server.urls() == [FIXED_URL], "only the configured jwks_url was consulted"


# -- the issuers file ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            'jwks_url: "http://keys.example.net/jwks.json"',
            "jwks_url: 'http://keys.example.net/jwks.json' must use https",
        ),
        ('jku_allow: ["http://keys.example.net/"]', "jku_allow: 'http://keys.example.net/' must use https"),
        (
            'jwks_url: "https://k.example.net/j.json"\n    fhir_servers: ["http://fhir.example.org/r4"]',
            "fhir_servers: 'http://fhir.example.org/r4' must use https",
        ),
        (
            'jku_allow: ["https://keys.example.net/?tenant=1"]',
            "jku_allow: 'https://keys.example.net/?tenant=1' must not carry a query or fragment",
        ),
        ('jku_allow: ["https://keys.example.net/#x"]', "must not carry a query or fragment"),
        (
            'jwks_url: "https://keys.example.net/jwks.json?x"',
            "jwks_url: 'https://keys.example.net/jwks.json?x' must not carry a query",
        ),
        (
            'jwks_url: "https://k.example.net/j.json"\n    fhir_servers: ["https://fhir.example.org/r4?_format=json"]',
            "fhir_servers: 'https://fhir.example.org/r4?_format=json' must not carry a query or fragment",
        ),
        (
            'jku_allow: ["https://keys.example.net/a/../"]',
            "jku_allow: 'https://keys.example.net/a/../' must not contain dot segments",
        ),
        ('jku_allow: ["https://keys.example.net/a/%2E/"]', "must not contain dot segments"),
        ('jku_allow: ["https://u:p@keys.example.net/"]', "must not carry credentials"),
        (
            'jwks_url: "https://k.example.net/j.json"\n    aud_allow_base: "yes"',
            "aud_allow_base: expected true or false",
        ),
    ],
)
def test_issuers_file_urls_must_be_https_without_query_or_fragment(
    tmp_path: Path, entry: str, message: str
) -> None:
    """Start-up stops with a ConfigError naming the issuer and key."""
    path = tmp_path / "issuers.yaml"
    path.write_text(f'issuers:\n  "https://e.example.org":\n    {entry}\n')
    with pytest.raises(ConfigError) as error:
        load_issuers(path)
    assert "issuers.'https://e.example.org'." in str(error.value) and message in str(error.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8080/fhir",
        "http://127.0.0.1/fhir",
        "http://127.8.9.10:9/x",
        "http://[::1]:8080/fhir",
    ],
)
def test_plain_http_is_allowed_on_loopback_hosts(tmp_path: Path, url: str) -> None:
    """Loopback hosts may use http (local development, sidecars, the test doubles)."""
    path = tmp_path / "issuers.yaml"
    path.write_text(
        f'issuers:\n  "https://e.example.org":\n    jku_allow: ["{url}/"]\n    fhir_servers: ["{url}"]\n'
    )
    issuer = load_issuers(path)["https://e.example.org"]
    assert issuer.fhir_server_allowed(url + "/Patient") and not issuer.aud_allow_base


# -- audience -----------------------------------------------------------------------------------------------------


def base_audiences() -> dict[str, str]:
    """The non-endpoint values some EHRs send: the base URL (with and without slash) and the discovery URL."""
    return {"base": PUBLIC_URL, "base/": PUBLIC_URL + "/", "discovery": PUBLIC_URL + DISCOVERY}


def call(app: Flask, env: ServiceEnv, endpoint: str, aud: Any) -> int:
    """Call ``endpoint`` (discovery, hook or feedback) with a token of EHR_ISS naming ``aud``; the status."""
    token = mint(env.keys["ec"], iss=EHR_ISS, aud=aud)
    headers = {"Authorization": f"Bearer {token}"}
    client = app.test_client()
    if endpoint == "discovery":
        return int(client.get(DISCOVERY, headers=headers).status_code)
    if endpoint == "hook":
        body = hook_request("patient-view", prefetch=prefetch_from(clinical_record()))
        return int(client.post(HOOK, json=body, headers=headers).status_code)
    card = issue_card(app, service_id="ecglab-patient-view", issuer=EHR_ISS)
    item = {"card": card, "outcome": "overridden", "outcomeTimestamp": "2026-03-01T08:00:00Z"}
    return int(client.post(FEEDBACK, json={"feedback": [item]}, headers=headers).status_code)


ENDPOINT_URLS = {
    "discovery": PUBLIC_URL + DISCOVERY,
    "hook": PUBLIC_URL + HOOK,
    "feedback": PUBLIC_URL + FEEDBACK,
}


@pytest.mark.parametrize("endpoint", list(ENDPOINT_URLS))
def test_aud_must_be_the_endpoint_url_called(make_app, service_env: ServiceEnv, endpoint: str) -> None:
    """CDS Hooks 2.0: aud is the endpoint's URL; the base or discovery URL (or another endpoint's) is a 401."""
    app = make_app()
    assert call(app, service_env, endpoint, ENDPOINT_URLS[endpoint]) == 200
    others = {name: url for name, url in ENDPOINT_URLS.items() if name != endpoint}
    wrong = {**base_audiences(), **others, "with trailing slash": ENDPOINT_URLS[endpoint] + "/"}
    if endpoint == "discovery":
        del wrong["discovery"]
    for name, aud in wrong.items():
        assert call(app, service_env, endpoint, aud) == 401, name


@pytest.mark.parametrize("endpoint", list(ENDPOINT_URLS))
def test_aud_allow_base_admits_the_base_and_discovery_urls(
    make_app, service_env: ServiceEnv, endpoint: str
) -> None:
    """An issuer with ``aud_allow_base: true`` may send the base or discovery URL; never another service's."""
    path = service_env.tmp / "base-aud-issuers.yaml"
    path.write_text(
        service_env.issuers_file.read_text().replace(
            "    jwks_file: keys/ehr.jwks.json\n",
            "    jwks_file: keys/ehr.jwks.json\n    aud_allow_base: true\n",
            1,
        )
    )
    app = make_app(issuers=str(path))
    for name, aud in base_audiences().items():
        assert call(app, service_env, endpoint, aud) == 200, name
    assert call(app, service_env, endpoint, ENDPOINT_URLS[endpoint]) == 200
    assert call(app, service_env, endpoint, PUBLIC_URL + "/cds-services/ecglab-order-sign") == 401
    assert call(app, service_env, endpoint, "https://elsewhere.example.org") == 401
