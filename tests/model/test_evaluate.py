"""``ecglab evaluate``: metrics.json, reports, predictions and thresholds of a trained tiny run.

Rules pinned: method.md §3.5 (per-target/macro/micro AUROC, per task), §3.6 (bootstrap CIs on val
and test folds), §1.1 (the paper's headline criterion and published figures), the project brief
(planted-target report, outputs) and issue 15 (calibration and decision thresholds chosen on the
validation fold only, ECE and Brier before/after, subgroups by sex and age band).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cds_service.cli import main
from fhir_mappings.calibration import Calibration, Calibrator
from model_training.config import EvalConfig
from model_training.evaluate import evaluate
from model_training.metrics import roc_auc
from model_training.thresholds import choose_threshold
from tests.training_fixtures import PLANTED, TARGETS, TinyRun


@pytest.fixture(scope="module")
def evaluated_run(evaluated_tiny_run: TinyRun) -> Path:
    """The session's tiny run, evaluated once through the CLI with 200 bootstrap resamples."""
    return evaluated_tiny_run.run


@pytest.fixture(scope="module")
def dataset_dir(evaluated_tiny_run: TinyRun) -> Path:
    """The DATASET the evaluated run was trained on."""
    return evaluated_tiny_run.data


@pytest.fixture(scope="module")
def metrics(evaluated_run: Path) -> dict[str, Any]:
    """The run's metrics.json."""
    return json.loads((evaluated_run / "metrics.json").read_text(encoding="utf-8"))


def test_metrics_json_has_per_target_entries_on_val_and_test(metrics: dict[str, Any]) -> None:
    """§3.6: both folds are evaluated; each target has AUROC, CI, counts, task, ECE and threshold."""
    assert set(metrics["splits"]) == {"val", "test"}
    assert metrics["splits"]["val"]["fold"] == 18 and metrics["splits"]["test"]["fold"] == 19
    for split in ("val", "test"):
        targets = metrics["splits"][split]["targets"]
        assert set(targets) == set(TARGETS)
        for name, entry in targets.items():
            assert set(entry) >= {
                "auroc",
                "ci_low",
                "ci_high",
                "n_pos",
                "n_neg",
                "task",
                "split",
                "ece",
                "decision_threshold",
            }
            assert entry["split"] == split and entry["task"] == name.rsplit("_", 1)[1]
            assert entry["ci_low"] <= entry["auroc"] <= entry["ci_high"]
            assert 0.0 <= entry["ece"] <= 1.0 and entry["n_pos"] >= 1 and entry["n_neg"] >= 1


def test_per_target_auroc_matches_saved_predictions(
    evaluated_run: Path, metrics: dict[str, Any], dataset_dir: Path
) -> None:
    """§3.5: AUROC is computed on the non-NaN labels of the test fold from the saved probabilities."""
    preds = pd.read_parquet(evaluated_run / "predictions_test.parquet")
    assert list(preds.columns) == ["study_id", *TARGETS]
    labels = pd.read_parquet(dataset_dir / "labels.parquet").set_index("study_id").loc[preds["study_id"]]
    records = pd.read_parquet(dataset_dir / "records.parquet").set_index("study_id")
    assert (records.loc[preds["study_id"], "strat_fold"] == 19).all()
    for target in TARGETS:
        expected = roc_auc(labels[target].to_numpy(), preds[target].to_numpy())
        assert metrics["splits"]["test"]["targets"][target]["auroc"] == pytest.approx(expected, abs=1e-6)


def test_decision_thresholds_are_chosen_on_the_validation_fold(
    evaluated_run: Path, metrics: dict[str, Any], dataset_dir: Path
) -> None:
    """Issue 15: the threshold per target is Youden's J on the calibrated val fold, reported for both folds."""
    preds = pd.read_parquet(evaluated_run / "predictions_val.parquet")
    labels = pd.read_parquet(dataset_dir / "labels.parquet").set_index("study_id").loc[preds["study_id"]]
    for target in TARGETS:
        expected = choose_threshold(
            labels[target].to_numpy(), preds[target].to_numpy().astype(np.float64), "youden"
        )
        for split in ("val", "test"):
            assert metrics["splits"][split]["targets"][target]["decision_threshold"] == pytest.approx(
                expected, abs=1e-6
            )


def test_task_category_micro_and_headline_summaries(metrics: dict[str, Any]) -> None:
    """§3.5 and §1.1: macro per task and per category with CIs, micro AUROC, >0.70 counts per task."""
    test = metrics["splits"]["test"]
    assert list(test["tasks"]) == ["est", "mon30"]
    for entry in [*test["tasks"].values(), *test["categories"].values(), test["all"]]:
        assert entry["ci_low"] <= entry["macro_auroc"] <= entry["ci_high"]
    est_aurocs = [test["targets"][t]["auroc"] for t in TARGETS if t.endswith("_est")]
    assert test["tasks"]["est"]["macro_auroc"] == pytest.approx(np.mean(est_aurocs))
    assert test["tasks"]["est"]["n_targets"] == 3
    assert test["micro"]["ci_low"] <= test["micro"]["auroc"] <= test["micro"]["ci_high"]
    significant = [
        t for t, e in test["targets"].items() if e["auroc"] > 0.7 and e["ci_low"] > 0.7 and e["task"] == "est"
    ]
    assert test["tasks"]["est"]["n_significant"] == len(significant)
    assert sorted(test["tasks"]["est"]["significant_targets"]) == sorted(significant)
    assert sum(c["n_targets"] for c in test["categories"].values()) == len(TARGETS)


def test_planted_targets_are_reported_separately(metrics: dict[str, Any]) -> None:
    """Brief: with a synthetic generator's ground truth, planted and noise targets are summarised apart."""
    planted = metrics["planted"]
    assert planted["source"] == "ground_truth.json"
    assert set(planted["targets"]) == set(PLANTED)
    groups = planted["groups"]
    assert groups["planted"]["n_targets"] == 3 and groups["not planted (noise)"]["n_targets"] == 1
    assert groups["planted"]["macro_auroc"] > 0.75
    assert metrics["data"]["trained_on_synthetic"] is True


def test_reports_show_paper_figures_side_by_side(evaluated_run: Path, metrics: dict[str, Any]) -> None:
    """§1.1: report.md and a self-contained report.html compare with the paper's published figures."""
    rows = {(r["figure"], r["paper"]): r for r in metrics["paper_comparison"]}
    assert {("NTproBNP_high_est AUROC", "> 0.90"), ("NTproBNP_high_est AUROC", "0.882")} <= set(rows)
    assert rows[("NTproBNP_high_est AUROC", "> 0.90")]["reproduced"] is not None
    assert ("est macro AUROC", "0.762") in rows
    assert rows[("Albumin_high_est AUROC", "> 0.85")]["ours"] == "target not in this model"
    md = (evaluated_run / "report.md").read_text(encoding="utf-8")
    assert "Side by side with the paper" in md and "SYNTHETIC" in md
    for link in ("figures/auroc_bars.png", "figures/roc_est.png", "figures/reliability_mon30.png"):
        assert f"]({link})" in md
        assert (evaluated_run / link).read_bytes()[:4] == b"\x89PNG"
    html = (evaluated_run / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 5 and "src='figures/" not in html
    assert "NTproBNP_high_est" in html and "planted" in html


def test_evaluation_uses_checkpoint_medians_not_the_new_data(
    evaluated_run: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    """§2.3: evaluation imputes with the training-fold medians saved in the checkpoint.

    Changing the training folds' metadata in a copy of the DATASET must not change any test
    prediction; the run is flagged as evaluated on different data.
    """
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy)
    meta = pd.read_parquet(copy / "metadata.parquet")
    folds = pd.read_parquet(copy / "records.parquet")["strat_fold"].to_numpy()
    meta.loc[folds < 18, "heart_rate"] = 250.0
    meta.to_parquet(copy / "metadata.parquet", index=False)
    before = pd.read_parquet(evaluated_run / "predictions_test.parquet")
    run_copy = tmp_path / "run"
    shutil.copytree(evaluated_run, run_copy)
    result = evaluate(run_copy, EvalConfig(bootstrap=0, num_threads=1), data=copy)
    after = pd.read_parquet(run_copy / "predictions_test.parquet")
    pd.testing.assert_frame_equal(before, after)
    assert result["data"]["differs_from_training"] is True


def test_threshold_rule_and_checkpoint_options(
    evaluated_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--threshold-rule sensitivity=X / ppv=X (and the old sens:X) and --checkpoint last work; a bad
    rule names the key."""
    run_copy = tmp_path / "run"
    shutil.copytree(evaluated_run, run_copy)
    args = ["evaluate", "--run", str(run_copy), "--device", "cpu", "--bootstrap", "0", "--num_threads=1"]
    assert main([*args, "--checkpoint", "last", "--threshold-rule", "sens:0.8"]) == 0
    result = json.loads((run_copy / "metrics.json").read_text(encoding="utf-8"))
    assert result["checkpoint"] == "last" and result["threshold_rule"] == "sensitivity=0.8"
    for entry in result["splits"]["val"]["targets"].values():
        assert entry["sensitivity"] >= 0.8
    assert main([*args, "--threshold-rule", "ppv=0.5"]) == 0
    result = json.loads((run_copy / "metrics.json").read_text(encoding="utf-8"))
    for entry in result["splits"]["val"]["targets"].values():
        assert entry["threshold_source"].startswith("fallback") or entry["ppv"] >= 0.5
    assert main([*args, "--threshold-rule", "best"]) == 2
    assert "config key 'threshold_rule': unknown threshold rule 'best'" in capsys.readouterr().err


def test_calibration_is_fitted_on_val_and_reported_before_and_after(
    evaluated_run: Path, metrics: dict[str, Any]
) -> None:
    """Issue 15: one map per target fitted on the val fold; ECE and Brier before/after per target and
    per task; saved predictions are the calibrated raw outputs."""
    fits = metrics["calibration"]["targets"]
    assert metrics["calibration"]["fold"] == "val" and set(fits) == set(TARGETS)
    maps = [Calibration.model_validate(fits[t]["calibration"]) for t in TARGETS]
    assert all(c.fold == "val" for c in maps)
    for split in ("val", "test"):
        entries = metrics["splits"][split]["targets"]
        for target in TARGETS:
            entry = entries[target]
            assert entry["calibration"] == fits[target]["method"]
            assert 0.0 <= entry["ece"] <= 1.0 and 0.0 <= entry["ece_raw"] <= 1.0
            assert 0.0 <= entry["brier"] <= 1.0 and 0.0 <= entry["brier_raw"] <= 1.0
        tasks = metrics["splits"][split]["calibration"]
        assert set(tasks) == {"est", "mon30", "all"}
        assert tasks["est"]["n_targets"] == 3 and sum(tasks["all"]["methods"].values()) == len(TARGETS)
        calibrated = pd.read_parquet(evaluated_run / f"predictions_{split}.parquet")
        raw = pd.read_parquet(evaluated_run / f"predictions_{split}_raw.parquet")
        assert list(raw["study_id"]) == list(calibrated["study_id"])
        expected = Calibrator(maps)(raw[list(TARGETS)].to_numpy())
        np.testing.assert_allclose(calibrated[list(TARGETS)].to_numpy(), expected, atol=1e-6)
    # the val fold is where the maps were fitted: they cannot make it worse than the raw outputs there
    val = metrics["splits"]["val"]["calibration"]["all"]
    assert val["brier_mean_after"] <= val["brier_mean_before"] + 1e-9
    planted = metrics["planted"]["calibration"]["test"]
    assert set(planted) == {"planted", "not planted (noise)"}
    md = (evaluated_run / "report.md").read_text(encoding="utf-8")
    assert "Calibration (test fold; maps fitted on the val fold)" in md and "ECE raw → calibrated" in md


def test_no_test_fold_label_changes_any_choice(
    evaluated_run: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    """Issue 15: flipping every test-fold label changes no calibration map and no threshold."""
    copy = tmp_path / "data"
    shutil.copytree(dataset_dir, copy)
    labels = pd.read_parquet(copy / "labels.parquet")
    folds = pd.read_parquet(copy / "records.parquet")["strat_fold"].to_numpy()
    for target in TARGETS:
        test_rows = folds == 19
        labels.loc[test_rows, target] = 1.0 - labels.loc[test_rows, target]
    labels.to_parquet(copy / "labels.parquet", index=False)
    run_copy = tmp_path / "run"
    shutil.copytree(evaluated_run, run_copy)
    before = json.loads((evaluated_run / "metrics.json").read_text(encoding="utf-8"))
    after = evaluate(run_copy, EvalConfig(bootstrap=0, num_threads=1), data=copy)
    assert after["calibration"]["targets"] == before["calibration"]["targets"]
    for target in TARGETS:
        for key in ("decision_threshold", "threshold_source"):
            assert (
                after["splits"]["val"]["targets"][target][key]
                == before["splits"]["val"]["targets"][target][key]
            )
    assert (
        after["splits"]["test"]["targets"][TARGETS[0]]["auroc"]
        != before["splits"]["test"]["targets"][TARGETS[0]]["auroc"]
    )


def test_subgroup_metrics_by_sex_and_age_band(metrics: dict[str, Any]) -> None:
    """The test fold's figures per sex and age band are in metrics.json["subgroups"] (model card input)."""
    subgroups = metrics["subgroups"]
    assert subgroups["n_records"] == metrics["splits"]["test"]["n_records"]
    assert set(subgroups["attributes"]) == {"sex", "age_band"}
    assert set(subgroups["attributes"]["sex"]) <= {"female", "male"}
    assert set(subgroups["attributes"]["age_band"]) <= {"<18", "18-39", "40-59", "60-79", "80+"}
