"""Shared test doubles and builders for the CDS Hooks service tests (``tests/test_service_*.py``).

* the shared CDS Hooks fixtures folder (``../shared/cdshooks-samples``) and schema validation;
* signing keys (EC P-384, RSA) made with ``cryptography``, JWKS documents and JWT minting;
* :class:`FakeRuntime`, a stand-in for ``ModelRuntime`` returning chosen ``TargetPrediction``s;
* FHIR builders: a Patient, vital signs, a 12-lead ECG Observation (``valueSampledData``), lab
  results and orders, searchset Bundles, a full prefetch for the service's templates;
* :class:`MockFhir`, an ``httpx.MockTransport`` FHIR server that records every request;
* fixture bodies: :func:`new_service_env` (issuers file, keys, settings) and :func:`app_factory`,
  which each test module wraps in two three-line fixtures (importing fixture functions would trip
  ruff's F811 and pytest's assertion rewriting).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask

from cds_service.inference import TargetPrediction

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLES = SHARED / "cdshooks-samples"
PUBLIC_URL = "https://cds.example.org/ecglab"
EHR_ISS = "https://ehr.example.org"
JKU_ISS = "https://jku.example.net"
EHR_FHIR = "https://fhir.example.org/r4"
JKU_URL = "https://jku.example.net/keys/jwks.json"
PATIENT_ID = "pat-4711-secret"
FHIR_TOKEN = "fhir-access-token-do-not-log-8c1e"
AUDIT_KEY = "test-audit-key-of-at-least-32-bytes-0001"
LOINC = "http://loinc.org"


# -- shared fixtures folder and schema -----------------------------------------------------------------


def samples() -> Path:
    """The shared CDS Hooks samples folder; skips the test when it is absent."""
    if not SAMPLES.is_dir():
        pytest.skip(f"shared CDS Hooks fixtures not found at {SAMPLES} (expected next to the repository)")
    return SAMPLES


def load_sample(relative: str) -> Any:
    """A sample JSON file with its ``_source``/``_note`` annotations removed."""
    data = json.loads((samples() / relative).read_text(encoding="utf-8"))
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if not k.startswith("_")}
    return data


def schema_errors(definition: str, payload: Any) -> list[str]:
    """Messages of every violation of ``$defs/<definition>`` in the shared CDS Hooks 2.0 schema."""
    from jsonschema import Draft202012Validator, FormatChecker

    schema = json.loads((samples() / "schema" / "cds-hooks-2.0.schema.json").read_text(encoding="utf-8"))
    wrapper = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{definition}"}
    validator = Draft202012Validator(wrapper, format_checker=FormatChecker())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(payload)]


def assert_schema_valid(definition: str, payload: Any) -> None:
    """Fail with the schema's messages when ``payload`` violates ``$defs/<definition>``."""
    errors = schema_errors(definition, payload)
    assert not errors, "\n".join(errors)


# -- keys and tokens -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """A private key with its kid and JWS algorithm."""

    private: Any
    kid: str
    alg: str

    def public_jwk(self) -> dict[str, Any]:
        """The public JWK (with kid, alg and use) of this key."""
        algorithm = jwt.get_algorithm_by_name(self.alg)
        jwk = json.loads(algorithm.to_jwk(self.private.public_key()))
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk


def make_keys() -> dict[str, SigningKey]:
    """One EC P-384 (ES384) and one RSA-2048 (RS384) key, plus a second EC key for rotation tests."""
    return {
        "ec": SigningKey(ec.generate_private_key(ec.SECP384R1()), "ec-key-1", "ES384"),
        "rsa": SigningKey(
            rsa.generate_private_key(public_exponent=65537, key_size=2048), "rsa+key/1=", "RS384"
        ),
        "ec2": SigningKey(ec.generate_private_key(ec.SECP384R1()), "ec-key-2", "ES384"),
    }


def jwks(*keys: SigningKey) -> dict[str, Any]:
    """A JWKS document with the public halves of ``keys``."""
    return {"keys": [k.public_jwk() for k in keys]}


def mint(
    key: SigningKey,
    *,
    iss: str,
    aud: str | list[str],
    jku: str | None = None,
    lifetime: int = 300,
    header: Mapping[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A signed CDS Hooks client JWT; ``claims`` override or add payload fields."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": iss,
        "aud": aud,
        "iat": now,
        "exp": now + lifetime,
        "jti": str(uuid.uuid4()),
    }
    payload.update(claims)
    headers: dict[str, Any] = {"kid": key.kid, "typ": "JWT"}
    if jku is not None:
        headers["jku"] = jku
    headers.update(header or {})
    return jwt.encode(payload, key.private, algorithm=key.alg, headers=headers)


# -- the model double ------------------------------------------------------------------------------------


@dataclass
class FakeRuntime:
    """Stands in for ``ModelRuntime``: returns ``predictions`` (or raises/sleeps) and records inputs."""

    predictions: list[TargetPrediction] = field(default_factory=list)
    version: str = "9.9.9-test"
    trained_on_synthetic: bool = False
    provider: str = "FakeProvider"
    manifest: Any = None
    raises: BaseException | None = None
    sleep_s: float = 0.0
    seen: list[Any] = field(default_factory=list)

    def predict(self, inputs: Any) -> list[TargetPrediction]:
        """Record the inputs, then sleep/raise/return as configured."""
        self.seen.append(inputs)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.raises is not None:
            raise self.raises
        return list(self.predictions)


def positive_runtime(**kwargs: Any) -> FakeRuntime:
    """A fake model flagging NT-proBNP (0.91) and not potassium (0.2): a call that reaches it gets a
    card unless an order or a recent result suppresses it."""
    return FakeRuntime([prediction("ntprobnp", 0.91), prediction("potassium", 0.2)], **kwargs)


HORIZONS = {"est": 0, "mon30": 30, "mon60": 60, "mon120": 120}


def prediction(
    lab_key: str,
    probability: float,
    *,
    task: str = "est",
    direction: str = "high",
    threshold: float = 0.5,
    auroc: float | None = 0.8,
) -> TargetPrediction:
    """A TargetPrediction for a lab of the mappings (label taken from its ``mimic_label``)."""
    from fhir_mappings import load_mappings

    lab = load_mappings().lab(lab_key)
    assert lab is not None, lab_key
    return TargetPrediction(
        target=f"{lab.mimic_label}_{direction}_{task}",
        lab_key=lab.key,
        label=lab.mimic_label,
        direction=direction,
        task=task,
        horizon_min=HORIZONS[task],
        probability=probability,
        decision_threshold=threshold,
        value_threshold=100.0,
        unit=lab.unit,
        auroc=auroc,
    )


# -- FHIR builders -------------------------------------------------------------------------------------


def iso(moment: datetime) -> str:
    """A FHIR instant in UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def assert_precondition_failed(response: Any, *, naming: Sequence[str] = ()) -> dict[str, Any]:
    """The one definition of the CDS Hooks 412 rule (cdshooks.md §4, §7) the suite checks against.

    Required data that is neither prefetched nor obtainable from the FHIR server is answered 412
    with an ``application/fhir+json`` OperationOutcome whose first issue is an error; its
    diagnostics name each of ``naming`` (missing prefetch keys, the FHIR error). Returns the body.
    """
    assert response.status_code == 412, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/fhir+json"
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    issue = outcome["issue"][0]
    assert issue["severity"] == "error"
    for word in naming:
        assert word in issue.get("diagnostics", ""), (word, issue)
    return dict(outcome)


def patient(pid: str = PATIENT_ID) -> dict[str, Any]:
    """A female Patient born 1956."""
    return {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1956-03-14"}


def ecg_observation(
    pid: str = PATIENT_ID,
    *,
    recorded_at: datetime,
    rid: str = "ecg-1",
    seconds: float = 10.0,
    leads: int = 12,
) -> dict[str, Any]:
    """A 12-lead ECG Observation with one ``valueSampledData`` component per lead (100 Hz, µV)."""
    from fhir_mappings import load_mappings

    ecg = load_mappings().ecg
    rng = np.random.default_rng(7)
    n = int(seconds * 100)
    t = np.arange(n) / 100.0
    components = []
    for index, lead in enumerate(ecg.lead_order[:leads]):
        wave = 800 * np.sin(2 * np.pi * 1.2 * t + index) + rng.normal(0, 20, n)
        coding = ecg.mdc_lead_codes[lead]
        components.append(
            {
                "code": {
                    "coding": [{"system": coding.system, "code": coding.code, "display": coding.display}]
                },
                "valueSampledData": {
                    "origin": {"value": 0, "unit": "uV", "system": "http://unitsofmeasure.org", "code": "uV"},
                    "period": 10,
                    "factor": 1,
                    "dimensions": 1,
                    "data": " ".join(str(int(v)) for v in wave),
                },
            }
        )
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "11524-6", "display": "EKG study"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": iso(recorded_at),
        "component": components,
    }


def vital(
    code: str, value: float, unit: str, at: datetime, rid: str, pid: str = PATIENT_ID
) -> dict[str, Any]:
    """A vital-sign Observation with a UCUM valueQuantity."""
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": iso(at),
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }


def lab_result(
    lab_key: str, at: datetime, rid: str, pid: str = PATIENT_ID, status: str = "final"
) -> dict[str, Any]:
    """A lab result Observation coded with the lab's first result code."""
    from fhir_mappings import load_mappings

    coding = load_mappings().lab(lab_key).result_codes[0]
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": status,
        "code": {"coding": [{"system": coding.system, "code": coding.code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": iso(at),
        "valueQuantity": {"value": 1.0},
    }


def lab_order(lab_key: str, rid: str, *, status: str = "active", pid: str = PATIENT_ID) -> dict[str, Any]:
    """A ServiceRequest for the lab's order code."""
    from fhir_mappings import load_mappings

    coding = load_mappings().lab(lab_key).order_code
    return {
        "resourceType": "ServiceRequest",
        "id": rid,
        "status": status,
        "intent": "order",
        "code": {"coding": [{"system": coding.system, "code": coding.code}]},
        "subject": {"reference": f"Patient/{pid}"},
    }


def bundle(*resources: Mapping[str, Any]) -> dict[str, Any]:
    """A searchset Bundle of ``resources``."""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"resource": dict(r), "search": {"mode": "match"}} for r in resources],
    }


def clinical_record(now: datetime | None = None, pid: str = PATIENT_ID) -> dict[str, list[dict[str, Any]]]:
    """One patient's resources by prefetch key: ECG 10 min ago, vitals at the ECG, nothing else."""
    moment = now or datetime.now(UTC)
    taken = moment - timedelta(minutes=10)
    return {
        "patient": [patient(pid)],
        "vitals": [
            vital("8867-4", 88, "/min", taken, "hr-1", pid),
            vital("29463-7", 71.5, "kg", taken - timedelta(days=2), "wt-1", pid),
        ],
        "ecgObservations": [ecg_observation(pid, recorded_at=taken)],
        "ecgMedia": [],
        "ecgDocuments": [],
        "labs": [],
        "orders": [],
    }


def prefetch_from(record: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The prefetch object an EHR would send for ``record`` (Patient as a resource, searches as Bundles)."""
    out: dict[str, Any] = {}
    for key, resources in record.items():
        out[key] = resources[0] if key == "patient" else bundle(*resources)
    return out


def hook_request(
    hook: str,
    *,
    prefetch: Mapping[str, Any] | None = None,
    fhir_server: str | None = None,
    token: str | None = None,
    pid: str = PATIENT_ID,
    draft_orders: list[dict[str, Any]] | None = None,
    user_id: str = "Practitioner/prac-001",
    encounter_id: str | None = "enc-001",
) -> dict[str, Any]:
    """A CDS Hooks request for ``hook``; order hooks get a ``draftOrders`` Bundle (and ``selections``)."""
    context: dict[str, Any] = {"userId": user_id, "patientId": pid}
    if encounter_id:
        context["encounterId"] = encounter_id
    if hook in ("order-select", "order-sign"):
        drafts = draft_orders or []
        context["draftOrders"] = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": d} for d in drafts],
        }
        if hook == "order-select":
            context["selections"] = [f"ServiceRequest/{d['id']}" for d in drafts] or ["ServiceRequest/none"]
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
    if fhir_server is not None:
        body["fhirServer"] = fhir_server
    if token is not None:
        body["fhirAuthorization"] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/Patient.read user/Observation.read",
            "subject": "ecglab",
        }
    if prefetch is not None:
        body["prefetch"] = dict(prefetch)
    return body


# -- a FHIR server double ---------------------------------------------------------------------------------


class MockFhir:
    """An in-memory FHIR server behind ``httpx.MockTransport``; records every request it gets.

    Searches answer with every stored resource of the type for the ``subject`` patient whose code
    matches the ``code``/``type`` token list when one is given (dates are not filtered).
    """

    def __init__(self, resources: list[dict[str, Any]], *, delay_s: float = 0.0, status: int = 200) -> None:
        self.resources = resources
        self.delay_s = delay_s
        self.status = status
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        """Answer one request from the stored resources."""
        self.requests.append(request)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.status != 200:
            return httpx.Response(self.status, json={"resourceType": "OperationOutcome", "issue": []})
        path = urlsplit(str(request.url)).path.rstrip("/").split("/")
        params = dict(parse_qsl(urlsplit(str(request.url)).query))
        if len(path) >= 2 and path[-2] == "Patient":
            for r in self.resources:
                if r["resourceType"] == "Patient" and r["id"] == path[-1]:
                    return httpx.Response(200, json=r, headers={"content-type": "application/fhir+json"})
            return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})
        kind = path[-1]
        wanted = params.get("code") or params.get("type")
        codes = {c.split("|")[-1] for c in wanted.split(",")} if wanted else None
        subject = params.get("subject", "")
        matches = []
        for r in self.resources:
            if r["resourceType"] != kind:
                continue
            if subject and r.get("subject", {}).get("reference") != subject:
                continue
            if codes is not None:
                concept = r.get("code") or (r.get("type") or {})
                found = {c.get("code") for c in concept.get("coding", [])}
                if not found & codes:
                    continue
            matches.append(r)
        return httpx.Response(200, json=bundle(*matches), headers={"content-type": "application/fhir+json"})

    def paths(self) -> list[str]:
        """``Type`` or ``Type/id`` of every request, in order."""
        return [urlsplit(str(r.url)).path.split("/r4/", 1)[-1] for r in self.requests]


# -- fixture bodies -------------------------------------------------------------------------------------


@dataclass
class ServiceEnv:
    """Everything a test needs to build apps and sign requests."""

    tmp: Path
    keys: dict[str, SigningKey]
    issuers_file: Path
    jku_jwks: dict[str, Any]
    jku_fetches: list[str] = field(default_factory=list)

    def jwks_transport(self) -> httpx.MockTransport:
        """Serves ``jku_jwks`` at :data:`JKU_URL` and counts the downloads."""

        def handle(request: httpx.Request) -> httpx.Response:
            """Serve the JWKS at JKU_URL, 404 elsewhere."""
            self.jku_fetches.append(str(request.url))
            if str(request.url) == JKU_URL:
                return httpx.Response(200, json=self.jku_jwks)
            return httpx.Response(404)

        return httpx.MockTransport(handle)

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """Settings for a test app (auth on, this env's issuers, SQLite in tmp), with overrides.

        The prediction cache is off (every call runs the model, as the tests count); the cache's
        own tests (``hooks/test_prediction_cache.py``) turn it on. ECGs are decoded in-process
        (hundreds of apps need no worker processes each); ``hooks/test_hook_decoder.py`` runs the
        service's decoder processes.
        """
        values: dict[str, Any] = {
            "public_url": PUBLIC_URL,
            "auth": True,
            "issuers": str(self.issuers_file),
            "database_url": f"sqlite:///{self.tmp / 'service.sqlite3'}",
            "jwks_refetch_s": 0,
            "metrics": True,
            "audit_key": AUDIT_KEY,
            "prediction_cache_s": 0,
            "ecg_decode_processes": 0,
        }
        values.update(overrides)
        return values

    def bearer(self, path: str, *, key: str = "ec", iss: str = EHR_ISS, **kwargs: Any) -> dict[str, str]:
        """``Authorization`` header with a fresh token for a request to ``path``."""
        token = mint(self.keys[key], iss=iss, aud=PUBLIC_URL + path, **kwargs)
        return {"Authorization": f"Bearer {token}"}


_KEYS: dict[str, SigningKey] = {}


def session_keys() -> dict[str, SigningKey]:
    """Keys generated once per test process (RSA generation is the slow part)."""
    if not _KEYS:
        _KEYS.update(make_keys())
    return _KEYS


def new_service_env(tmp_path: Path) -> ServiceEnv:
    """Issuers file with a static-JWKS issuer (EC + RSA) and a jku-only issuer, plus the keys."""
    keys = session_keys()
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    (key_dir / "ehr.jwks.json").write_text(json.dumps(jwks(keys["ec"], keys["rsa"])))
    issuers = tmp_path / "issuers.yaml"
    issuers.write_text(
        "issuers:\n"
        f'  "{EHR_ISS}":\n'
        "    jwks_file: keys/ehr.jwks.json\n"
        f'    fhir_servers: ["{EHR_FHIR}"]\n'
        f'  "{JKU_ISS}":\n'
        '    jku_allow: ["https://jku.example.net/keys/"]\n'
        f'    fhir_servers: ["{EHR_FHIR}/"]\n'
    )
    return ServiceEnv(tmp_path, keys, issuers, jwks(keys["rsa"], keys["ec"]))


AppFactory = Callable[..., Flask]


def app_factory(service_env: ServiceEnv) -> Iterator[AppFactory]:
    """Yields ``make_app(runtime=..., fhir=MockFhir, **settings)`` → a Flask app wired to test doubles.

    Test modules wrap it in a fixture (``yield from app_factory(service_env)``); afterwards each
    app is closed through its own close hook (thread pools and database engine).
    """
    from cds_service.app import create_app

    built: list[Flask] = []

    def factory(*, runtime: Any = None, fhir: MockFhir | None = None, **overrides: Any) -> Flask:
        """Build one app with the given runtime, FHIR double and setting overrides."""
        app = create_app(service_env.settings(**overrides), runtime=runtime or FakeRuntime())
        state = app.extensions["ecglab"]
        state.jwks.transport = service_env.jwks_transport()
        state.pipeline.deps.fhir_transport = (fhir or MockFhir([])).transport
        built.append(app)
        return app

    yield factory
    for app in built:
        app.extensions["ecglab"].close()


# Fixtures: this module is a pytest plugin (tests/conftest.py), so every service test shares them.
@pytest.fixture
def service_env(tmp_path: Path) -> ServiceEnv:
    """Issuers file and keys in this test's temp folder."""
    return new_service_env(tmp_path)


@pytest.fixture
def make_app(service_env: ServiceEnv) -> Iterator[AppFactory]:
    """Factory of apps wired to test doubles."""
    yield from app_factory(service_env)
