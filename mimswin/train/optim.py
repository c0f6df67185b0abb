"""Optimizer and per-iteration schedule from timm parts: AdamW without decay on biases/norms/tokens, warmup + cosine."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from mimswin.config import OptimConfig


def scaled_lr(cfg: OptimConfig, effective_batch: int) -> float:
    """Absolute lr: `optim.lr` if given, else blr * effective batch / lr_batch_divisor (256 for MAE, 512 for SimMIM)."""
    return cfg.lr if cfg.lr is not None else cfg.blr * effective_batch / cfg.lr_batch_divisor


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, opt: str = "adamw",
                    layer_decay: float | None = None, exclude: Iterable[nn.Parameter] = (),
                    **kwargs) -> torch.optim.Optimizer:
    """timm optimizer; 1-D params and the model's `no_weight_decay()` names get weight decay 0. Parameters in
    `exclude` are left out (timm groups trainable parameters only: they are frozen while it builds the groups)."""
    if opt.endswith("adamw") or opt.endswith("adam"):
        kwargs.setdefault("betas", tuple(cfg.betas))
    frozen = [p for p in exclude if p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    try:
        return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=cfg.weight_decay, layer_decay=layer_decay,
                                   **kwargs)
    finally:
        for param in frozen:
            param.requires_grad_(True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    steps_per_epoch: int) -> CosineLRScheduler:
    """Linear warmup from 0 over `warmup_epochs`, then a half-cycle cosine to `min_lr`, updated every optimizer step.

    Call `step_update(step)` before each optimizer step; the lr is a pure function of the step (and each param
    group's `lr_scale`), so resuming needs only the step counter.
    """
    warmup = min(int(math.ceil(cfg.warmup_epochs * steps_per_epoch)), total_steps)
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup), lr_min=cfg.min_lr,
                             warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
