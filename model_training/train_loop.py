"""The training loop of ``ecglab train`` (method.md §3.3, §3.4): data, model, epochs, validation.

One epoch = every training record (folds 0-17) once, as one random 250-sample crop, in shuffled
batches of 32 (incomplete last batch dropped); binary focal loss (γ = 2, missing labels masked);
AdamW, lr 1e-3, weight decay 1e-3, constant schedule. After each epoch the validation fold (18)
is scored with 4 non-overlapping windows per ECG (mean probability) and the macro AUROC over all
targets of all tasks picks ``checkpoint_best.pt``.

Files written to RUN (rank 0 only): ``checkpoint_last.pt``, ``checkpoint_best.pt`` (see
:mod:`model_training.checkpoint`), ``train_log.jsonl`` (one JSON object per epoch), ``curves.png``
and ``run.json`` (summary). Under ``torchrun`` each process trains on its share of the records
(DistributedSampler, DistributedDataParallel) and validation predictions are gathered so every
rank sees the same metrics (:mod:`model_training.distributed`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from fhir_mappings.errors import InputError
from model_training.checkpoint import (
    capture_rng_state,
    check_provenance,
    constant_checkpoint_fields,
    epoch_state,
    resolve_run_config,
    restore_training_state,
    save_atomic,
    seed_everything,
    software_versions,
)
from model_training.config import TrainConfig, to_dict
from model_training.data import (
    EcgLabWindows,
    LabDataset,
    cont_feature_names,
    dataset_provenance,
    encode_features,
    fit_metadata_spec,
    open_dataset,
    parse_target,
)
from model_training.distributed import (
    DistContext,
    barrier,
    configure_threads,
    gather_objects,
    gather_predictions,
    init_distributed,
    mean_over_ranks,
)
from model_training.losses import binary_focal_loss
from model_training.metrics import group_columns
from model_training.model import FusionModel
from model_training.predict import predict, validation_metrics


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
    return mean_over_ranks(loss_sum, n_steps, ctx), n_steps


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
    cfg, ckpt = resolve_run_config(out, config_file, dict(overrides or {}), resume)
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
        check_provenance(dataset, ckpt["provenance"])
    rows = {"train": dataset.rows_in(cfg.train_folds), "val": dataset.rows_in([cfg.val_fold])}
    records_file = dataset.root / "records.parquet"
    if len(rows["train"]) < cfg.batch_size * ctx.world_size:
        raise InputError(
            f"{records_file}: {len(rows['train'])} training records (folds {list(cfg.train_folds)}) "
            f"are fewer than one batch of {cfg.batch_size} per process"
        )
    if len(rows["val"]) == 0:
        raise InputError(f"{records_file}: no record in validation fold {cfg.val_fold}")
    spec = fit_metadata_spec(dataset.metadata, rows["train"], missing_indicators=cfg.use_missing_indicators)
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

    start_epoch = 0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": None, "val_macro_auroc": -math.inf, "last_val": None}
    if ckpt is not None:
        start_epoch, history, best, note = restore_training_state(
            ckpt, model, optimizer, loaders.generator, cfg.seed, ctx.rank, ctx.world_size
        )
        if note:
            _say(ctx, note)

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
    constant = constant_checkpoint_fields(cfg, model, dataset, spec, provenance)
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
        rng_states = gather_objects(capture_rng_state(), ctx)  # collective: every rank takes part
        if not ctx.is_main:
            continue
        metrics = {
            "val_macro_auroc": _json_safe(macro),
            "val_task_macro_auroc": entry["val_task_macro_auroc"],
            "val_target_auroc": per_target,
        }
        state = epoch_state(
            constant,
            epoch + 1,
            model,
            optimizer,
            metrics,
            best,
            history,
            rng_states,
            cfg.seed,
            loaders.generator,
        )
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
    barrier(ctx)
    return summary


def _json_safe(value: float) -> float | None:
    """NaN/inf/None → None (JSON has no NaN), else the float."""
    return None if value is None or not math.isfinite(value) else float(value)


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
