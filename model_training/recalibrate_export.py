"""Calibrate an exported model and re-derive its thresholds from predictions alone, without retraining.

Usage::

    python -m model_training.recalibrate_export --model models --data data/ds2000 \\
        --check-data data/ds-seed2 --report models/demo-run/recalibration.json

A model exported before issue 15 has raw focal-loss outputs as "probabilities", thresholds chosen
on those, and a card gate on its test-fold AUROC. Everything issue 15 asks of its manifest needs
only the model's predictions, so this command recomputes it from the **exported ONNX graph**
(scored exactly as the service scores: the manifest's windows, encoding and averaging) on the
DATASET the model was trained on:

1. raw probabilities of the validation (18) and test (19) folds;
2. a calibration map per target fitted on the validation fold
   (:func:`model_training.calibration.fit_calibrations`, the same choice ``ecglab evaluate`` makes);
3. decision thresholds by ``--rule`` (default Youden) on the **calibrated** validation
   probabilities (:func:`model_training.thresholds.choose_thresholds`);
4. validation AUROC with its bootstrap CI (the card gate) and the test-fold AUROC, CI, ECE and
   Brier score before and after calibration (:func:`model_training.evaluate.split_metrics`);
5. optionally, the same maps applied to every ECG of a second DATASET (``--check-data``, e.g. a
   fresh generator seed the model never saw): the calibration's out-of-sample check.

The manifest is then rewritten in place (re-read immediately before writing, so fields another tool
added meanwhile, e.g. ``variants``, are kept): per label ``calibration``, ``decision_threshold``,
``threshold_rule``, ``threshold_fold``, ``auroc_val*`` and the recomputed test-fold figures
(``auroc_fold: test``), the manifest's ``threshold_rule`` and ``abnormal_rule``, the evaluation
summary recomputed on calibrated probabilities, and ``evaluation.recalibration`` recording what was
done (this module, the data, the rule, the figures). The ONNX file is never touched (its SHA-256 is
checked before and after). ``--report`` also writes every per-target figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fhir_mappings.calibration import Calibrator
from fhir_mappings.errors import EcglabError, InputError
from fhir_mappings.manifest import Manifest, find_manifest, load_manifest, sha256_file
from model_training.calibration import fit_calibrations
from model_training.config import EvalConfig
from model_training.data import LabDataset, open_dataset, parse_target
from model_training.evaluate import lab_categories, planted_targets, split_metrics
from model_training.metrics import brier_score, expected_calibration_error, group_columns
from model_training.quantize import ecg_probabilities, fold_inputs, fold_rows, open_session
from model_training.thresholds import canonical_rule, choose_thresholds

VAL_FOLD = 18
TEST_FOLD = 19
SOURCE = "model_training.recalibrate_export"


def _scores(
    session: Any, names: Sequence[str], dataset: LabDataset, rows: np.ndarray, manifest: Manifest
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(labels, raw window-averaged probabilities, targets) of ``rows``, for the manifest targets the DATASET has."""
    inputs = fold_inputs(dataset, rows, manifest)
    probs = ecg_probabilities(session, names, inputs)  # (N, n_labels) in manifest order
    order = [lab.target for lab in manifest.labels]
    columns = [order.index(t) for t in inputs.targets]
    return inputs.labels.astype(np.float64), probs[:, columns].astype(np.float64), inputs.targets


def _median(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None and np.isfinite(v)]
    return float(statistics.median(found)) if found else None


def _check(
    session: Any,
    names: Sequence[str],
    path: Path,
    manifest: Manifest,
    calibrations: Mapping[str, Any],
    bins: int,
) -> dict[str, Any]:
    """ECE and Brier before/after on every ECG of ``path`` (a DATASET the model never saw)."""
    dataset = open_dataset(path)
    y, raw, targets = _scores(session, names, dataset, np.arange(len(dataset.records)), manifest)
    calibrated = Calibrator([calibrations[t] for t in targets])(raw)
    planted = planted_targets(dataset.info)
    per_target = {
        t: {
            "ece_raw": _finite(expected_calibration_error(y[:, j], raw[:, j], bins)),
            "ece": _finite(expected_calibration_error(y[:, j], calibrated[:, j], bins)),
            "brier_raw": _finite(brier_score(y[:, j], raw[:, j])),
            "brier": _finite(brier_score(y[:, j], calibrated[:, j])),
            "n_labelled": int(np.isfinite(y[:, j]).sum()),
        }
        for j, t in enumerate(targets)
    }
    chosen = set(planted[0]) if planted else set(targets)
    return {
        "data": str(path),
        "generator": dataset.info.get("generator"),
        "n_records": len(dataset.records),
        "n_targets": len(targets),
        "planted_targets": len([t for t in targets if t in chosen]) if planted else None,
        "median_ece_planted_before": _median([per_target[t]["ece_raw"] for t in targets if t in chosen]),
        "median_ece_planted_after": _median([per_target[t]["ece"] for t in targets if t in chosen]),
        "median_ece_all_before": _median([e["ece_raw"] for e in per_target.values()]),
        "median_ece_all_after": _median([e["ece"] for e in per_target.values()]),
        "targets": per_target,
    }


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def recalibrate_export(
    model: Path,
    data: Path,
    *,
    check_data: Path | None = None,
    rule: str = "youden",
    bootstrap: int = 1000,
    seed: int = 0,
    threads: int = 0,
    now: datetime | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Recalibrate the newest manifest in ``model`` on ``data``; returns (manifest path, full report)."""
    rule = canonical_rule(rule)
    manifest_path = find_manifest(Path(model))
    manifest = load_manifest(manifest_path, verify_file=True)
    onnx_path = manifest_path.parent / manifest.onnx.file
    onnx_sha = sha256_file(onnx_path)
    targets_all = [lab.target for lab in manifest.labels]
    dataset = open_dataset(Path(data), targets=targets_all)
    session = open_session(onnx_path, threads)
    names = [spec.name for spec in manifest.onnx.inputs]
    cfg = EvalConfig(bootstrap=bootstrap, seed=seed, threshold_rule=rule)

    ys: dict[str, np.ndarray] = {}
    raw: dict[str, np.ndarray] = {}
    for split, fold in (("val", VAL_FOLD), ("test", TEST_FOLD)):
        ys[split], raw[split], targets = _scores(session, names, dataset, fold_rows(dataset, fold), manifest)
        if targets != targets_all:
            raise InputError(f"{data}: the DATASET lacks targets of the manifest")
    fits = fit_calibrations(ys["val"], raw["val"], targets_all, seed=seed)
    calibrations = {t: fits[t].calibration for t in targets_all}
    calibrator = Calibrator([calibrations[t] for t in targets_all])
    probs = {split: calibrator(p) for split, p in raw.items()}
    chosen = choose_thresholds(ys["val"], probs["val"], targets_all, rule)
    thresholds = {t: value for t, (value, _) in chosen.items()}
    methods = {t: fits[t].calibration.method for t in targets_all}
    categories = lab_categories(sorted({parse_target(t).label for t in targets_all}))
    splits: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for split in ("val", "test"):
        splits[split], results[split] = split_metrics(
            split, ys[split], probs[split], raw[split], targets_all, categories, thresholds, cfg, methods
        )
    planted = planted_targets(dataset.info)
    planted_set = set(planted[0]) if planted else set()
    groups = group_columns(
        targets_all, {t: "planted" if t in planted_set else "not planted (noise)" for t in targets_all}
    )
    test_targets = splits["test"]["targets"]
    figures: dict[str, Any] = {
        "test_median_ece_planted_before": _median(
            [test_targets[t]["ece_raw"] for t in targets_all if t in planted_set]
        ),
        "test_median_ece_planted_after": _median(
            [test_targets[t]["ece"] for t in targets_all if t in planted_set]
        ),
        "test_median_ece_all_before": _median([e["ece_raw"] for e in test_targets.values()]),
        "test_median_ece_all_after": _median([e["ece"] for e in test_targets.values()]),
        "methods": splits["val"]["calibration"]["all"]["methods"],
        "gate_targets_val_ci_low_above_0.70": sum(
            1 for e in splits["val"]["targets"].values() if e["ci_low"] is not None and e["ci_low"] > 0.70
        ),
    }
    check = _check(session, names, check_data, manifest, calibrations, cfg.ece_bins) if check_data else None
    if check is not None:
        figures |= {
            f"fresh_seed_{k}": check[k] for k in ("median_ece_planted_before", "median_ece_planted_after")
        }

    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    provenance = {
        "by": SOURCE,
        "created": stamp,
        "data": str(data),
        "generator": dataset.info.get("generator"),
        "folds": {"calibration_and_thresholds": VAL_FOLD, "reported": TEST_FOLD},
        "rule": rule,
        "bootstrap": bootstrap,
        "seed": seed,
        "onnx_sha256": onnx_sha,
        "check_data": str(check_data) if check_data else None,
        "figures": figures,
        "python": platform.python_version(),
    }
    abnormal_rule = (dataset.info.get("options") or {}).get("abnormal_rule", "strict")
    written = _write(
        manifest_path, splits, results, groups, fits, chosen, rule, abnormal_rule, provenance, cfg
    )
    if sha256_file(onnx_path) != onnx_sha:
        raise InputError(f"{onnx_path}: changed while recalibrating; the manifest may not match it")
    report = {
        "provenance": provenance,
        "splits": splits,
        "check": check,
        "calibration": {t: f.to_json() for t, f in fits.items()},
    }
    return written, report


def _write(
    manifest_path: Path,
    splits: Mapping[str, Any],
    results: Mapping[str, Any],
    groups: Mapping[str, list[int]],
    fits: Mapping[str, Any],
    chosen: Mapping[str, tuple[float, str]],
    rule: str,
    abnormal_rule: str,
    provenance: dict[str, Any],
    cfg: EvalConfig,
) -> Path:
    """Rewrite the manifest from its current JSON (re-read now) with the recomputed fields; validated first."""
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    val, test = splits["val"]["targets"], splits["test"]["targets"]
    for label in data["labels"]:
        target = label["target"]
        label.update(
            decision_threshold=chosen[target][0],
            threshold_rule=chosen[target][1],
            threshold_fold="val",
            calibration=fits[target].calibration.model_dump(mode="json"),
            auroc=test[target]["auroc"],
            ci_low=test[target]["ci_low"],
            ci_high=test[target]["ci_high"],
            n_pos=test[target]["n_pos"],
            n_neg=test[target]["n_neg"],
            auroc_fold="test",
            auroc_val=val[target]["auroc"],
            auroc_val_ci_low=val[target]["ci_low"],
            auroc_val_ci_high=val[target]["ci_high"],
        )
    evaluation = dict(data.get("evaluation") or {})
    keys = ("macro_auroc", "ci_low", "ci_high", "n_above", "n_significant")
    evaluation.update(
        threshold_rule=rule,
        threshold_fold="val",
        bootstrap=cfg.bootstrap,
        tasks={t: {k: v.get(k) for k in keys} for t, v in splits["test"]["tasks"].items()},
        micro=splits["test"]["micro"],
        calibration=splits["test"]["calibration"],
        recalibration=provenance,
    )
    if groups and evaluation.get("planted") is not None:
        evaluation["planted"] = {
            name: dict(
                zip(
                    ("macro_auroc", "ci_low", "ci_high"),
                    results["test"].macro(cols, cfg.confidence),
                    strict=True,
                )
            )
            | {"n_targets": len(cols)}
            for name, cols in groups.items()
        }
    data.update(evaluation=evaluation, threshold_rule=rule, abnormal_rule=abnormal_rule)
    Manifest.model_validate(data)
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(manifest_path)
    load_manifest(manifest_path, verify_file=True)
    return manifest_path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m model_training.recalibrate_export``; prints the headline figures."""
    parser = argparse.ArgumentParser(
        prog="python -m model_training.recalibrate_export", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--model", type=Path, required=True, help="folder (or manifest) of the exported model"
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="DATASET the model was trained on (folds 18, 19)"
    )
    parser.add_argument("--check-data", type=Path, help="a DATASET the model never saw (every ECG is scored)")
    parser.add_argument("--rule", default="youden", help="threshold rule: youden, sensitivity=X, ppv=X or f1")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the calibration folds")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = all cores)")
    parser.add_argument("--report", type=Path, help="write every figure as JSON here")
    args = parser.parse_args(argv)
    try:
        path, report = recalibrate_export(
            args.model,
            args.data,
            check_data=args.check_data,
            rule=args.rule,
            bootstrap=args.bootstrap,
            seed=args.seed,
            threads=args.threads,
        )
    except (EcglabError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"rewrote {path}")
    print(json.dumps(report["provenance"]["figures"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
