"""Governance wired into the service: shadow mode, audit trail, local monitoring, model card, kill switch.

The proof of issue 17 (:func:`test_shadow_mode_then_monitor_on_the_real_fhir_server`), on the
sekmet FHIR test server of ``tests/fhir_servers.py`` and the bundled ONNX model:

1. ``seed-fhir``'s code writes 8 demo patients, their ECGs about 3 h ago; their own lab results
   are left out, so every lab value inside a window is one this test wrote;
2. the service (auth off, sekmet allowed, its clock at the seeding time) runs in shadow mode: each
   patient-view call fetches the patient from sekmet, answers ``{"cards": []}`` and leaves one
   audit row that names the patient only by its keyed hash; the audited probabilities are checked
   against the runtime scoring the same patient;
3. the test writes potassium results at times inside and outside each target's window, abnormal
   and normal (:data:`SCENARIOS`; the outcome of every scenario and target worked out by hand in
   :data:`EXPECTED`);
4. ``ecglab monitor`` runs in process against sekmet and the service's database;
5. counts, alert rates, PPV, sensitivity, AUROC, ECE, the macro AUROC and the subgroup sizes are
   recomputed here with scikit-learn and numpy and compared with ``report.json``; the service
   then exports the report's gauges on ``/metrics`` and shows the local figures on its model card.

The other tests use the model double and a prefetch (fast, deterministic): the model card
endpoints and the link on every card, the kill switch re-read without a restart, global off,
shadow mode audited, which calls are audited, the audit key rule, retention and the gauges.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sqlalchemy import func, select

from cds_service.audit import AuditRecord, iter_audit, patient_key, write_audit
from cds_service.cli import main
from cds_service.db import IssuedCard, make_engine
from cds_service.monitor.report import REPORT_FORMAT
from fhir_mappings.errors import ConfigError
from fhir_mappings.manifest import load_manifest
from tests.fhir_servers import FhirServer
from tests.service_fixtures import (
    AUDIT_KEY,
    EHR_FHIR,
    PATIENT_ID,
    PUBLIC_URL,
    FakeRuntime,
    ServiceEnv,
    assert_schema_valid,
    clinical_record,
    hook_request,
    iso,
    prediction,
    prefetch_from,
)

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
MANIFEST = load_manifest(MODELS / "ecglab-0.2.0-demo.manifest.json", verify_file=False)
SCHEMA = json.loads((ROOT / "cds_service" / "schemas" / "model-card.schema.json").read_text())
EXAMPLE_SITE = MODELS / "site-info.example.yaml"
DEV = {"auth": False, "issuers": "", "dev_fhir_servers": EHR_FHIR}
SERVICE = "/cds-services/ecglab-patient-view"
HEX64 = re.compile(r"[0-9a-f]{64}")

# -- the end-to-end scenario ------------------------------------------------------------------------------

PATIENTS = 8
K_LOINC = "2823-3"
# Potassium results per patient: (minutes after the ECG, value, unit); low < 3.3, high > 5.1 (manifest).
SCENARIOS: list[list[tuple[int, float, str]]] = [
    [(10, 5.8, "mEq/L")],
    [(-20, 4.0, "mmol/L")],
    [(45, 2.9, "mmol/L")],
    [(-75, 6.0, "mmol/L"), (100, 4.2, "mmol/L")],
    [(25, 5.5, "mmol/L"), (50, 3.0, "mmol/L")],
    [(130, 5.6, "mmol/L")],
    [(5, 4.4, "mmol/L"), (90, 2.8, "mmol/L")],
    [(-30, 3.0, "mmol/L"), (30, 5.5, "mmol/L")],
]
TASKS = ("est", "mon30", "mon60", "mon120")
# Expected outcome per scenario: direction -> (est, mon30, mon60, mon120); None = no outcome.
# est: the result closest to the ECG within ±60 min (ties: the earlier); monN: any result in
# [ECG, ECG + N] in the direction, none when the window holds both a low and a high value.
EXPECTED: list[dict[str, tuple[int | None, ...]]] = [
    {"high": (1, 1, 1, 1), "low": (0, 0, 0, 0)},  # +10 high (mEq/L is the manifest's spelling)
    {"high": (0, None, None, None), "low": (0, None, None, None)},  # only a value before the ECG
    {"high": (0, None, 0, 0), "low": (1, None, 1, 1)},  # +45 low: outside 30 min
    {"high": (None, None, None, 0), "low": (None, None, None, 0)},  # -75 outside est; +100 normal
    {"high": (1, 1, None, None), "low": (0, 0, None, None)},  # +25 high, +50 low: 60/120 mixed
    {"high": (None,) * 4, "low": (None,) * 4},  # +130: outside every window
    {"high": (0, 0, 0, 0), "low": (0, 0, 0, 1)},  # +5 normal; +90 low only within 120 min
    {"high": (0, 1, 1, 1), "low": (1, 0, 0, 0)},  # -30 and +30 tie for est: the earlier (low) wins
]


def potassium_targets() -> dict[str, tuple[str, int]]:
    """Target -> (direction, index of its task in TASKS) for the manifest's potassium targets."""
    return {
        label.target: (label.direction, TASKS.index(label.task))
        for label in MANIFEST.labels
        if label.lab_key == "potassium"
    }


def age_band(age: float) -> str:
    """The monitor's age bands, written out."""
    if age < 18:
        return "<18"
    if age < 40:
        return "18-39"
    if age < 60:
        return "40-59"
    if age < 80:
        return "60-79"
    return "80+"


def ece(y: np.ndarray, p: np.ndarray) -> float:
    """Expected calibration error over 10 equal-width bins (the last one includes 1.0)."""
    bins = np.minimum((p * 10).astype(int), 9)
    total = 0.0
    for b in set(bins.tolist()):
        members = bins == b
        total += members.mean() * abs(p[members].mean() - y[members].mean())
    return total


def lab_observation(oid: str, pid: str, at: datetime, value: float, unit: str) -> dict[str, Any]:
    """A final serum potassium result."""
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": K_LOINC}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": iso(at),
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }


def seed_patients(base_url: str, tmp: Path, seed_now: datetime) -> list[Any]:
    """8 demo patients (ids unique to this test, own lab results dropped), ECGs before ``seed_now``."""
    from fhir_mappings import load_mappings
    from model_training.seed_fhir import read_subjects, seed
    from model_training.synthetic import generate

    mappings = load_mappings()
    generate(tmp / "synth", 30, 3, workers=1)
    subjects = [
        dataclasses.replace(s, subject_id=f"gov-{s.subject_id}", labs=[])
        for s in read_subjects(tmp / "synth", PATIENTS, 0, mappings)
    ]
    rows = seed(base_url, subjects, mappings, now=seed_now)
    assert [row["patient"] for row in rows] == [f"ecglab-{s.subject_id}" for s in subjects]
    return subjects


def write_lab_results(base_url: str, ids: list[str], ecg_times: list[datetime]) -> None:
    """The potassium results of :data:`SCENARIOS`, one transaction."""
    from model_training.seed_fhir import post_transaction

    entries = []
    for i, (pid, ecg_time) in enumerate(zip(ids, ecg_times, strict=True)):
        for j, (minutes, value, unit) in enumerate(SCENARIOS[i]):
            resource = lab_observation(f"{pid}-k{j}", pid, ecg_time + timedelta(minutes=minutes), value, unit)
            url = f"Observation/{resource['id']}"
            entries.append({"fullUrl": url, "resource": resource, "request": {"method": "PUT", "url": url}})
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    with httpx.Client(headers=headers, timeout=60.0) as client:
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        post_transaction(client, base_url, bundle, "potassium results")


def independent_predictions(base_url: str, pid: str, now: datetime, runtime: Any) -> dict[str, float]:
    """The runtime's probabilities for ``pid``, read from the server outside the service."""
    from cds_service.fetch import gather_patient_data, model_inputs
    from cds_service.fhir_client import FhirClient
    from cds_service.prefetch import build_queries
    from fhir_mappings import load_mappings

    mappings = load_mappings()
    with FhirClient(base_url, timeout=30.0) as client:
        data = gather_patient_data(build_queries(mappings), pid, now=now, client=client)
        inputs = model_inputs(data, mappings=mappings, now=now, client=client)
    return {p.target: p.probability for p in runtime.predict(inputs)}


@pytest.mark.fhir
@pytest.mark.parametrize("fhir_server", ["sekmet"], indirect=True)
def test_shadow_mode_then_monitor_on_the_real_fhir_server(
    fhir_server: FhirServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cds_service.app import create_app
    from cds_service.inference import ModelRuntime

    base = fhir_server.base_url
    seed_now = (datetime.now(UTC) - timedelta(hours=3)).replace(second=0, microsecond=0)
    subjects = seed_patients(base, tmp_path, seed_now)
    ids = [f"ecglab-{s.subject_id}" for s in subjects]
    ecg_times = [seed_now - timedelta(minutes=5 + 7 * i) for i in range(PATIENTS)]
    database = f"sqlite:///{tmp_path / 'service.sqlite3'}"
    monitor_dir = tmp_path / "monitor"
    runtime = ModelRuntime.load(MODELS, ["CPUExecutionProvider"])
    app = create_app(
        {
            **DEV,
            "dev_fhir_servers": base,
            "public_url": PUBLIC_URL,
            "database_url": database,
            "mode": "shadow",
            "audit_key": AUDIT_KEY,
            "monitor_dir": str(monitor_dir),
            "budget_ms": 60_000,
            "fhir_timeout_ms": 30_000,
        },
        runtime=runtime,
    )
    state = app.extensions["ecglab"]
    state.pipeline.deps.clock = lambda: seed_now
    try:
        client = app.test_client()
        for pid in ids:
            response = client.post(
                SERVICE, json=hook_request("patient-view", fhir_server=base, token="t", pid=pid)
            )
            assert response.status_code == 200 and response.get_json() == {"cards": []}
        assert state.audit.flush()

        # -- the audit trail ----------------------------------------------------------------------------
        engine = make_engine(database)
        rows = list(iter_audit(engine, seed_now - timedelta(hours=1)))
        assert [r.patient_key for r in rows] == [patient_key(AUDIT_KEY.encode(), pid) for pid in ids]
        assert {(r.mode, r.outcome, r.model_sha256) for r in rows} == {
            ("shadow", "shadow", MANIFEST.onnx.sha256)
        }
        assert [r.ecg_time for r in rows] == ecg_times
        assert (
            all(HEX64.fullmatch(r.inputs_sha256) for r in rows) and len({r.inputs_sha256 for r in rows}) == 8
        )
        assert all(len(r.predictions) == len(MANIFEST.labels) for r in rows)
        for pid, row in zip(ids, rows, strict=True):
            # the ECG's own reference is audited as it is; the seeded ECG ids embed the patient id
            stored = {k: v for k, v in dataclasses.asdict(row).items() if k != "ecg_reference"}
            assert pid not in json.dumps(stored, default=str) and row.ecg_reference
            expected = independent_predictions(base, pid, seed_now, runtime)
            got = {t: s.probability for t, s in row.predictions.items()}
            assert got.keys() == expected.keys()
            np.testing.assert_allclose([got[t] for t in expected], list(expected.values()), atol=1e-6)
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(IssuedCard)).scalar_one() == 0
        export = tmp_path / "audit.csv"
        since = iso(seed_now - timedelta(hours=1))
        assert (
            main(["audit", "export", "--since", since, "--out", str(export), "--database-url", database]) == 0
        )
        exported = list(csv.DictReader(export.open()))
        assert [row["patient_key"] for row in exported] == [r.patient_key for r in rows]
        assert not any(pid in json.dumps({**r, "ecg_reference": ""}) for r in exported for pid in ids)

        # -- lab results arrive, the monitor runs -------------------------------------------------------
        write_lab_results(base, ids, ecg_times)
        monkeypatch.setenv("ECGLAB_AUDIT_KEY", AUDIT_KEY)
        out = monitor_dir / "run-1"
        argv = [
            "monitor",
            "--fhir-url",
            base,
            "--since",
            since,
            "--out",
            str(out),
            "--database-url",
            database,
        ]
        argv += ["--model", str(MODELS), "--min-class", "2", "--bootstrap", "50", "--no-progress"]
        assert main(argv) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["counts"]["audited_calls"] == PATIENTS == report["counts"]["shadow_calls"]
        assert report["counts"]["live_calls"] == 0

        # -- the realised figures, recomputed -----------------------------------------------------------
        macro = []
        for target, (direction, task) in potassium_targets().items():
            threshold = next(lab.decision_threshold for lab in MANIFEST.labels if lab.target == target)
            p_all = np.array([r.predictions[target].probability for r in rows])
            outcomes = [EXPECTED[i][direction][task] for i in range(PATIENTS)]
            known = [i for i, o in enumerate(outcomes) if o is not None]
            y = np.array([outcomes[i] for i in known])
            p = p_all[known]
            entry = report["targets"][target]
            assert (entry["n_predictions"], entry["threshold"]) == (PATIENTS, threshold), target
            assert entry["alert_rate"] == pytest.approx(float(np.mean(p_all >= threshold))), target
            assert (entry["n_outcomes"], entry["n_pos"]) == (len(known), int(y.sum())), target
            tp, fp = int(((p >= threshold) & (y == 1)).sum()), int(((p >= threshold) & (y == 0)).sum())
            fn = int(((p < threshold) & (y == 1)).sum())
            assert (entry["tp"], entry["fp"], entry["fn"]) == (tp, fp, fn), target
            assert entry["ppv"] == (pytest.approx(tp / (tp + fp)) if tp + fp else None), target
            assert entry["sensitivity"] == (pytest.approx(tp / (tp + fn)) if tp + fn else None), target
            assert entry["ece"] == pytest.approx(ece(y, p)), target
            both = 0 < y.sum() < len(y)
            assert entry["auroc"] == (pytest.approx(roc_auc_score(y, p)) if both else None), target
            if y.sum() >= 2 and len(y) - y.sum() >= 2:
                macro.append(roc_auc_score(y, p))
        assert len(macro) == 5  # high/low est, high mon60, high/low mon120 have >= 2 of each class
        assert report["summary"]["n_targets_evaluable"] == 5
        assert report["summary"]["macro_auroc"] == pytest.approx(np.mean(macro))
        by_sex = report["summary"]["by_subgroup"]["sex"]
        sexes = [{"M": "male", "F": "female"}[s.gender] for s in subjects if s.gender in ("M", "F")]
        assert {k: v["n"] for k, v in by_sex.items()} == {s: sexes.count(s) for s in set(sexes)}
        bands = [age_band(s.anchor_age) for s in subjects]
        by_age = report["summary"]["by_subgroup"]["age_band"]
        assert {k: v["n"] for k, v in by_age.items()} == {b: bands.count(b) for b in set(bands)}

        # -- the service publishes the report: gauges and model card ------------------------------------
        metrics = client.get("/metrics").get_data(as_text=True)
        auroc = report["targets"]["Potassium_high_est"]["auroc"]
        line = re.search(r'^ecglab_local_auroc\{target="Potassium_high_est"\} (\S+)$', metrics, re.M)
        assert line is not None and float(line.group(1)) == pytest.approx(auroc)
        card = client.get("/cds-services/model-card").get_json()
        jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker()).validate(card)
        assert card["performance"]["local"]["summary"]["macro_auroc"] == pytest.approx(np.mean(macro))
        page = client.get("/model-card").get_data(as_text=True)
        for text in (json.dumps(card), page):
            assert not any(pid in text or r.patient_key in text for pid, r in zip(ids, rows, strict=True))
    finally:
        state.close()
        runtime.close()


# -- model card, links, kill switch, shadow mode, audit rules (model double, prefetch) ----------------


def two_lab_runtime(**kwargs: Any) -> FakeRuntime:
    """A model double flagging NT-proBNP (0.91) and potassium (0.95), with the bundled manifest."""
    predictions = [prediction("ntprobnp", 0.91), prediction("potassium", 0.95), prediction("creatinine", 0.1)]
    return FakeRuntime(predictions, version=MANIFEST.version, manifest=MANIFEST, **kwargs)


def call(client: Any, **headers: str) -> Any:
    """A patient-view call with a full prefetch for :data:`PATIENT_ID`."""
    body = hook_request("patient-view", prefetch=prefetch_from(clinical_record()))
    return client.post(SERVICE, json=body, headers=headers)


def card_labs(response: Any) -> set[str]:
    """The lab keys of the cards of a hook answer."""
    assert response.status_code == 200, response.get_data(as_text=True)
    return {c["extension"]["org.ecglab.prediction"]["labKey"] for c in response.get_json()["cards"]}


def audit_rows(app: Any) -> list[AuditRecord]:
    """Every audit row of ``app`` (after the audit thread has written what was queued)."""
    state = app.extensions["ecglab"]
    assert state.audit.flush()
    return list(iter_audit(state.engine, datetime(2000, 1, 1, tzinfo=UTC)))


def write_controls(path: Path, text: str, bump: int) -> None:
    """Write the controls file with a distinct mtime, then wait out the 1 s re-check interval."""
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + bump * 1_000_000_000))
    time.sleep(1.05)


def test_model_card_endpoints_and_every_card_links_to_it(make_app, service_env: ServiceEnv) -> None:
    """No JWT, schema-valid JSON and HTML without CORS or patient data; cards link it and name the SHA-256."""
    client = make_app(runtime=two_lab_runtime(), site_info=str(EXAMPLE_SITE), cors_origins="*").test_client()
    response = client.get("/cds-services/model-card", headers={"Origin": "https://ehr.example.org"})
    assert response.status_code == 200 and "Access-Control-Allow-Origin" not in response.headers
    card = response.get_json()
    jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker()).validate(card)
    assert card["url"] == f"{PUBLIC_URL}/model-card" and card["model"]["sha256"] == MANIFEST.onnx.sha256
    assert card["performance"]["local"] is None and card["not_for_clinical_use"] is True
    page = client.get("/model-card", headers={"Origin": "https://ehr.example.org"})
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "Access-Control-Allow-Origin" not in page.headers
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
    html = page.get_data(as_text=True)
    assert MANIFEST.onnx.sha256 in html and f"{PUBLIC_URL}/cds-services/model-card" in html
    assert "<script" not in html.lower()

    discovery = client.get("/cds-services", headers=service_env.bearer("/cds-services")).get_json()
    assert {s["extension"]["org.ecglab.service"]["modelCard"] for s in discovery["services"]} == {
        f"{PUBLIC_URL}/model-card"
    }
    response = call(client, **service_env.bearer(SERVICE))
    assert card_labs(response) == {"ntprobnp", "potassium"}
    assert_schema_valid("serviceResponse", response.get_json())
    for issued in response.get_json()["cards"]:
        assert {"label", "url", "type"} <= issued["links"][0].keys()
        assert (issued["links"][0]["url"], issued["links"][0]["type"]) == (
            f"{PUBLIC_URL}/model-card",
            "absolute",
        )
        assert issued["extension"]["org.ecglab.prediction"]["modelSha256"] == MANIFEST.onnx.sha256
        assert issued["extension"]["org.ecglab.prediction"]["modelVersion"] == MANIFEST.version
    for text in (json.dumps(card), html):
        assert PATIENT_ID not in text

    double = make_app(runtime=FakeRuntime()).test_client()
    missing = double.get("/model-card")
    assert missing.status_code == 404 and missing.get_json()["resourceType"] == "OperationOutcome"


def test_kill_switch_is_re_read_without_restart(make_app, tmp_path: Path) -> None:
    """Disable a lab, then a target, then everything; a broken file fails closed; fixing it restores."""
    controls = tmp_path / "controls.yaml"
    controls.write_text("mode: live\n")
    runtime = two_lab_runtime()
    app = make_app(runtime=runtime, controls=str(controls), **DEV)
    client = app.test_client()
    assert card_labs(call(client)) == {"ntprobnp", "potassium"}

    write_controls(controls, "disabled_labs: [potassium]\n", 1)
    assert card_labs(call(client)) == {"ntprobnp"}
    write_controls(controls, "disabled_targets: [NTproBNP_high_est]\n", 2)
    assert card_labs(call(client)) == {"potassium"}
    rows = audit_rows(app)
    assert [{c.lab for c in r.cards} for r in rows] == [
        {"ntprobnp", "potassium"},
        {"ntprobnp"},
        {"potassium"},
    ]
    assert all("Potassium_high_est" in r.predictions for r in rows)  # disabled, still audited

    write_controls(controls, "mode: off\n", 3)
    calls_before = len(runtime.seen)
    assert card_labs(call(client)) == set() and len(runtime.seen) == calls_before
    assert audit_rows(app)[-1].outcome == "off"

    write_controls(controls, "mode: dark\n", 4)
    assert card_labs(call(client)) == set()
    health = client.get("/healthz").get_json()
    assert health["mode"] == "off" and "mode: expected one of" in health["controlsError"]
    write_controls(controls, "mode: live\n", 5)
    assert card_labs(call(client)) == {"ntprobnp", "potassium"}
    assert client.get("/healthz").get_json()["mode"] == "live"


def test_unknown_lab_in_the_controls_file_stops_startup(make_app, tmp_path: Path) -> None:
    controls = tmp_path / "controls.yaml"
    controls.write_text("disabled_labs: [sodiumm]\n")
    with pytest.raises(ConfigError, match=r"disabled_labs: unknown \['sodiumm'\]"):
        make_app(runtime=two_lab_runtime(), controls=str(controls), **DEV)


def test_shadow_mode_audits_the_cards_it_withholds(make_app, tmp_path: Path) -> None:
    """ECGLAB_MODE=shadow: no cards reach the EHR (a controls file saying live cannot lift it)."""
    controls = tmp_path / "controls.yaml"
    controls.write_text("mode: live\n")
    app = make_app(runtime=two_lab_runtime(), mode="shadow", controls=str(controls), **DEV)
    client = app.test_client()
    response = call(client)
    assert response.get_json() == {"cards": []}
    assert client.get("/healthz").get_json()["mode"] == "shadow"
    [row] = audit_rows(app)
    assert (row.mode, row.outcome, row.issuer) == ("shadow", "shadow", None)
    assert {(c.lab, c.horizon_min) for c in row.cards} == {("ntprobnp", 0), ("potassium", 0)}
    assert row.patient_key == patient_key(AUDIT_KEY.encode(), PATIENT_ID)
    assert row.predictions["Potassium_high_est"].probability == 0.95
    assert row.predictions["Potassium_high_est"].threshold == 0.5
    assert row.ecg_reference and row.ecg_time is not None and HEX64.fullmatch(row.inputs_sha256)
    assert row.model_sha256 == MANIFEST.onnx.sha256 and row.latency_ms > 0
    assert "race" in row.missing_inputs and "heart_rate" not in row.missing_inputs
    assert {"ecg_rms_mv", "ecg_p2p_mv", "heart_rate"} <= row.features.keys()
    assert PATIENT_ID not in json.dumps(dataclasses.asdict(row), default=str)
    with app.extensions["ecglab"].engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(IssuedCard)).scalar_one() == 0


def test_every_parsed_call_is_audited_and_a_refused_one_is_not(make_app) -> None:
    """412, no ECG and live calls leave a row each; a 400 (no usable patient) and audit off leave none."""
    app = make_app(runtime=two_lab_runtime(), **DEV)
    client = app.test_client()
    assert client.post(SERVICE, json=hook_request("patient-view")).status_code == 412
    record = clinical_record()
    record["ecgObservations"] = []
    no_ecg = hook_request("patient-view", prefetch=prefetch_from(record))
    assert client.post(SERVICE, json=no_ecg).get_json() == {"cards": []}
    assert card_labs(call(client)) == {"ntprobnp", "potassium"}
    assert client.post(SERVICE, json={"hook": "patient-view"}).status_code == 400
    rows = audit_rows(app)
    assert [(r.outcome, r.mode, len(r.predictions)) for r in rows] == [
        ("precondition_failed", "live", 0),
        ("no_ecg", "live", 0),
        ("cards", "live", 3),
    ]
    assert rows[0].ecg_time is None and rows[0].inputs_sha256 == ""

    quiet = make_app(runtime=two_lab_runtime(), audit=False, **DEV)
    assert card_labs(call(quiet.test_client())) == {"ntprobnp", "potassium"}
    assert quiet.extensions["ecglab"].audit.enabled is False


def test_audit_key_is_required_with_auth_on(
    make_app, service_env: ServiceEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """Auth on: no key stops startup, a short one too; audit off needs none; auth off: random key + warning."""
    with pytest.raises(ConfigError, match="ECGLAB_AUDIT_KEY: required while ECGLAB_AUTH"):
        make_app(audit_key="")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        make_app(audit_key="short")
    assert make_app(audit_key="", audit=False).extensions["ecglab"].audit.enabled is False
    caplog.set_level(logging.WARNING, logger="cds_service.hook_audit")
    app = make_app(audit_key="", **DEV)
    assert "random key" in caplog.text
    call(app.test_client())
    [row] = audit_rows(app)
    assert row.patient_key != patient_key(AUDIT_KEY.encode(), PATIENT_ID)
    assert AUDIT_KEY not in repr(make_app().extensions["ecglab"].settings)


def test_retention_purges_old_rows_at_startup(make_app, service_env: ServiceEnv) -> None:
    from cds_service.db import init_db

    engine = make_engine(service_env.settings()["database_url"])
    init_db(engine)
    now = datetime.now(UTC)
    for age in (40, 10):
        write_audit(
            engine,
            AuditRecord(
                time=now - timedelta(days=age),
                service_id="ecglab-patient-view",
                hook_instance=f"old-{age}",
                issuer=None,
                patient_key="0" * 64,
                ecg_reference=None,
                ecg_version=None,
                ecg_time=None,
                inputs_sha256="",
                missing_inputs=(),
                predictions={},
                cards=(),
                latency_ms=1.0,
                model_sha256="",
                model_version="x",
                mode="live",
            ),
        )
    make_app(audit_retention_days=30, **DEV)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [r.hook_instance for r in iter_audit(engine, now - timedelta(days=365))]
        if left == ["old-10"]:
            break
        time.sleep(0.05)
    assert left == ["old-10"]


def test_metrics_export_the_newest_monitor_report(make_app, tmp_path: Path) -> None:
    """Gauges of the newest report under ECGLAB_MONITOR_DIR; a new run shows at the next scrape."""
    folder = tmp_path / "monitor"

    def report(name: str, stamp: str, auroc: float) -> None:
        gauges = [
            {
                "name": "ecglab_local_auroc",
                "help": "realised AUROC",
                "labels": {"target": "K_high"},
                "value": auroc,
            },
            {"name": "bad name", "help": "", "labels": {}, "value": 1.0},
            {"name": "ecglab_local_macro_auroc", "help": "macro", "labels": {}, "value": auroc},
        ]
        (folder / name).mkdir(parents=True)
        body = {"format": REPORT_FORMAT, "generated_at": stamp, "gauges": gauges}
        (folder / name / "report.json").write_text(json.dumps(body))

    client = make_app(monitor_dir=str(folder), **DEV).test_client()
    assert "ecglab_local_auroc" not in client.get("/metrics").get_data(as_text=True)
    report("2026-01", "2026-02-01T00:00:00+00:00", 0.71)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'ecglab_local_auroc{target="K_high"} 0.71' in text and "ecglab_local_macro_auroc 0.71" in text
    assert "bad name" not in text
    report("2026-02", "2026-03-01T00:00:00+00:00", 0.74)
    assert 'ecglab_local_auroc{target="K_high"} 0.74' in client.get("/metrics").get_data(as_text=True)
