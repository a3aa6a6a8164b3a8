"""``ecglab evaluate``: test a training run as the paper does, plus calibration and thresholds.

Usage::

    ecglab evaluate --run RUN                                   # best checkpoint, 1000 bootstraps
    ecglab evaluate --run RUN --data DATASET --checkpoint last --bootstrap 200 --threshold-rule ppv=0.3

Beyond the paper, and chosen on the **validation fold only** (issue 15: the test fold never
chooses anything):

1. a calibration map per target (:mod:`model_training.calibration`: temperature, Platt or
   isotonic by cross-validated log-loss, ``--calibration`` to fix one) fitted on the validation
   fold's raw window-averaged probabilities; every figure below uses the **calibrated**
   probabilities, as the exported model serves them;
2. a decision threshold per target on the calibrated validation probabilities by the named rule
   (``--threshold-rule``: ``youden`` by default, ``sensitivity=X``, ``ppv=X`` or ``f1``;
   :mod:`model_training.thresholds`); the service flags a target when its probability reaches it.

For the validation fold (18) and the test fold (19) (method.md §3.5, §3.6):

* per-target AUROC on the non-missing labels with a 95 % empirical bootstrap CI (1000 resamples
  of whole ECGs; ``CI = point + percentile(boot - point, [2.5, 97.5])``), the positive and
  negative counts, ECE and Brier score before (``*_raw``) and after calibration, and the
  threshold's sensitivity, specificity and PPV;
* macro AUROC (undefined AUROC counted as 0.5) with CI per task (est, mon30, mon60, mon120), over
  all targets, and per organ-system category (from ``fhir_mappings``); micro AUROC; ECE and Brier
  before/after per task (``calibration``);
* the paper's headline criterion per task: how many targets (and distinct labs) have
  AUROC > 0.70 and a CI lower bound > 0.70;
* on the test fold, the same per subgroup of sex and age band
  (:func:`model_training.subgroups.subgroup_metrics`, ``metrics.json["subgroups"]``).

Writes to RUN: ``metrics.json``, ``report.md`` + ``figures/*.png`` (reliability diagrams after
calibration), ``report.html`` (self-contained), ``predictions_{test,val}.parquet`` (study_id + one
calibrated probability column per target) and ``predictions_{test,val}_raw.parquet`` (the raw
network outputs, from which calibration or thresholds can be re-derived without the model).
Metadata is encoded with the medians stored in the checkpoint, never recomputed, exactly as the
exported model will see it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from fhir_mappings.calibration import Calibrator
from fhir_mappings.errors import InputError
from fhir_mappings.manifest import MetadataSpec
from model_training.calibration import fit_calibrations, summarise_calibration
from model_training.checkpoint import load_checkpoint
from model_training.config import EvalConfig, add_config_arguments, overrides_from_args, resolve, to_dict
from model_training.data import (
    EcgLabWindows,
    LabDataset,
    dataset_provenance,
    encode_features,
    open_dataset,
    parse_target,
)
from model_training.distributed import resolve_device
from model_training.metrics import (
    BootstrapResult,
    bootstrap_auroc,
    brier_score,
    expected_calibration_error,
    group_columns,
    roc_auc,
)
from model_training.model import FusionModel
from model_training.predict import predict
from model_training.reports import (
    TASK_TITLES,
    paper_comparison,
    plot_auroc_bars,
    plot_reliability,
    plot_roc_curves,
    write_html,
    write_markdown,
)
from model_training.subgroups import age_band, sex_name, subgroup_metrics
from model_training.thresholds import canonical_rule, choose_thresholds, operating_point

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ecglab evaluate``; every EvalConfig key is also a ``--key=value`` option."""
    parser.add_argument("--run", type=Path, required=True, help="RUN directory written by 'ecglab train'")
    parser.add_argument(
        "--data", type=Path, help="DATASET directory (default: the one the run was trained on)"
    )
    parser.add_argument("--config", type=Path, help="YAML or JSON file of evaluation config keys")
    parser.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="auto", help="where to run the model"
    )
    add_config_arguments(parser, EvalConfig)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ecglab evaluate``; returns the exit status."""
    cfg = resolve(EvalConfig, args.config, overrides_from_args(args))
    metrics = evaluate(args.run, cfg, data=args.data, device=resolve_device(args.device))
    test = metrics["splits"]["test"]
    summary = ", ".join(f"{task} {t['macro_auroc']:.3f}" for task, t in test["tasks"].items())
    print(
        f"ecglab evaluate: test macro AUROC {test['all']['macro_auroc']:.3f} ({summary}); "
        f"reports in {args.run / 'report.html'}",
        file=sys.stderr,
    )
    return 0


# --------------------------------------------------------------------------------------------
# Look-ups: organ system and planted targets
# --------------------------------------------------------------------------------------------
def lab_categories(labels: Sequence[str]) -> dict[str, str]:
    """Organ-system category of each MIMIC lab label from ``fhir_mappings`` ('other' if unknown)."""
    try:
        from fhir_mappings import load_mappings
    except ImportError:
        log.warning("fhir_mappings.load_mappings is not available; every lab is categorised 'other'")
        return dict.fromkeys(labels, "other")
    mappings = load_mappings()
    out: dict[str, str] = {}
    for label in labels:
        spec = mappings.lab_by_mimic_label(label)
        out[label] = spec.category if spec is not None else "other"
    return out


def planted_targets(info: Mapping[str, Any]) -> tuple[list[str], str] | None:
    """Targets the synthetic generator planted signal in, and where that list came from.

    ``dataset.json`` of a synthetic DATASET carries ``generator: {ground_truth: PATH, ...}``
    (written by ``ecglab preprocess`` when the source root has ``ground_truth.json``). A list
    under ``generator.planted_targets`` is used directly; otherwise the ground-truth file is read.
    Returns None for real data or when the file has gone.
    """
    generator = info.get("generator")
    if not isinstance(generator, Mapping):
        return None
    if isinstance(generator.get("planted_targets"), list):
        return [str(t) for t in generator["planted_targets"]], "dataset.json generator.planted_targets"
    path = generator.get("ground_truth")
    if not isinstance(path, str) or not Path(path).is_file():
        log.warning(
            "dataset.json names a synthetic generator but its ground_truth.json (%s) is not readable", path
        )
        return None
    try:
        truth = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: ground truth named by dataset.json is not readable JSON ({exc})") from exc
    planted = truth.get("planted_targets")
    if not isinstance(planted, list):
        raise InputError(f"{path}: field 'planted_targets' is missing or not a list")
    return [str(t) for t in planted], Path(path).name


def planted_oracle(
    dataset: Any, rows: np.ndarray, y: np.ndarray, targets: Sequence[str], is_planted: Mapping[str, bool]
) -> dict[str, Any] | None:
    """Test-fold AUROC of the generator's noise-free planted rules (the ceiling for any model).

    None for real data, or when the ground truth has no per-record drivers to score.
    """
    generator = dataset.info.get("generator")
    path = generator.get("ground_truth") if isinstance(generator, Mapping) else None
    if not isinstance(path, str) or not Path(path).is_file():
        return None
    from model_training.synthetic import oracle_scores

    truth = json.loads(Path(path).read_text(encoding="utf-8"))
    if "rules" not in truth or "records" not in truth:
        return None
    scores = oracle_scores(truth, dataset.records["study_id"].to_numpy()[rows])
    per_target: dict[str, float | None] = {}
    for j, target in enumerate(targets):
        name = parse_target(target)
        if is_planted[target] and name.label in scores:
            sign = 1.0 if name.direction == "high" else -1.0
            per_target[target] = _num(roc_auc(y[:, j], sign * scores[name.label]))
    values = [v for v in per_target.values() if v is not None]
    return {"macro_auroc": float(np.mean(values)) if values else None, "per_target": per_target}


# --------------------------------------------------------------------------------------------
# Metrics of one split
# --------------------------------------------------------------------------------------------
def _num(value: float) -> float | None:
    """NaN/None → None for JSON, else the float."""
    return None if value is None or not math.isfinite(value) else float(value)


def _macro_entry(result: BootstrapResult, columns: Sequence[int], confidence: float) -> dict[str, Any]:
    """Macro AUROC (NaN counted 0.5) with CI over ``columns``, as a JSON-able dict."""
    point, low, high = result.macro(columns, confidence)
    return {"macro_auroc": _num(point), "ci_low": _num(low), "ci_high": _num(high), "n_targets": len(columns)}


def split_metrics(
    split: str,
    y: np.ndarray,
    probs: np.ndarray,
    raw: np.ndarray,
    targets: Sequence[str],
    categories: Mapping[str, str],
    thresholds: Mapping[str, float],
    cfg: EvalConfig,
    methods: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], BootstrapResult]:
    """All numbers of one split: per target, per task, per category, micro and headline counts.

    ``probs`` are the calibrated probabilities every figure uses; ``raw`` the network's outputs,
    for the before-calibration ECE and Brier score; ``methods`` names each target's calibration map.
    """
    result = bootstrap_auroc(y, probs, n_boot=cfg.bootstrap, seed=cfg.seed)
    lows, highs = result.target_ci(cfg.confidence)
    per_target: dict[str, dict[str, Any]] = {}
    for j, target in enumerate(targets):
        name = parse_target(target)
        column = y[:, j]
        point = operating_point(column, probs[:, j], thresholds[target])
        per_target[target] = {
            "auroc": _num(result.point[j]),
            "ci_low": _num(lows[j]),
            "ci_high": _num(highs[j]),
            "n_pos": int(np.nansum(column == 1.0)),
            "n_neg": int(np.nansum(column == 0.0)),
            "task": name.task,
            "label": name.label,
            "direction": name.direction,
            "category": categories.get(name.label, "other"),
            "split": split,
            "calibration": (methods or {}).get(target, "identity"),
            "ece": _num(expected_calibration_error(column, probs[:, j], cfg.ece_bins)),
            "ece_raw": _num(expected_calibration_error(column, raw[:, j], cfg.ece_bins)),
            "brier": _num(brier_score(column, probs[:, j])),
            "brier_raw": _num(brier_score(column, raw[:, j])),
            "decision_threshold": float(thresholds[target]),
            "sensitivity": _num(point.sensitivity),
            "specificity": _num(point.specificity),
            "ppv": _num(point.ppv),
        }
    thr = cfg.headline_auroc

    def headline(columns: Sequence[int]) -> dict[str, Any]:
        """The paper's criterion over ``columns``: AUROC > thr, and CI lower bound > thr too."""
        entries = [per_target[targets[j]] for j in columns]
        above = [e for e in entries if e["auroc"] is not None and e["auroc"] > thr]
        significant = [e for e in above if e["ci_low"] is not None and e["ci_low"] > thr]
        return {
            "n_above": len(above),
            "n_significant": len(significant),
            "n_labs_significant": len({e["label"] for e in significant}),
            "significant_targets": [f"{e['label']}_{e['direction']}_{e['task']}" for e in significant],
        }

    tasks = group_columns(targets, {t: parse_target(t).task for t in targets})
    cats = group_columns(targets, {t: categories.get(parse_target(t).label, "other") for t in targets})
    all_cols = list(range(len(targets)))
    micro, micro_low, micro_high = result.micro(cfg.confidence)
    metrics = {
        "n_records": len(y),
        "targets": per_target,
        "tasks": {
            task: {**_macro_entry(result, cols, cfg.confidence), **headline(cols)}
            for task, cols in sorted(tasks.items(), key=lambda kv: list(TASK_TITLES).index(kv[0]))
        },
        "categories": {c: _macro_entry(result, cols, cfg.confidence) for c, cols in sorted(cats.items())},
        "all": {**_macro_entry(result, all_cols, cfg.confidence), **headline(all_cols)},
        "micro": {"auroc": _num(micro), "ci_low": _num(micro_low), "ci_high": _num(micro_high)},
        "calibration": {
            **{
                task: summarise_calibration([per_target[targets[j]] for j in cols])
                for task, cols in sorted(tasks.items(), key=lambda kv: list(TASK_TITLES).index(kv[0]))
            },
            "all": summarise_calibration(list(per_target.values())),
        },
    }
    return metrics, result


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def _load_model(ckpt: Mapping[str, Any], device: torch.device) -> FusionModel:
    """Rebuild the model from the checkpoint's model_args and load its weights (eval mode)."""
    model = FusionModel.from_args(ckpt["model_args"])
    model.load_state_dict(ckpt["model_state"])
    return model.to(device).eval()


def _split_predictions(
    model: FusionModel,
    dataset: LabDataset,
    rows: np.ndarray,
    cat: np.ndarray,
    cont: np.ndarray,
    window: int,
    cfg: EvalConfig,
    device: torch.device,
) -> np.ndarray:
    """Window-averaged probabilities (n, K) of one split's records, in row order."""
    ds = EcgLabWindows(dataset.ecg, rows, cat, cont, dataset.labels, window, train=False)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False)
    got_rows, probs = predict(model, loader, device, window)
    assert np.array_equal(got_rows, rows), "prediction order must follow the split's rows"
    return probs


def evaluate(
    run_dir: Path, cfg: EvalConfig, data: Path | None = None, device: torch.device | None = None
) -> dict[str, Any]:
    """Evaluate ``run_dir``'s checkpoint on the val and test folds; write every output; return metrics."""
    started = time.time()
    device = device or torch.device("cpu")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    ckpt = load_checkpoint(run_dir / f"checkpoint_{cfg.checkpoint}.pt")
    train_cfg = ckpt["config"]
    targets: list[str] = list(ckpt["labels"])
    data_path = Path(data) if data is not None else Path(ckpt["provenance"]["path"])
    dataset = open_dataset(data_path, targets=targets)
    provenance = dataset_provenance(dataset)
    saved_hashes = {k: v.get("digest") for k, v in ckpt["provenance"].get("hashes", {}).items()}
    differs = any(provenance["hashes"].get(k, {}).get("digest") != v for k, v in saved_hashes.items())
    if differs:
        log.warning("evaluating on %s, which differs from the DATASET the run was trained on", data_path)

    spec = MetadataSpec.model_validate(ckpt["features"]["metadata_spec"])
    cat, cont = encode_features(dataset.metadata, spec)
    model = _load_model(ckpt, device)
    window = int(ckpt["ecg"]["window"])
    folds = {"val": int(train_cfg["val_fold"]), "test": int(train_cfg["test_fold"])}
    rows = {split: dataset.rows_in([fold]) for split, fold in folds.items()}
    for split, split_rows in rows.items():
        if len(split_rows) == 0:
            raise InputError(f"{data_path / 'records.parquet'}: no record in the {split} fold {folds[split]}")
    raw = {
        split: _split_predictions(model, dataset, r, cat, cont, window, cfg, device)
        for split, r in rows.items()
    }
    ys = {split: dataset.labels[r] for split, r in rows.items()}

    # Calibration and thresholds: the validation fold only.
    fits = fit_calibrations(
        ys["val"],
        raw["val"],
        targets,
        method=cfg.calibration,
        isotonic_min_class=cfg.isotonic_min_class,
        seed=cfg.seed,
    )
    calibrator = Calibrator([fits[t].calibration for t in targets])
    probs = {split: calibrator(p) for split, p in raw.items()}
    chosen = choose_thresholds(ys["val"], probs["val"], targets, cfg.threshold_rule)
    thresholds = {t: threshold for t, (threshold, _) in chosen.items()}
    methods = {t: fits[t].calibration.method for t in targets}

    categories = lab_categories(sorted({parse_target(t).label for t in targets}))
    splits: dict[str, Any] = {}
    results: dict[str, BootstrapResult] = {}
    for split in ("val", "test"):
        splits[split], results[split] = split_metrics(
            split, ys[split], probs[split], raw[split], targets, categories, thresholds, cfg, methods
        )
        splits[split]["fold"] = folds[split]
        for target in targets:
            splits[split]["targets"][target]["threshold_source"] = chosen[target][1]

    planted = planted_targets(dataset.info)
    metrics: dict[str, Any] = {
        "format": "ecglab-metrics",
        "run": str(run_dir),
        "checkpoint": cfg.checkpoint,
        "epoch": int(ckpt["epoch"]),
        "eval_config": to_dict(cfg),
        "bootstrap": cfg.bootstrap,
        "seed": cfg.seed,
        "confidence": cfg.confidence,
        "threshold_rule": canonical_rule(cfg.threshold_rule),
        "threshold_fold": "val",
        "headline_auroc": cfg.headline_auroc,
        "n_windows": int(ckpt["ecg"]["n_windows"]),
        "data": {
            "path": str(data_path),
            "differs_from_training": differs,
            "trained_on_synthetic": isinstance(
                ckpt["provenance"].get("dataset_json", {}).get("generator"), Mapping
            ),
        },
        "splits": splits,
        "calibration": {
            "fold": "val",
            "method": cfg.calibration,
            "isotonic_min_class": cfg.isotonic_min_class,
            "targets": {t: fits[t].to_json() for t in targets},
        },
    }
    test_meta = dataset.metadata.iloc[rows["test"]]
    metrics["subgroups"] = subgroup_metrics(
        ys["test"],
        probs["test"],
        {
            "sex": [sex_name(v) for v in test_meta["sex"].to_numpy(dtype=np.float64)],
            "age_band": [age_band(v) for v in test_meta["age"].to_numpy(dtype=np.float64)],
        },
        targets=targets,
        thresholds=thresholds,
        n_boot=cfg.bootstrap,
        confidence=cfg.confidence,
        seed=cfg.seed,
    )
    if planted is not None:
        names, source = planted
        is_planted = {t: t in set(names) for t in targets}
        groups = group_columns(
            targets, {t: "planted" if is_planted[t] else "not planted (noise)" for t in targets}
        )
        metrics["planted"] = {
            "source": source,
            "targets": [t for t in targets if is_planted[t]],
            "groups": {g: _macro_entry(results["test"], cols, cfg.confidence) for g, cols in groups.items()},
            "per_target": {t: splits["test"]["targets"][t]["auroc"] for t in targets if is_planted[t]},
            "calibration": {
                split: {
                    group: summarise_calibration([splits[split]["targets"][targets[j]] for j in cols])
                    for group, cols in groups.items()
                }
                for split in ("val", "test")
            },
        }
        oracle = planted_oracle(dataset, rows["test"], ys["test"], targets, is_planted)
        if oracle is not None:
            metrics["planted"]["oracle"] = oracle
    metrics["paper_comparison"] = paper_comparison(metrics)

    for split in ("val", "test"):
        for suffix, values in (("", probs[split]), ("_raw", raw[split])):
            frame = pd.DataFrame(values.astype(np.float32), columns=targets)
            frame.insert(0, "study_id", dataset.records["study_id"].to_numpy()[rows[split]])
            frame.to_parquet(run_dir / f"predictions_{split}{suffix}.parquet", index=False)

    figures = _write_figures(run_dir, ys["test"], probs["test"], targets, splits["test"], cfg)
    metrics["seconds"] = round(time.time() - started, 2)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    write_markdown(metrics, figures, run_dir / "report.md")
    write_html(metrics, figures, run_dir / "report.html")
    return metrics


def _write_figures(
    run_dir: Path,
    y: np.ndarray,
    probs: np.ndarray,
    targets: Sequence[str],
    test: Mapping[str, Any],
    cfg: EvalConfig,
) -> dict[str, Path]:
    """ROC curves, AUROC bars with CIs and reliability diagrams (calibrated) per task (test fold)."""
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    figures: dict[str, Path] = {}
    per_target = test["targets"]
    aurocs = {
        t: (per_target[t]["auroc"] if per_target[t]["auroc"] is not None else math.nan) for t in targets
    }
    eces = {t: (per_target[t]["ece"] if per_target[t]["ece"] is not None else math.nan) for t in targets}
    path = fig_dir / "auroc_bars.png"
    plot_auroc_bars(
        [{"target": t, **per_target[t]} for t in targets], "Test AUROC per target", path, cfg.headline_auroc
    )
    figures["AUROC per target with 95% bootstrap CI (test)"] = path
    for task, cols in group_columns(targets, {t: parse_target(t).task for t in targets}).items():
        names = [targets[j] for j in cols]
        path = fig_dir / f"roc_{task}.png"
        plot_roc_curves(y[:, cols], probs[:, cols], names, aurocs, f"ROC, {TASK_TITLES[task]} (test)", path)
        figures[f"ROC curves, {TASK_TITLES[task]} (test)"] = path
        path = fig_dir / f"reliability_{task}.png"
        plot_reliability(
            y[:, cols],
            probs[:, cols],
            names,
            eces,
            f"Reliability after calibration, {TASK_TITLES[task]} (test)",
            path,
            n_bins=cfg.ece_bins,
        )
        figures[f"Reliability after calibration, {TASK_TITLES[task]} (test)"] = path
    return figures
