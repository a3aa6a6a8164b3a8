"""Whole-record predictions of a model, and the validation metrics that pick a run's best epoch.

Shared by training (validation after every epoch) and ``ecglab evaluate`` (val and test folds), so
both score a record the same way: 4 non-overlapping 2.5 s windows, sigmoid probabilities averaged
per record (method.md §2.2), AUROC per target and its macro over all targets of all tasks (§3.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from model_training.data import eval_windows, parse_target
from model_training.metrics import auroc_per_target, group_columns, macro_auroc


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


def validation_metrics(
    y: np.ndarray, probs: np.ndarray, targets: Sequence[str]
) -> tuple[float, dict[str, float], dict[str, float | None]]:
    """Macro AUROC over all targets, per-task macros and per-target AUROC (None where undefined)."""
    aurocs = auroc_per_target(y, probs)
    tasks = group_columns(targets, {t: parse_target(t).task for t in targets})
    per_task = {task: macro_auroc(aurocs[cols]) for task, cols in tasks.items()}
    per_target = {t: (None if math.isnan(a) else float(a)) for t, a in zip(targets, aurocs, strict=True)}
    return macro_auroc(aurocs), per_task, per_target
