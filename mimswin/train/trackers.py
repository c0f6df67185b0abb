"""Experiment trackers (wandb, tensorboard) through accelerate: init options and pictures; scalars go via
`accelerator.log` in the loop core."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
from accelerate import Accelerator

from mimswin.config import TrainConfig


def tracker_init_kwargs(cfg: TrainConfig) -> Dict[str, Dict[str, Any]]:
    """wandb writes its files into the run dir and names the run after it (no `./wandb` in the working dir)."""
    return {"wandb": {"dir": str(Path(cfg.output_dir).expanduser()), "name": Path(cfg.output_dir).name}}


def log_picture(accelerator: Accelerator, name: str, picture: torch.Tensor, step: int) -> None:
    """Send a [3, H, W] picture in [0, 1] to every image-capable tracker; rank 0 only (other ranks hold stubs)."""
    if not accelerator.is_main_process:
        return
    array = (picture.detach().cpu().permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: array[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [array]}, step=step)
