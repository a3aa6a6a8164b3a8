"""The model card's ``chai`` section: the same content under the CHAI Applied Model Card field names.

The Coalition for Health AI publishes an *Applied Model Card* with a machine-readable schema
(https://mc.chai.org/v0.2/schema.xsd) that EHR vendors and registries ingest. Its element names
are used here as JSON keys, nested as in the schema (``BasicInfo``, ``ReleaseInfo``,
``ModelSummary``, ``UsesAndDirections``, ``Warnings``, ``TrustIngredients``, ``KeyMetrics``,
``Resources``, ``Bibliography``); each ``MetricResult`` keeps the schema's ``Label`` +
``ValueJson`` (a JSON text) pair. Values are taken from the HTI-1 attributes already built, so the
two views of the card cannot disagree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cds_service import model_card_text as text
from cds_service.site_info import SiteInfo
from fhir_mappings.manifest import Manifest

CHAI_SCHEMA = "https://mc.chai.org/v0.2/schema.xsd"
KEYWORDS = ("ECG", "electrocardiogram", "laboratory testing", "lab abnormality prediction", "CDS Hooks")


def chai_section(card: Mapping[str, Any], manifest: Manifest, site: SiteInfo) -> dict[str, Any]:
    """The ``chai`` section of ``card`` (whose ``source_attributes`` are already filled)."""
    groups = card["source_attributes"]["groups"]

    def value(group: str, attribute: str) -> str:
        """The text of one HTI-1 attribute."""
        return str(groups[group]["attributes"][attribute]["value"])

    synthetic = manifest.trained_on_synthetic
    contact = (
        site.developer.contact.text() or site.organisation.contact.text() or "Not stated by the deployer."
    )
    if synthetic:
        stage = "Demonstration only: trained on synthetic data, not for clinical use"
    elif site.deployment.go_live:
        stage = f"Deployed (live since {site.deployment.go_live})"
    else:
        stage = "Pilot: not yet in live use at this site"
    performance = card["performance"]
    return {
        "schema": CHAI_SCHEMA,
        "AppliedModelCard": {
            "BasicInfo": {
                "ModelName": f"{manifest.name} {manifest.version}",
                "ModelDeveloper": value("details_and_output", "developer"),
                "DeveloperContact": contact,
            },
            "ReleaseInfo": {
                "ReleaseStage": stage,
                "ReleaseDate": manifest.created,
                "ReleaseVersion": manifest.version,
                "GlobalAvailability": "Open-source software; each site deploys and validates its own instance.",
                "EHRCompatibility": [site.deployment.ehr]
                if site.deployment.ehr
                else ["Any EHR supporting CDS Hooks 2.0"],
                "RegulatoryApproval": site.regulatory_status or "None stated.",
            },
            "ModelSummary": {
                "Summary": value("details_and_output", "output_value"),
                "Keywords": list(KEYWORDS),
            },
            "UsesAndDirections": {
                "IntendedUseAndWorkflow": value("purpose", "intended_use"),
                "PrimaryIntendedUsers": value("purpose", "intended_users"),
                "HowToUse": site.deployment.how_to_use or value("purpose", "decision_role"),
                "TargetedPatientPopulation": value("purpose", "intended_population"),
                "CautionedOutOfScopeSettings": value("out_of_scope", "cautioned_uses"),
            },
            "Warnings": {
                "KnownRisksAndLimitations": value("out_of_scope", "known_risks"),
                "KnownBiasesOrEthicalConsiderations": value("development", "demographic_variables")
                + " "
                + value("performance", "fairness_test"),
                "ClinicalRiskLevel": text.CLINICAL_RISK,
            },
            "TrustIngredients": {
                "AISystemFacts": {
                    "OutcomesAndOutputs": value("details_and_output", "output_type"),
                    "ModelType": (
                        "Multimodal deep learning: S4 state-space ECG encoder late-fused with a metadata MLP, "
                        f"{len(manifest.labels)} sigmoid outputs; ONNX file sha256 {manifest.onnx.sha256}."
                    ),
                    "InputDataSource": (
                        "The EHR's FHIR data through CDS Hooks prefetch or FHIR queries: newest 12-lead ECG, "
                        "Patient (sex, birth date), vital signs and biometrics."
                    ),
                    "OutputAndInputDataTypes": (
                        "Input: ECG waveform (mV), categorical and continuous metadata. Output: probabilities "
                        "in [0, 1] and CDS Hooks cards with draft ServiceRequests."
                    ),
                    "DevelopmentDataCharacterization": value("development", "inclusion_exclusion")
                    + " "
                    + value("development", "training_representativeness"),
                    "BiasMitigationApproaches": value("fairness", "bias_management"),
                    "OngoingMaintenance": value("maintenance", "validity_monitoring"),
                    "Security": (
                        "JWT-authenticated CDS Hooks calls (ES384/RS384, issuer allowlist, replay cache); "
                        "audit trail stores a keyed hash of the patient id, never the id."
                    ),
                    "Transparency": "This model card (JSON and HTML), the audit trail and 'ecglab monitor' reports.",
                },
                "TransparencyInformation": {
                    "FundingSource": value("details_and_output", "funding_source"),
                    "ThirdPartyInformation": f"Method: {text.PAPER_CITATION}",
                    "StakeholdersConsulted": site.stakeholders_consulted or "Not stated by the deployer.",
                },
            },
            "KeyMetrics": {
                "UsefulnessUsabilityEfficacy": _key_metric(
                    "Discriminate abnormal from normal lab values (AUROC) on held-out data.",
                    _task_results(performance.get("test") or {}),
                    value("performance", "validity_test"),
                    "Internal validation: held-out, patient-grouped test fold.",
                ),
                "FairnessEquity": _key_metric(
                    "Comparable discrimination across sex and age bands.",
                    _subgroup_results(performance.get("subgroups")),
                    value("performance", "fairness_test"),
                    "Internal validation by subgroup: held-out test fold.",
                ),
                "SafetyReliability": _key_metric(
                    "Realised AUROC, PPV, sensitivity and calibration on the site's own patients.",
                    _local_results(performance.get("local")),
                    value("maintenance", "validity_local"),
                    "Local validation: audited predictions joined with later lab results ('ecglab monitor').",
                ),
            },
            "Resources": {
                "EvaluationReferences": value("performance", "outcome_evaluations"),
                "ClinicalTrial": "None.",
                "PeerReviewedPublications": text.PAPER_CITATION,
                "ReimbursementStatus": "None.",
                "PatientConsentOrDisclosure": site.patient_disclosure or "Not stated by the deployer.",
            },
            "Bibliography": text.PAPER_CITATION,
        },
    }


def _key_metric(
    goal: str, results: list[dict[str, str]], interpretation: str, test_type: str
) -> dict[str, Any]:
    """One CHAI ``KeyMetric`` (the schema requires at least one result: an explicit 'not available' if none)."""
    return {
        "MetricGoal": goal,
        "Results": results or [{"Label": "not available", "ValueJson": "null"}],
        "Interpretation": interpretation,
        "TestType": test_type,
        "TestingDataDescription": test_type,
        "ValidationProcessAndJustification": (
            "AUROC with empirical bootstrap 95% confidence intervals; decision thresholds chosen on the "
            "validation fold (or re-fitted locally with 'ecglab recalibrate')."
        ),
    }


def _result(label: str, payload: Mapping[str, Any]) -> dict[str, str]:
    """A ``MetricResult``: a label and the figures as JSON text."""
    return {"Label": label, "ValueJson": json.dumps(dict(payload), sort_keys=True)}


def _task_results(test: Mapping[str, Any]) -> list[dict[str, str]]:
    """Macro AUROC per task from the manifest's evaluation summary."""
    tasks = test.get("tasks")
    if not isinstance(tasks, Mapping):
        return []
    keys = ("macro_auroc", "ci_low", "ci_high")
    return [
        _result(f"{task} macro AUROC", {k: entry.get(k) for k in keys})
        for task, entry in tasks.items()
        if isinstance(entry, Mapping)
    ]


def _subgroup_results(subgroups: Any) -> list[dict[str, str]]:
    """Macro AUROC per subgroup from the evaluation's ``subgroups`` figures."""
    if not isinstance(subgroups, Mapping) or not isinstance(subgroups.get("attributes"), Mapping):
        return []
    keys = ("macro_auroc", "ci_low", "ci_high", "n")
    out = []
    for attribute, groups in subgroups["attributes"].items():
        for group, entry in (groups or {}).items():
            if isinstance(entry, Mapping):
                out.append(_result(f"{attribute}={group} macro AUROC", {k: entry.get(k) for k in keys}))
    return out


def _local_results(local: Any) -> list[dict[str, str]]:
    """Realised figures from the latest monitor report's summary."""
    if not isinstance(local, Mapping) or not isinstance(local.get("summary"), Mapping):
        return []
    summary = local["summary"]
    keys = (
        "n_predictions",
        "macro_auroc",
        "macro_auroc_ci_low",
        "macro_auroc_ci_high",
        "n_targets_evaluable",
    )
    return [_result("local macro AUROC", {k: summary.get(k) for k in keys})]
