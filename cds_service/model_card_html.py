"""The model card as one self-contained, printable HTML page (``/model-card``).

:func:`render_model_card_html` turns the JSON card of :func:`cds_service.model_card.build_model_card`
into a page a clinician or a governance committee can read and print: the not-for-clinical-use
notice first (when the model was trained on synthetic data), the model's identity, all 31 HTI-1
source attributes in their nine groups with where each statement comes from, then the performance
tables (test fold, by subgroup, local monitoring). Every value is HTML-escaped; the page loads
nothing from anywhere (inline CSS, no scripts, no images, no fonts) and holds no patient data.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

PROVENANCE_LABELS: dict[str, str] = {
    "developer": "ecglab project",
    "manifest": "model file",
    "evaluation": "evaluation",
    "deployer": "this site",
    "local-monitoring": "local monitoring",
}

_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:1.5em auto;"
    "padding:0 1em;color:#111;line-height:1.4}"
    "h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}"
    ".notice{border:3px solid #b00020;background:#fde7ea;color:#7a0014;padding:.8em 1em;font-weight:700;"
    "font-size:1.1em;margin:1em 0}"
    "table{border-collapse:collapse;width:100%;font-size:13px;margin:.5em 0 1em}"
    "td,th{border:1px solid #bbb;padding:4px 7px;text-align:left;vertical-align:top}th{background:#f0f0f0}"
    "td.num{text-align:right;white-space:nowrap}.ref{white-space:nowrap;color:#444}"
    ".prov{white-space:nowrap;font-size:12px;color:#444}code{font-size:12px;word-break:break-all}"
    "@media print{body{margin:0;max-width:none}.notice{background:none}h2{page-break-after:avoid}"
    "tr{page-break-inside:avoid}}"
)


def _esc(value: Any) -> str:
    """Escaped text of ``value`` ('—' for ``None``)."""
    return "—" if value is None else html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    """A finite number with ``digits`` decimals, else '—'."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}f}"


def _ci(point: Any, low: Any, high: Any) -> str:
    """'0.957 [0.927, 0.983]' (or '—')."""
    if _num(point) == "—":
        return "—"
    return f"{_num(point)} [{_num(low)}, {_num(high)}]"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """A table from pre-escaped cells; columns in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f"<td class='num'>{cell}</td>" if i in numeric else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    if not body:
        return "<p>None.</p>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_model_card_html(card: Mapping[str, Any], *, json_url: str | None = None) -> str:
    """The HTML page of ``card``; ``json_url`` (optional) links the machine-readable form."""
    model = card["model"]
    title = f"Model card: {model['name']} {model['version']}"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<meta name='robots' content='noindex'>",
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
    ]
    if card.get("not_for_clinical_use"):
        parts.append(f"<div class='notice' role='alert'>{_esc(card.get('notice'))}</div>")
    parts.append(_identity(card, json_url))
    parts.append(_attributes(card["source_attributes"]))
    parts.append(_performance(card["performance"]))
    parts.append(
        "<h2>Machine-readable form</h2><p>The same card as JSON carries every attribute above, the "
        "per-target figures and a <code>chai</code> section with the CHAI Applied Model Card field names "
        f"({_esc(card['chai']['schema'])}).</p>"
    )
    parts.append(f"<p class='prov'>Generated {_esc(card.get('generated_at'))}.</p></body></html>")
    return "\n".join(parts)


def _identity(card: Mapping[str, Any], json_url: str | None) -> str:
    """Model identity and the deploying site."""
    model, deployer = card["model"], card["deployer"]
    rows = [
        ("Model", f"{_esc(model['name'])} {_esc(model['version'])}"),
        ("ONNX file SHA-256", f"<code>{_esc(model['sha256'])}</code>"),
        ("Created", _esc(model.get("created"))),
        ("Training data", _esc(model["training_data"].get("source"))),
        ("Targets", _esc(model.get("n_targets"))),
        ("Software", _esc(model.get("software"))),
        ("Deploying organisation", _esc(deployer.get("organisation"))),
        ("Contact at this site", _esc(deployer.get("contact"))),
        ("Setting", _esc(deployer.get("setting"))),
        ("Live since", _esc(deployer.get("go_live"))),
    ]
    if json_url:
        rows.append(("JSON", f"<a href='{_esc(json_url)}'>{_esc(json_url)}</a>"))
    return "<h2>Model</h2>" + _table(("Field", "Value"), rows)


def _attributes(source: Mapping[str, Any]) -> str:
    """All source attributes, one table per group."""
    out = [
        f"<h2>Source attributes ({_esc(source['regulation'])})</h2>",
        "<p>Each statement names where it comes from: the ecglab project, the model file, its evaluation, "
        "this site, or this site's local monitoring.</p>",
    ]
    for number, group in enumerate(source["groups"].values(), start=1):
        rows = [
            (
                f"<span class='ref'>{_esc(attr['ref'])}</span>",
                _esc(attr["title"]),
                _esc(attr["value"]),
                f"<span class='prov'>{_esc(PROVENANCE_LABELS.get(attr['provenance'], attr['provenance']))}</span>",
            )
            for attr in group["attributes"].values()
        ]
        out.append(f"<h3>{number}. {_esc(group['title'])}</h3>")
        out.append(_table(("Ref.", "Attribute", "Statement", "Source"), rows))
    return "\n".join(out)


def _performance(performance: Mapping[str, Any]) -> str:
    """Test-fold, subgroup and local figures."""
    out = ["<h2>Performance on the held-out test fold</h2>"]
    rows = [
        (
            _esc(t["target"]),
            _esc(t["direction"]),
            _esc(t["task"]),
            _ci(t.get("auroc"), t.get("ci_low"), t.get("ci_high")),
            f"{_esc(t.get('n_pos'))} / {_esc(t.get('n_neg'))}",
            _num(t.get("decision_threshold")),
        )
        for t in performance["test"]["targets"]
    ]
    out.append(
        _table(
            ("Target", "Direction", "Task", "AUROC [95% CI]", "Abnormal / normal", "Threshold"),
            rows,
            (3, 4, 5),
        )
    )
    subgroups = performance.get("subgroups")
    out.append("<h2>Performance by subgroup (test fold)</h2>")
    if isinstance(subgroups, Mapping) and isinstance(subgroups.get("attributes"), Mapping):
        group_rows = [
            (
                _esc(attribute),
                _esc(group),
                _esc(entry.get("n")),
                _ci(entry.get("macro_auroc"), entry.get("ci_low"), entry.get("ci_high")),
                _esc(entry.get("n_targets_evaluable")),
            )
            for attribute, groups in subgroups["attributes"].items()
            for group, entry in (groups or {}).items()
            if isinstance(entry, Mapping)
        ]
        out.append(
            _table(
                ("Attribute", "Group", "ECGs", "Macro AUROC [95% CI]", "Targets evaluable"),
                group_rows,
                (2, 3, 4),
            )
        )
    else:
        out.append("<p>Not computed for this model.</p>")
    local = performance.get("local")
    out.append("<h2>Performance on this site's patients</h2>")
    if isinstance(local, Mapping) and isinstance(local.get("targets"), Mapping):
        period = local.get("period") or {}
        out.append(f"<p>Monitoring period {_esc(period.get('since'))} to {_esc(period.get('until'))}.</p>")
        local_rows = [
            (
                _esc(target),
                _esc(entry.get("n_outcomes")),
                _ci(entry.get("auroc"), entry.get("auroc_ci_low"), entry.get("auroc_ci_high")),
                _num(entry.get("ppv")),
                _num(entry.get("sensitivity")),
                _num(entry.get("ece")),
                _num(entry.get("alert_rate")),
            )
            for target, entry in local["targets"].items()
        ]
        out.append(
            _table(
                ("Target", "Outcomes", "AUROC [95% CI]", "PPV", "Sensitivity", "ECE", "Alert rate"),
                local_rows,
                (1, 2, 3, 4, 5, 6),
            )
        )
    else:
        out.append("<p>Not yet measured at this site.</p>")
    return "\n".join(out)
