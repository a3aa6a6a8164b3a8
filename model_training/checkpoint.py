"""What a training run saves after every epoch, and how ``--resume`` restores it bit-exactly.

A checkpoint is a plain dict of tensors and JSON-able values (``torch.load(weights_only=True)``
reads it): format and version, the config, model arguments, labels, metadata features and their
training-fold medians, the ECG layout, data provenance and software versions (the same in every
checkpoint of a run), then per epoch the model and optimiser states, validation metrics, history,
every rank's RNG states and the sampler state. Shuffling and crops are functions of seed and
epoch, so these are all a resumed run needs to continue exactly as an uninterrupted one.
"""

from __future__ import annotations

import os
import platform
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cds_service import __version__
from fhir_mappings.errors import ConfigError, InputError
from fhir_mappings.manifest import MetadataSpec
from fhir_mappings.signal_spec import MODEL_LEADS, TARGET_FS
from model_training.config import TrainConfig, apply_overrides, from_dict, load_config_file, resolve, to_dict
from model_training.data import LabDataset, cont_feature_names, dataset_provenance
from model_training.model import FusionModel

CHECKPOINT_FORMAT = "ecglab-train-checkpoint"
CHECKPOINT_VERSION = 1
#: Config keys a ``--resume`` may change: they affect speed or length, not what a step computes.
RESUMABLE_KEYS = frozenset({"epochs", "num_workers", "num_threads", "eval_batch_size", "progress"})


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file, then rename, so a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; InputError naming the file when unusable."""
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for corrupt or foreign files
        raise InputError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not an ecglab training checkpoint (field 'format' is missing or wrong)")
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise InputError(
            f"{path}: checkpoint format_version {ckpt.get('format_version')} is not {CHECKPOINT_VERSION}"
        )
    return ckpt


def software_versions() -> dict[str, str]:
    """Versions that matter for reproducing a run."""
    return {
        "ecglab": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "cuda": str(torch.version.cuda),
        "platform": platform.platform(),
    }


# --------------------------------------------------------------------------------------------
# RNG state (seed, save / restore, JSON-able)
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) so a run is reproducible from its seed."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch RNG states as tensors and plain values."""
    algo, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "algo": algo,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["algo"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Resume: config, data, training state
# --------------------------------------------------------------------------------------------
def resolve_run_config(
    out: Path, config_file: Path | None, overrides: dict[str, Any], resume: bool
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The run's config and, on --resume, its last checkpoint (only RESUMABLE_KEYS may change)."""
    last = out / "checkpoint_last.pt"
    if not resume:
        if last.exists():
            raise InputError(f"{last} exists: pass --resume to continue that run or choose another --out")
        return resolve(TrainConfig, config_file, overrides), None
    ckpt = load_checkpoint(last)
    saved = from_dict(TrainConfig, ckpt["config"], source=f"{last}")
    cfg = saved
    if config_file is not None:
        cfg = apply_overrides(cfg, load_config_file(config_file), source=f"file {config_file}")
    cfg = apply_overrides(cfg, overrides)
    cfg.validate()
    before, after = _flat(to_dict(saved)), _flat(to_dict(cfg))
    for key in sorted(after):
        if after[key] != before.get(key) and key not in RESUMABLE_KEYS:
            raise ConfigError(
                f"--resume cannot change config key '{key}' (run has {before.get(key)!r}, given {after[key]!r}); "
                f"only {sorted(RESUMABLE_KEYS)} may change"
            )
    return cfg, ckpt


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict → {dotted key: value}, to compare two configs key by key."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_provenance(dataset: LabDataset, saved: dict[str, Any]) -> None:
    """InputError when a DATASET file changed since the run started (resume must see the same data)."""
    current = dataset_provenance(dataset)["hashes"]
    for name, digest in saved.get("hashes", {}).items():
        if current.get(name, {}).get("digest") != digest.get("digest"):
            raise InputError(
                f"{dataset.root / name}: changed since the run started; resume needs the same DATASET"
            )


def restore_training_state(
    ckpt: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader_generator: torch.Generator,
    seed: int,
    rank: int,
    world_size: int,
) -> tuple[int, list[dict[str, Any]], dict[str, Any], str | None]:
    """Load model, optimiser, this rank's RNG and the loader generator from ``ckpt``.

    Returns (epochs done, history, best-so-far, note). A run resumed with another number of
    processes cannot restore per-rank RNG states; dropout is then re-seeded from the seed, the
    epoch and the rank, and ``note`` says so.
    """
    model.load_state_dict(ckpt["model_state"])
    optimizer.load_state_dict(ckpt["optimizer_state"])
    start_epoch, history, best = int(ckpt["epoch"]), list(ckpt["history"]), dict(ckpt["best"])
    per_rank = ckpt["rng"]["per_rank"]
    if len(per_rank) == world_size:
        restore_rng_state(per_rank[rank])
        loader_generator.set_state(ckpt["sampler"]["loader_generator"])
        return start_epoch, history, best, None
    seed_everything(seed + 1000 * start_epoch + rank)
    return (
        start_epoch,
        history,
        best,
        f"resuming a {len(per_rank)}-process run with {world_size}: dropout RNG re-seeded",
    )


# --------------------------------------------------------------------------------------------
# Checkpoint contents
# --------------------------------------------------------------------------------------------
def constant_checkpoint_fields(
    cfg: TrainConfig, model: FusionModel, dataset: LabDataset, spec: MetadataSpec, provenance: dict[str, Any]
) -> dict[str, Any]:
    """What every checkpoint of a run repeats: format, config, model args, features, ECG, provenance."""
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "config": to_dict(cfg),
        "model_args": model.model_args(),
        "labels": list(dataset.targets),
        "features": {
            "categorical": [c.key for c in spec.categorical],
            "continuous": list(spec.continuous),
            "missing_indicators": list(spec.missing_indicators),
            "cont_features": cont_feature_names(spec),
            "medians": dict(spec.medians),
            "metadata_spec": spec.model_dump(mode="json"),
        },
        "ecg": {
            "window": cfg.model.window,
            "n_windows": int(dataset.ecg.shape[1]) // cfg.model.window,
            "length": int(dataset.ecg.shape[1]),
            "lead_order": list(MODEL_LEADS),
            "sampling_rate_hz": TARGET_FS,
        },
        "provenance": provenance,
        "versions": software_versions(),
    }


def epoch_state(
    constant: dict[str, Any],
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    metrics: dict[str, Any],
    best: dict[str, Any],
    history: list[dict[str, Any]],
    rng_states: list[dict[str, Any]],
    seed: int,
    loader_generator: torch.Generator,
) -> dict[str, Any]:
    """The checkpoint after ``epoch`` epochs (``kind`` is added by the caller: last or best).

    ``rng_states`` holds every rank's RNG state (index = rank), so a DDP run resumes exactly too.
    """
    return {
        **constant,
        "epoch": epoch,
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "metrics": metrics,
        "best": dict(best),
        "history": list(history),
        "rng": {"world_size": len(rng_states), "per_rank": rng_states},
        "sampler": {
            "seed": seed,
            "epoch": epoch,
            "world_size": len(rng_states),
            "loader_generator": loader_generator.get_state(),
        },
    }
