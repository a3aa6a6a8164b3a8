"""SMART Backend Services through the hook pipeline (issue 16): EHRs that send no ``fhirAuthorization``.

An issuer with a ``smart_backend`` client in the issuers file: a hook call from it naming one of its
``fhir_servers`` but carrying no ``fhirAuthorization`` is fetched with the service's own token from
a real OAuth2 token endpoint (``tests/oauth_server.py``), and the token goes only to that server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.oauth_server import TokenServer, public_pem_of
from tests.service_fixtures import (
    EHR_FHIR,
    FHIR_TOKEN,
    AppFactory,
    FakeRuntime,
    MockFhir,
    ServiceEnv,
    assert_precondition_failed,
    clinical_record,
    hook_request,
    prediction,
)

SERVICE = "/cds-services/ecglab-patient-view"
SCOPE = "system/Patient.rs system/Observation.rs system/Media.rs system/DocumentReference.rs"


def _issuers_with_backend(env: ServiceEnv, endpoint: TokenServer, key_file: Path) -> None:
    """Rewrite the test issuers file so that the EHR issuer has a SMART backend client."""
    text = env.issuers_file.read_text()
    anchor = f'    fhir_servers: ["{EHR_FHIR}"]\n'
    assert anchor in text
    backend = (
        "    smart_backend:\n"
        f"      token_url: {endpoint.token_url}\n"
        "      client_id: ecglab\n"
        f"      private_key_file: {key_file}\n"
        "      alg: ES384\n"
        f"      scope: {SCOPE}\n"
    )
    env.issuers_file.write_text(text.replace(anchor, anchor + backend, 1))


def _resources() -> list[dict[str, Any]]:
    return [r for resources in clinical_record().values() for r in resources]


def _runtime() -> FakeRuntime:
    return FakeRuntime([prediction("ntprobnp", 0.91), prediction("potassium", 0.2)])


def test_no_fhir_authorization_uses_the_services_own_token(
    make_app: AppFactory, service_env: ServiceEnv, endpoint: TokenServer, keys: dict[str, Path]
) -> None:
    """A call without fhirAuthorization gets cards; every FHIR request carries the endpoint's token."""
    endpoint.register("ecglab", public_pem_of(keys["ec"]))
    _issuers_with_backend(service_env, endpoint, keys["ec"])
    fhir = MockFhir(_resources())
    client = make_app(runtime=_runtime(), fhir=fhir).test_client()
    for _ in range(2):
        body = hook_request("patient-view", fhir_server=EHR_FHIR)
        assert "fhirAuthorization" not in body
        response = client.post(SERVICE, json=body, headers=service_env.bearer(SERVICE))
        assert response.status_code == 200, response.get_json()
        assert len(response.get_json()["cards"]) == 1
    sent = {r.headers.get("authorization") for r in fhir.requests}
    assert len(sent) == 1 and sent != {None}
    token = next(iter(sent)).removeprefix("Bearer ")
    assert token in endpoint.issued  # the token the OAuth2 endpoint issued, not the EHR's
    assert len(endpoint.issued) == 1  # cached: the second call asked for no new token


def test_the_ehrs_own_token_wins_over_the_backend(
    make_app: AppFactory, service_env: ServiceEnv, endpoint: TokenServer, keys: dict[str, Path]
) -> None:
    """When the EHR sends fhirAuthorization, that token is used and the token endpoint is not asked."""
    endpoint.register("ecglab", public_pem_of(keys["ec"]))
    _issuers_with_backend(service_env, endpoint, keys["ec"])
    fhir = MockFhir(_resources())
    client = make_app(runtime=_runtime(), fhir=fhir).test_client()
    body = hook_request("patient-view", fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    response = client.post(SERVICE, json=body, headers=service_env.bearer(SERVICE))
    assert response.status_code == 200, response.get_json()
    assert {r.headers.get("authorization") for r in fhir.requests} == {f"Bearer {FHIR_TOKEN}"}
    assert not endpoint.issued


def test_a_refused_backend_client_is_412(
    make_app: AppFactory, service_env: ServiceEnv, endpoint: TokenServer, keys: dict[str, Path]
) -> None:
    """The authorization server refuses the client (not registered): 412 naming the OAuth error, no FHIR call."""
    _issuers_with_backend(service_env, endpoint, keys["ec"])  # never registered at the endpoint
    fhir = MockFhir(_resources())
    client = make_app(runtime=_runtime(), fhir=fhir).test_client()
    body = hook_request("patient-view", fhir_server=EHR_FHIR)
    response = client.post(SERVICE, json=body, headers=service_env.bearer(SERVICE))
    assert_precondition_failed(response, naming=["SMART backend token", "invalid_client"])
    assert not fhir.requests


def test_without_a_backend_client_no_fhir_authorization_is_412(
    make_app: AppFactory, service_env: ServiceEnv
) -> None:
    """An issuer with no smart_backend: nothing prefetched and no token stays a 412 (CDS Hooks §4)."""
    fhir = MockFhir(_resources())
    client = make_app(runtime=_runtime(), fhir=fhir).test_client()
    body = hook_request("patient-view", fhir_server=EHR_FHIR)
    response = client.post(SERVICE, json=body, headers=service_env.bearer(SERVICE))
    assert_precondition_failed(response)
    assert not fhir.requests
