"""``report.html``: the monitor report as one self-contained page with plots.

Tables for the summary, every target, the subgroups, input drift and feedback, and three figures
drawn with matplotlib on the headless Agg backend (reliability diagrams, alert rates, PSI per
input), embedded as base64 PNGs so the page needs no other file. matplotlib is in the ``train``
extra, not the service's; without it the page has the tables and says why the figures are missing.
All text is HTML-escaped; the report holds aggregate figures only.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping
from typing import Any

from cds_service.html_parts import BASE_CSS, ci, esc, num, table

MAX_RELIABILITY_PANELS = 24

_CSS = BASE_CSS + "table{margin:.5em 0 1.5em}img{max-width:100%;border:1px solid #eee}"


def _png(fig: Any) -> str:
    """An ``<img>`` with the figure as a base64 PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt='figure' src='data:image/png;base64,{data}'>"


def _figures(report: Mapping[str, Any]) -> str:
    """The three figures, or a note when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return "<p>Figures need matplotlib (pip install matplotlib); the tables hold every figure's data.</p>"
    parts = []
    targets = report.get("targets") or {}
    shown = [t for t, e in targets.items() if e.get("n_outcomes")][:MAX_RELIABILITY_PANELS]
    if shown:
        cols = min(4, len(shown))
        rows = math.ceil(len(shown) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
        for ax in axes.ravel()[len(shown) :]:
            ax.axis("off")
        for ax, target in zip(axes.ravel(), shown, strict=False):
            rel = targets[target]["reliability"]
            pairs = [(m, o) for m, o in zip(rel["mean_prob"], rel["observed"], strict=True) if m is not None]
            ax.plot([0, 1], [0, 1], color="#999", linewidth=1)
            if pairs:
                ax.plot([m for m, _ in pairs], [o for _, o in pairs], marker="o", color="#1f5fa8")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_title(f"{target}\nECE {num(targets[target].get('ece'), 2)}", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.supxlabel("mean predicted probability")
        fig.supylabel("observed abnormal rate")
        parts.append("<h3>Reliability (calibration)</h3>" + _png(fig))
    if targets:
        names = list(targets)
        fig, ax = plt.subplots(figsize=(10, max(2.5, 0.18 * len(names))))
        ax.barh(names, [targets[t].get("alert_rate") or 0.0 for t in names], color="#c0782b")
        ax.set_xlabel("alert rate (share of predictions at or above the deployed threshold)")
        ax.tick_params(labelsize=6)
        ax.invert_yaxis()
        parts.append("<h3>Alert rate per target</h3>" + _png(fig))
    features = ((report.get("drift") or {}).get("features")) or {}
    scored = {k: v["psi"] for k, v in features.items() if v.get("psi") is not None}
    if scored:
        fig, ax = plt.subplots(figsize=(8, max(2.5, 0.3 * len(scored))))
        ax.barh(list(scored), list(scored.values()), color="#5b8c3a")
        for limit in (0.1, 0.25):
            ax.axvline(limit, color="#999", linestyle="--", linewidth=1)
        ax.set_xlabel("population stability index")
        ax.invert_yaxis()
        parts.append("<h3>Input drift</h3>" + _png(fig))
    return "\n".join(parts)


def render_report_html(report: Mapping[str, Any]) -> str:
    """The whole page."""
    summary = report.get("summary") or {}
    period = report.get("period") or {}
    model = report.get("model") or {}
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>ecglab local validation report</title>",
        f"<style>{_CSS}</style></head><body><h1>ecglab local validation report</h1>",
        f"<p>Period {esc(period.get('since'))} to {esc(period.get('until'))}; model {esc(model.get('version'))} "
        f"(sha256 <code>{esc(model.get('sha256'))}</code>); FHIR server {esc(report.get('fhir_server'))}; "
        f"generated {esc(report.get('generated_at'))}.</p>",
        "<h2>Summary</h2>",
        table(
            ("Calls", "Predictions", "Evaluable targets", "Macro AUROC [95% CI]"),
            [
                (
                    esc(summary.get("n_calls")),
                    esc(summary.get("n_predictions")),
                    esc(summary.get("n_targets_evaluable")),
                    ci(
                        summary.get("macro_auroc"),
                        summary.get("macro_auroc_ci_low"),
                        summary.get("macro_auroc_ci_high"),
                    ),
                )
            ],
        ),
        table(("Count", "Value"), [(esc(k), esc(v)) for k, v in (report.get("counts") or {}).items()]),
        "<h2>Per target</h2>",
        table(
            (
                "Target",
                "Threshold",
                "Predictions",
                "Alert rate",
                "Outcomes",
                "Abnormal",
                "AUROC [95% CI]",
                "PPV",
                "Sensitivity",
                "ECE",
            ),
            [
                (
                    esc(t),
                    num(e.get("threshold")),
                    esc(e.get("n_predictions")),
                    num(e.get("alert_rate")),
                    esc(e.get("n_outcomes")),
                    esc(e.get("n_pos")),
                    ci(e.get("auroc"), e.get("auroc_ci_low"), e.get("auroc_ci_high")),
                    ci(e.get("ppv"), e.get("ppv_ci_low"), e.get("ppv_ci_high")),
                    ci(e.get("sensitivity"), e.get("sensitivity_ci_low"), e.get("sensitivity_ci_high")),
                    num(e.get("ece")),
                )
                for t, e in (report.get("targets") or {}).items()
            ],
        ),
        "<h2>By subgroup</h2>",
        table(
            ("Attribute", "Group", "Calls", "Evaluable targets", "Macro AUROC [95% CI]"),
            [
                (
                    esc(attribute),
                    esc(group),
                    esc(e.get("n")),
                    esc(e.get("n_targets_evaluable")),
                    ci(e.get("macro_auroc"), e.get("macro_auroc_ci_low"), e.get("macro_auroc_ci_high")),
                )
                for attribute, groups in (summary.get("by_subgroup") or {}).items()
                for group, e in groups.items()
            ],
        ),
        _drift(report.get("drift") or {}),
        _feedback(report.get("feedback") or {}),
        "<h2>Figures</h2>",
        _figures(report),
        "</body></html>",
    ]
    return "\n".join(parts)


def _drift(drift: Mapping[str, Any]) -> str:
    """Input drift table, or why drift is unavailable."""
    head = f"<h2>Input drift</h2><p>Reference: {esc(drift.get('reference'))}.</p>"
    features = drift.get("features")
    if not features:
        return head + "<p>Unavailable: no reference distribution (see --reference).</p>"
    rows = [
        (
            esc(k),
            num(v.get("psi")),
            esc(v.get("band")),
            num(v.get("missing_reference")),
            num(v.get("missing_current")),
        )
        for k, v in features.items()
    ]
    return head + table(("Input", "PSI", "Band", "Missing (reference)", "Missing (now)"), rows)


def _feedback(feedback: Mapping[str, Any]) -> str:
    """Feedback per lab with the override reasons."""
    rows = [
        (
            esc(lab),
            esc(e.get("live_cards")),
            esc(e.get("shadow_cards")),
            esc(e.get("accepted")),
            esc(e.get("overridden")),
            num(e.get("acceptance_rate")),
            esc("; ".join(f"{r} ({n})" for r, n in (e.get("override_reasons") or {}).items())),
        )
        for lab, e in feedback.items()
    ]
    return "<h2>Clinician feedback per lab</h2>" + table(
        ("Lab", "Live cards", "Shadow cards", "Accepted", "Overridden", "Acceptance", "Override reasons"),
        rows,
    )
