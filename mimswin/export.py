"""Export the pretrained encoder as safetensors keyed exactly like `timm.create_model(name)` (head aside).

Two formats: `safetensors` (one file with the timm name, constructor kwargs and pretrained_cfg as metadata) and `timm`
(a folder in timm's own hub layout, `model.safetensors` + `config.json`, loadable as `local-dir:FOLDER`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import safetensors
import safetensors.torch
import timm
import torch

from mimswin.errors import CheckpointError, MimswinError
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


def pretrained_cfg(timm_kwargs: Dict[str, Any], mean: Sequence[float], std: Sequence[float],
                   tag: str) -> Dict[str, Any]:
    """The pretrained_cfg fields that describe our weights: input size, normalisation, no classifier."""
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


def load_snippet(fmt: str, path: Path, name: str, kwargs: Dict[str, Any]) -> str:
    """The Python line that loads an export with plain timm, printed for the user."""
    if fmt == "timm":
        return f"timm.create_model('local-dir:{path}', pretrained=True, num_classes=...)"
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (f"timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='{path}', "
            f"num_classes=0){args})")


def export_run(source: str | Path, fmt: str = "safetensors", out: Optional[str | Path] = None) -> Path:
    """Export the encoder of a pretraining run (its latest checkpoint) as `fmt`; returns the written path."""
    from mimswin.models.vit import timm_kwargs
    from mimswin.pretrained import find_run_config, load_pretrain_run

    run = load_pretrain_run(source)
    m = run.cfg.model
    kwargs = timm_kwargs(m.img_size, m.patch_size, m.drop_path_rate, m.kwargs)
    kwargs.pop("drop_path_rate", None)
    cfg = pretrained_cfg(kwargs, run.cfg.data.mean, run.cfg.data.std, f"mimswin_{run.cfg.method}")
    encoder = run.method.encoder.model
    default_dir = find_run_config(run.checkpoint).parent / "export"
    if fmt == "timm":
        return export_timm_folder(encoder, Path(out) if out else default_dir / m.name, kwargs, cfg)
    path = Path(out) if out else default_dir / f"{m.name}.safetensors"
    state = json.loads((run.checkpoint / "state.json").read_text())
    return export_encoder(encoder, path, m.name, kwargs, {"method": run.cfg.method, "step": state.get("step"),
                                                          "pretrained_cfg": cfg})


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """`mimswin export --from RUN --format timm|safetensors [--out PATH]`."""
    parser = argparse.ArgumentParser(prog="mimswin export", description="Write the pretrained encoder of a run so "
                                     "that plain timm loads it (no mimswin needed to use it).")
    parser.add_argument("--from", dest="source", required=True, help="run dir or checkpoint dir")
    parser.add_argument("--format", choices=("safetensors", "timm"), default="safetensors",
                        help="safetensors: one file with metadata; timm: folder with model.safetensors + config.json")
    parser.add_argument("--out", default=None, help="output file (safetensors) or folder (timm); default RUN/export/")
    args = parser.parse_args(argv)
    try:
        path = export_run(args.source, args.format, args.out)
    except MimswinError as err:
        print(f"mimswin: error: {err}", file=sys.stderr)
        return 2
    if args.format == "timm":
        snippet = load_snippet("timm", path, "", {})
    else:
        _, name, kwargs = read_export(path)
        snippet = load_snippet("safetensors", path, name, kwargs)
    print(f"wrote {path}\nload it with: {snippet}")
    return 0
