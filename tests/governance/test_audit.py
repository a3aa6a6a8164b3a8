"""The audit trail (cds_service.audit) and ``ecglab audit export|purge`` on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import inspect

from cds_service.audit import (
    AuditRecord,
    CardRef,
    TargetScore,
    ecg_amplitude_features,
    inputs_digest,
    iter_audit,
    load_audit_key,
    patient_key,
    purge_audit,
    storable_features,
    write_audit,
)
from cds_service.cli import main
from cds_service.db import init_db, make_engine
from fhir_mappings.errors import ConfigError

pytest_plugins = ["tests.pg"]

KEY = b"k" * 32
PATIENT = "patient-4711"
T0 = datetime(2026, 1, 10, 8, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    return str(request.getfixturevalue("pg_url"))


def record(when: datetime, *, patient: str = PATIENT, mode: str = "live") -> AuditRecord:
    return AuditRecord(
        time=when,
        service_id="ecglab-patient-view",
        hook_instance="hook-1",
        issuer="https://ehr.example.org",
        patient_key=patient_key(KEY, patient),
        ecg_reference="Observation/ecg-1",
        ecg_version="3",
        ecg_time=when - timedelta(minutes=5),
        inputs_sha256=inputs_digest(np.zeros((1, 12, 250), np.float32)),
        missing_inputs=("temperature", "bmi"),
        predictions={
            "Potassium_high_est": TargetScore(0.71, 0.36),
            "Potassium_low_est": TargetScore(0.02, 0.41),
        },
        cards=(CardRef("card-uuid-1", "potassium", 0),),
        latency_ms=41.5,
        model_sha256="a" * 64,
        model_version="0.2.0-demo",
        mode=mode,  # type: ignore[arg-type]
        features={"sex": 1.0, "age": 97.0, "temperature": None, "heart_rate": float("nan")},
        outcome="cards",
    )


def test_round_trip_and_init_db_creates_the_table(database_url: str) -> None:
    engine = make_engine(database_url)
    init_db(engine)
    assert "hook_audit" in inspect(engine).get_table_names()
    first = write_audit(engine, record(T0))
    write_audit(engine, record(T0 + timedelta(hours=1), mode="shadow"))
    stored = list(iter_audit(engine, T0 - timedelta(days=1), batch=1))
    assert [r.id for r in stored] == [first, first + 1]
    got = stored[0]
    assert got.time == T0 and got.ecg_time == T0 - timedelta(minutes=5)
    assert got.predictions["Potassium_high_est"] == TargetScore(0.71, 0.36)
    assert got.cards == (CardRef("card-uuid-1", "potassium", 0),)
    assert got.missing_inputs == ("bmi", "temperature")
    assert got.features == {"sex": 1.0, "age": 90.0, "temperature": None, "heart_rate": None}
    assert stored[1].mode == "shadow"
    assert [r.id for r in iter_audit(engine, T0, T0 + timedelta(minutes=30))] == [first]
    assert list(iter_audit(engine, T0, model_sha256="b" * 64)) == []


def test_patient_is_only_a_keyed_hash() -> None:
    hashed = patient_key(KEY, PATIENT)
    assert len(hashed) == 64 and PATIENT not in hashed
    assert hashed == patient_key(KEY, PATIENT) != patient_key(b"j" * 32, PATIENT)
    with pytest.raises(ValueError, match="never an id"):
        AuditRecord(**{**record(T0).__dict__, "patient_key": PATIENT})
    with pytest.raises(ConfigError, match="ECGLAB_AUDIT_KEY"):
        load_audit_key("short")
    assert load_audit_key(" " + "x" * 40 + "\n") == b"x" * 40


def test_inputs_digest_sees_every_byte_dtype_and_shape() -> None:
    ecg = np.zeros((1, 12, 250), np.float32)
    base = inputs_digest(ecg, np.array([[1, 4]]))
    changed = ecg.copy()
    changed[0, 3, 100] = 1e-6
    assert inputs_digest(changed, np.array([[1, 4]])) != base
    assert inputs_digest(ecg.astype(np.float64), np.array([[1, 4]])) != base
    assert inputs_digest(ecg.reshape(1, 250, 12), np.array([[1, 4]])) != base
    assert inputs_digest(ecg, np.array([[1, 4]])) == base
    assert storable_features({"age": 120.0, "bmi": float("inf")}) == {"age": 90.0, "bmi": None}


def test_ecg_amplitude_features() -> None:
    t = np.linspace(0, 10, 1000)
    ecg = np.vstack([np.sin(2 * np.pi * t) * a for a in (0.5, 1.0, 2.0)])
    ecg[2, :100] = 3.0  # clipped stretch
    ecg[0, 5] = np.nan
    stats = ecg_amplitude_features(ecg, clip_mv=3.0)
    finite = ecg[np.isfinite(ecg)]
    assert stats["ecg_rms_mv"] == pytest.approx(np.sqrt(np.mean(finite**2)))
    assert stats["ecg_p2p_mv"] == pytest.approx(2.0, abs=1e-3)  # median of ~1, ~2, ~5 mV
    assert stats["ecg_clipped_fraction"] == pytest.approx(100 / finite.size)
    assert ecg_amplitude_features(np.full((12, 10), np.nan), 3.0)["ecg_rms_mv"] is None
    with pytest.raises(ValueError, match="leads, samples"):
        ecg_amplitude_features(np.zeros(10), 3.0)


def test_purge_by_age_and_by_cutoff(database_url: str) -> None:
    engine = make_engine(database_url)
    init_db(engine)
    for days in (400, 200, 10):
        write_audit(engine, record(T0 - timedelta(days=days)))
    assert purge_audit(engine, timedelta(days=365), now=T0) == 1
    assert purge_audit(engine, T0 - timedelta(days=100)) == 1
    assert len(list(iter_audit(engine, T0 - timedelta(days=1000)))) == 1


def test_export_csv_and_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    engine = make_engine(url)
    init_db(engine)
    write_audit(engine, record(T0))
    write_audit(engine, record(T0 + timedelta(days=2)))
    out = tmp_path / "audit.csv"
    argv = ["audit", "export", "--since", "2026-01-10", "--until", "2026-01-11T00:00Z", "--database-url", url]
    assert main([*argv, "--format", "csv", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1
    assert rows[0]["created_at"] == "2026-01-10T08:00:00+00:00" and rows[0]["mode"] == "live"
    assert json.loads(rows[0]["cards"]) == [{"uuid": "card-uuid-1", "lab": "potassium", "horizon_min": 0}]
    assert PATIENT not in out.read_text()
    pq = pytest.importorskip("pyarrow.parquet")
    parquet = tmp_path / "audit.parquet"
    assert main([*argv, "--format", "parquet", "--out", str(parquet)]) == 0
    table = pq.read_table(parquet)
    assert table.num_rows == 1 and table.column("latency_ms").to_pylist() == [41.5]
    assert table.column("created_at").to_pylist()[0] == T0
    assert str(table.schema.field("created_at").type) == "timestamp[us, tz=UTC]"


def test_export_parquet_without_pyarrow_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    argv = [
        "audit",
        "export",
        "--since",
        "2026-01-01",
        "--format",
        "parquet",
        "--out",
        str(tmp_path / "a.parquet"),
    ]
    assert main([*argv, "--database-url", url]) == 2
    assert "needs the pyarrow package" in capsys.readouterr().err
    assert main(["audit", "export", "--since", "yesterday", "--out", "x", "--database-url", url]) == 2
    assert "--since" in capsys.readouterr().err


def test_purge_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    engine = make_engine(url)
    init_db(engine)
    write_audit(engine, record(datetime.now(UTC) - timedelta(days=40)))
    write_audit(engine, record(datetime.now(UTC)))
    assert main(["audit", "purge", "--older-than-days", "30", "--database-url", url]) == 0
    assert "purged 1 audit row(s)" in capsys.readouterr().out
