"""`mimswin export`: a pretraining run's encoder written for plain timm (one safetensors file, or timm's hub folder)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from mimswin.models.create import encoder_kwargs
from mimswin.programs.common import console_entry
from mimswin.runs.checkpoint import read_state
from mimswin.runs.export import export_encoder, export_timm_folder, pretrained_cfg, read_export
from mimswin.runs.layout import EXPORT
from mimswin.runs.open import find_run_config, load_pretrain_run


def load_snippet(fmt: str, path: Path, name: str, kwargs: Dict[str, Any]) -> str:
    """The Python line that loads an export with plain timm, printed for the user."""
    if fmt == "timm":
        return f"timm.create_model('local-dir:{path}', pretrained=True, num_classes=...)"
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    size = kwargs.get("img_size", 224)
    input_size = [kwargs.get("in_chans", 3), *((size, size) if isinstance(size, int) else size)]
    return (f"timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='{path}', "
            f"num_classes=0, input_size={input_size}){args})")


def export_run(source: str | Path, fmt: str = "safetensors", out: Optional[str | Path] = None) -> Path:
    """Export the encoder of a pretraining run (its latest checkpoint) as `fmt`; returns the written path."""
    run = load_pretrain_run(source)
    m = run.cfg.model
    kwargs = encoder_kwargs(run.cfg)
    kwargs.pop("drop_path_rate", None)
    cfg = pretrained_cfg(kwargs, run.cfg.data.mean, run.cfg.data.std, f"mimswin_{run.cfg.method}")
    encoder = run.method.encoder.model
    default_dir = find_run_config(run.checkpoint).parent / EXPORT
    if fmt == "timm":
        return export_timm_folder(encoder, Path(out) if out else default_dir / m.name, kwargs, cfg)
    path = Path(out) if out else default_dir / f"{m.name}.safetensors"
    state = read_state(run.checkpoint)
    return export_encoder(encoder, path, m.name, kwargs, {"method": run.cfg.method, "step": state.get("step"),
                                                          "pretrained_cfg": cfg})


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Parse, export, print where the export went and the line that loads it."""
    parser = argparse.ArgumentParser(prog="mimswin export", description="Write the pretrained encoder of a run so "
                                     "that plain timm loads it (no mimswin needed to use it).")
    parser.add_argument("--from", dest="source", required=True, help="run dir or checkpoint dir")
    parser.add_argument("--format", choices=("safetensors", "timm"), default="safetensors",
                        help="safetensors: one file with metadata; timm: folder with model.safetensors + config.json")
    parser.add_argument("--out", default=None, help="output file (safetensors) or folder (timm); default RUN/export/")
    args = parser.parse_args(argv)
    path = export_run(args.source, args.format, args.out)
    if args.format == "timm":
        snippet = load_snippet("timm", path, "", {})
    else:
        _, name, kwargs = read_export(path)
        snippet = load_snippet("safetensors", path, name, kwargs)
    print(f"wrote {path}\nload it with: {snippet}")
    return path


cli = console_entry(main)
