"""What every MIM method returns, and the reconstruction loss restricted to hidden patches."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mimswin.models.masking import MaskSample

LOSS_KINDS = ("mse", "l1")


class MIMOutput(NamedTuple):
    """The loss, predictions [B, N, target values], targets, the mask drawn, the online probe's class scores (None
    without a probe), and `answered` [B, N] bool: the cells the decoder predicted, the others' `pred` being zero (None:
    every cell has a prediction)."""

    loss: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    mask: MaskSample
    probe_logits: Optional[torch.Tensor] = None
    answered: Optional[torch.Tensor] = None


def masked_loss(pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean over hidden patches of the per-patch mean squared (`mse`) or absolute (`l1`) error."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind '{kind}' (known: {', '.join(LOSS_KINDS)})")
    diff = pred.float() - target.float()
    per_patch = (diff.pow(2) if kind == "mse" else diff.abs()).mean(dim=-1)
    weights = hidden.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum()
