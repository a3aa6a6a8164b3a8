"""``report.html``: the monitor report as one self-contained page with plots.

Tables for the summary, every target, the subgroups, input drift and feedback, and three figures
drawn with matplotlib on the headless Agg backend (reliability diagrams, alert rates, PSI per
input), embedded as base64 PNGs so the page needs no other file. matplotlib is in the ``train``
extra, not the service's; without it the page has the tables and says why the figures are missing.
All text is HTML-escaped; the report holds aggregate figures only.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MAX_RELIABILITY_PANELS = 24

_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#111}"
    "table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}td,th{border:1px solid #bbb;"
    "padding:3px 7px;text-align:left}th{background:#f0f0f0}td.num{text-align:right}"
    "img{max-width:100%;border:1px solid #eee}h2{border-bottom:1px solid #ccc}"
    "@media print{body{max-width:none;margin:0}tr{page-break-inside:avoid}}"
)


def _esc(value: Any) -> str:
    """Escaped text ('—' for ``None``)."""
    return "—" if value is None else html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    """A finite number with ``digits`` decimals, else '—'."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}f}"


def _ci(point: Any, low: Any, high: Any) -> str:
    """'0.81 [0.75, 0.86]' or '—'."""
    return "—" if _num(point) == "—" else f"{_num(point)} [{_num(low)}, {_num(high)}]"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table of pre-escaped cells; cells that look numeric are right-aligned."""
    out = ["<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"]
    count = 0
    for row in rows:
        count += 1
        cells = "".join(
            f"<td class='num'>{c}</td>" if c[:1].isdigit() or c == "—" else f"<td>{c}</td>" for c in row
        )
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    return "".join(out) if count else "<p>None.</p>"


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
            ax.set_title(f"{target}\nECE {_num(targets[target].get('ece'), 2)}", fontsize=8)
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
        f"<p>Period {_esc(period.get('since'))} to {_esc(period.get('until'))}; model {_esc(model.get('version'))} "
        f"(sha256 <code>{_esc(model.get('sha256'))}</code>); FHIR server {_esc(report.get('fhir_server'))}; "
        f"generated {_esc(report.get('generated_at'))}.</p>",
        "<h2>Summary</h2>",
        _table(
            ("Calls", "Predictions", "Evaluable targets", "Macro AUROC [95% CI]"),
            [
                (
                    _esc(summary.get("n_calls")),
                    _esc(summary.get("n_predictions")),
                    _esc(summary.get("n_targets_evaluable")),
                    _ci(
                        summary.get("macro_auroc"),
                        summary.get("macro_auroc_ci_low"),
                        summary.get("macro_auroc_ci_high"),
                    ),
                )
            ],
        ),
        _table(("Count", "Value"), [(_esc(k), _esc(v)) for k, v in (report.get("counts") or {}).items()]),
        "<h2>Per target</h2>",
        _table(
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
                    _esc(t),
                    _num(e.get("threshold")),
                    _esc(e.get("n_predictions")),
                    _num(e.get("alert_rate")),
                    _esc(e.get("n_outcomes")),
                    _esc(e.get("n_pos")),
                    _ci(e.get("auroc"), e.get("auroc_ci_low"), e.get("auroc_ci_high")),
                    _ci(e.get("ppv"), e.get("ppv_ci_low"), e.get("ppv_ci_high")),
                    _ci(e.get("sensitivity"), e.get("sensitivity_ci_low"), e.get("sensitivity_ci_high")),
                    _num(e.get("ece")),
                )
                for t, e in (report.get("targets") or {}).items()
            ],
        ),
        "<h2>By subgroup</h2>",
        _table(
            ("Attribute", "Group", "Calls", "Evaluable targets", "Macro AUROC [95% CI]"),
            [
                (
                    _esc(attribute),
                    _esc(group),
                    _esc(e.get("n")),
                    _esc(e.get("n_targets_evaluable")),
                    _ci(e.get("macro_auroc"), e.get("macro_auroc_ci_low"), e.get("macro_auroc_ci_high")),
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
    head = f"<h2>Input drift</h2><p>Reference: {_esc(drift.get('reference'))}.</p>"
    features = drift.get("features")
    if not features:
        return head + "<p>Unavailable: no reference distribution (see --reference).</p>"
    rows = [
        (
            _esc(k),
            _num(v.get("psi")),
            _esc(v.get("band")),
            _num(v.get("missing_reference")),
            _num(v.get("missing_current")),
        )
        for k, v in features.items()
    ]
    return head + _table(("Input", "PSI", "Band", "Missing (reference)", "Missing (now)"), rows)


def _feedback(feedback: Mapping[str, Any]) -> str:
    """Feedback per lab with the override reasons."""
    rows = [
        (
            _esc(lab),
            _esc(e.get("live_cards")),
            _esc(e.get("shadow_cards")),
            _esc(e.get("accepted")),
            _esc(e.get("overridden")),
            _num(e.get("acceptance_rate")),
            _esc("; ".join(f"{r} ({n})" for r, n in (e.get("override_reasons") or {}).items())),
        )
        for lab, e in feedback.items()
    ]
    return "<h2>Clinician feedback per lab</h2>" + _table(
        ("Lab", "Live cards", "Shadow cards", "Accepted", "Overridden", "Acceptance", "Override reasons"),
        rows,
    )
