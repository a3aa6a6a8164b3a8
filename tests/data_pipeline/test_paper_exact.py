"""The paper-exact switches (issue 15): the abnormality comparison (``ecglab preprocess
--abnormal-rule``) and the missingness flags as model inputs (train key ``use_missing_indicators``)."""

from __future__ import annotations

import argparse
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
import yaml

from fhir_mappings import DEFAULT_DIR, EcgFile
from fhir_mappings.tasks import MAX_WINDOW_END_MIN, task_window
from model_training import labels as lab
from model_training.config import TrainConfig, apply_overrides
from model_training.data import MISSING_INDICATORS, cont_feature_names, fit_metadata_spec
from model_training.mimic_tables import connect
from model_training.preprocess import add_arguments


def _classes(rule: str) -> list[int]:
    """Classes of values at, below, inside and above the thresholds [3.5, 5.0] under ``rule``."""
    con = connect(None, memory_limit="256MB", threads=1, temp_dir=None)
    try:
        con.execute("CREATE TABLE t AS SELECT 3.5::DOUBLE AS lower, 5.0::DOUBLE AS upper")
        con.execute("CREATE TABLE l AS SELECT unnest([3.4, 3.5, 4.2, 5.0, 5.1])::DOUBLE AS valuenum")
        rows = con.execute(f"SELECT {lab.class_sql(rule)} FROM l, t ORDER BY l.valuenum").fetchall()
    finally:
        con.close()
    return [int(r[0]) for r in rows]


def test_strict_rule_is_the_reference_code_and_inclusive_the_paper_text() -> None:
    """strict: < lower is low, > upper is high (values on a threshold are normal); inclusive: <=, >=."""
    assert _classes("strict") == [1, 0, 0, 0, 2]
    assert _classes("inclusive") == [1, 1, 0, 2, 2]
    with pytest.raises(ValueError, match="abnormal_rule"):
        lab.class_sql("loose")


def test_preprocess_flag_defaults_to_strict() -> None:
    """``--abnormal-rule`` accepts strict|inclusive and defaults to the reference code's strict."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--out", "x"]).abnormal_rule == "strict"
    assert parser.parse_args(["--out", "x", "--abnormal-rule", "inclusive"]).abnormal_rule == "inclusive"
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--abnormal-rule", "loose"])


def test_label_windows_come_from_the_contract() -> None:
    """Labels use fhir_mappings' validity windows (est ECG ± 60 min, monN ECG … ECG + N min), whose
    longest end (120 min) is the default ECG age limit when ecg.yaml leaves it out."""
    assert task_window("est") == (timedelta(minutes=-60), timedelta(minutes=60))
    assert task_window("mon30") == (timedelta(0), timedelta(minutes=30))
    assert lab.EST_WINDOW_MIN == 60 and lab.HORIZON_MIN == {"mon30": 30, "mon60": 60, "mon120": 120}
    assert MAX_WINDOW_END_MIN == 120
    raw = yaml.safe_load((DEFAULT_DIR / "ecg.yaml").read_text(encoding="utf-8"))
    del raw["max_age_minutes"]
    assert EcgFile.model_validate(raw).max_age_minutes == MAX_WINDOW_END_MIN
    assert EcgFile.model_validate({**raw, "max_age_minutes": 45}).max_age_minutes == 45


def test_missing_indicators_switch() -> None:
    """Default: one ``{key}_missing`` input per flagged feature; false: none (the published model)."""
    assert TrainConfig().use_missing_indicators is True
    cfg = apply_overrides(TrainConfig(), {"use_missing_indicators": "false"})
    assert cfg.use_missing_indicators is False
    rng = np.random.default_rng(0)
    keys = [
        "sex",
        "race",
        "age",
        "temperature",
        "heart_rate",
        "resp_rate",
        "spo2",
        "sbp",
        "dbp",
        "bmi",
        "weight",
        "height",
    ]
    metadata = pd.DataFrame({k: rng.normal(50, 5, 40) for k in keys}).assign(sex=1.0, race=2.0)
    with_flags = fit_metadata_spec(metadata, np.arange(40))
    without = fit_metadata_spec(metadata, np.arange(40), missing_indicators=False)
    assert with_flags.missing_indicators == list(MISSING_INDICATORS) and without.missing_indicators == []
    assert cont_feature_names(without) == list(without.continuous)
    assert len(cont_feature_names(with_flags)) == len(without.continuous) + len(MISSING_INDICATORS)
