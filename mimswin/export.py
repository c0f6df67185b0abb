"""Export the pretrained encoder as safetensors keyed exactly like `timm.create_model(name)` (head aside)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import safetensors
import safetensors.torch
import timm
import torch

from mimswin.errors import CheckpointError
from mimswin.train.rundir import atomic_write_bytes

FORMAT = "mimswin-encoder"


def export_encoder(model: torch.nn.Module, path: Path, timm_name: str, timm_kwargs: Dict[str, Any],
                   extra: Dict[str, Any] | None = None) -> Path:
    """Write the timm model's state dict with metadata (timm name and constructor kwargs) for rebuilding it."""
    metadata = {"format": FORMAT, "timm_name": timm_name, "timm_kwargs": json.dumps(timm_kwargs),
                **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(Path(path), safetensors.torch.save(tensors, metadata=metadata))
    return Path(path)


def read_export(path: str | Path) -> Tuple[Dict[str, torch.Tensor], str, Dict[str, Any]]:
    """(state dict, timm name, timm kwargs) of an exported encoder."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"exported encoder '{path}' does not exist")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        weights = safetensors.torch.load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"'{path}' is not a readable safetensors file: {err}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a mimswin encoder export (no '{FORMAT}' metadata)")
    return weights, metadata["timm_name"], json.loads(metadata["timm_kwargs"])


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
