"""The tiny planted DATASET and the one tiny training run every model test shares (a pytest plugin).

Registered in ``tests/conftest.py`` (``pytest_plugins``), so any test module can ask for:

* ``tiny_dataset``: a DATASET in the ``ecglab preprocess`` layout with planted, learnable targets
  (written once per test session by :func:`write_tiny_dataset`);
* ``tiny_run``: that DATASET trained once per test session through ``ecglab train`` (4 epochs of the
  :data:`TINY` model, seed 0, CPU);
* ``evaluated_tiny_run``: a copy of that run, evaluated once through ``ecglab evaluate`` (200
  bootstrap resamples), for the evaluation and export tests.

The fixtures are session-scoped and shared: a test must not modify them (copy the folder first).
Tests of training itself that need a run of their own (exact resume, DDP, bad flags) call
:func:`train_cli` on ``tmp_path``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cds_service.cli import main

#: The targets :func:`write_tiny_dataset` plants (``Sodium_low_est`` is pure noise).
PLANTED = ("NTproBNP_high_est", "NTproBNP_high_mon30", "Hemoglobin_low_est")
#: Every target of the tiny DATASET, in column order.
TARGETS = (*PLANTED, "Sodium_low_est")
#: A model small enough to train in about a second per epoch on one CPU thread.
TINY = ["--model.d_model=32", "--model.n_layers=1", "--batch_size=16", "--num_threads=1", "--progress=false"]
#: Epochs and seed of the shared run (``tiny_run``).
TINY_RUN_EPOCHS = 4
TINY_RUN_SEED = 0
VITALS = {
    "temperature": (98.3, 0.9),
    "heart_rate": (80.0, 15.0),
    "resp_rate": (17.0, 2.0),
    "spo2": (97.0, 2.0),
    "sbp": (125.0, 15.0),
    "dbp": (75.0, 10.0),
    "bmi": (27.0, 5.0),
    "weight": (80.0, 15.0),
    "height": (170.0, 10.0),
}


def write_tiny_dataset(
    root: Path, n_train: int = 288, n_val: int = 72, n_test: int = 72, seed: int = 0
) -> Path:
    """Write a DATASET (the ``ecglab preprocess`` layout) with planted, learnable targets.

    * ``NTproBNP_high_est`` / ``_mon30``: a latent z shifts every lead by 0.4·z mV (ECG signal);
    * ``Hemoglobin_low_est``: follows sex (metadata signal);
    * ``Sodium_low_est``: pure noise.
    20 % of labels and ~30 % of vitals are missing. ``dataset.json`` points to a
    ``ground_truth.json`` listing the planted targets, as a synthetic DATASET does.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    folds = np.r_[np.arange(n_train) % 18, np.full(n_val, 18), np.full(n_test, 19)]
    study = 40_000_000 + np.arange(n)
    records = pd.DataFrame(
        {
            "study_id": study,
            "subject_id": 10_000_000 + np.arange(n),
            "ecg_time": pd.Timestamp("2150-01-01") + pd.to_timedelta(np.arange(n), unit="h"),
            "strat_fold": folds,
        }
    )
    z = rng.normal(size=n)
    t = np.arange(1000) / 100.0
    ecg = (
        0.05 * rng.normal(size=(n, 1000, 12))
        + (0.4 * z)[:, None, None]
        + 0.3 * np.sin(2 * np.pi * 1.2 * t)[None, :, None]
    )
    np.save(root / "ecg.npy", ecg.astype(np.float32))
    sex = rng.integers(0, 2, n).astype(float)
    labels = pd.DataFrame(
        {
            "study_id": study,
            "NTproBNP_high_est": (z + 0.3 * rng.normal(size=n) > 0.3).astype(float),
            "NTproBNP_high_mon30": (z + 0.3 * rng.normal(size=n) > 0.3).astype(float),
            "Hemoglobin_low_est": (sex + 0.3 * rng.normal(size=n) > 0.5).astype(float),
            "Sodium_low_est": (rng.random(n) < 0.3).astype(float),
        }
    )
    for column in labels.columns[1:]:
        labels.loc[rng.random(n) < 0.2, column] = np.nan
    meta = pd.DataFrame({"study_id": study, "sex": sex, "race": rng.integers(0, 5, n).astype(float)})
    meta["age"] = rng.uniform(20, 90, n)
    for key, (mu, sd) in VITALS.items():
        meta[key] = rng.normal(mu, sd, n)
        meta.loc[rng.random(n) < 0.3, key] = np.nan
    meta.loc[rng.random(n) < 0.1, "race"] = np.nan
    records.to_parquet(root / "records.parquet", index=False)
    labels.to_parquet(root / "labels.parquet", index=False)
    meta.to_parquet(root / "metadata.parquet", index=False)
    (root / "ground_truth.json").write_text(json.dumps({"planted_targets": list(PLANTED)}), encoding="utf-8")
    generator = {"ground_truth": str(root / "ground_truth.json"), "seed": seed}
    (root / "dataset.json").write_text(json.dumps({"format": "ecglab-dataset", "generator": generator}))
    (root / "thresholds.json").write_text("{}", encoding="utf-8")
    return root


def train_cli(data: Path, out: Path, *extra: str) -> int:
    """``ecglab train`` in-process on the CPU with the tiny model."""
    return main(["train", "--data", str(data), "--out", str(out), "--device", "cpu", *TINY, *extra])


@dataclass(frozen=True)
class TinyRun:
    """A trained (or trained and evaluated) run and the DATASET it was trained on."""

    data: Path
    run: Path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny planted DATASET (seed 0), written once per test session. Read-only for tests."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny-dataset"))


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """The one tiny training run of the test session (4 epochs, seed 0). Read-only for tests."""
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    status = train_cli(tiny_dataset, out, f"--epochs={TINY_RUN_EPOCHS}", f"--seed={TINY_RUN_SEED}")
    assert status == 0, "the shared tiny training run failed"
    return TinyRun(tiny_dataset, out)


@pytest.fixture(scope="session")
def evaluated_tiny_run(tiny_run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """A copy of ``tiny_run`` evaluated once (val and test folds, 200 bootstrap resamples).

    A copy, so the trained run's folder stays exactly what ``ecglab train`` wrote.
    """
    out = tmp_path_factory.mktemp("tiny-evaluated") / "run"
    shutil.copytree(tiny_run.run, out)
    args = ["evaluate", "--run", str(out), "--bootstrap", "200", "--device", "cpu", "--num_threads=1"]
    assert main(args) == 0, "evaluating the shared tiny run failed"
    return TinyRun(tiny_run.data, out)
