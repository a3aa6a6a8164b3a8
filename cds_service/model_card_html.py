"""The model card as one self-contained, printable HTML page (``/model-card``).

:func:`render_model_card_html` turns the JSON card of :func:`cds_service.model_card.build_model_card`
into a page a clinician or a governance committee can read and print: the not-for-clinical-use
notice first (when the model was trained on synthetic data), the model's identity, all 31 HTI-1
source attributes in their nine groups with where each statement comes from, then the performance
tables (test fold, by subgroup, local monitoring). Every value is HTML-escaped; the page loads
nothing from anywhere (inline CSS, no scripts, no images, no fonts) and holds no patient data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cds_service.html_parts import BASE_CSS, ci, esc, num, table

PROVENANCE_LABELS: dict[str, str] = {
    "developer": "ecglab project",
    "manifest": "model file",
    "evaluation": "evaluation",
    "deployer": "this site",
    "local-monitoring": "local monitoring",
}

_CSS = BASE_CSS + (
    "body{max-width:1100px}h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em}"
    ".notice{border:3px solid #b00020;background:#fde7ea;color:#7a0014;padding:.8em 1em;font-weight:700;"
    "font-size:1.1em;margin:1em 0}table{width:100%}.ref{white-space:nowrap;color:#444}"
    ".prov{white-space:nowrap;font-size:12px;color:#444}code{font-size:12px;word-break:break-all}"
    "@media print{.notice{background:none}}"
)


def render_model_card_html(card: Mapping[str, Any], *, json_url: str | None = None) -> str:
    """The HTML page of ``card``; ``json_url`` (optional) links the machine-readable form."""
    model = card["model"]
    title = f"Model card: {model['name']} {model['version']}"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<meta name='robots' content='noindex'>",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if card.get("not_for_clinical_use"):
        parts.append(f"<div class='notice' role='alert'>{esc(card.get('notice'))}</div>")
    parts.append(_identity(card, json_url))
    parts.append(_attributes(card["source_attributes"]))
    parts.append(_performance(card["performance"]))
    parts.append(
        "<h2>Machine-readable form</h2><p>The same card as JSON carries every attribute above, the "
        "per-target figures and a <code>chai</code> section with the CHAI Applied Model Card field names "
        f"({esc(card['chai']['schema'])}).</p>"
    )
    parts.append(f"<p class='prov'>Generated {esc(card.get('generated_at'))}.</p></body></html>")
    return "\n".join(parts)


def _identity(card: Mapping[str, Any], json_url: str | None) -> str:
    """Model identity and the deploying site."""
    model, deployer = card["model"], card["deployer"]
    rows = [
        ("Model", f"{esc(model['name'])} {esc(model['version'])}"),
        ("ONNX file SHA-256", f"<code>{esc(model['sha256'])}</code>"),
        ("Created", esc(model.get("created"))),
        ("Training data", esc(model["training_data"].get("source"))),
        ("Targets", esc(model.get("n_targets"))),
        ("Software", esc(model.get("software"))),
        ("Deploying organisation", esc(deployer.get("organisation"))),
        ("Contact at this site", esc(deployer.get("contact"))),
        ("Setting", esc(deployer.get("setting"))),
        ("Live since", esc(deployer.get("go_live"))),
    ]
    if json_url:
        rows.append(("JSON", f"<a href='{esc(json_url)}'>{esc(json_url)}</a>"))
    return "<h2>Model</h2>" + table(("Field", "Value"), rows)


def _attributes(source: Mapping[str, Any]) -> str:
    """All source attributes, one table per group."""
    out = [
        f"<h2>Source attributes ({esc(source['regulation'])})</h2>",
        "<p>Each statement names where it comes from: the ecglab project, the model file, its evaluation, "
        "this site, or this site's local monitoring.</p>",
    ]
    for number, group in enumerate(source["groups"].values(), start=1):
        rows = [
            (
                f"<span class='ref'>{esc(attr['ref'])}</span>",
                esc(attr["title"]),
                esc(attr["value"]),
                f"<span class='prov'>{esc(PROVENANCE_LABELS.get(attr['provenance'], attr['provenance']))}</span>",
            )
            for attr in group["attributes"].values()
        ]
        out.append(f"<h3>{number}. {esc(group['title'])}</h3>")
        out.append(table(("Ref.", "Attribute", "Statement", "Source"), rows))
    return "\n".join(out)


def _performance(performance: Mapping[str, Any]) -> str:
    """Test-fold, subgroup and local figures."""
    out = ["<h2>Performance on the held-out test fold</h2>"]
    rows = [
        (
            esc(t["target"]),
            esc(t["direction"]),
            esc(t["task"]),
            ci(t.get("auroc"), t.get("ci_low"), t.get("ci_high")),
            f"{esc(t.get('n_pos'))} / {esc(t.get('n_neg'))}",
            num(t.get("decision_threshold")),
        )
        for t in performance["test"]["targets"]
    ]
    out.append(
        table(
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
                esc(attribute),
                esc(group),
                esc(entry.get("n")),
                ci(entry.get("macro_auroc"), entry.get("ci_low"), entry.get("ci_high")),
                esc(entry.get("n_targets_evaluable")),
            )
            for attribute, groups in subgroups["attributes"].items()
            for group, entry in (groups or {}).items()
            if isinstance(entry, Mapping)
        ]
        out.append(
            table(
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
        out.append(f"<p>Monitoring period {esc(period.get('since'))} to {esc(period.get('until'))}.</p>")
        local_rows = [
            (
                esc(target),
                esc(entry.get("n_outcomes")),
                ci(entry.get("auroc"), entry.get("auroc_ci_low"), entry.get("auroc_ci_high")),
                num(entry.get("ppv")),
                num(entry.get("sensitivity")),
                num(entry.get("ece")),
                num(entry.get("alert_rate")),
            )
            for target, entry in local["targets"].items()
        ]
        out.append(
            table(
                ("Target", "Outcomes", "AUROC [95% CI]", "PPV", "Sensitivity", "ECE", "Alert rate"),
                local_rows,
                (1, 2, 3, 4, 5, 6),
            )
        )
    else:
        out.append("<p>Not yet measured at this site.</p>")
    return "\n".join(out)
