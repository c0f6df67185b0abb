"""Speed switches from the config: gradient checkpointing, torch.compile and the fused AdamW kernel."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from mimswin.config import OptimConfig, TrainConfig
from mimswin.errors import ConfigError


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Turn on every submodule's `set_grad_checkpointing` (timm's switch, also on our decoders); returns how many."""
    switches = [m for m in model.modules() if callable(getattr(m, "set_grad_checkpointing", None))]
    if not switches:
        raise ConfigError(f"config key 'train.activation_checkpointing': {type(model).__name__} has no module that "
                          "supports gradient checkpointing")
    for module in switches:
        module.set_grad_checkpointing(True)
    return len(switches)


def apply_model_flags(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Checkpointing, then `nn.Module.compile()` in place, so state_dict keys and attributes stay the model's own."""
    if cfg.activation_checkpointing:
        enable_grad_checkpointing(model)
    if cfg.compile:
        model.compile()
    return model


def optimizer_kwargs(cfg: OptimConfig, device: torch.device) -> Dict[str, Any]:
    """`fused=True` for AdamW on CUDA and CPU (the fused kernel: ~4x faster than foreach on CPU, and on CUDA it skips
    non-finite steps without a host sync) unless `optim.fused` says otherwise; an explicit `optim.fused` always wins."""
    fused = cfg.fused if cfg.fused is not None else device.type in ("cuda", "cpu")
    return {"fused": True} if fused else {}
