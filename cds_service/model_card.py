"""The model card: every ONC HTI-1 source attribute of the intervention, as one JSON document.

US ONC HTI-1 requires certified EHRs to let users review 31 *source attributes* of each predictive
decision support intervention (45 CFR 170.315(b)(11)(iv)(B)), in nine groups: details and output;
purpose; cautioned out-of-scope use; development details and input features; fairness approach;
external validation; quantitative performance; ongoing maintenance; update schedule.
:func:`build_model_card` fills all 31 from four sources and says for each which one it used
(``provenance``):

* ``developer``: what the ecglab project states (:mod:`cds_service.model_card_text`);
* ``manifest``: the deployed model file: name, version, SHA-256, training data, every target's
  test AUROC with its CI, counts and decision threshold;
* ``evaluation``: ``metrics.json`` of ``ecglab evaluate``, for performance by sex and age band
  (its ``subgroups`` key, :func:`model_training.subgroups.subgroup_metrics`);
* ``deployer`` / ``local-monitoring``: the site file (:mod:`cds_service.site_info`) and the latest
  ``ecglab monitor`` report, for contact, external and local validation and the update schedule.

A statement nobody has made is written as such ("not stated by the deployer"), never invented.
A model trained on synthetic data is marked ``not_for_clinical_use`` with a notice on top. The
``chai`` section repeats the content under the CHAI Applied Model Card field names
(:mod:`cds_service.model_card_chai`); ``cds_service/schemas/model-card.schema.json`` is the JSON
Schema of the whole document. The card holds no patient data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from cds_service import model_card_text as text
from cds_service.site_info import SiteInfo
from fhir_mappings.manifest import Manifest

CARD_FORMAT = "ecglab-model-card/1"
PROVENANCES: tuple[str, ...] = ("developer", "manifest", "evaluation", "deployer", "local-monitoring")
NOT_STATED = "Not stated by the deployer."

#: The nine HTI-1 groups and their 31 attributes: (group id, title, ((attribute id, reference, title), …)).
GROUPS: tuple[tuple[str, str, tuple[tuple[str, str, str], ...]], ...] = (
    (
        "details_and_output",
        "Details and output of the intervention",
        (
            ("developer", "(1)(i)", "Name and contact information of the intervention developer"),
            ("funding_source", "(1)(ii)", "Funding source of the intervention's development"),
            ("output_value", "(1)(iii)", "Value the intervention produces as an output"),
            ("output_type", "(1)(iv)", "Type of output (prediction, classification, recommendation, …)"),
        ),
    ),
    (
        "purpose",
        "Purpose of the intervention",
        (
            ("intended_use", "(2)(i)", "Intended use"),
            ("intended_population", "(2)(ii)", "Intended patient population"),
            ("intended_users", "(2)(iii)", "Intended users"),
            ("decision_role", "(2)(iv)", "Intended decision-making role"),
        ),
    ),
    (
        "out_of_scope",
        "Cautioned out-of-scope use",
        (
            ("cautioned_uses", "(3)(i)", "Tasks, situations or populations where use is cautioned against"),
            ("known_risks", "(3)(ii)", "Known risks, inappropriate settings or uses, known limitations"),
        ),
    ),
    (
        "development",
        "Development details and input features",
        (
            ("inclusion_exclusion", "(4)(i)", "Inclusion and exclusion criteria of the training data"),
            ("demographic_variables", "(4)(ii)", "Use of the (iv)(A)(5)-(13) variables as input features"),
            (
                "training_representativeness",
                "(4)(iii)",
                "Demographic representativeness of the training data",
            ),
            ("training_relevance", "(4)(iv)", "Relevance of the training data to the deployed setting"),
        ),
    ),
    (
        "fairness",
        "Process used to ensure fairness in development",
        (
            ("fairness_approach", "(5)(i)", "Approach taken to make the output fair"),
            ("bias_management", "(5)(ii)", "Approaches to manage, reduce or eliminate bias"),
        ),
    ),
    (
        "external_validation",
        "External validation process",
        (
            ("data_source", "(6)(i)", "Data source, clinical setting or environment of external validation"),
            ("party", "(6)(ii)", "Party that conducted the external testing"),
            (
                "external_representativeness",
                "(6)(iii)",
                "Demographic representativeness of the external data",
            ),
            ("process", "(6)(iv)", "External validation process"),
        ),
    ),
    (
        "performance",
        "Quantitative measures of performance",
        (
            ("validity_test", "(7)(i)", "Validity in test data from the training data's source"),
            ("fairness_test", "(7)(ii)", "Fairness in test data from the training data's source"),
            ("validity_external", "(7)(iii)", "Validity in external data"),
            ("fairness_external", "(7)(iv)", "Fairness in external data"),
            (
                "outcome_evaluations",
                "(7)(v)",
                "References to evaluations of the intervention's effect on outcomes",
            ),
        ),
    ),
    (
        "maintenance",
        "Ongoing maintenance of implementation and use",
        (
            ("validity_monitoring", "(8)(i)", "Process and frequency of monitoring validity"),
            ("validity_local", "(8)(ii)", "Validity in local data"),
            ("fairness_monitoring", "(8)(iii)", "Process and frequency of monitoring fairness"),
            ("fairness_local", "(8)(iv)", "Fairness in local data"),
        ),
    ),
    (
        "updates",
        "Update and continued validation or fairness assessment schedule",
        (
            ("update_process", "(9)(i)", "Process and frequency of updating the intervention"),
            (
                "correction_frequency",
                "(9)(ii)",
                "How often performance is corrected when validity or fairness risks appear",
            ),
        ),
    ),
)


def build_model_card(
    manifest: Manifest,
    site: SiteInfo,
    metrics: Mapping[str, Any] | None,
    *,
    local_report: Mapping[str, Any] | None = None,
    card_url: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The model card of ``manifest`` at ``site``; see the module docstring.

    ``metrics`` is the model's ``metrics.json`` (``None`` when not shipped: the test figures then
    come from the manifest alone), ``local_report`` the latest ``ecglab monitor`` report
    (:func:`cds_service.monitor.load_latest_report`), ``card_url`` where the HTML card is served.
    """
    from cds_service.model_card_chai import chai_section

    values = _values(manifest, site, metrics or {}, local_report or {})
    groups: dict[str, Any] = {}
    for group_id, title, attributes in GROUPS:
        entries: dict[str, Any] = {}
        for attribute_id, ref, attribute_title in attributes:
            value, provenance, data = values[attribute_id]
            entry: dict[str, Any] = {
                "ref": ref,
                "title": attribute_title,
                "value": value,
                "provenance": provenance,
            }
            if data is not None:
                entry["data"] = data
            entries[attribute_id] = entry
        groups[group_id] = {"title": title, "attributes": entries}
    synthetic = manifest.trained_on_synthetic
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "generated_at": (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds"),
        "not_for_clinical_use": synthetic,
        "notice": text.NOT_FOR_CLINICAL_USE if synthetic else None,
        "url": card_url,
        "model": _model_section(manifest),
        "deployer": _deployer_section(site),
        "source_attributes": {"regulation": text.REGULATION, "groups": groups},
        "performance": {
            "test": _test_performance(manifest),
            "subgroups": _clean(metrics.get("subgroups")) if metrics else None,
            "local": _local_summary(local_report) if local_report else None,
        },
    }
    card["chai"] = chai_section(card, manifest, site)
    return card


def attribute_count(card: Mapping[str, Any]) -> int:
    """How many source attributes ``card`` carries (31 for a complete card)."""
    groups = card["source_attributes"]["groups"]
    return sum(len(group["attributes"]) for group in groups.values())


# -- the sections -------------------------------------------------------------------------------------


def _model_section(manifest: Manifest) -> dict[str, Any]:
    """Identity of the deployed model file and where its training data came from."""
    return {
        "name": manifest.name,
        "version": manifest.version,
        "sha256": manifest.onnx.sha256,
        "onnx_file": manifest.onnx.file,
        "created": manifest.created,
        "mapping_version": manifest.mapping_version,
        "intended_use": manifest.intended_use,
        "training_data": {
            "source": manifest.training_data.source,
            "versions": dict(manifest.training_data.versions),
            "details": dict(manifest.training_data.details),
        },
        "trained_on_synthetic": manifest.trained_on_synthetic,
        "n_targets": len(manifest.labels),
        "inputs": {
            "ecg": f"12-lead ECG, {manifest.ecg.duration_s:g} s resampled to {manifest.ecg.sampling_rate_hz:g} Hz",
            "categorical": [c.key for c in manifest.metadata.categorical],
            "continuous": list(manifest.metadata.continuous),
            "missing_indicators": list(manifest.metadata.missing_indicators),
        },
        "software": text.SOFTWARE,
    }


def _deployer_section(site: SiteInfo) -> dict[str, Any]:
    """The site's identity and contact, as stated in the site file."""
    org = site.organisation
    return {
        "organisation": org.name,
        "department": org.department,
        "contact": org.contact.text(),
        "setting": site.deployment.setting,
        "ehr": site.deployment.ehr,
        "go_live": site.deployment.go_live,
    }


def _values(
    manifest: Manifest, site: SiteInfo, metrics: Mapping[str, Any], report: Mapping[str, Any]
) -> dict[str, tuple[str, str, Any]]:
    """(value, provenance, data) of every attribute id."""
    synthetic = manifest.trained_on_synthetic
    ext = site.external_validation
    local = site.local_validation
    upd = site.update_schedule
    validity_test, validity_data = _test_validity(manifest)
    fairness_test, fairness_data = _test_fairness(metrics)
    variables, variables_data = _variables(manifest)
    outcome_refs = [*site.outcome_evaluations]
    outcomes = text.NO_OUTCOME_EVALUATION + text.PAPER_CITATION
    if outcome_refs:
        outcomes = "; ".join(outcome_refs) + " — " + outcomes
    caution = text.CAUTIONED_USES + (" " + text.NOT_FOR_CLINICAL_USE if synthetic else "")
    values: dict[str, tuple[str, str, Any]] = {
        "developer": _developer(site),
        "funding_source": _stated(
            site.funding, "Not stated by the deployer; the ecglab project names no funding source."
        ),
        "output_value": (text.OUTPUT_VALUE, "developer", None),
        "output_type": (text.OUTPUT_TYPE, "developer", {"output_types": ["prediction", "recommendation"]}),
        "intended_use": (f"{text.INTENDED_USE} Model file: {manifest.intended_use}", "manifest", None),
        "intended_population": (text.INTENDED_POPULATION, "developer", None),
        "intended_users": _site_or(site.deployment.intended_users, text.INTENDED_USERS),
        "decision_role": (text.DECISION_ROLE, "developer", {"role": "informs"}),
        "cautioned_uses": (caution, "developer", None),
        "known_risks": (text.KNOWN_LIMITATIONS, "developer", None),
        "inclusion_exclusion": (
            text.INCLUSION_EXCLUSION_SYNTHETIC if synthetic else text.INCLUSION_EXCLUSION_MIMIC,
            "manifest",
            {"training_source": manifest.training_data.source, **_details(manifest)},
        ),
        "demographic_variables": (variables, "manifest", variables_data),
        "training_representativeness": _representativeness(manifest, metrics),
        "training_relevance": (
            text.RELEVANCE_SYNTHETIC if synthetic else text.RELEVANCE_MIMIC,
            "manifest",
            None,
        ),
        "fairness_approach": (text.FAIRNESS_APPROACH, "developer", None),
        "bias_management": (text.BIAS_MANAGEMENT, "developer", None),
        "data_source": _external(ext.data_source),
        "party": _external(ext.party),
        "external_representativeness": _external(ext.demographics),
        "process": _external(ext.process),
        "validity_test": (validity_test, "manifest", validity_data),
        "fairness_test": (fairness_test, "evaluation", fairness_data),
        "validity_external": _external(ext.validity),
        "fairness_external": _external(ext.fairness),
        "outcome_evaluations": (outcomes, "deployer" if outcome_refs else "developer", outcome_refs or None),
        "validity_monitoring": _monitoring(
            local.validity_process, local.validity_frequency, text.VALIDITY_MONITORING
        ),
        "validity_local": _local_validity(report, local.validity_results),
        "fairness_monitoring": _monitoring(
            local.fairness_process, local.fairness_frequency, text.FAIRNESS_MONITORING
        ),
        "fairness_local": _local_fairness(report, local.fairness_results),
        "update_process": _joined((upd.update_process, upd.update_frequency)),
        "correction_frequency": _stated(upd.correction_process, NOT_STATED),
    }
    return values


def _stated(value: str | None, fallback: str) -> tuple[str, str, Any]:
    """The site's statement, else ``fallback`` (a developer statement or "not stated")."""
    if value:
        return value, "deployer", None
    return fallback, "developer" if fallback != NOT_STATED else "deployer", None


def _site_or(value: str | None, default: str) -> tuple[str, str, Any]:
    """The site's wording when given, else the developer's."""
    return (value, "deployer", None) if value else (default, "developer", None)


def _joined(parts: Sequence[str | None]) -> tuple[str, str, Any]:
    """Several site statements as one value ("not stated" when all are empty)."""
    stated = [p.strip() for p in parts if p and p.strip()]
    return (" ".join(stated) if stated else NOT_STATED), "deployer", None


def _external(value: str | None) -> tuple[str, str, Any]:
    """An external-validation field: the site's statement, else "none performed"."""
    if value:
        return value, "deployer", None
    return "No external validation has been performed or stated for this model.", "deployer", None


def _monitoring(process: str | None, frequency: str | None, default: str) -> tuple[str, str, Any]:
    """How (and how often) the site monitors: its own words, else the tool the project provides."""
    if process or frequency:
        value, _, _ = _joined((process, frequency))
        return value, "deployer", None
    return f"{default} Frequency: {NOT_STATED.lower()}", "developer", None


def _developer(site: SiteInfo) -> tuple[str, str, Any]:
    """The developer named by the site, else the ecglab project."""
    dev = site.developer
    if dev.name or dev.contact.text():
        parts = [p for p in (dev.name, dev.contact.text()) if p]
        return f"{'; '.join(parts)} (software: {text.SOFTWARE})", "deployer", None
    return (
        f"The ecglab project, {text.SOFTWARE}; method by Lopez Alcaraz and Strodthoff. "
        "Developer contact: not stated by the deployer.",
        "developer",
        None,
    )


def _details(manifest: Manifest) -> dict[str, Any]:
    """The manifest's training-data details (record counts, generator seed, …)."""
    return {str(k): v for k, v in manifest.training_data.details.items()}


def _fmt(value: Any) -> str:
    """A figure with 3 decimals, or 'n/a'."""
    return f"{value:.3f}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def _ci(point: Any, low: Any, high: Any) -> str:
    """'0.957 [0.927, 0.983]'."""
    return f"{_fmt(point)} [{_fmt(low)}, {_fmt(high)}]"


def _test_performance(manifest: Manifest) -> dict[str, Any]:
    """Per-target test figures and thresholds from the manifest, plus its evaluation summary."""
    evaluation = manifest.evaluation
    return {
        "split": evaluation.get("split"),
        "fold": evaluation.get("fold"),
        "n_records": evaluation.get("n_records"),
        "bootstrap": evaluation.get("bootstrap"),
        "threshold_rule": evaluation.get("threshold_rule"),
        "tasks": _clean(evaluation.get("tasks")),
        "micro": _clean(evaluation.get("micro")),
        "targets": [
            {
                "target": label.target,
                "label": label.label,
                "lab_key": label.lab_key,
                "direction": label.direction,
                "task": label.task,
                "horizon_min": label.horizon_min,
                "value_threshold": label.value_threshold,
                "unit": label.unit,
                "decision_threshold": label.decision_threshold,
                "threshold_rule": label.threshold_rule,
                "auroc": _finite(label.auroc),
                "ci_low": _finite(label.ci_low),
                "ci_high": _finite(label.ci_high),
                "n_pos": label.n_pos,
                "n_neg": label.n_neg,
            }
            for label in manifest.labels
        ],
    }


def _test_validity(manifest: Manifest) -> tuple[str, Any]:
    """(7)(i): macro AUROC per task and how many targets clear AUROC 0.70 with their CI."""
    evaluation = manifest.evaluation
    tasks = evaluation.get("tasks")
    parts = []
    if isinstance(tasks, Mapping):
        for task, entry in tasks.items():
            if isinstance(entry, Mapping):
                parts.append(
                    f"{task} {_ci(entry.get('macro_auroc'), entry.get('ci_low'), entry.get('ci_high'))}"
                )
    scored = [lab for lab in manifest.labels if lab.auroc is not None]
    strong = [lab for lab in scored if lab.ci_low is not None and lab.ci_low > 0.7]
    where = f"test fold {evaluation.get('fold', '?')}, {evaluation.get('n_records', '?')} ECGs"
    head = f"Held-out {where}: macro AUROC [95% CI] by task: " + (
        "; ".join(parts) if parts else "not recorded"
    )
    tail = (
        f". {len(strong)} of {len(scored)} targets have an AUROC whose CI lower bound exceeds 0.70; "
        "per-target AUROC, CI, counts and decision thresholds are in performance.test."
    )
    return head + tail, {"n_targets": len(scored), "n_ci_low_above_0_70": len(strong)}


def _subgroup_line(attribute: str, groups: Mapping[str, Any]) -> str:
    """'sex: female 0.81 [0.77, 0.85] (n=120), male …'."""
    items = [
        f"{group} {_ci(entry.get('macro_auroc'), entry.get('ci_low'), entry.get('ci_high'))} (n={entry.get('n', '?')})"
        for group, entry in groups.items()
        if isinstance(entry, Mapping)
    ]
    return f"{attribute}: " + (", ".join(items) if items else "no group")


def _test_fairness(metrics: Mapping[str, Any]) -> tuple[str, Any]:
    """(7)(ii): macro AUROC by sex and age band on the test fold, when evaluate computed them."""
    subgroups = metrics.get("subgroups")
    if not isinstance(subgroups, Mapping) or not isinstance(subgroups.get("attributes"), Mapping):
        return (
            "Not computed for this model: its evaluation metrics carry no subgroup figures "
            "('ecglab evaluate' computes AUROC by sex and age band with bootstrap CIs).",
            None,
        )
    lines = [_subgroup_line(a, g) for a, g in subgroups["attributes"].items() if isinstance(g, Mapping)]
    gaps_raw = subgroups.get("gaps")
    gaps: Mapping[str, Any] = gaps_raw if isinstance(gaps_raw, Mapping) else {}
    widest = []
    for attribute, per_target in gaps.items():
        found = [(t, g["auroc_gap"]) for t, g in (per_target or {}).items() if isinstance(g, Mapping)]
        if found:
            target, gap = max(found, key=lambda tg: tg[1])
            widest.append(f"{attribute} {_fmt(gap)} ({target})")
    text_out = "Macro AUROC [95% CI] on the test fold by " + "; ".join(lines) + "."
    if widest:
        text_out += " Largest per-target AUROC gap between groups: " + "; ".join(widest) + "."
    return text_out + " Per-target figures with CIs are in performance.subgroups.", {
        "source": "metrics.subgroups"
    }


def _variables(manifest: Manifest) -> tuple[str, dict[str, Any]]:
    """(4)(ii): which of the HTI-1 demographic and social variables are model inputs."""
    inputs = {c.key: list(c.categories) for c in manifest.metadata.categorical}
    inputs.update({key: [] for key in manifest.metadata.continuous})
    data: dict[str, Any] = {}
    used_names: list[str] = []
    unused_names: list[str] = []
    for key, name, features in text.HTI1_VARIABLES:
        used = [f for f in features if f in inputs]
        note = None
        if key == "date_of_birth" and used:
            note = "used as age in years at the ECG"
        if key == "ethnicity" and "hispanic" in inputs.get("race", []):
            note = "not a separate input; the race input has a 'hispanic' category (MIMIC's combined field)"
        data[key] = {"used": bool(used), "features": used, "note": note}
        (used_names if used else unused_names).append(name + (f" ({note})" if note else ""))
    value = (
        "Used as input features: "
        + (", ".join(used_names) if used_names else "none")
        + ". Not used: "
        + (", ".join(unused_names) if unused_names else "none")
        + "."
    )
    return value, data


def _representativeness(manifest: Manifest, metrics: Mapping[str, Any]) -> tuple[str, str, Any]:
    """(4)(iii): the test fold's composition by sex and age band when known, plus the source's nature."""
    base = (
        text.REPRESENTATIVENESS_SYNTHETIC if manifest.trained_on_synthetic else text.REPRESENTATIVENESS_MIMIC
    )
    subgroups = metrics.get("subgroups")
    counts: dict[str, dict[str, int]] = {}
    if isinstance(subgroups, Mapping) and isinstance(subgroups.get("attributes"), Mapping):
        for attribute, groups in subgroups["attributes"].items():
            if isinstance(groups, Mapping):
                counts[attribute] = {
                    g: int(e.get("n", 0)) for g, e in groups.items() if isinstance(e, Mapping)
                }
    if not counts:
        return base + " Group counts of the test fold were not recorded.", "manifest", None
    described = "; ".join(
        f"{attribute}: " + ", ".join(f"{g} {n}" for g, n in groups.items())
        for attribute, groups in counts.items()
    )
    return f"{base} Test fold ECGs by group — {described}.", "evaluation", {"test_fold_counts": counts}


def _local_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a monitor report the card shows (aggregate figures only, no patient data)."""
    keep = ("format", "generated_at", "period", "model", "counts", "summary")
    out = {k: _clean(report.get(k)) for k in keep if k in report}
    targets = report.get("targets")
    if isinstance(targets, Mapping):
        fields = (
            "n_outcomes",
            "n_pos",
            "alert_rate",
            "auroc",
            "auroc_ci_low",
            "auroc_ci_high",
            "ppv",
            "sensitivity",
            "ece",
        )
        out["targets"] = {
            t: {f: _clean(e.get(f)) for f in fields} for t, e in targets.items() if isinstance(e, Mapping)
        }
    return out


def _local_validity(report: Mapping[str, Any], stated: str | None) -> tuple[str, str, Any]:
    """(8)(ii): the latest monitor report's realised AUROC, else the site's words, else "not yet"."""
    summary = report.get("summary") if isinstance(report.get("summary"), Mapping) else None
    if summary is not None:
        period = report.get("period", {})
        value = (
            f"Local monitoring {period.get('since', '?')} to {period.get('until', '?')}: "
            f"{summary.get('n_predictions', '?')} audited predictions, "
            f"macro AUROC {_ci(summary.get('macro_auroc'), summary.get('macro_auroc_ci_low'), summary.get('macro_auroc_ci_high'))} "
            f"over {summary.get('n_targets_evaluable', 0)} targets with enough outcomes."
        )
        if stated:
            value += " " + stated
        return value, "local-monitoring", {"source": "performance.local"}
    if stated:
        return stated, "deployer", None
    return "Not yet measured at this site (run 'ecglab monitor').", "deployer", None


def _local_fairness(report: Mapping[str, Any], stated: str | None) -> tuple[str, str, Any]:
    """(8)(iv): the monitor report's macro AUROC by sex and age band, else the site's words."""
    summary = report.get("summary") if isinstance(report.get("summary"), Mapping) else None
    by_group = summary.get("by_subgroup") if summary is not None else None
    if isinstance(by_group, Mapping) and by_group:
        lines = [_subgroup_line(a, g) for a, g in by_group.items() if isinstance(g, Mapping)]
        value = "Realised macro AUROC by " + "; ".join(lines) + "."
        if stated:
            value += " " + stated
        return value, "local-monitoring", {"source": "performance.local"}
    if stated:
        return stated, "deployer", None
    return "Not yet measured at this site (run 'ecglab monitor').", "deployer", None


def _finite(value: float | None) -> float | None:
    """``value`` when finite, else ``None``."""
    return value if value is not None and math.isfinite(value) else None


def _clean(value: Any) -> Any:
    """A JSON-safe deep copy: NaN/inf become ``None``, tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value
