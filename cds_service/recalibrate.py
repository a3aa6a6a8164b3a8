"""``ecglab recalibrate``: a new model version whose decision thresholds fit the site's own patients.

Usage::

    ecglab recalibrate --model models --from-monitor monitor/2026-01 --rule ppv=0.3 --out models-site

A threshold chosen on the training centre's validation fold rarely gives the same PPV or
sensitivity elsewhere. This command reads the ``outcomes.csv`` of an ``ecglab monitor`` run (the
audited probabilities joined with the outcomes that followed) and, for every target with at least
``--min-class`` observed abnormal *and* normal outcomes, chooses a new threshold by ``--rule``
("positive when probability >= threshold", candidates = the observed probabilities):

* ``youden``: maximise sensitivity + specificity − 1;
* ``sensitivity=X``: the highest threshold whose sensitivity is at least X;
* ``ppv=X``: the most sensitive threshold whose PPV is at least X (PPV is not monotonic in the
  threshold, so every candidate is checked); a target where no threshold reaches X keeps its own.

Ties go to the higher threshold (fewer alerts). Targets without enough outcomes keep theirs.

It writes a **new version** to ``--out``: the same ONNX file copied (its SHA-256 checked) under
``ecglab-<version>.onnx`` and a new manifest with the new thresholds, ``threshold_rule`` set to
``local:<rule>``, and ``evaluation.local_recalibration`` recording the parent model, the monitor
report it came from (period, generation time, SHA-256 of ``outcomes.csv``), the rule and every
target's old and new threshold. Calibration is **not** refitted: manifest format 1 has no
per-target calibration field, so only thresholds change (the provenance says so). The original
model folder is only read; existing files are never overwritten.
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

from fhir_mappings.errors import InputError

RULE_PATTERN = re.compile(r"^(youden|ppv=(0(\.\d+)?|1(\.0+)?)|sensitivity=(0(\.\d+)?|1(\.0+)?))$")
CALIBRATION_NOTE = (
    "not refitted: manifest format 1 has no per-target calibration field, so only decision thresholds "
    "changed; the probabilities are the parent model's"
)


@dataclass(frozen=True)
class Choice:
    """The threshold chosen for one target and what it gives on the local outcomes."""

    threshold: float
    sensitivity: float
    specificity: float
    ppv: float


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


def _sha256(path: Path) -> str:
    """SHA-256 of a file."""
    from fhir_mappings.manifest import sha256_file

    return sha256_file(path)


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
    from fhir_mappings.manifest import MANIFEST_SUFFIX, Manifest, find_manifest, load_manifest

    rule_name, rule_value = parse_rule(rule)
    parent_path = find_manifest(model)
    parent = load_manifest(parent_path, verify_file=True)
    report_path = monitor_dir / "report.json"
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{report_path}: not a readable monitor report ({exc})") from None
    report_sha = (report.get("model") or {}).get("sha256") if isinstance(report, dict) else None
    if report_sha != parent.onnx.sha256:
        raise InputError(
            f"{report_path}: the monitor report is for model sha256 {str(report_sha)[:12]}…, "
            f"not {parent.onnx.sha256[:12]}… in {parent_path}"
        )
    outcomes_path = monitor_dir / "outcomes.csv"
    outcomes = read_outcomes(outcomes_path)
    stamp = (now or datetime.now(UTC)).astimezone(UTC)
    new_version = version or f"{parent.version}+local.{stamp:%Y%m%d%H%M%S}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]*", new_version):
        raise InputError(f"--version: {new_version!r} may hold only letters, digits and . + _ -")
    onnx_out = out / f"ecglab-{new_version}.onnx"
    manifest_out = out / f"ecglab-{new_version}{MANIFEST_SUFFIX}"
    for path in (onnx_out, manifest_out):
        if path.exists():
            raise InputError(f"{path} exists; choose another --version or --out (nothing is overwritten)")

    data = parent.model_dump(mode="json")
    targets = _new_thresholds(data["labels"], outcomes, rule_name, rule_value, rule, min_class)
    provenance = {
        "parent": {
            "version": parent.version,
            "manifest": parent_path.name,
            "manifest_sha256": _sha256(parent_path),
            "onnx_sha256": parent.onnx.sha256,
        },
        "source": {
            "monitor_dir": str(monitor_dir),
            "report_generated_at": report.get("generated_at"),
            "period": report.get("period"),
            "outcomes_sha256": _sha256(outcomes_path),
        },
        "rule": rule,
        "min_class": min_class,
        "created": stamp.isoformat(timespec="seconds"),
        "calibration": CALIBRATION_NOTE,
        "targets": targets,
    }
    data.update(version=new_version, created=stamp.strftime("%Y-%m-%dT%H:%M:%SZ"))
    data["onnx"]["file"] = onnx_out.name
    data["evaluation"] = {**data.get("evaluation", {}), "local_recalibration": provenance}
    manifest = Manifest.model_validate(data)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(parent_path.parent / parent.onnx.file, onnx_out)
    if _sha256(onnx_out) != parent.onnx.sha256:
        onnx_out.unlink()
        raise InputError(f"{onnx_out}: the copy's SHA-256 differs from the parent's; nothing written")
    manifest_out.write_text(json.dumps(manifest.model_dump(mode="json"), indent=1) + "\n", encoding="utf-8")
    load_manifest(manifest_out, verify_file=True)
    return manifest_out, provenance


def _new_thresholds(
    labels: Sequence[dict[str, Any]],
    outcomes: Mapping[str, tuple[np.ndarray, np.ndarray]],
    rule_name: str,
    rule_value: float | None,
    rule: str,
    min_class: int,
) -> dict[str, Any]:
    """Update ``labels`` (manifest dicts) in place; returns each target's old/new threshold and status."""
    record: dict[str, Any] = {}
    for label in labels:
        target = label["target"]
        old = float(label["decision_threshold"])
        y, p = outcomes.get(target, (np.zeros(0, dtype=np.int64), np.zeros(0)))
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        entry: dict[str, Any] = {"old": old, "new": old, "n_pos": n_pos, "n_neg": n_neg}
        if n_pos < min_class or n_neg < min_class:
            entry["status"] = f"kept: fewer than {min_class} abnormal or normal local outcomes"
        else:
            choice = choose_threshold(y, p, rule_name, rule_value)
            if choice is None:
                entry["status"] = f"kept: no threshold reaches {rule}"
            else:
                label["decision_threshold"] = choice.threshold
                label["threshold_rule"] = f"local:{rule}"
                label["threshold_fold"] = "local"  # chosen on the site's outcomes, not fold 18
                entry.update(
                    new=choice.threshold,
                    status="recalibrated",
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
    """Recalibrate and print what changed."""
    if args.min_class < 1:
        raise InputError("--min-class must be at least 1")
    manifest_path, provenance = recalibrate(
        args.model, args.from_monitor, args.rule, args.out, version=args.version, min_class=args.min_class
    )
    changed = {t: e for t, e in provenance["targets"].items() if e["status"] == "recalibrated"}
    print(f"wrote {manifest_path} (+ {manifest_path.name.replace('.manifest.json', '.onnx')})")
    print(
        f"{len(changed)} of {len(provenance['targets'])} target(s) recalibrated with {args.rule}; calibration {CALIBRATION_NOTE}"
    )
    for target, entry in changed.items():
        print(
            f"  {target}: {entry['old']:.4f} -> {entry['new']:.4f} (n_pos {entry['n_pos']}, n_neg {entry['n_neg']})"
        )
    return 0
