"""Reopen a pretraining run: its resolved config and the pretraining model (encoder + decoder) of its latest checkpoint.

Used by `mimswin export` and `mimswin visualize`, which need the whole pretraining model, not only the encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from mimswin.config import PretrainConfig, load_config
from mimswin.errors import CheckpointError
from mimswin.models import build_method
from mimswin.train.checkpoint import load_model_weights, resolve_checkpoint

CONFIG_NAME = "config.yaml"


class PretrainRun(NamedTuple):
    cfg: PretrainConfig
    method: torch.nn.Module
    checkpoint: Path


def find_run_config(checkpoint: Path) -> Path:
    """The run's config.yaml: beside the checkpoint, or two levels up (`run/checkpoints/step_*`)."""
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    raise CheckpointError(f"no {CONFIG_NAME} found for checkpoint '{checkpoint}' (looked in it and its run dir)")


def load_pretrain_run(path: str | Path) -> PretrainRun:
    """The model of a run dir or checkpoint dir, weights loaded, in eval mode on CPU."""
    if Path(path).is_file():
        raise CheckpointError(f"'{path}' is a file; give the run dir or one of its checkpoints/step_* dirs (the whole "
                              "pretraining model and the run's config are needed, not only exported weights)")
    checkpoint = resolve_checkpoint(path)
    cfg = load_config(PretrainConfig, [find_run_config(checkpoint)])
    method = build_method(cfg)
    load_model_weights(method, checkpoint / "model.safetensors")
    return PretrainRun(cfg, method.eval(), checkpoint)
