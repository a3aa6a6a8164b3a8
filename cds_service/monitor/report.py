"""The monitor report: realised performance per target and subgroup, written as JSON and read back.

:func:`build_report` turns the joined (call, target) rows into ``report.json``'s content:

* per target: predictions, outcomes, alert rate (share of audited predictions at or above the
  deployed threshold), realised AUROC with a bootstrap CI, PPV / sensitivity / specificity at the
  deployed threshold with Wilson intervals, calibration (ECE and reliability bins), and the same
  figures by sex and by age band;
* a summary: macro AUROC over the targets with at least ``min_class`` outcomes of each class, with
  its CI, overall and per subgroup;
* ``gauges``: the flat list of Prometheus gauges the service exports from the latest report.

AUROC CIs resample whole hook calls (all targets of a call together), so a target's CI and the
macro CI come from the same resamples. Everything is aggregate: no patient key, id or time.
:func:`load_latest_report` finds the newest report under a folder for the service.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cds_service.monitor.outcomes import OutcomeRow
from cds_service.monitor.stats import Confusion, auroc, empirical_ci, weighted_auroc
from fhir_mappings.reliability import reliability

log = logging.getLogger(__name__)

REPORT_FORMAT = "ecglab-monitor-report/1"
REPORT_FILE = "report.json"
SUBGROUP_ATTRIBUTES: tuple[str, ...] = ("sex", "age_band")


def _num(value: float | None) -> float | None:
    """A finite float or ``None`` (JSON has no NaN)."""
    return float(value) if value is not None and math.isfinite(value) else None


class _Block:
    """The outcome rows of one population (all calls, or one subgroup), indexed for the bootstrap."""

    def __init__(self, rows: Sequence[OutcomeRow]) -> None:
        self.rows = list(rows)
        calls = sorted({r.audit_id for r in self.rows})
        self.call_index = {call: i for i, call in enumerate(calls)}
        self.by_target: dict[str, list[OutcomeRow]] = {}
        for row in self.rows:
            self.by_target.setdefault(row.target, []).append(row)

    @property
    def n_calls(self) -> int:
        return len(self.call_index)


def _target_entry(
    rows: Sequence[OutcomeRow], min_class: int, n_bins: int, confidence: float
) -> dict[str, Any]:
    """Point figures of one target over ``rows`` (AUROC CI added by the caller)."""
    p_all = np.array([r.probability for r in rows], dtype=np.float64)
    t_all = np.array([r.threshold for r in rows], dtype=np.float64)
    known = [r for r in rows if r.outcome is not None]
    y = np.array([r.outcome for r in known], dtype=np.int64)
    p = np.array([r.probability for r in known], dtype=np.float64)
    t = np.array([r.threshold for r in known], dtype=np.float64)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    entry: dict[str, Any] = {
        "lab_key": rows[0].lab_key,
        "task": rows[0].task,
        "threshold": float(Counter(t_all.tolist()).most_common(1)[0][0]),
        "n_predictions": len(rows),
        "n_alerts": int((p_all >= t_all).sum()),
        "alert_rate": _num(float((p_all >= t_all).mean())),
        "n_outcomes": len(known),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "evaluable": n_pos >= min_class and n_neg >= min_class,
        "auroc": _num(auroc(y, p)) if len(known) else None,
    }
    confusion = Confusion.at(y, p, t)
    entry.update({"tp": confusion.tp, "fp": confusion.fp, "fn": confusion.fn, "tn": confusion.tn})
    entry.update({k: _num(v) for k, v in confusion.ratios(confidence).items()})
    bins = reliability(y, p, n_bins)
    entry["ece"] = _num(bins.ece)
    entry["reliability"] = {
        "edges": [float(e) for e in bins.edges],
        "mean_prob": [_num(v) for v in bins.mean_prob],
        "observed": [_num(v) for v in bins.observed],
        "count": [int(c) for c in bins.count],
    }
    return entry


def _block_figures(
    block: _Block, *, n_boot: int, seed: int, min_class: int, n_bins: int, confidence: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per-target entries, macro summary) of one population, AUROC CIs from shared call resamples."""
    entries = {
        t: _target_entry(rows, min_class, n_bins, confidence) for t, rows in sorted(block.by_target.items())
    }
    labelled = {
        t: (
            np.array([block.call_index[r.audit_id] for r in rows if r.outcome is not None], dtype=np.int64),
            np.array([r.outcome == 1 for r in rows if r.outcome is not None], dtype=bool),
            np.array([r.probability for r in rows if r.outcome is not None], dtype=np.float64),
        )
        for t, rows in block.by_target.items()
        if entries[t]["auroc"] is not None
    }
    boots = {t: np.full(n_boot, np.nan) for t in labelled}
    if labelled and n_boot > 0 and block.n_calls > 0:
        rng = np.random.default_rng(seed)
        uniform = np.full(block.n_calls, 1.0 / block.n_calls)
        step = max(1, min(n_boot, 2_000_000 // block.n_calls))
        for start in range(0, n_boot, step):
            stop = min(n_boot, start + step)
            counts = rng.multinomial(block.n_calls, uniform, size=stop - start).T.astype(np.float64)
            for t, (calls, y, p) in labelled.items():
                boots[t][start:stop] = weighted_auroc(y, p, counts[calls])
    for t in labelled:
        low, high = empirical_ci(entries[t]["auroc"], boots[t], confidence)
        entries[t]["auroc_ci_low"], entries[t]["auroc_ci_high"] = _num(low), _num(high)
    for entry in entries.values():
        entry.setdefault("auroc_ci_low", None)
        entry.setdefault("auroc_ci_high", None)
    evaluable = [t for t in labelled if entries[t]["evaluable"]]
    summary: dict[str, Any] = {
        "n_calls": block.n_calls,
        "n_predictions": len(block.rows),
        "n_targets_evaluable": len(evaluable),
        "macro_auroc": None,
        "macro_auroc_ci_low": None,
        "macro_auroc_ci_high": None,
    }
    if evaluable:
        point = float(np.mean([entries[t]["auroc"] for t in evaluable]))
        macro_boot = np.nan_to_num(np.vstack([boots[t] for t in evaluable]), nan=0.5).mean(axis=0)
        low, high = empirical_ci(point, macro_boot, confidence) if n_boot else (math.nan, math.nan)
        summary.update(macro_auroc=point, macro_auroc_ci_low=_num(low), macro_auroc_ci_high=_num(high))
    return entries, summary


def build_report(
    rows: Sequence[OutcomeRow],
    *,
    period: Mapping[str, str],
    model: Mapping[str, str],
    counts: Mapping[str, Any],
    drift: Mapping[str, Any],
    feedback: Mapping[str, Any],
    fhir_server: str,
    n_boot: int = 500,
    seed: int = 0,
    min_class: int = 10,
    n_bins: int = 10,
    confidence: float = 0.95,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The whole report; see the module docstring."""
    options: dict[str, Any] = {
        "n_boot": n_boot,
        "min_class": min_class,
        "n_bins": n_bins,
        "confidence": confidence,
    }
    targets, summary = _block_figures(_Block(rows), seed=seed, **options)
    by_subgroup: dict[str, dict[str, Any]] = {}
    for attribute in SUBGROUP_ATTRIBUTES:
        groups: dict[str, list[OutcomeRow]] = {}
        for row in rows:
            label = getattr(row, attribute)
            if label is not None:
                groups.setdefault(label, []).append(row)
        by_subgroup[attribute] = {}
        for offset, (label, group_rows) in enumerate(sorted(groups.items())):
            entries, group_summary = _block_figures(_Block(group_rows), seed=seed + 1 + offset, **options)
            by_subgroup[attribute][label] = {**group_summary, "n": group_summary["n_calls"]}
            for target, entry in entries.items():
                entry.pop("reliability")
                targets[target].setdefault("subgroups", {}).setdefault(attribute, {})[label] = entry
    summary["by_subgroup"] = by_subgroup
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "generated_at": (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds"),
        "period": dict(period),
        "fhir_server": fhir_server,
        "model": dict(model),
        "options": {**options, "seed": seed},
        "counts": dict(counts),
        "summary": summary,
        "targets": targets,
        "drift": dict(drift),
        "feedback": dict(feedback),
    }
    report["gauges"] = gauges(report)
    return report


def gauges(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Prometheus gauges of a report: ``{"name", "help", "labels", "value"}``, finite values only."""
    out: list[dict[str, Any]] = []

    def add(name: str, help_text: str, labels: Mapping[str, str], value: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out.append({"name": name, "help": help_text, "labels": dict(labels), "value": float(value)})

    summary = report.get("summary") or {}
    add(
        "ecglab_local_macro_auroc",
        "realised macro AUROC over evaluable targets",
        {},
        summary.get("macro_auroc"),
    )
    per_target = (
        ("auroc", "ecglab_local_auroc", "realised AUROC"),
        ("ppv", "ecglab_local_ppv", "PPV at the deployed threshold"),
        ("sensitivity", "ecglab_local_sensitivity", "sensitivity at the deployed threshold"),
        ("ece", "ecglab_local_ece", "expected calibration error"),
        ("alert_rate", "ecglab_local_alert_rate", "share of predictions at or above the threshold"),
    )
    for target, entry in (report.get("targets") or {}).items():
        for key, name, help_text in per_target:
            add(name, help_text, {"target": target}, entry.get(key))
    for feature, entry in ((report.get("drift") or {}).get("features") or {}).items():
        add(
            "ecglab_input_psi",
            "population stability index against the reference",
            {"feature": feature},
            entry.get("psi"),
        )
    for lab, entry in (report.get("feedback") or {}).items():
        add(
            "ecglab_feedback_acceptance_rate",
            "accepted / (accepted + overridden)",
            {"lab": lab},
            entry.get("acceptance_rate"),
        )
    stamp = report.get("generated_at")
    if isinstance(stamp, str):
        add(
            "ecglab_monitor_report_timestamp_seconds",
            "when the report was generated",
            {},
            datetime.fromisoformat(stamp).timestamp(),
        )
    return out


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temporary file + rename), so a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_latest_report(directory: Path) -> dict[str, Any]:
    """The newest monitor report in ``directory`` or one level below it; ``{}`` when there is none.

    Newest = latest ``generated_at``; unreadable or foreign files are skipped with a warning.
    """
    candidates = [directory / REPORT_FILE, *sorted(directory.glob(f"*/{REPORT_FILE}"))]
    best: dict[str, Any] = {}
    for path in candidates:
        if not path.is_file():
            continue
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("monitor report %s unreadable (%s); skipped", path, exc)
            continue
        if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
            log.warning("%s is not an ecglab monitor report; skipped", path)
            continue
        if not best or str(report.get("generated_at", "")) > str(best.get("generated_at", "")):
            best = report
    return best
