"""``ecglab train``: train the S4 ECG + metadata fusion model as the paper does (method.md §3).

Usage::

    ecglab train --data DATASET --out RUN                         # paper settings, 40 epochs
    ecglab train --data DATASET --out RUN --epochs=3 --model.d_model=64 --batch_size=16
    ecglab train --data DATASET --out RUN --config model_training/configs/small.yaml
    ecglab train --out RUN --resume --epochs=60                   # continue (and extend) a run
    torchrun --nproc_per_node=4 -m cds_service.cli train --data DATASET --out RUN

One epoch = every training record (folds 0-17) once, as one random 250-sample crop, in shuffled
batches of 32 (incomplete last batch dropped); binary focal loss (γ = 2, missing labels masked);
AdamW, lr 1e-3, weight decay 1e-3, constant schedule. After each epoch the validation fold (18)
is scored with 4 non-overlapping windows per ECG (mean probability) and the macro AUROC over all
targets of all tasks picks ``checkpoint_best.pt``. ``checkpoint_last.pt`` allows ``--resume``,
which continues bit-exactly: model, optimiser, epoch, RNG states of python/numpy/torch (per rank)
and the sampler state (shuffling and crops are functions of seed and epoch).

Files written to RUN (rank 0 only): ``checkpoint_last.pt``, ``checkpoint_best.pt`` (plain dicts of
tensors and JSON-able values, loadable with ``torch.load(weights_only=True)``), ``train_log.jsonl``
(one JSON object per epoch), ``curves.png`` and ``run.json`` (summary). Under ``torchrun`` each
process trains on its share of the records (DistributedSampler, DistributedDataParallel; NCCL on
GPUs, gloo on CPUs) and validation predictions are gathered so every rank sees the same metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from cds_service import __version__
from fhir_mappings.errors import ConfigError, InputError
from fhir_mappings.manifest import MetadataSpec
from fhir_mappings.signal_spec import MODEL_LEADS, TARGET_FS
from model_training.config import (
    TrainConfig,
    add_config_arguments,
    apply_overrides,
    from_dict,
    load_config_file,
    overrides_from_args,
    resolve,
    to_dict,
)
from model_training.data import (
    EcgLabWindows,
    LabDataset,
    cont_feature_names,
    dataset_provenance,
    encode_features,
    eval_windows,
    fit_metadata_spec,
    open_dataset,
    parse_target,
)
from model_training.losses import binary_focal_loss
from model_training.metrics import auroc_per_target, group_columns, macro_auroc
from model_training.model import FusionModel

CHECKPOINT_FORMAT = "ecglab-train-checkpoint"
CHECKPOINT_VERSION = 1
#: Config keys a ``--resume`` may change: they affect speed or length, not what a step computes.
RESUMABLE_KEYS = frozenset({"epochs", "num_workers", "num_threads", "eval_batch_size", "progress"})


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ecglab train``; every TrainConfig key is also a ``--key=value`` option."""
    parser.add_argument(
        "--data",
        type=Path,
        help="DATASET directory from 'ecglab preprocess' (default on --resume: the run's)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="RUN directory for checkpoints, logs and plots"
    )
    parser.add_argument(
        "--config", type=Path, help="YAML or JSON file of config keys (applied before --key=value)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint_last.pt")
    parser.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="auto", help="where to train (default: auto)"
    )
    add_config_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ecglab train``; returns the exit status."""
    overrides = overrides_from_args(args)
    ctx = init_distributed(args.device)
    try:
        train(
            data=args.data,
            out=args.out,
            config_file=args.config,
            overrides=overrides,
            resume=args.resume,
            ctx=ctx,
            command_line=list(sys.argv),
            arguments={
                "data": str(args.data) if args.data else None,
                "out": str(args.out),
                "config": str(args.config) if args.config else None,
                "resume": bool(args.resume),
                "device": args.device,
                "overrides": overrides,
            },
        )
    finally:
        if ctx.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------------------------
# Devices and processes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistContext:
    """This process's place in a (possibly single-process) training job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes every file."""
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (error without a GPU) or ``auto`` (GPU when available)."""
    if name == "cpu":
        return torch.device("cpu")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cuda":
        raise InputError("--device cuda: no CUDA GPU is available on this machine (use --device cpu or auto)")
    if name == "auto":
        return torch.device("cpu")
    raise InputError(f"--device: unknown device {name!r}; expected cpu, cuda or auto")


def init_distributed(device_name: str) -> DistContext:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, local_world, device)


def configure_threads(num_threads: int, ctx: DistContext) -> int:
    """Set torch's intra-op threads: the config value, or the cores shared among local processes."""
    threads = num_threads or max(1, (os.cpu_count() or 1) // max(1, ctx.local_world_size))
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) so a run is reproducible from its seed."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------------------------
# RNG state (save / restore, JSON-able)
# --------------------------------------------------------------------------------------------
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
# Prediction (shared with evaluate)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(
    model: torch.nn.Module, loader: DataLoader[Any], device: torch.device, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Window-averaged probabilities of every record in ``loader``: (rows (n,), probs (n, K)).

    Each record is cut into non-overlapping windows (4 for 10 s at 100 Hz); sigmoid probabilities
    are averaged over them per record (method.md §2.2).
    """
    was_training = model.training
    model.eval()
    rows, probs = [], []
    for batch in loader:
        ecg = batch["ecg"].to(device, non_blocking=True)  # (B, 12, T)
        b = ecg.shape[0]
        windows = eval_windows(ecg, window)  # (B*n, 12, W)
        n = windows.shape[0] // b
        cat = batch["cat"].to(device).repeat_interleave(n, dim=0)  # (B*n, 2)
        cont = batch["cont"].to(device).repeat_interleave(n, dim=0)  # (B*n, F)
        p = torch.sigmoid(model(windows, cat, cont).float()).view(b, n, -1).mean(dim=1)  # (B, K)
        probs.append(p.cpu().numpy())
        rows.append(batch["row"].numpy())
    model.train(was_training)
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(rows), np.concatenate(probs)


def gather_predictions(
    rows: np.ndarray, probs: np.ndarray, ctx: DistContext
) -> tuple[np.ndarray, np.ndarray]:
    """All ranks' predictions on every rank, de-duplicated (DistributedSampler pads) and sorted by row."""
    if ctx.world_size > 1:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, (rows, probs))
        rows = np.concatenate([g[0] for g in gathered])
        probs = np.concatenate([g[1] for g in gathered if len(g[1])])
    unique_rows, first = np.unique(rows, return_index=True)
    return unique_rows, probs[first]


def validation_metrics(
    y: np.ndarray, probs: np.ndarray, targets: Sequence[str]
) -> tuple[float, dict[str, float], dict[str, float | None]]:
    """Macro AUROC over all targets, per-task macros and per-target AUROC (None where undefined)."""
    aurocs = auroc_per_target(y, probs)
    tasks = group_columns(targets, {t: parse_target(t).task for t in targets})
    per_task = {task: macro_auroc(aurocs[cols]) for task, cols in tasks.items()}
    per_target = {t: (None if math.isnan(a) else float(a)) for t, a in zip(targets, aurocs, strict=True)}
    return macro_auroc(aurocs), per_task, per_target


# --------------------------------------------------------------------------------------------
# Checkpoints
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


def _json_safe(value: float) -> float | None:
    """NaN/inf/None → None (JSON has no NaN), else the float."""
    return None if value is None or not math.isfinite(value) else float(value)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _resolve_config(
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


def _check_provenance(dataset: LabDataset, saved: dict[str, Any]) -> None:
    """InputError when a DATASET file changed since the run started (resume must see the same data)."""
    current = dataset_provenance(dataset)["hashes"]
    for name, digest in saved.get("hashes", {}).items():
        if current.get(name, {}).get("digest") != digest.get("digest"):
            raise InputError(
                f"{dataset.root / name}: changed since the run started; resume needs the same DATASET"
            )


@dataclass
class _Loaders:
    """The training and validation loaders of one process, with what resuming needs."""

    train_ds: EcgLabWindows
    sampler: DistributedSampler[Any]
    generator: torch.Generator
    train: DataLoader[Any]
    val: DataLoader[Any]


def _build_loaders(
    dataset: LabDataset,
    rows: dict[str, np.ndarray],
    cat: np.ndarray,
    cont: np.ndarray,
    cfg: TrainConfig,
    ctx: DistContext,
) -> _Loaders:
    """Shuffled random-crop batches for training, whole records (4 windows) for validation.

    The DistributedSampler (also used with one process) shuffles with ``seed + epoch``, so the
    order of an epoch is reproducible and needs no state beyond the epoch number.
    """
    window = cfg.model.window
    train_ds = EcgLabWindows(
        dataset.ecg, rows["train"], cat, cont, dataset.labels, window, train=True, seed=cfg.seed
    )
    val_ds = EcgLabWindows(dataset.ecg, rows["val"], cat, cont, dataset.labels, window, train=False)
    sampler: DistributedSampler[Any] = DistributedSampler(
        train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    pin = ctx.device.type == "cuda"
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.num_workers,
        pin_memory=pin,
        generator=generator,
    )
    val_sampler: DistributedSampler[Any] | None = (
        DistributedSampler(val_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False)
        if ctx.world_size > 1
        else None
    )
    val_loader = DataLoader(
        val_ds,
        batch_size=cfg.eval_batch_size,
        sampler=val_sampler,
        num_workers=cfg.num_workers,
        pin_memory=pin,
    )
    return _Loaders(train_ds, sampler, generator, train_loader, val_loader)


def _train_epoch(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loaders: _Loaders,
    epoch: int,
    cfg: TrainConfig,
    ctx: DistContext,
    last_val: float | None,
) -> tuple[float, int]:
    """One pass over the training records; returns (mean batch loss over all ranks, steps per rank)."""
    loaders.sampler.set_epoch(epoch)
    loaders.train_ds.set_epoch(epoch)
    net.train()
    steps = len(loaders.train)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    loss_sum, n_steps = 0.0, 0
    bar = tqdm(
        total=steps,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        disable=not (cfg.progress and ctx.is_main),
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    for batch in loaders.train:
        if n_steps >= steps:
            break
        ecg = batch["ecg"].to(ctx.device, non_blocking=True)  # (B, 12, W)
        logits = net(ecg, batch["cat"].to(ctx.device), batch["cont"].to(ctx.device))  # (B, K)
        loss = binary_focal_loss(logits.float(), batch["y"].to(ctx.device), gamma=cfg.focal_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach())
        n_steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / n_steps:.4f}", val_auroc=_fmt(last_val))
    bar.close()
    if ctx.world_size > 1:
        totals = torch.tensor([loss_sum, float(n_steps)], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(totals)
        return float(totals[0] / totals[1].clamp(min=1)), n_steps
    return loss_sum / max(1, n_steps), n_steps


def _gather_rng_states(ctx: DistContext) -> list[dict[str, Any]]:
    """Every rank's RNG state (index = rank), so a DDP run resumes exactly too."""
    if ctx.world_size == 1:
        return [capture_rng_state()]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, capture_rng_state())
    return states


def train(
    data: Path | None,
    out: Path,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    ctx: DistContext | None = None,
    command_line: Sequence[str] = (),
    arguments: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run in ``out`` and return the ``run.json`` summary (empty on ranks > 0)."""
    ctx = ctx or init_distributed("auto")
    cfg, ckpt = _resolve_config(out, config_file, dict(overrides or {}), resume)
    threads = configure_threads(cfg.num_threads, ctx)
    started = time.time()

    # ---- data: folds, training-fold medians, encoded metadata
    if data is None:
        if ckpt is None:
            raise InputError("--data is required (the DATASET directory from 'ecglab preprocess')")
        data = Path(ckpt["provenance"]["path"])
    dataset = open_dataset(data, tasks=cfg.tasks, targets=ckpt["labels"] if ckpt else None)
    provenance = dataset_provenance(dataset) if ckpt is None else ckpt["provenance"]
    if ckpt is not None:
        _check_provenance(dataset, ckpt["provenance"])
    rows = {"train": dataset.rows_in(cfg.train_folds), "val": dataset.rows_in([cfg.val_fold])}
    records_file = dataset.root / "records.parquet"
    if len(rows["train"]) < cfg.batch_size * ctx.world_size:
        raise InputError(
            f"{records_file}: {len(rows['train'])} training records (folds {list(cfg.train_folds)}) "
            f"are fewer than one batch of {cfg.batch_size} per process"
        )
    if len(rows["val"]) == 0:
        raise InputError(f"{records_file}: no record in validation fold {cfg.val_fold}")
    spec = fit_metadata_spec(dataset.metadata, rows["train"])
    cat, cont = encode_features(dataset.metadata, spec)

    # ---- model, optimiser, loaders (and their state on --resume)
    seed_everything(cfg.seed)
    model = FusionModel(cfg.model, labels=dataset.targets, cont_features=cont_feature_names(spec))
    model = model.to(ctx.device)
    if ctx.world_size > 1:
        torch.manual_seed(cfg.seed + ctx.rank)  # same initial weights, different dropout masks per rank
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    net: torch.nn.Module = DistributedDataParallel(model) if ctx.world_size > 1 else model
    loaders = _build_loaders(dataset, rows, cat, cont, cfg, ctx)

    start_epoch, history = 0, []
    best: dict[str, Any] = {"epoch": None, "val_macro_auroc": -math.inf, "last_val": None}
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        start_epoch, history, best = int(ckpt["epoch"]), list(ckpt["history"]), dict(ckpt["best"])
        per_rank = ckpt["rng"]["per_rank"]
        if len(per_rank) == ctx.world_size:
            restore_rng_state(per_rank[ctx.rank])
            loaders.generator.set_state(ckpt["sampler"]["loader_generator"])
        else:
            _say(ctx, f"resuming a {len(per_rank)}-process run with {ctx.world_size}: dropout RNG re-seeded")
            seed_everything(cfg.seed + 1000 * start_epoch + ctx.rank)

    out.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    tasks = group_columns(dataset.targets, {t: parse_target(t).task for t in dataset.targets})
    _say(
        ctx,
        f"data {dataset.root}: {len(rows['train'])} train / {len(rows['val'])} val records, "
        f"{len(dataset.targets)} targets ({', '.join(f'{k} {len(v)}' for k, v in tasks.items())})",
    )
    _say(
        ctx,
        f"model {n_params / 1e6:.2f} M parameters on {ctx.device} x{ctx.world_size}, {threads} threads; "
        f"epochs {start_epoch}->{cfg.epochs}, batch {cfg.batch_size}, lr {cfg.lr}",
    )
    constant = _constant_checkpoint_fields(cfg, model, dataset, spec, provenance)
    log_path = out / "train_log.jsonl"
    if ckpt is None and ctx.is_main and log_path.exists():
        log_path.unlink()

    # ---- epochs
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        train_loss, n_steps = _train_epoch(net, optimizer, loaders, epoch, cfg, ctx, best.get("last_val"))
        val_rows, probs = gather_predictions(*predict(model, loaders.val, ctx.device, cfg.model.window), ctx)
        macro, per_task, per_target = validation_metrics(dataset.labels[val_rows], probs, dataset.targets)
        entry = {
            "epoch": epoch + 1,
            "train_loss": _json_safe(train_loss),
            "val_macro_auroc": _json_safe(macro),
            "val_task_macro_auroc": {k: _json_safe(v) for k, v in per_task.items()},
            "seconds": round(time.time() - t0, 3),
            "lr": optimizer.param_groups[0]["lr"],
            "steps": n_steps,
        }
        history.append(entry)
        improved = macro > best["val_macro_auroc"]
        if improved:
            best.update(epoch=epoch + 1, val_macro_auroc=float(macro))
        best["last_val"] = float(macro)
        rng_states = _gather_rng_states(ctx)  # collective: every rank takes part
        if not ctx.is_main:
            continue
        state = {
            **constant,
            "epoch": epoch + 1,
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "metrics": {
                "val_macro_auroc": _json_safe(macro),
                "val_task_macro_auroc": entry["val_task_macro_auroc"],
                "val_target_auroc": per_target,
            },
            "best": dict(best),
            "history": list(history),
            "rng": {"world_size": ctx.world_size, "per_rank": rng_states},
            "sampler": {
                "seed": cfg.seed,
                "epoch": epoch + 1,
                "world_size": ctx.world_size,
                "loader_generator": loaders.generator.get_state(),
            },
        }
        save_atomic({**state, "kind": "last"}, out / "checkpoint_last.pt")
        if improved:
            save_atomic({**state, "kind": "best"}, out / "checkpoint_best.pt")
        with log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        _write_summary(
            out, cfg, best, history, ctx, (command_line, arguments), provenance, started, n_params, "running"
        )
        _say(
            ctx,
            f"epoch {epoch + 1}/{cfg.epochs}: train_loss {train_loss:.4f}  val_macro_auroc {macro:.4f}"
            f"{'  (best)' if improved else ''}  [{entry['seconds']:.1f}s]",
        )

    summary: dict[str, Any] = {}
    if ctx.is_main:
        summary = _write_summary(
            out,
            cfg,
            best,
            history,
            ctx,
            (command_line, arguments),
            provenance,
            started,
            n_params,
            "finished",
            plot=False,
        )
    if ctx.world_size > 1:
        dist.barrier()
    return summary


def _constant_checkpoint_fields(
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


def _fmt(value: float | None) -> str:
    """A metric for the progress bar ('-' before the first validation)."""
    return "-" if value is None else f"{value:.4f}"


def _say(ctx: DistContext, message: str) -> None:
    """One progress line on stderr from rank 0 (tqdm-safe)."""
    if ctx.is_main:
        tqdm.write(f"ecglab train: {message}", file=sys.stderr)


def _write_summary(
    out: Path,
    cfg: TrainConfig,
    best: dict[str, Any],
    history: list[dict[str, Any]],
    ctx: DistContext,
    invocation: tuple[Sequence[str], dict[str, Any] | None],
    provenance: dict[str, Any],
    started: float,
    n_params: int,
    status: str,
    plot: bool = True,
) -> dict[str, Any]:
    """Write ``run.json`` (and ``curves.png`` unless ``plot`` is False) and return the summary."""
    from model_training.reports import plot_training_curves

    summary = {
        "status": status,
        "epochs_completed": len(history),
        "epochs": cfg.epochs,
        "best_epoch": best.get("epoch"),
        "best_val_macro_auroc": _json_safe(best.get("val_macro_auroc", math.nan)),
        "seed": cfg.seed,
        "config": to_dict(cfg),
        "n_parameters": n_params,
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        "command_line": list(invocation[0]),
        "arguments": invocation[1],
        "versions": software_versions(),
        "data": {k: provenance[k] for k in ("path", "n_records", "summary", "hashes")},
        "seconds_this_session": round(time.time() - started, 2),
        "seconds_per_epoch": [h["seconds"] for h in history],
    }
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "run.json")
    if plot or not (out / "curves.png").exists():
        plot_training_curves(history, out / "curves.png")
    return summary
