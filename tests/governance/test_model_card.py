"""The model card (HTI-1 source attributes, CHAI fields, JSON Schema, HTML) and the site file."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from pydantic import BaseModel

from cds_service.model_card import GROUPS, attribute_count, build_model_card
from cds_service.model_card_html import render_model_card_html
from cds_service.monitor.outcomes import OutcomeRow
from cds_service.monitor.report import build_report
from cds_service.site_info import SiteInfo, load_site_info
from fhir_mappings.errors import ConfigError
from fhir_mappings.manifest import Manifest, load_manifest
from model_training.subgroups import subgroup_metrics

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "models" / "ecglab-0.2.0-demo.manifest.json"
METRICS = ROOT / "models" / "demo-run" / "metrics.json"
EXAMPLE_SITE = ROOT / "models" / "site-info.example.yaml"
SCHEMA = json.loads((ROOT / "cds_service" / "schemas" / "model-card.schema.json").read_text())
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(MANIFEST, verify_file=False)


@pytest.fixture(scope="module")
def metrics(manifest: Manifest) -> dict[str, Any]:
    """The bundled metrics plus subgroup figures computed on a small synthetic test fold."""
    rng = np.random.default_rng(0)
    n, targets = 120, [label.target for label in manifest.labels[:3]]
    y = (rng.random((n, 3)) < 0.4).astype(float)
    p = np.clip(0.4 * y + 0.6 * rng.random((n, 3)), 0, 1)
    groups = {"sex": ["female", "male"] * (n // 2), "age_band": ["40-59", "60-79", "80+"] * (n // 3)}
    data = json.loads(METRICS.read_text())
    data["subgroups"] = subgroup_metrics(y, p, groups, targets=targets, thresholds=[0.5] * 3, n_boot=50)
    return data


def validate(card: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker()).validate(card)


def attributes(card: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for g in card["source_attributes"]["groups"].values() for k, v in g["attributes"].items()}


def test_all_31_attributes_in_9_groups_and_the_schema_requires_each(manifest: Manifest) -> None:
    card = build_model_card(manifest, load_site_info(None), None, now=NOW)
    validate(card)
    assert len(card["source_attributes"]["groups"]) == 9 and attribute_count(card) == 31
    assert [len(attrs) for _, _, attrs in GROUPS] == [4, 4, 2, 4, 2, 4, 5, 4, 2]
    schema_groups = SCHEMA["properties"]["source_attributes"]["properties"]["groups"]
    for group_id, _, attrs in GROUPS:
        required = schema_groups["properties"][group_id]["properties"]["attributes"]["required"]
        assert required == [a for a, _, _ in attrs]
    refs = [a["ref"] for a in attributes(card).values()]
    assert len(set(refs)) == 31 and refs[0] == "(1)(i)" and refs[-1] == "(9)(ii)"
    broken = copy.deepcopy(card)
    del broken["source_attributes"]["groups"]["performance"]["attributes"]["fairness_test"]
    with pytest.raises(jsonschema.ValidationError, match="fairness_test"):
        validate(broken)


def test_manifest_values_and_not_for_clinical_use(manifest: Manifest, metrics: dict[str, Any]) -> None:
    card = build_model_card(
        manifest, load_site_info(EXAMPLE_SITE), metrics, card_url="https://cds.example.org/model-card"
    )
    validate(card)
    assert card["not_for_clinical_use"] is True and "NOT FOR CLINICAL USE" in card["notice"]
    assert card["model"]["sha256"] == manifest.onnx.sha256 and card["model"]["version"] == "0.2.0-demo"
    by_target = {t["target"]: t for t in card["performance"]["test"]["targets"]}
    label = manifest.labels[5]
    assert (
        by_target[label.target]["auroc"] == label.auroc and by_target[label.target]["ci_low"] == label.ci_low
    )
    assert by_target[label.target]["decision_threshold"] == label.decision_threshold
    attrs = attributes(card)
    est = json.loads(MANIFEST.read_text())["evaluation"]["tasks"]["est"]  # the manifest's est macro AUROC
    stated = f"est {est['macro_auroc']:.3f} [{est['ci_low']:.3f}, {est['ci_high']:.3f}]"
    assert stated in attrs["validity_test"]["value"]
    assert "NOT FOR CLINICAL USE" in attrs["cautioned_uses"]["value"]
    variables = attrs["demographic_variables"]["data"]
    assert variables["race"]["used"] and variables["sex"]["used"] and variables["date_of_birth"]["used"]
    assert not variables["language"]["used"] and not variables["sdoh"]["used"]
    assert attrs["fairness_test"]["provenance"] == "evaluation"
    female = metrics["subgroups"]["attributes"]["sex"]["female"]
    assert f"female {female['macro_auroc']:.3f}" in attrs["fairness_test"]["value"]
    assert attrs["training_representativeness"]["data"]["test_fold_counts"]["sex"] == {
        "female": 60,
        "male": 60,
    }
    assert attrs["funding_source"]["provenance"] == "deployer"
    assert attrs["party"]["value"].startswith("Example General Hospital Data Science Unit")
    chai = card["chai"]["AppliedModelCard"]
    assert chai["BasicInfo"]["ModelName"] == "ecglab 0.2.0-demo"
    assert chai["ReleaseInfo"]["ReleaseStage"].startswith("Demonstration only")
    result = json.loads(chai["KeyMetrics"]["FairnessEquity"]["Results"][0]["ValueJson"])
    assert result["n"] == 60


def test_unstated_site_fields_say_so(manifest: Manifest) -> None:
    card = build_model_card(manifest, SiteInfo(), None)
    attrs = attributes(card)
    assert attrs["correction_frequency"]["value"] == "Not stated by the deployer."
    assert "No external validation" in attrs["data_source"]["value"]
    assert attrs["fairness_test"]["value"].startswith("Not computed for this model")
    assert attrs["validity_local"]["value"].startswith("Not yet measured")
    assert card["performance"]["subgroups"] is None and card["performance"]["local"] is None


def test_real_data_model_is_not_flagged(manifest: Manifest) -> None:
    data = manifest.model_dump(mode="json")
    data["training_data"]["source"] = "MIMIC-IV"
    card = build_model_card(Manifest.model_validate(data), SiteInfo(), None)
    validate(card)
    assert card["not_for_clinical_use"] is False and card["notice"] is None
    assert "MIMIC-IV-ECG record" in attributes(card)["inclusion_exclusion"]["value"]


def test_local_monitoring_report_fills_group_8(manifest: Manifest) -> None:
    rng = np.random.default_rng(1)
    rows = [
        OutcomeRow(
            i,
            manifest.labels[5].target,
            "creatinine",
            "est",
            float(pr),
            0.4,
            int(pr > 0.5) if i % 5 else 1 - int(pr > 0.5),
            sex,
            "60-79",
            "shadow",
        )
        for i, (pr, sex) in enumerate(zip(rng.random(200), ["female", "male"] * 100, strict=True))
    ]
    report = build_report(
        rows,
        period={"since": "2026-01-01", "until": "2026-02-01"},
        model={"sha256": manifest.onnx.sha256},
        counts={},
        drift={},
        feedback={},
        fhir_server="https://fhir.example.org",
        n_boot=50,
        now=NOW,
    )
    card = build_model_card(manifest, SiteInfo(), None, local_report=report)
    validate(card)
    attrs = attributes(card)
    assert attrs["validity_local"]["provenance"] == "local-monitoring"
    assert f"{report['summary']['macro_auroc']:.3f}" in attrs["validity_local"]["value"]
    assert "female" in attrs["fairness_local"]["value"] and "male" in attrs["fairness_local"]["value"]
    local = card["performance"]["local"]["targets"][manifest.labels[5].target]
    assert local["auroc"] == report["targets"][manifest.labels[5].target]["auroc"]


def test_html_is_escaped_self_contained_and_complete(manifest: Manifest, metrics: dict[str, Any]) -> None:
    site = SiteInfo.model_validate({"organisation": {"name": "<script>alert(1)</script> & Co"}})
    card = build_model_card(manifest, site, metrics)
    page = render_model_card_html(card, json_url="/cds-services/model-card")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in page
    assert (
        not re.search(r"""(src|href)=['"]https?://""", page) and "<link" not in page and "@import" not in page
    )
    assert page.index("NOT FOR CLINICAL USE") < page.index("Source attributes")
    for _, _, attrs in GROUPS:
        for _, _, title in attrs:
            assert title.replace("'", "&#x27;") in page
    assert "@media print" in page and manifest.onnx.sha256 in page


def _every_field_set(model: BaseModel, where: str = "") -> list[str]:
    """Names of fields (recursively) that the example leaves at their default."""
    unset = []
    for name, value in model:
        if name not in model.model_fields_set:
            unset.append(where + name)
        elif isinstance(value, BaseModel):
            unset += _every_field_set(value, f"{where}{name}.")
    return unset


def test_example_site_file_documents_every_field() -> None:
    assert _every_field_set(load_site_info(EXAMPLE_SITE)) == []


def test_site_file_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "site.yaml"
    bad.write_text("organisation:\n  nmae: typo\n")
    with pytest.raises(ConfigError, match=r"organisation\.nmae"):
        load_site_info(bad)
    bad.write_text("organisation: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_site_info(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_site_info(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_site_info(empty) == SiteInfo()
