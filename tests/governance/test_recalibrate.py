"""``ecglab recalibrate``: site thresholds from a monitor run, written as a new model version."""

from __future__ import annotations

import csv
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from cds_service.cli import main
from cds_service.recalibrate import CALIBRATION_NOTE, choose_threshold, parse_rule, recalibrate
from fhir_mappings.errors import InputError
from fhir_mappings.manifest import find_manifest, load_manifest, sha256_file

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
PARENT = load_manifest(MODELS / "ecglab-0.1.0-demo.manifest.json", verify_file=False)
RICH, SPARSE = "Potassium_high_est", "Sodium_high_est"
NOW = datetime(2026, 4, 1, 9, 30, tzinfo=UTC)


def outcomes(n: int = 300, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.25).astype(int)
    p = np.clip(0.25 * y + 0.75 * rng.random(n), 0, 1).round(3)
    return y, p


@pytest.fixture()
def monitor_dir(tmp_path: Path) -> Path:
    """A monitor output folder: report.json for the bundled model and outcomes.csv."""
    folder = tmp_path / "monitor"
    folder.mkdir()
    report = {
        "format": "ecglab-monitor-report/1",
        "generated_at": "2026-03-31T00:00:00+00:00",
        "period": {"since": "2026-03-01T00:00:00+00:00", "until": "2026-03-31T00:00:00+00:00"},
        "model": {"sha256": PARENT.onnx.sha256, "version": PARENT.version},
    }
    (folder / "report.json").write_text(json.dumps(report))
    y, p = outcomes()
    with (folder / "outcomes.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "audit_id",
                "target",
                "lab_key",
                "task",
                "probability",
                "threshold",
                "outcome",
                "sex",
                "age_band",
                "mode",
            ]
        )
        for i, (yy, pp) in enumerate(zip(y, p, strict=True)):
            writer.writerow([i, RICH, "potassium", "est", pp, 0.33, yy, "female", "40-59", "shadow"])
            writer.writerow(
                [i, "Potassium_high_mon120", "potassium", "mon120", pp, 0.36, "", "", "", "shadow"]
            )
        for i in range(12):
            writer.writerow([i, SPARSE, "sodium", "est", 0.5, 0.3, int(i < 3), "", "", "shadow"])
    return folder


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def flagged_stats(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float]:
    flagged = p >= t
    tp = (flagged & (y == 1)).sum()
    return tp / (y == 1).sum(), tp / flagged.sum()


def test_rules_pick_the_documented_thresholds() -> None:
    y, p = outcomes()
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    best = np.flatnonzero((tpr - fpr) == (tpr - fpr).max())
    youden = choose_threshold(y, p, "youden", None)
    assert youden is not None and youden.threshold == pytest.approx(thr[best].max())
    sens = choose_threshold(y, p, "sensitivity", 0.8)
    assert sens is not None and sens.sensitivity >= 0.8
    higher = np.unique(p)[np.unique(p) > sens.threshold]
    assert all(flagged_stats(y, p, t)[0] < 0.8 for t in higher)  # the highest threshold reaching 0.8
    ppv = choose_threshold(y, p, "ppv", 0.4)
    assert ppv is not None and ppv.ppv >= 0.4
    qualifying = [t for t in np.unique(p) if flagged_stats(y, p, t)[1] >= 0.4]
    most_sensitive = max(flagged_stats(y, p, t)[0] for t in qualifying)
    assert ppv.sensitivity == most_sensitive  # PPV is not monotonic: the best sensitivity among PPV >= 0.4
    assert ppv.threshold == max(t for t in qualifying if flagged_stats(y, p, t)[0] == most_sensitive)
    perfect = choose_threshold(y, p, "ppv", 1.0)
    assert perfect is None or perfect.ppv == 1.0
    assert choose_threshold(np.array([1, 0, 0]), np.array([0.2, 0.5, 0.9]), "ppv", 0.9) is None
    assert parse_rule("ppv=0.3") == ("ppv", 0.3) and parse_rule("youden") == ("youden", None)
    for bad in ("ppv=1.5", "sens:0.8", "youden=1", ""):
        with pytest.raises(InputError, match="--rule"):
            parse_rule(bad)


def test_new_version_with_provenance_and_the_original_untouched(monitor_dir: Path, tmp_path: Path) -> None:
    before = snapshot(MODELS)
    out = tmp_path / "site-models"
    path, provenance = recalibrate(MODELS, monitor_dir, "sensitivity=0.8", out, now=NOW)
    assert snapshot(MODELS) == before
    child = load_manifest(path, verify_file=True)
    assert child.version == "0.1.0-demo+local.20260401093000" and child.onnx.sha256 == PARENT.onnx.sha256
    assert (out / child.onnx.file).is_file() and path.name == f"ecglab-{child.version}.manifest.json"
    y, p = outcomes()
    expected = choose_threshold(y, p, "sensitivity", 0.8)
    assert expected is not None
    labels = {label.target: label for label in child.labels}
    assert (
        labels[RICH].decision_threshold == expected.threshold
        and labels[RICH].threshold_rule == "local:sensitivity=0.8"
    )
    assert (
        labels[SPARSE].decision_threshold
        == {lab.target: lab for lab in PARENT.labels}[SPARSE].decision_threshold
    )
    assert provenance["targets"][SPARSE]["status"].startswith("kept: fewer than 10")
    assert provenance["targets"]["Potassium_high_mon120"]["n_pos"] == 0  # no observed outcome: kept
    assert sum(1 for e in provenance["targets"].values() if e["status"] == "recalibrated") == 1
    recorded = child.evaluation["local_recalibration"]
    assert isinstance(recorded, dict)
    assert recorded["parent"]["manifest_sha256"] == before["ecglab-0.1.0-demo.manifest.json"][0]
    assert recorded["source"]["outcomes_sha256"] == sha256_file(monitor_dir / "outcomes.csv")
    assert recorded["rule"] == "sensitivity=0.8" and recorded["calibration"] == CALIBRATION_NOTE
    assert child.evaluation["tasks"] == PARENT.evaluation["tasks"]
    with pytest.raises(InputError, match="exists"):
        recalibrate(MODELS, monitor_dir, "sensitivity=0.8", out, now=NOW)


def test_written_beside_the_original_it_becomes_the_served_model(monitor_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("ecglab-0.1.0-demo.manifest.json", "ecglab-0.1.0-demo.onnx"):
        shutil.copyfile(MODELS / name, folder / name)
    path, _ = recalibrate(folder, monitor_dir, "youden", folder, now=NOW)
    assert find_manifest(folder) == path
    assert sha256_file(folder / "ecglab-0.1.0-demo.manifest.json") == sha256_file(
        MODELS / "ecglab-0.1.0-demo.manifest.json"
    )


def test_refuses_a_report_of_another_model(monitor_dir: Path, tmp_path: Path) -> None:
    report = json.loads((monitor_dir / "report.json").read_text())
    report["model"]["sha256"] = "0" * 64
    (monitor_dir / "report.json").write_text(json.dumps(report))
    with pytest.raises(InputError, match="monitor report is for model sha256 000000000000"):
        recalibrate(MODELS, monitor_dir, "youden", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_command_line(monitor_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "recalibrate",
        "--model",
        str(MODELS),
        "--from-monitor",
        str(monitor_dir),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--rule", "ppv=0.3", "--version", "0.1.0-demo-site1"]) == 0
    out = capsys.readouterr().out
    assert "ecglab-0.1.0-demo-site1.manifest.json" in out and "1 of 111 target(s) recalibrated" in out
    assert "calibration not refitted" in out
    assert main([*argv, "--rule", "f1"]) == 2
    assert "--rule" in capsys.readouterr().err
    assert main([*argv, "--rule", "youden", "--version", "../evil"]) == 2
