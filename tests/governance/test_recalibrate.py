"""``ecglab recalibrate``: site calibration and thresholds from a monitor run, as a new model version."""

from __future__ import annotations

import csv
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from cds_service.cli import main
from cds_service.inference import ModelRuntime
from cds_service.recalibrate import CALIBRATION_NOTE, choose_threshold, parse_rule, recalibrate
from fhir_mappings.calibration import Calibration, log_loss, logit, preimage, sigmoid
from fhir_mappings.errors import InputError
from fhir_mappings.manifest import LabelSpec, find_manifest, load_manifest, sha256_file
from fhir_mappings.signal_spec import MODEL_LEADS

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
PARENT_MANIFEST = "ecglab-0.2.0-demo.manifest.json"
PARENT = load_manifest(MODELS / PARENT_MANIFEST, verify_file=False)
PARENT_LABELS = {label.target: label for label in PARENT.labels}
RICH, SPARSE = "Potassium_high_est", "Sodium_high_est"
NOW = datetime(2026, 4, 1, 9, 30, tzinfo=UTC)
COLUMNS = [
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


def outcomes(n: int = 300, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.25).astype(int)
    p = np.clip(0.25 * y + 0.75 * rng.random(n), 0, 1).round(3)
    return y, p


def planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(outcomes, served, raw, true probability) for RICH at a site where the parent's map is wrong.

    The service serves ``q = f(raw)`` (the parent's Platt map); at this site the true probability is
    ``sigmoid(0.5·logit(q) − 1.2)``: fewer abnormal results and a flatter relation than ``q`` claims.
    """
    rng = np.random.default_rng(seed)
    raw = sigmoid(rng.normal(-0.8, 1.0, n))
    parent_map = PARENT_LABELS[RICH].calibration
    assert parent_map is not None and parent_map.method == "platt"
    served = parent_map.apply(raw)
    truth = sigmoid(0.5 * logit(served) - 1.2)
    return (rng.random(n) < truth).astype(int), served, raw, truth


def write_monitor(folder: Path, rows: list[list[object]]) -> Path:
    """A monitor output folder for the bundled model: report.json and outcomes.csv holding ``rows``."""
    folder.mkdir()
    report = {
        "format": "ecglab-monitor-report/1",
        "generated_at": "2026-03-31T00:00:00+00:00",
        "period": {"since": "2026-03-01T00:00:00+00:00", "until": "2026-03-31T00:00:00+00:00"},
        "model": {"sha256": PARENT.onnx.sha256, "version": PARENT.version},
    }
    (folder / "report.json").write_text(json.dumps(report))
    with (folder / "outcomes.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return folder


def rich_rows(y: np.ndarray, q: np.ndarray) -> list[list[object]]:
    return [
        [i, RICH, "potassium", "est", repr(float(qq)), 0.33, int(yy), "female", "40-59", "shadow"]
        for i, (yy, qq) in enumerate(zip(y, q, strict=True))
    ]


@pytest.fixture()
def monitor_dir(tmp_path: Path) -> Path:
    """RICH with 300 outcomes, Potassium_high_mon120 with none observed, SPARSE with 12 (too few)."""
    y, p = outcomes()
    rows = rich_rows(y, p)
    rows += [
        [i, "Potassium_high_mon120", "potassium", "mon120", pp, 0.36, "", "", "", "shadow"]
        for i, pp in enumerate(p)
    ]
    rows += [[i, SPARSE, "sodium", "est", 0.5, 0.3, int(i < 3), "", "", "shadow"] for i in range(12)]
    return write_monitor(tmp_path / "monitor", rows)


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def served_by(label: LabelSpec, parent: LabelSpec, q: np.ndarray) -> np.ndarray:
    """What the child label serves a patient the parent served ``q``."""
    assert label.calibration is not None
    return label.calibration.apply(preimage(parent.calibration, q))


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
    assert snapshot(MODELS) == before  # every file byte for byte, not even rewritten
    child = load_manifest(path, verify_file=True)
    assert child.version == "0.2.0-demo+local.20260401093000" and child.onnx.sha256 == PARENT.onnx.sha256
    assert (out / child.onnx.file).is_file() and path.name == f"ecglab-{child.version}.manifest.json"
    labels = {label.target: label for label in child.labels}
    rich = labels[RICH]
    assert rich.calibration is not None and rich.calibration.fold == "local"
    assert (rich.calibration.n_pos, rich.calibration.n_neg) == (
        int(outcomes()[0].sum()),
        300 - int(outcomes()[0].sum()),
    )
    y, p = outcomes()
    expected = choose_threshold(y, served_by(rich, PARENT_LABELS[RICH], p), "sensitivity", 0.8)
    assert expected is not None  # chosen on the locally calibrated probabilities
    assert rich.decision_threshold == expected.threshold and rich.threshold_rule == "local:sensitivity=0.8"
    assert rich.threshold_fold == "local"
    for kept in (SPARSE, "Potassium_high_mon120"):  # too few outcomes: the parent's label, unchanged
        assert labels[kept] == PARENT_LABELS[kept]
    assert provenance["targets"][SPARSE]["status"].startswith("kept: fewer than 10")
    assert provenance["targets"]["Potassium_high_mon120"]["n_pos"] == 0  # no observed outcome: kept
    assert sum(1 for e in provenance["targets"].values() if e["status"] == "recalibrated") == 1
    assert len(provenance["kept_parent"]) == 110 and SPARSE in provenance["kept_parent"]
    assert child.threshold_rule is None  # mixed rules: each label names its own
    recorded = child.evaluation["local_recalibration"]
    assert isinstance(recorded, dict)
    assert recorded["parent"]["manifest_sha256"] == before[PARENT_MANIFEST][0]
    assert recorded["source"]["outcomes_sha256"] == sha256_file(monitor_dir / "outcomes.csv")
    assert recorded["rule"] == "sensitivity=0.8" and recorded["calibration"] == CALIBRATION_NOTE
    entry = recorded["targets"][RICH]["calibration"]
    assert entry["parent"] == "platt" and entry["stored"] == rich.calibration.method
    assert child.evaluation["tasks"] == PARENT.evaluation["tasks"]
    with pytest.raises(InputError, match="exists"):
        recalibrate(MODELS, monitor_dir, "sensitivity=0.8", out, now=NOW)


def test_local_calibration_corrects_a_planted_miscalibration(tmp_path: Path) -> None:
    """Fitted on one sample of the site's outcomes, the new map lowers the log-loss on a fresh sample."""
    y, q, _, _ = planted(2000, seed=11)
    folder = write_monitor(tmp_path / "monitor", rich_rows(y, q))
    path, provenance = recalibrate(MODELS, folder, "youden", tmp_path / "out", now=NOW, min_class=30)
    new = {label.target: label for label in load_manifest(path).labels}[RICH].calibration
    assert new is not None and new.fold == "local"
    y_new, q_new, raw_new, truth_new = planted(4000, seed=12)
    before, after = log_loss(y_new, q_new), log_loss(y_new, new.apply(raw_new))
    oracle = log_loss(y_new, truth_new)
    assert before - oracle > 0.05  # the planted miscalibration is real
    assert after < before - 0.04 and after < oracle + 0.01
    assert np.abs(new.apply(raw_new) - truth_new).mean() < 0.02
    recorded = provenance["targets"][RICH]["calibration"]
    assert recorded["log_loss_local"] < recorded["log_loss_parent"]


def test_unreachable_rule_keeps_the_parents_decisions_on_the_new_scale(tmp_path: Path) -> None:
    """ppv=1 cannot be met when the highest-scored case is normal: the local map is still fitted and the
    parent's threshold is carried through it, flagging every case the parent flagged."""
    y, q, _, _ = planted(1000, seed=13)
    y[np.argmax(q)] = 0
    folder = write_monitor(tmp_path / "monitor", rich_rows(y, q))
    path, provenance = recalibrate(MODELS, folder, "ppv=1", tmp_path / "out", now=NOW)
    label, parent = {lab.target: lab for lab in load_manifest(path).labels}[RICH], PARENT_LABELS[RICH]
    assert provenance["targets"][RICH]["status"].startswith("calibrated; threshold kept")
    assert label.threshold_fold == parent.threshold_fold and label.threshold_rule == parent.threshold_rule
    served = served_by(label, parent, q)
    assert label.decision_threshold == pytest.approx(
        float(served_by(label, parent, np.array([parent.decision_threshold]))[0])
    )
    assert np.all(served[q >= parent.decision_threshold] >= label.decision_threshold)


def test_variants_are_copied_verified_and_served_with_auto(monitor_dir: Path, tmp_path: Path) -> None:
    """The int8 file comes along under the new version's name with its SHA-256; variant=auto serves it
    with the new calibration."""
    out = tmp_path / "site"
    path, provenance = recalibrate(MODELS, monitor_dir, "youden", out, version="0.2.0-demo-site1", now=NOW)
    child = load_manifest(path)
    spec, parent_spec = child.variants["int8"], PARENT.variants["int8"]
    assert spec.file == "ecglab-0.2.0-demo-site1.int8.onnx" and spec.sha256 == parent_spec.sha256
    assert sha256_file(out / spec.file) == parent_spec.sha256 and spec.model_dump(
        exclude={"file"}
    ) == parent_spec.model_dump(exclude={"file"})
    assert provenance["variants"] == {"int8": {"file": spec.file, "sha256": spec.sha256}}
    assert sorted(p.name for p in out.iterdir()) == sorted([path.name, child.onnx.file, spec.file])

    runtime = ModelRuntime.load(out, ["CPUExecutionProvider"], variant="auto")
    assert runtime.variant == "int8" and runtime.manifest.version == "0.2.0-demo-site1"
    parent_int8 = ModelRuntime.load(MODELS, ["CPUExecutionProvider"], variant="int8")
    rng = np.random.default_rng(3)
    ecg = SimpleNamespace(signal=rng.normal(0, 0.3, (1000, 12)), fs=100.0, lead_names=list(MODEL_LEADS))
    inputs = SimpleNamespace(ecg=ecg, metadata={"age": 61.0, "sex": 0.0})
    got = {p.target: p for p in runtime.predict(inputs)}
    parent = {p.target: p for p in parent_int8.predict(inputs)}
    assert got[RICH].raw_probability == parent[RICH].raw_probability  # the same int8 graph
    calibration, raw = {lab.target: lab for lab in child.labels}[RICH].calibration, got[RICH].raw_probability
    assert isinstance(calibration, Calibration) and calibration.fold == "local" and raw is not None
    assert got[RICH].probability == pytest.approx(float(calibration.apply(raw)))
    assert got[SPARSE].probability == parent[SPARSE].probability  # kept: the parent's map


def test_a_missing_or_altered_variant_stops_before_writing(monitor_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    for name in (PARENT_MANIFEST, PARENT.onnx.file):
        shutil.copyfile(MODELS / name, folder / name)
    with pytest.raises(
        InputError, match=r"variant file ecglab-0.2.0-demo.int8.onnx \(variants.int8\) is missing"
    ):
        recalibrate(folder, monitor_dir, "youden", tmp_path / "out", now=NOW)
    (folder / PARENT.variants["int8"].file).write_bytes(b"not the int8 graph")
    with pytest.raises(InputError, match=r"sha256 does not match variants\.int8"):
        recalibrate(folder, monitor_dir, "youden", tmp_path / "out", now=NOW)
    assert not (tmp_path / "out").exists()


def test_written_beside_the_original_it_becomes_the_served_model(monitor_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    for name in (PARENT_MANIFEST, PARENT.onnx.file, PARENT.variants["int8"].file):
        shutil.copyfile(MODELS / name, folder / name)
    before = snapshot(folder)
    path, _ = recalibrate(folder, monitor_dir, "youden", folder, now=NOW)
    assert find_manifest(folder) == path
    assert {name: entry for name, entry in snapshot(folder).items() if name in before} == before
    assert (
        ModelRuntime.load(folder, ["CPUExecutionProvider"], variant="auto").manifest.version
        == load_manifest(path).version
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
    assert main([*argv, "--rule", "ppv=0.3", "--version", "0.2.0-demo-site1"]) == 0
    out = capsys.readouterr().out
    assert "ecglab-0.2.0-demo-site1.manifest.json" in out and "ecglab-0.2.0-demo-site1.int8.onnx" in out
    assert "1 of 111 target(s) recalibrated" in out and f"  {RICH}: threshold " in out
    kept_line = next(
        line for line in out.splitlines() if "kept the parent's calibration and threshold" in line
    )
    assert kept_line.startswith("110 target(s)") and SPARSE in kept_line and RICH not in kept_line
    assert f"calibration: {CALIBRATION_NOTE}" in out
    assert main([*argv, "--rule", "f1"]) == 2
    assert "--rule" in capsys.readouterr().err
    assert main([*argv, "--rule", "youden", "--version", "../evil"]) == 2
