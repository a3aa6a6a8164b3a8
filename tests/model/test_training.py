"""Training: config overrides, data pipeline, a tiny end-to-end run, exact resume and DDP.

Each test pins one rule of method.md §2.2 (windows), §2.3 (imputation), §2.5 (folds), §3.3/§3.4
(training) or the project brief (config overrides, checkpoint format, resume, torchrun). The
DATASET (``tiny_dataset``, with a planted signal a tiny model must learn within a few epochs) and
the trained run (``tiny_run``) are the session-wide fixtures of :mod:`tests.training_fixtures`;
only the resume and DDP tests train runs of their own.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from cds_service.cli import main
from fhir_mappings.errors import ConfigError, InputError
from model_training.config import TrainConfig, apply_overrides, load_config_file, resolve
from model_training.data import (
    CONTINUOUS,
    MISSING_INDICATORS,
    EcgLabWindows,
    crop_starts,
    encode_features,
    eval_windows,
    fit_metadata_spec,
    open_dataset,
)
from tests.training_fixtures import TINY, TinyRun, train_cli, write_tiny_dataset

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
def test_config_overrides_are_typed() -> None:
    """Brief: ``--key=value`` strings are converted to the field's type, nested keys by dots."""
    cfg = apply_overrides(
        TrainConfig(),
        {
            "epochs": "3",
            "lr": "5e-4",
            "model.d_model": "64",
            "model.mlp_dims": "64,32",
            "model.mlp_dropouts": "0.1,0.5",
            "progress": "false",
        },
    )
    assert cfg.epochs == 3 and cfg.lr == 5e-4 and cfg.progress is False
    assert cfg.model.d_model == 64 and cfg.model.mlp_dims == (64, 32)
    assert TrainConfig().epochs == 40 and TrainConfig().model.d_model == 512  # paper defaults untouched


def test_config_unknown_key_is_rejected_naming_the_key(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Brief: an unknown key fails with an error that names it (API and command line)."""
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.d_modle'"):
        apply_overrides(TrainConfig(), {"model.d_modle": "64"})
    with pytest.raises(SystemExit) as exc:
        train_cli(tiny_dataset, tmp_path / "run", "--epoch=3")
    assert exc.value.code == 2
    assert "unrecognized arguments: --epoch=3" in capsys.readouterr().err


def test_config_ill_typed_value_names_the_key(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Brief: a value of the wrong type ends the command with exit 2 and names the key."""
    assert train_cli(tiny_dataset, tmp_path / "run", "--epochs=three") == 2
    assert "config key 'epochs' (command line): expected an integer, got 'three'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"'model\.dropout'.*expected a number"):
        apply_overrides(TrainConfig(), {"model.dropout": "high"})


def test_config_file_yaml_then_command_line(tmp_path: Path) -> None:
    """Brief: ``--config FILE`` (YAML or JSON, nested or dotted) then ``--key=value`` on top."""
    yaml_file = tmp_path / "small.yaml"
    yaml_file.write_text("epochs: 7\nmodel:\n  d_model: 64\nmodel.n_layers: 2\ntasks: [est, mon30]\n")
    cfg = resolve(TrainConfig, yaml_file, {"epochs": "9"})
    assert (cfg.epochs, cfg.model.d_model, cfg.model.n_layers, cfg.tasks) == (9, 64, 2, ("est", "mon30"))
    json_file = tmp_path / "bad.json"
    json_file.write_text('{"model": {"width": 3}}')
    assert load_config_file(json_file) == {"model": {"width": 3}}
    with pytest.raises(ConfigError, match=r"unknown config key 'model.width' \(file .*bad.json\)"):
        resolve(TrainConfig, json_file, {})


def test_config_rejects_training_on_the_test_fold() -> None:
    """§2.5: train folds 0–17, val 18, test 19; a config mixing them is refused."""
    with pytest.raises(ConfigError, match="'train_folds' contains the test fold 19"):
        resolve(TrainConfig, None, {"train_folds": "0,1,19"})


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def test_imputation_uses_training_fold_medians_only_and_sets_indicators(tiny_dataset: Path) -> None:
    """§2.3: NaNs take the median of folds 0–17 (race: rounded code); indicators mark them."""
    ds = open_dataset(tiny_dataset)
    train_rows = ds.rows_in(range(18))
    meta = ds.metadata.copy()
    meta.loc[ds.rows_in([18, 19]), "heart_rate"] = 500.0  # extreme val/test values must not move the median
    spec = fit_metadata_spec(meta, train_rows)
    assert spec.medians["heart_rate"] == pytest.approx(
        np.nanmedian(ds.metadata["heart_rate"].iloc[train_rows])
    )
    assert spec.medians["race"] == float(np.rint(np.nanmedian(ds.metadata["race"].iloc[train_rows])))
    cat, cont = encode_features(meta, spec)
    assert cat.dtype == np.int64 and cat.shape == (len(meta), 2)
    assert cont.dtype == np.float32 and cont.shape == (len(meta), len(CONTINUOUS) + len(MISSING_INDICATORS))
    hr, hr_missing = CONTINUOUS.index("heart_rate"), len(CONTINUOUS) + MISSING_INDICATORS.index("heart_rate")
    missing = meta["heart_rate"].isna().to_numpy()
    assert missing.any() and (~missing).any()
    assert np.all(cont[missing, hr] == np.float32(spec.medians["heart_rate"]))
    assert np.array_equal(cont[:, hr_missing], missing.astype(np.float32))
    race_missing = meta["race"].isna().to_numpy()
    assert np.all(cat[race_missing, 1] == int(spec.medians["race"]))
    assert np.array_equal(cont[:, len(CONTINUOUS)], race_missing.astype(np.float32))


def test_training_crops_are_in_bounds_and_change_per_epoch(tiny_dataset: Path) -> None:
    """§2.2: one random 250-sample crop per record per epoch, start in [0, 750]."""
    ds = open_dataset(tiny_dataset)
    cat, cont = encode_features(ds.metadata, fit_metadata_spec(ds.metadata, ds.rows_in(range(18))))
    rows = ds.rows_in(range(18))
    windows = EcgLabWindows(ds.ecg, rows, cat, cont, ds.labels, 250, train=True, seed=3)
    starts = crop_starts(100_000, 1000, 250, seed=3, epoch=0)
    assert starts.min() == 0 and starts.max() == 750
    first = windows.starts.copy()
    item = windows[5]
    assert item["ecg"].shape == (12, 250)
    s = int(first[5])
    assert torch.equal(item["ecg"], torch.from_numpy(np.ascontiguousarray(ds.ecg[rows[5], s : s + 250].T)))
    windows.set_epoch(1)
    assert not np.array_equal(first, windows.starts)
    windows.set_epoch(0)
    assert np.array_equal(first, windows.starts)  # a pure function of (seed, epoch): resumable


def test_evaluation_uses_four_fixed_non_overlapping_windows(tiny_dataset: Path) -> None:
    """§2.2: validation/test cut each 10 s record into 4 non-overlapping 2.5 s windows."""
    ds = open_dataset(tiny_dataset)
    cat, cont = encode_features(ds.metadata, fit_metadata_spec(ds.metadata, ds.rows_in(range(18))))
    rows = ds.rows_in([18])
    windows = EcgLabWindows(ds.ecg, rows, cat, cont, ds.labels, 250, train=False)
    batch = torch.stack([windows[0]["ecg"], windows[1]["ecg"]])  # (2, 12, 1000)
    cut = eval_windows(batch, 250)
    assert cut.shape == (8, 12, 250)
    for k in range(4):
        assert torch.equal(cut[k], batch[0, :, 250 * k : 250 * (k + 1)])
        assert torch.equal(cut[4 + k], batch[1, :, 250 * k : 250 * (k + 1)])
    windows.set_epoch(5)
    assert torch.equal(windows[0]["ecg"], batch[0])


def test_missing_dataset_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Brief: bad input ends with exit 2 and a message naming the file."""
    write_tiny_dataset(tmp_path / "ds", n_train=36, n_val=4, n_test=4)
    (tmp_path / "ds" / "labels.parquet").unlink()
    assert train_cli(tmp_path / "ds", tmp_path / "run") == 2
    assert "labels.parquet: required dataset file is missing" in capsys.readouterr().err
    meta_file = write_tiny_dataset(tmp_path / "ds2", n_train=36, n_val=4, n_test=4) / "metadata.parquet"
    pd.read_parquet(meta_file).drop(columns="spo2").to_parquet(meta_file)
    with pytest.raises(InputError, match=r"metadata\.parquet: feature column 'spo2' is missing"):
        open_dataset(tmp_path / "ds2")


# --------------------------------------------------------------------------------------------
# Training end to end
# --------------------------------------------------------------------------------------------
def test_tiny_model_learns_planted_target(tiny_run: TinyRun) -> None:
    """§3: a tiny S4 fusion model beats chance on the planted ECG target (val AUROC > 0.75)."""
    best = torch.load(tiny_run.run / "checkpoint_best.pt", map_location="cpu", weights_only=True)
    assert best["metrics"]["val_target_auroc"]["NTproBNP_high_est"] > 0.75
    assert best["metrics"]["val_target_auroc"]["Hemoglobin_low_est"] > 0.75  # metadata branch learns too


def test_checkpoints_are_plain_and_complete(tiny_run: TinyRun) -> None:
    """Brief: checkpoints load with weights_only=True and carry config, model args, medians, provenance."""
    last = torch.load(tiny_run.run / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    best = torch.load(tiny_run.run / "checkpoint_best.pt", map_location="cpu", weights_only=True)
    expected = {
        "format", "format_version", "kind", "epoch", "config", "model_args", "labels", "features", "ecg",
        "provenance", "versions", "model_state", "optimizer_state", "metrics", "best", "history", "rng", "sampler",
    }  # fmt: skip
    assert set(last) == expected and set(best) == expected
    assert last["epoch"] == 4 and best["epoch"] == best["best"]["epoch"] and last["kind"] == "last"
    assert last["config"]["model"]["d_model"] == 32 and last["config"]["lr"] == 1e-3
    assert last["model_args"]["labels"] == last["labels"]
    assert last["features"]["cont_features"][-1] == "height_missing"
    assert set(last["features"]["medians"]) == {"sex", "race", *CONTINUOUS}
    assert last["ecg"] == {
        "window": 250, "n_windows": 4, "length": 1000, "sampling_rate_hz": 100,
        "lead_order": ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6", "III", "aVR", "aVL", "aVF"],
    }  # fmt: skip
    assert last["provenance"]["hashes"]["ecg.npy"]["method"] == "sha256"
    assert json.loads(json.dumps({k: last[k] for k in ("config", "model_args", "features", "provenance")}))


def test_run_writes_log_curves_and_summary(tiny_run: TinyRun) -> None:
    """Brief: train_log.jsonl has one object per epoch; curves.png and run.json exist."""
    lines = [json.loads(x) for x in (tiny_run.run / "train_log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3, 4]
    assert set(lines[0]) >= {
        "epoch",
        "train_loss",
        "val_macro_auroc",
        "val_task_macro_auroc",
        "seconds",
        "lr",
    }
    assert set(lines[0]["val_task_macro_auroc"]) == {"est", "mon30"}
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert (tiny_run.run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tiny_run.run / "run.json").read_text())
    best = max(lines, key=lambda x: x["val_macro_auroc"])
    assert summary["status"] == "finished" and summary["best_epoch"] == best["epoch"]
    assert summary["best_val_macro_auroc"] == pytest.approx(best["val_macro_auroc"])
    assert summary["seed"] == 0 and summary["versions"]["torch"] == torch.__version__
    assert summary["arguments"]["overrides"]["epochs"] == "4" and summary["arguments"]["device"] == "cpu"


def _state(path: Path) -> dict[str, Any]:
    """A checkpoint loaded the way consumers must load it."""
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_dataset: Path, tmp_path: Path) -> None:
    """Brief: --resume restores model, optimiser, RNG and sampler so epoch 2 is bit-identical."""
    steps = "--max_steps_per_epoch=6"
    assert train_cli(tiny_dataset, tmp_path / "straight", "--epochs=2", steps) == 0
    assert train_cli(tiny_dataset, tmp_path / "resumed", "--epochs=1", steps) == 0
    assert (
        main(["train", "--out", str(tmp_path / "resumed"), "--resume", "--epochs=2", "--device", "cpu"]) == 0
    )
    straight, resumed = (
        _state(tmp_path / "straight" / "checkpoint_last.pt"),
        _state(tmp_path / "resumed" / "checkpoint_last.pt"),
    )
    assert resumed["epoch"] == 2
    for name, tensor in straight["model_state"].items():
        assert torch.equal(tensor, resumed["model_state"][name]), name
    for key in ("train_loss", "val_macro_auroc"):
        assert straight["history"][1][key] == resumed["history"][1][key]
    assert straight["history"][0]["train_loss"] == resumed["history"][0]["train_loss"]  # same seed, same run


def test_resume_refuses_to_change_the_method(tiny_dataset: Path, tiny_run: TinyRun, tmp_path: Path) -> None:
    """Brief: --resume may extend epochs but not change what a step computes; no silent overwrite."""
    with pytest.raises(ConfigError, match="--resume cannot change config key 'lr'"):
        from model_training.train_loop import train

        train(None, tiny_run.run, overrides={"lr": "0.01"}, resume=True)
    assert train_cli(tiny_dataset, tiny_run.run, "--epochs=1") == 2  # exists and no --resume
    assert main(["train", "--out", str(tmp_path / "none"), "--resume", "--device", "cpu"]) == 2


def test_cuda_request_without_gpu_is_a_clear_error(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Brief: --device cuda on a machine without a GPU is an input error, not a traceback.

    "No GPU" is simulated, so this is asserted on every machine, GPU or not.
    """
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA GPU is available" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_gloo_processes_train_one_epoch(tiny_dataset: Path, tmp_path: Path) -> None:
    """Brief: torchrun with 2 CPU processes (gloo, DDP, DistributedSampler) trains one epoch."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "cds_service.cli", "train", "--data", str(tiny_dataset), "--out", str(out), "--device", "cpu",
        "--epochs=1", *TINY,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_completed"] == 1
    last = _state(out / "checkpoint_last.pt")
    assert len(last["rng"]["per_rank"]) == 2
    # 288 training records / 2 ranks / batch 16 = 9 steps per rank
    assert last["history"][0]["steps"] == 9
    assert not math.isnan(last["history"][0]["val_macro_auroc"])
