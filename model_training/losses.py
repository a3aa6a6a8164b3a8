"""Binary focal loss with missing labels masked, as the paper's training objective (method.md §3.3).

The reference uses ``bcef``: binary focal cross-entropy with γ = 2 and ``ignore_nans``. A lab that
was not measured leaves a NaN target; that entry contributes nothing. Each label's loss is the
mean over its *observed* entries in the batch, and the per-label means are summed (not averaged)
over labels, so every target weighs the same regardless of how often its lab is ordered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def binary_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Sum over labels of the mean focal BCE over each label's non-NaN targets.

    Args:
        logits: (B, K) raw scores.
        targets: (B, K) 1.0 / 0.0 / NaN (NaN = lab not measured, masked out).
        gamma: focusing parameter; ``gamma = 0`` gives plain binary cross-entropy.

    Returns:
        A scalar. Labels without any observed target in the batch contribute 0 (and no
        gradient); a batch with no observed target at all gives an exact 0 that still carries
        a graph, so ``backward`` never fails.

    The focal factor ``(1 - p_t)^γ`` uses ``p_t = exp(-BCE)``, the probability given to the true
    class, which is numerically stable for large logits.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    observed = ~torch.isnan(targets)
    safe_targets = torch.where(observed, targets, torch.zeros_like(targets))
    bce = F.binary_cross_entropy_with_logits(logits, safe_targets, reduction="none")  # (B, K)
    if gamma != 0.0:
        p_t = torch.exp(-bce)
        bce = (1.0 - p_t).pow(gamma) * bce
    per_entry = torch.where(observed, bce, torch.zeros_like(bce))
    count = observed.sum(dim=0)  # (K,)
    per_label = per_entry.sum(dim=0) / count.clamp(min=1)  # (K,), 0 for labels never observed
    return per_label.sum()
