"""``ecglab monitor``: audited predictions joined with later lab results from a FHIR server.

The FHIR server is an ``httpx.MockTransport`` that answers ``Observation?code=…&date=ge…&date=le…``
searches with paging. Each patient follows one of nine scenarios placing potassium results inside
and outside each target's window (closest-value ties, both directions in a window, a wrong unit,
a preliminary result, a result 130 min later); the expected outcome of every (scenario, target) is
written out by hand below, and AUROC, PPV, sensitivity, alert rate and ECE are recomputed here with
scikit-learn and numpy, independently of the monitor's code.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sqlalchemy import insert

from cds_service.audit import AuditRecord, CardRef, TargetScore, patient_key, write_audit
from cds_service.cli import main
from cds_service.db import Feedback, init_db, make_engine
from cds_service.monitor import load_latest_report
from cds_service.monitor.command import monitor
from fhir_mappings.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
MANIFEST = load_manifest(MODELS / "ecglab-0.2.0-demo.manifest.json", verify_file=False)
THRESHOLD = {label.target: label.decision_threshold for label in MANIFEST.labels}
KEY = b"monitor-test-key-" * 3
BASE = "http://fhir.test/R4"
T0 = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
NOW = datetime(2026, 3, 10, 0, 0, tzinfo=UTC)
TARGETS = ("Potassium_high_est", "Potassium_low_est", "Potassium_high_mon30", "Potassium_high_mon120")
K_SERUM = ("http://loinc.org", "2823-3")
N_PER_SCENARIO = 5

# (minutes after the ECG, value, unit code, status); potassium is low < 3.3, high > 5.1 (manifest)
SCENARIOS: list[list[tuple[int, float, str, str]]] = [
    [(10, 5.8, "mmol/L", "final")],
    [(-20, 4.0, "mmol/L", "final")],
    [(45, 2.9, "mmol/L", "final")],
    [(-75, 6.0, "mmol/L", "final"), (100, 4.2, "mmol/L", "final")],
    [(25, 5.5, "mmol/L", "final"), (50, 3.0, "mmol/L", "final")],
    [(130, 5.6, "mmol/L", "final")],
    [(5, 6.2, "mg/dL", "final"), (15, 4.4, "mmol/L", "final")],
    [(5, 7.0, "mmol/L", "preliminary"), (60, 5.9, "mEq/L", "amended")],
    [(-30, 3.0, "mmol/L", "final"), (30, 5.5, "mmol/L", "final")],
]
# the outcome each scenario must give, by target (None = no outcome), worked out from the rule
EXPECTED: list[dict[str, int | None]] = [
    {"Potassium_high_est": 1, "Potassium_low_est": 0, "Potassium_high_mon30": 1, "Potassium_high_mon120": 1},
    {
        "Potassium_high_est": 0,
        "Potassium_low_est": 0,
        "Potassium_high_mon30": None,
        "Potassium_high_mon120": None,
    },
    {
        "Potassium_high_est": 0,
        "Potassium_low_est": 1,
        "Potassium_high_mon30": None,
        "Potassium_high_mon120": 0,
    },
    {
        "Potassium_high_est": None,
        "Potassium_low_est": None,
        "Potassium_high_mon30": None,
        "Potassium_high_mon120": 0,
    },
    # closest is +25 (high); 0..120 holds high and low: no monitoring outcome
    {
        "Potassium_high_est": 1,
        "Potassium_low_est": 0,
        "Potassium_high_mon30": 1,
        "Potassium_high_mon120": None,
    },
    {
        "Potassium_high_est": None,
        "Potassium_low_est": None,
        "Potassium_high_mon30": None,
        "Potassium_high_mon120": None,
    },
    # the mg/dL value is ignored
    {"Potassium_high_est": 0, "Potassium_low_est": 0, "Potassium_high_mon30": 0, "Potassium_high_mon120": 0},
    # the preliminary value is ignored; +60 min is inside the est window (ends inclusive)
    {
        "Potassium_high_est": 1,
        "Potassium_low_est": 0,
        "Potassium_high_mon30": None,
        "Potassium_high_mon120": 1,
    },
    # -30 and +30 tie for est: the earlier (low) wins
    {"Potassium_high_est": 0, "Potassium_low_est": 1, "Potassium_high_mon30": 1, "Potassium_high_mon120": 1},
]


def patient_id(i: int) -> str:
    return f"pat-{i:04d}-secret"


class FakeFhir:
    """Observation search by code and date with 7-entry pages; records every request."""

    def __init__(self, observations: list[dict[str, Any]]) -> None:
        self.observations = observations
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert request.url.path == "/R4/Observation"
        query = parse_qs(urlsplit(str(request.url)).query)
        codes = set(query["code"][0].split(","))
        bounds = {d[:2]: datetime.fromisoformat(d[2:].replace("Z", "+00:00")) for d in query["date"]}
        hits = [
            o
            for o in self.observations
            if f"{o['code']['coding'][0]['system']}|{o['code']['coding'][0]['code']}" in codes
            and bounds["ge"] <= datetime.fromisoformat(o["effectiveDateTime"]) <= bounds["le"]
        ]
        offset = int(query.get("_offset", ["0"])[0])
        page = hits[offset : offset + 7]
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": r} for r in page],
        }
        if offset + 7 < len(hits):
            flat = {k: v for k, v in query.items() if k != "_offset"}
            bundle["link"] = [
                {
                    "relation": "next",
                    "url": f"{BASE}/Observation?{urlencode({**flat, '_offset': offset + 7}, doseq=True)}",
                }
            ]
        return httpx.Response(200, json=bundle)


def observation(
    i: int, n: int, code: tuple[str, str], when: datetime, value: float, unit: str, status: str
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"lab-{i}-{n}",
        "status": status,
        "code": {"coding": [{"system": code[0], "code": code[1]}]},
        "subject": {"reference": f"Patient/{patient_id(i)}"},
        "effectiveDateTime": when.isoformat(),
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }


def scenario_record(
    i: int, rng: np.random.Generator, *, ecg_time: datetime | None, sha: str = MANIFEST.onnx.sha256
) -> AuditRecord:
    return AuditRecord(
        time=(ecg_time or T0) + timedelta(minutes=2),
        service_id="ecglab-patient-view",
        hook_instance=f"hook-{i}",
        issuer="https://ehr.test",
        patient_key=patient_key(KEY, patient_id(i)),
        ecg_reference=f"Observation/ecg-{i}",
        ecg_version="1",
        ecg_time=ecg_time,
        inputs_sha256="0" * 64,
        missing_inputs=(),
        predictions={t: TargetScore(float(rng.random()), THRESHOLD[t]) for t in TARGETS},
        cards=(CardRef(f"card-{i}", "potassium", 0),),
        latency_ms=30.0,
        model_sha256=sha,
        model_version=MANIFEST.version,
        mode="live" if i < 9 else "shadow",
        features={
            "sex": float(i % 2),
            "age": 25.0 + i * 1.5,
            "heart_rate": 60.0 + (i * 7) % 50,
            "temperature": None,
        },
    )


@pytest.fixture()
def world(tmp_path: Path) -> dict[str, Any]:
    """An audit database with 45 scenario calls (+ 3 that must be left out) and the fake FHIR server."""
    url = f"sqlite:///{tmp_path / 'service.sqlite3'}"
    engine = make_engine(url)
    init_db(engine)
    rng = np.random.default_rng(7)
    observations: list[dict[str, Any]] = []
    records: list[AuditRecord] = []
    for i in range(len(SCENARIOS) * N_PER_SCENARIO):
        ecg = T0 + timedelta(hours=3 * i)
        record = scenario_record(i, rng, ecg_time=ecg)
        records.append(record)
        write_audit(engine, record)
        for n, (minutes, value, unit, status) in enumerate(SCENARIOS[i % len(SCENARIOS)]):
            code = K_SERUM if n % 2 == 0 else ("http://loinc.org", "6298-4")
            observations.append(
                observation(i, n, code, ecg + timedelta(minutes=minutes), value, unit, status)
            )
        observations.append(observation(i, 99, ("http://loinc.org", "2160-0"), ecg, 9.9, "mg/dL", "final"))
    open_window = scenario_record(900, rng, ecg_time=NOW - timedelta(minutes=10))
    write_audit(engine, open_window)
    write_audit(engine, scenario_record(901, rng, ecg_time=None))
    write_audit(engine, scenario_record(902, rng, ecg_time=T0, sha="f" * 64))
    with engine.begin() as conn:
        for uuid, outcome, reason in (
            ("card-0", "accepted", None),
            ("card-1", "overridden", "Already ordered"),
            ("card-2", "overridden", "Already ordered"),
            ("card-20", "accepted", None),
        ):
            conn.execute(
                insert(Feedback).values(
                    dedup_key=uuid,
                    service_id="ecglab-patient-view",
                    card_uuid=uuid,
                    outcome=outcome,
                    outcome_timestamp=NOW,
                    override_display=reason,
                    received_at=NOW,
                )
            )
    return {"url": url, "fhir": FakeFhir(observations), "records": records, "open_window": open_window}


def run_monitor(world: dict[str, Any], out: Path, **extra: Any) -> dict[str, Any]:
    return monitor(
        fhir_url=BASE,
        since=T0 - timedelta(days=1),
        until=NOW,
        out=out,
        database_url=world["url"],
        model=MODELS,
        key=KEY,
        n_boot=200,
        min_class=10,
        progress=False,
        now=NOW,
        transport=world["fhir"].transport,
        **extra,
    )


def expected_ece(y: np.ndarray, p: np.ndarray) -> float:
    total = 0.0
    for b in range(10):
        inside = (p >= b / 10) & ((p < (b + 1) / 10) if b < 9 else (p <= 1.0))
        if inside.any():
            total += inside.sum() / len(p) * abs(y[inside].mean() - p[inside].mean())
    return total


def test_realised_figures_match_an_independent_computation(
    world: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        report = run_monitor(world, tmp_path / "run1")
    records: list[AuditRecord] = world["records"]
    for target in TARGETS:
        outcomes = [EXPECTED[i % len(SCENARIOS)][target] for i in range(len(records))]
        known = [i for i, o in enumerate(outcomes) if o is not None]
        y = np.array([outcomes[i] for i in known])
        p = np.array([records[i].predictions[target].probability for i in known])
        flagged = p >= THRESHOLD[target]
        entry = report["targets"][target]
        assert entry["n_outcomes"] == len(known) and entry["n_pos"] == int(y.sum())
        assert entry["auroc"] == pytest.approx(roc_auc_score(y, p))
        assert entry["ppv"] == pytest.approx((flagged & (y == 1)).sum() / flagged.sum())
        assert entry["sensitivity"] == pytest.approx((flagged & (y == 1)).sum() / (y == 1).sum())
        assert entry["ece"] == pytest.approx(expected_ece(y, p))
        everyone = [r.predictions[target].probability for r in [*records, world["open_window"]]]
        assert entry["alert_rate"] == pytest.approx(np.mean(np.array(everyone) >= THRESHOLD[target]))
        assert entry["auroc_ci_low"] <= entry["auroc"] <= entry["auroc_ci_high"]
        female = [i for i in known if i % 2 == 0]
        sub = entry["subgroups"]["sex"]["female"]
        ys = np.array([outcomes[i] for i in female])
        if 0 < ys.sum() < len(ys):
            assert sub["auroc"] == pytest.approx(
                roc_auc_score(ys, [records[i].predictions[target].probability for i in female])
            )
    assert report["targets"]["Potassium_high_mon30"]["evaluable"] is False  # 5 negatives only
    assert report["summary"]["n_targets_evaluable"] == 3
    evaluable = [report["targets"][t]["auroc"] for t in TARGETS if t != "Potassium_high_mon30"]
    assert report["summary"]["macro_auroc"] == pytest.approx(np.mean(evaluable))
    counts = report["counts"]
    assert counts["audited_calls"] == 47 and counts["calls_of_other_models"] == 1
    assert counts["calls_without_ecg_time"] == 1 and counts["predictions_window_open"] == 4
    assert counts["lab_results_skipped_other_unit"] == N_PER_SCENARIO
    assert counts["lab_results_skipped_status"] == N_PER_SCENARIO
    assert counts["fhir_pages"] > 2  # paging followed
    assert set(report["summary"]["by_subgroup"]["sex"]) == {"female", "male"}
    assert "18-39" in report["summary"]["by_subgroup"]["age_band"]
    assert all("2823-3" in str(r.url) or "6298-4" in str(r.url) for r in world["fhir"].requests)
    assert report["feedback"]["potassium"] == {
        "live_cards": 9,
        "shadow_cards": 38,
        "feedback": 3,
        "accepted": 1,
        "overridden": 2,
        "acceptance_rate": pytest.approx(1 / 3),
        "override_reasons": {"Already ordered": 2},
    }  # card-20 was a shadow card: its feedback cannot count
    assert report["drift"] == {"reference": "unavailable", "features": {}}
    gauges = {(g["name"], tuple(sorted(g["labels"].items()))): g["value"] for g in report["gauges"]}
    assert (
        gauges[("ecglab_local_auroc", (("target", "Potassium_high_est"),))]
        == report["targets"]["Potassium_high_est"]["auroc"]
    )
    out = tmp_path / "run1"
    written = "".join(
        (out / name).read_text()
        for name in ("report.json", "report.html", "outcomes.csv", "distribution.json")
    )
    assert "<img" in (out / "report.html").read_text()
    for i in (0, 17, 44):
        assert patient_id(i) not in written and patient_id(i) not in caplog.text
    lines = (out / "outcomes.csv").read_text().splitlines()
    assert lines[0].startswith("audit_id,target") and len(lines) == 1 + 46 * 4


def test_drift_against_a_reference_and_the_latest_report(world: dict[str, Any], tmp_path: Path) -> None:
    first = run_monitor(world, tmp_path / "runs" / "a")
    assert first["drift"]["reference"] == "unavailable"
    reference = tmp_path / "runs" / "a" / "distribution.json"
    second = monitor(
        fhir_url=BASE,
        since=T0 - timedelta(days=1),
        until=NOW,
        out=tmp_path / "runs" / "b",
        database_url=world["url"],
        model=MODELS,
        key=KEY,
        n_boot=0,
        progress=False,
        now=NOW + timedelta(hours=1),
        transport=world["fhir"].transport,
        reference=reference,
    )
    features = second["drift"]["features"]
    assert set(features) == {"sex", "age", "heart_rate", "temperature"}
    assert all(f["psi"] == pytest.approx(0.0, abs=1e-9) and f["band"] == "stable" for f in features.values())
    assert features["temperature"]["missing_current"] == 1.0
    assert second["targets"]["Potassium_high_est"]["auroc_ci_low"] is None  # no bootstrap asked
    assert load_latest_report(tmp_path / "runs")["generated_at"] == second["generated_at"]
    assert load_latest_report(tmp_path / "nothing") == {}
    shifted = json.loads(reference.read_text())
    shifted["features"]["sex"]["categories"] = {"0": 0.95, "1": 0.05}
    reference.write_text(json.dumps(shifted))
    third = run_monitor(world, tmp_path / "runs" / "c", reference=reference)
    assert third["drift"]["features"]["sex"]["band"] == "major"


def test_command_line_errors(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ECGLAB_AUDIT_KEY", raising=False)
    argv = [
        "monitor",
        "--fhir-url",
        BASE,
        "--since",
        "2026-03-01",
        "--out",
        str(tmp_path / "o"),
        "--database-url",
        world["url"],
        "--model",
        str(MODELS),
    ]
    assert main(argv) == 2
    assert "ECGLAB_AUDIT_KEY" in capsys.readouterr().err
    monkeypatch.setenv("ECGLAB_AUDIT_KEY", "short")
    assert main(argv) == 2
    assert "at least 32 bytes" in capsys.readouterr().err
    monkeypatch.setenv("ECGLAB_AUDIT_KEY", KEY.decode())
    assert main([*argv, "--until", "2026-02-01"]) == 2
    assert "--until must be later" in capsys.readouterr().err
