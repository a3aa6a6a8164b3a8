"""``ecglab recalibrate``: a new model version whose calibration and thresholds fit the site's own patients.

Usage::

    ecglab recalibrate --model models --from-monitor monitor/2026-01 --rule ppv=0.3 --out models-site

A model calibrated and thresholded on the training centre's validation fold rarely gives the same
probabilities, PPV or sensitivity elsewhere. This command reads the ``outcomes.csv`` of an ``ecglab
monitor`` run (the audited probabilities joined with the outcomes that followed) and, for every
target with at least ``--min-class`` observed abnormal *and* normal outcomes:

1. **Calibration.** The audit stores the probabilities the service served, i.e. already calibrated
   by the parent's map ``f`` (not the raw network output). A local map ``g`` is fitted on those
   with the training code's own choice (:func:`fhir_mappings.calibration.fit_calibration`:
   temperature, Platt or isotonic by cross-validated log-loss, fold ``local``), and the new
   manifest stores the one map ``g∘f`` over the raw output
   (:func:`fhir_mappings.calibration.compose`), which is what the runtime applies.
2. **Threshold.** On the locally calibrated probabilities (``g∘f`` evaluated at a raw value that
   ``f`` maps to each served probability, :func:`fhir_mappings.calibration.preimage`, i.e. what the
   new version serves for that patient) a new threshold is chosen by ``--rule`` ("positive when
   probability >= threshold", candidates = those probabilities):

   * ``youden``: maximise sensitivity + specificity − 1;
   * ``sensitivity=X``: the highest threshold whose sensitivity is at least X;
   * ``ppv=X``: the most sensitive threshold whose PPV is at least X (PPV is not monotonic in the
     threshold, so every candidate is checked).

   Ties go to the higher threshold (fewer alerts); the label records ``threshold_fold: local`` and
   ``threshold_rule: local:<rule>``. Where no threshold reaches the rule, the parent's threshold is
   kept, carried through the local map (``g`` of it, which flags every patient the parent's flagged).

Targets with fewer outcomes keep the parent's calibration and threshold unchanged; the provenance
and the command's output name them. The manifest-level ``threshold_rule`` becomes ``--rule`` when
every target was re-derived, stays the parent's when none was, and is cleared (each label says its
own) when they are mixed.

It writes a **new version** to ``--out``: the ONNX file and every variant the manifest lists (e.g.
the int8 graph ``ECGLAB_MODEL_VARIANT=auto`` may pick) copied under ``ecglab-<version>.onnx`` and
``ecglab-<version>.<variant>.onnx``, each copy's SHA-256 checked against the parent's manifest, and
a new manifest, written last, with ``evaluation.local_recalibration`` recording the parent model, the
monitor report it came from (period, generation time, SHA-256 of ``outcomes.csv``), the rule, the
variants copied and every target's old and new threshold and calibration with the local log-loss
before and after. The original model folder is only read; existing files are never overwritten.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fhir_mappings.calibration import Calibration, compose, fit_calibration, log_loss, preimage
from fhir_mappings.errors import InputError
from fhir_mappings.manifest import MANIFEST_SUFFIX, Manifest, find_manifest, load_manifest, sha256_file

RULE_PATTERN = re.compile(r"^(youden|ppv=(0(\.\d+)?|1(\.0+)?)|sensitivity=(0(\.\d+)?|1(\.0+)?))$")
CALIBRATION_NOTE = (
    "refitted per target on the local outcomes (fold 'local', chosen by cross-validated log-loss among "
    "temperature, Platt and isotonic); the audit stores the parent's calibrated probabilities, not the raw "
    "network output, so the local map is fitted on those and composed with the parent's map into one map "
    "over the raw output; targets with too few local outcomes keep the parent's calibration and threshold"
)
RECALIBRATED = "recalibrated"
"""Status of a target whose calibration was refitted and threshold re-derived by the rule."""


@dataclass(frozen=True)
class Choice:
    """The threshold chosen for one target and what it gives on the local outcomes."""

    threshold: float
    sensitivity: float
    specificity: float
    ppv: float


@dataclass(frozen=True)
class _Rule:
    text: str
    name: str
    value: float | None
    min_class: int


def parse_rule(rule: str) -> tuple[str, float | None]:
    """``('youden', None)``, ``('ppv', 0.3)`` or ``('sensitivity', 0.8)``; :class:`InputError` otherwise."""
    text = rule.strip()
    if not RULE_PATTERN.fullmatch(text):
        raise InputError(f"--rule: expected youden, ppv=X or sensitivity=X with 0 <= X <= 1, got {rule!r}")
    if text == "youden":
        return "youden", None
    name, value = text.split("=", 1)
    return name, float(value)


def choose_threshold(y: np.ndarray, p: np.ndarray, rule: str, target: float | None) -> Choice | None:
    """The threshold ``rule`` picks on 1/0 outcomes ``y`` and probabilities ``p`` (``None``: unreachable)."""
    y = np.asarray(y) == 1
    p = np.asarray(p, dtype=np.float64)
    candidates = np.unique(p)[::-1]  # descending: the first qualifying one is the highest threshold
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    best: Choice | None = None
    best_score = -math.inf
    for t in candidates:
        flagged = p >= t
        tp = int((flagged & y).sum())
        fp = int((flagged & ~y).sum())
        sens = tp / n_pos
        spec = 1.0 - fp / n_neg
        ppv = tp / (tp + fp) if tp + fp else math.nan
        choice = Choice(float(t), sens, spec, ppv)
        if rule == "youden":
            score = sens + spec - 1.0
            if score > best_score + 1e-12:
                best, best_score = choice, score
        elif rule == "sensitivity":
            assert target is not None
            if sens >= target - 1e-12:
                return choice
        else:
            assert target is not None
            if not math.isnan(ppv) and ppv >= target - 1e-12 and sens > best_score + 1e-12:
                best, best_score = choice, sens
    return best


def read_outcomes(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per target: (outcomes, probabilities) of the rows whose outcome was observed."""
    if not path.is_file():
        raise InputError(f"{path}: not found (expected the outcomes.csv an 'ecglab monitor' run writes)")
    found: dict[str, tuple[list[int], list[float]]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"target", "probability", "outcome"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{path}: columns {sorted(missing)} missing; not a monitor outcomes.csv")
        for row in reader:
            if row["outcome"] == "":
                continue
            ys, ps = found.setdefault(row["target"], ([], []))
            ys.append(int(row["outcome"]))
            ps.append(float(row["probability"]))
    return {
        t: (np.array(ys, dtype=np.int64), np.array(ps, dtype=np.float64)) for t, (ys, ps) in found.items()
    }


def recalibrate(
    model: Path,
    monitor_dir: Path,
    rule: str,
    out: Path,
    *,
    version: str | None = None,
    min_class: int = 10,
    now: datetime | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write the new version; returns (its manifest path, the recorded provenance)."""
    rule_name, rule_value = parse_rule(rule)
    parent_path = find_manifest(model)
    parent = load_manifest(parent_path, verify_file=True)
    report = _read_report(monitor_dir / "report.json", parent.onnx.sha256, parent_path)
    outcomes_path = monitor_dir / "outcomes.csv"
    outcomes = read_outcomes(outcomes_path)
    stamp = (now or datetime.now(UTC)).astimezone(UTC)
    new_version = version or f"{parent.version}+local.{stamp:%Y%m%d%H%M%S}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]*", new_version):
        raise InputError(f"--version: {new_version!r} may hold only letters, digits and . + _ -")
    copies = _planned_copies(parent_path, parent, out, new_version)
    manifest_out = out / f"ecglab-{new_version}{MANIFEST_SUFFIX}"
    for path in [manifest_out, *(dst for _, dst, _ in copies.values())]:
        if path.exists():
            raise InputError(f"{path} exists; choose another --version or --out (nothing is overwritten)")

    data = parent.model_dump(mode="json")
    targets = _recalibrate_labels(data["labels"], outcomes, _Rule(rule, rule_name, rule_value, min_class))
    statuses = [entry["status"] for entry in targets.values()]
    if all(status == RECALIBRATED for status in statuses):
        data["threshold_rule"] = rule
    elif any(status == RECALIBRATED for status in statuses):
        data["threshold_rule"] = None  # mixed: every label names its own rule
    provenance = {
        "parent": {
            "version": parent.version,
            "manifest": parent_path.name,
            "manifest_sha256": sha256_file(parent_path),
            "onnx_sha256": parent.onnx.sha256,
        },
        "source": {
            "monitor_dir": str(monitor_dir),
            "report_generated_at": report.get("generated_at"),
            "period": report.get("period"),
            "outcomes_sha256": sha256_file(outcomes_path),
        },
        "rule": rule,
        "min_class": min_class,
        "created": stamp.isoformat(timespec="seconds"),
        "calibration": CALIBRATION_NOTE,
        "kept_parent": sorted(t for t, e in targets.items() if e["status"].startswith("kept")),
        "variants": {
            name: {"file": dst.name, "sha256": sha}
            for name, (_, dst, sha) in copies.items()
            if name != "fp32"
        },
        "targets": targets,
    }
    data.update(version=new_version, created=stamp.strftime("%Y-%m-%dT%H:%M:%SZ"))
    data["onnx"]["file"] = copies["fp32"][1].name
    for name in parent.variants:
        data["variants"][name]["file"] = copies[name][1].name
    data["evaluation"] = {**data.get("evaluation", {}), "local_recalibration": provenance}
    manifest = Manifest.model_validate(data)
    out.mkdir(parents=True, exist_ok=True)
    _copy_verified(copies)
    manifest_out.write_text(json.dumps(manifest.model_dump(mode="json"), indent=1) + "\n", encoding="utf-8")
    load_manifest(manifest_out, verify_file=True)
    return manifest_out, provenance


def _read_report(report_path: Path, onnx_sha256: str, parent_path: Path) -> dict[str, Any]:
    """The monitor's ``report.json``, refused unless it is about the parent model."""
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{report_path}: not a readable monitor report ({exc})") from None
    if not isinstance(report, dict):
        raise InputError(f"{report_path}: not a monitor report (a JSON object is expected)")
    report_sha = (report.get("model") or {}).get("sha256")
    if report_sha != onnx_sha256:
        raise InputError(
            f"{report_path}: the monitor report is for model sha256 {str(report_sha)[:12]}…, "
            f"not {onnx_sha256[:12]}… in {parent_path}"
        )
    return report


def _planned_copies(
    parent_path: Path, parent: Manifest, out: Path, new_version: str
) -> dict[str, tuple[Path, Path, str]]:
    """``fp32`` and every variant: (source, destination, SHA-256 the manifest records).

    A variant file that is missing or does not match its recorded SHA-256 stops the command before
    anything is written: the new version would otherwise list a graph it cannot serve.
    """
    copies = {
        "fp32": (
            parent_path.parent / parent.onnx.file,
            out / f"ecglab-{new_version}.onnx",
            parent.onnx.sha256,
        )
    }
    for name, spec in parent.variants.items():
        source = parent_path.parent / spec.file
        if not source.is_file():
            raise InputError(
                f"{parent_path}: variant file {spec.file} (variants.{name}) is missing; nothing written"
            )
        if sha256_file(source) != spec.sha256:
            raise InputError(
                f"{source}: sha256 does not match variants.{name} in {parent_path.name}; nothing written"
            )
        copies[name] = (source, out / f"ecglab-{new_version}.{name}.onnx", spec.sha256)
    return copies


def _copy_verified(copies: Mapping[str, tuple[Path, Path, str]]) -> None:
    """Copy every file and check each copy's SHA-256; on a mismatch remove all copies made."""
    written: list[Path] = []
    for source, destination, sha in copies.values():
        shutil.copyfile(source, destination)
        written.append(destination)
        if sha256_file(destination) != sha:
            for path in written:
                path.unlink(missing_ok=True)
            raise InputError(f"{destination}: the copy's SHA-256 differs from the parent's; nothing written")


def _recalibrate_labels(
    labels: Sequence[dict[str, Any]], outcomes: Mapping[str, tuple[np.ndarray, np.ndarray]], rule: _Rule
) -> dict[str, Any]:
    """Update ``labels`` (manifest dicts) in place; returns each target's record for the provenance."""
    record: dict[str, Any] = {}
    for index, label in enumerate(labels):
        target = label["target"]
        old = float(label["decision_threshold"])
        parent_map = Calibration.model_validate(label["calibration"]) if label.get("calibration") else None
        parent_method = parent_map.method if parent_map is not None else None
        y, q = outcomes.get(target, (np.zeros(0, dtype=np.int64), np.zeros(0)))
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        entry: dict[str, Any] = {"old": old, "new": old, "n_pos": n_pos, "n_neg": n_neg}
        if n_pos < rule.min_class or n_neg < rule.min_class:
            entry["status"] = (
                f"kept: fewer than {rule.min_class} abnormal or normal local outcomes "
                "(the parent's calibration and threshold)"
            )
            entry["calibration"] = {"parent": parent_method, "local": None, "stored": parent_method}
            record[target] = entry
            continue
        fit = fit_calibration(y, q, fold="local", seed=index)
        stored = compose(fit.calibration, parent_map)
        served = stored.apply(preimage(parent_map, q))  # what the new version serves these patients
        label["calibration"] = stored.model_dump(mode="json")
        entry["calibration"] = {
            "parent": parent_method,
            "local": fit.calibration.method,
            "stored": stored.method,
            "reason": fit.reason,
            "cv_log_loss": fit.cv_log_loss,
            "log_loss_parent": log_loss(y, q),
            "log_loss_local": log_loss(y, served),
        }
        choice = choose_threshold(y, served, rule.name, rule.value)
        if choice is None:
            carried = float(stored.apply(preimage(parent_map, np.array([old])))[0])
            label["decision_threshold"] = carried
            entry.update(
                new=carried,
                status=f"calibrated; threshold kept: no threshold reaches {rule.text} (the parent's, "
                "carried through the local calibration)",
            )
        else:
            label["decision_threshold"] = choice.threshold
            label["threshold_rule"] = f"local:{rule.text}"
            label["threshold_fold"] = "local"  # chosen on the site's outcomes, not the validation fold
            entry.update(
                new=choice.threshold,
                status=RECALIBRATED,
                sensitivity=choice.sensitivity,
                specificity=choice.specificity,
                ppv=None if math.isnan(choice.ppv) else choice.ppv,
            )
        record[target] = entry
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags."""
    parser.add_argument(
        "--model", type=Path, required=True, help="folder (or manifest) of the deployed model"
    )
    parser.add_argument(
        "--from-monitor",
        type=Path,
        required=True,
        help="output folder of an 'ecglab monitor' run for that model",
    )
    parser.add_argument(
        "--rule", required=True, help="youden, ppv=X (e.g. ppv=0.3) or sensitivity=X (e.g. sensitivity=0.8)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the new version (created)")
    parser.add_argument(
        "--version", help="version of the new model (default: <parent>+local.<UTC timestamp>)"
    )
    parser.add_argument(
        "--min-class",
        type=int,
        default=10,
        help="abnormal and normal local outcomes a target needs to be recalibrated (default 10)",
    )


def run(args: argparse.Namespace) -> int:
    """Recalibrate and print what changed, and which targets kept the parent's calibration and threshold."""
    if args.min_class < 1:
        raise InputError("--min-class must be at least 1")
    manifest_path, provenance = recalibrate(
        args.model, args.from_monitor, args.rule, args.out, version=args.version, min_class=args.min_class
    )
    targets: dict[str, Any] = provenance["targets"]
    changed = {t: e for t, e in targets.items() if e["status"] == RECALIBRATED}
    calibrated_only = sorted(t for t, e in targets.items() if e["status"].startswith("calibrated"))
    copied = [manifest_path.name.replace(MANIFEST_SUFFIX, ".onnx")]
    copied += [v["file"] for v in provenance["variants"].values()]
    print(f"wrote {manifest_path} (+ {', '.join(copied)})")
    print(
        f"{len(changed)} of {len(targets)} target(s) recalibrated with {args.rule} "
        "(calibration refitted on local outcomes, threshold re-derived)"
    )
    for target, entry in changed.items():
        cal = entry["calibration"]
        print(
            f"  {target}: threshold {entry['old']:.4f} -> {entry['new']:.4f}; calibration {cal['parent']} -> "
            f"{cal['stored']} (local {cal['local']}); local log-loss {cal['log_loss_parent']:.4f} -> "
            f"{cal['log_loss_local']:.4f} (n_pos {entry['n_pos']}, n_neg {entry['n_neg']})"
        )
    if calibrated_only:
        print(
            f"{len(calibrated_only)} target(s) calibrated locally but no threshold reaches {args.rule}; "
            f"the parent's threshold carried through: {', '.join(calibrated_only)}"
        )
    kept = provenance["kept_parent"]
    if kept:
        print(
            f"{len(kept)} target(s) kept the parent's calibration and threshold (fewer than "
            f"{args.min_class} abnormal or normal local outcomes): {', '.join(kept)}"
        )
    print(f"calibration: {CALIBRATION_NOTE}")
    return 0
