"""Reopen what a run wrote: the whole pretraining model of a run (export, visualize), or the encoder weights of any
artifact (finetune, linprobe, knn).

Encoder sources: an exported `encoder.safetensors`, a timm hub folder (a run's `encoder/`, `mimswin export --format
timm`), a run dir (its export, else its latest checkpoint), or a checkpoint dir `checkpoints/step_*` (pretraining: the
`encoder.model.` weights; fine-tune/probe runs: their meta).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

import torch
import yaml

from mimswin.config.loading import load_config
from mimswin.config.pretrain import PretrainConfig
from mimswin.errors import CheckpointError
from mimswin.models.create import timm_kwargs
from mimswin.models.factory import build_method
from mimswin.models.online_probe import PROBE_ATTRIBUTE
from mimswin.runs.checkpoint import checkpoint_weights, load_state, read_state
from mimswin.runs.discovery import latest_checkpoint, resolve_checkpoint
from mimswin.runs.export import export_metadata, read_export
from mimswin.runs.files import read_safetensors
from mimswin.runs.layout import CHECKPOINTS, CONFIG, ENCODER, ENCODER_DIR, FOLDER_CONFIG, MODEL, STATE


class PretrainRun(NamedTuple):
    cfg: PretrainConfig
    method: torch.nn.Module
    checkpoint: Path


def run_config_path(checkpoint: Path) -> Optional[Path]:
    """The run's config.yaml: beside the checkpoint, or two levels up (`run/checkpoints/step_*`); None if absent."""
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (folder / CONFIG).is_file():
            return folder / CONFIG
    return None


def find_run_config(checkpoint: Path) -> Path:
    """`run_config_path`, or one CheckpointError when the run has no config."""
    found = run_config_path(checkpoint)
    if found is None:
        raise CheckpointError(f"no {CONFIG} found for checkpoint '{checkpoint}' (looked in it and its run dir)")
    return found


def load_pretrain_run(path: str | Path) -> PretrainRun:
    """The model of a run dir or checkpoint dir, weights loaded, in eval mode on CPU (without the online probe a run
    may have trained beside it: export and pictures need the method alone)."""
    if Path(path).is_file():
        raise CheckpointError(f"'{path}' is a file; give the run dir or one of its checkpoints/step_* dirs (the whole "
                              "pretraining model and the run's config are needed, not only exported weights)")
    checkpoint = resolve_checkpoint(path)
    cfg = load_config(PretrainConfig, [find_run_config(checkpoint)])
    method = build_method(cfg)
    weights = {k: v for k, v in checkpoint_weights(checkpoint).items() if not k.startswith(f"{PROBE_ATTRIBUTE}.")}
    load_state(method, weights, f"checkpoint '{checkpoint}'")
    return PretrainRun(cfg, method.eval(), checkpoint)


PRETRAIN_PREFIX = "encoder.model."


@dataclass
class EncoderWeights:
    """Encoder weights keyed like `timm.create_model(timm_name, **timm_kwargs)`, where they came from, and the
    normalisation they were trained with (None where the source does not record it)."""

    weights: Dict[str, torch.Tensor]
    timm_name: str
    timm_kwargs: Dict[str, Any]
    source: Path
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None

    @property
    def in_chans(self) -> int:
        return self.timm_kwargs.get("in_chans", 3)


def _from_checkpoint_dir(path: Path) -> EncoderWeights:
    meta = read_state(path).get("meta", {})
    weights = checkpoint_weights(path)
    if "timm_name" in meta:
        prefix = meta.get("encoder_prefix", "")
        name, kwargs, pixels = meta["timm_name"], meta.get("timm_kwargs", {}), meta
    else:
        config = run_config_path(path) or path.parent.parent / CONFIG
        try:
            run = yaml.safe_load(config.read_text())
            model, pixels = run["model"], run.get("data", {})
            name = model["name"]
            kwargs = timm_kwargs(model["img_size"], model.get("patch_size"), model.get("drop_path_rate", 0.0),
                                 model.get("kwargs"), pixels.get("channels") or 3)
        except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError):
            raise CheckpointError(f"checkpoint '{path}': cannot tell its architecture (no timm_name in state.json "
                                  f"and no readable model section in {config})") from None
        prefix = PRETRAIN_PREFIX
    encoder = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not encoder:
        raise CheckpointError(f"checkpoint '{path}' holds no encoder weights (no keys under '{prefix}')")
    return EncoderWeights(encoder, name, kwargs, path, pixels.get("mean"), pixels.get("std"))


def _from_timm_folder(path: Path) -> EncoderWeights:
    """A timm hub folder: the architecture and statistics of its config.json, the weights of its model.safetensors."""
    try:
        config = json.loads((path / FOLDER_CONFIG).read_text())
        name, recorded = config["architecture"], config.get("pretrained_cfg", {})
        kwargs = {k: v for k, v in config.get("model_args", {}).items() if k not in ("num_classes", "global_pool")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"'{path / FOLDER_CONFIG}' is not a readable timm config ({err})") from None
    weights = read_safetensors(path / MODEL, "exported encoder")
    return EncoderWeights(weights, name, kwargs, path, recorded.get("mean"), recorded.get("std"))


def read_encoder_weights(path: str | Path) -> EncoderWeights:
    """Encoder weights and architecture of an exported file, a timm folder, a run dir or a checkpoint dir."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"--from '{path}' does not exist")
    if path.is_file():
        weights, name, kwargs = read_export(path)
        recorded = export_metadata(path).get("pretrained_cfg", {})
        return EncoderWeights(weights, name, kwargs, path, recorded.get("mean"), recorded.get("std"))
    if (path / STATE).is_file():
        return _from_checkpoint_dir(path)
    if (path / FOLDER_CONFIG).is_file():
        return _from_timm_folder(path)
    if (path / ENCODER).is_file():
        return read_encoder_weights(path / ENCODER)
    if (path / ENCODER_DIR / FOLDER_CONFIG).is_file():
        return _from_timm_folder(path / ENCODER_DIR)
    checkpoint = latest_checkpoint(path / CHECKPOINTS) if (path / CHECKPOINTS).is_dir() else None
    if checkpoint is None:
        raise CheckpointError(f"--from '{path}' is neither an exported encoder (encoder.safetensors or a timm folder), "
                              "a run dir (encoder/, encoder.safetensors or checkpoints/step_*) nor a checkpoint dir "
                              "(state.json)")
    return _from_checkpoint_dir(checkpoint)
