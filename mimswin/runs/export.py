"""Export the pretrained encoder as safetensors keyed exactly like `timm.create_model(name)` (head aside).

Two formats: `safetensors` (one file with the timm name, constructor kwargs and pretrained_cfg as metadata) and `timm`
(a folder in timm's own hub layout, `model.safetensors` + `config.json`, loadable as `local-dir:FOLDER`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple

import safetensors
import safetensors.torch
import timm
import torch

from mimswin.errors import CheckpointError
from mimswin.runs.files import atomic_write_bytes, read_safetensors

FORMAT = "mimswin-encoder"


def export_encoder(model: torch.nn.Module | Mapping[str, torch.Tensor], path: Path, timm_name: str,
                   timm_kwargs: Dict[str, Any], extra: Dict[str, Any] | None = None) -> Path:
    """Write the timm model's state dict (or the state dict itself, e.g. gathered from FSDP shards) with metadata
    (timm name and constructor kwargs) for rebuilding it."""
    metadata = {"format": FORMAT, "timm_name": timm_name, "timm_kwargs": json.dumps(timm_kwargs),
                **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    atomic_write_bytes(Path(path), safetensors.torch.save(tensors, metadata=metadata))
    return Path(path)


def export_metadata(path: str | Path) -> Dict[str, Any]:
    """The metadata of an exported encoder, JSON values decoded (timm_kwargs, pretrained_cfg, method, step)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"exported encoder '{path}' does not exist")
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a mimswin encoder export (no '{FORMAT}' metadata)")
    return {k: v if k in ("format", "timm_name") else json.loads(v) for k, v in metadata.items()}


def read_export(path: str | Path) -> Tuple[Dict[str, torch.Tensor], str, Dict[str, Any]]:
    """(state dict, timm name, timm kwargs) of an exported encoder."""
    metadata = export_metadata(path)
    return read_safetensors(Path(path), "exported encoder"), metadata["timm_name"], metadata["timm_kwargs"]


def load_exported_timm(path: str | Path, **overrides: Any) -> torch.nn.Module:
    """`timm.create_model` of the exported architecture with the exported weights (head left at its init)."""
    weights, name, kwargs = read_export(path)
    model = timm.create_model(name, pretrained=False, **{**kwargs, **overrides})
    missing, unexpected = model.load_state_dict(weights, strict=False)
    head_keys = {k for k in missing if k.startswith(("head.", "fc_norm."))}
    if unexpected or set(missing) - head_keys:
        absent = sorted(set(missing) - head_keys)[:3]
        raise CheckpointError(f"'{path}' does not fit timm model '{name}': missing {absent}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    return model


def pretrained_cfg(timm_kwargs: Dict[str, Any], mean: Sequence[float], std: Sequence[float],
                   tag: str) -> Dict[str, Any]:
    """The pretrained_cfg fields that describe our weights: input size [C, H, W], normalisation (per channel, in the
    loader's units), no classifier. timm's data config and `mimswin` evaluation read them."""
    size = timm_kwargs.get("img_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return {"tag": tag, "input_size": [timm_kwargs.get("in_chans", 3), *size], "mean": list(mean), "std": list(std),
            "crop_pct": 1.0, "num_classes": 0}


def export_timm_folder(model: torch.nn.Module, folder: Path, timm_kwargs: Dict[str, Any],
                       cfg: Dict[str, Any]) -> Path:
    """timm's hub layout (model.safetensors + config.json) via timm's own writer."""
    from timm.models._hub import save_for_hf

    save_for_hf(model, str(folder), model_config={"pretrained_cfg": cfg}, model_args=dict(timm_kwargs),
                safe_serialization=True, data_config={"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
                                                      "crop_pct": cfg["crop_pct"]})
    return Path(folder)


