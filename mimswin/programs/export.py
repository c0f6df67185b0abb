"""`mimswin export`: a pretraining run's encoder written for plain timm (one safetensors file, or timm's hub folder
with its model card), and pushed to the Hugging Face Hub with timm's own `push_to_hf_hub`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from mimswin.programs.common import console_entry
from mimswin.runs.card import TASK, RunFacts, card_text, model_card
from mimswin.runs.checkpoint import read_state
from mimswin.runs.export import (
    encoder_spec,
    export_timm_folder,
    hub_kwargs,
    read_export,
    timm_encoder,
    write_encoder_file,
    write_encoder_folder,
)
from mimswin.runs.layout import EXPORT
from mimswin.runs.open import PretrainRun, find_run_config, load_pretrain_run


def load_snippet(fmt: str, path: Path, name: str, kwargs: Dict[str, Any]) -> str:
    """The Python line that loads an export with plain timm, printed for the user."""
    if fmt == "timm":
        return f"timm.create_model('local-dir:{path}', pretrained=True, num_classes=...)"
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    size = kwargs.get("img_size", 224)
    input_size = [kwargs.get("in_chans", 3), *((size, size) if isinstance(size, int) else size)]
    return (f"timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='{path}', "
            f"num_classes=0, input_size={input_size}){args})")


def run_facts(run: PretrainRun) -> RunFacts:
    """What the card of a run's export tells, from its config and its checkpoint's state (step, images, command)."""
    state = read_state(run.checkpoint)
    meta = state.get("meta", {})
    return RunFacts(run.cfg, find_run_config(run.checkpoint).parent, state.get("step", 0), meta.get("images"),
                    meta.get("command"))


def export_run(source: str | Path, fmt: str = "safetensors", out: Optional[str | Path] = None) -> Path:
    """Export the encoder of a pretraining run (its latest checkpoint) as `fmt`; returns the written path."""
    run = load_pretrain_run(source)
    facts = run_facts(run)
    weights = run.method.encoder.model.state_dict()
    default_dir = facts.root / EXPORT
    if fmt == "timm":
        return write_encoder_folder(weights, Path(out) if out else default_dir / run.cfg.model.name, facts)
    return write_encoder_file(weights, Path(out) if out else default_dir / f"{run.cfg.model.name}.safetensors",
                              facts)


def push_run(source: str | Path, repo: str, out: Optional[str | Path] = None, private: bool = False) -> Path:
    """Write the timm folder of a run's encoder with the card the Hub will show (its usage names `hf-hub:REPO`), then
    upload the same with timm's `push_to_hf_hub`; returns the local folder."""
    from timm.models import push_to_hf_hub

    run = load_pretrain_run(source)
    facts = run_facts(run)
    name, kwargs, cfg = encoder_spec(run.cfg)
    model = timm_encoder(run.method.encoder.model, name, kwargs, cfg)
    card = model_card(facts, f"hf-hub:{repo}")
    folder = Path(out) if out else facts.root / EXPORT / repo.split("/")[-1]
    export_timm_folder(model, folder, name, kwargs, cfg, card_text(card, repo.split("/")[-1]))
    push_to_hf_hub(model, repo, private=private, model_card=card, task_name=TASK, **hub_kwargs(kwargs, cfg))
    return folder


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Parse, export (and push), print where the export went and the line that loads it."""
    parser = argparse.ArgumentParser(prog="mimswin export", description="Write the pretrained encoder of a run so "
                                     "that plain timm loads it (no mimswin needed to use it).")
    parser.add_argument("--from", dest="source", required=True, help="run dir or checkpoint dir")
    parser.add_argument("--format", choices=("safetensors", "timm"), default=None,
                        help="safetensors (default): one file with metadata; timm: timm's hub folder (config.json, "
                             "model.safetensors, README.md model card)")
    parser.add_argument("--out", default=None, help="output file (safetensors) or folder (timm); default RUN/export/")
    parser.add_argument("--push-to-hub", dest="repo", default=None, metavar="REPO",
                        help="also upload timm's folder to the Hugging Face Hub repo REPO (user/name) with timm's "
                             "push_to_hf_hub (needs a token: `huggingface-cli login`)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = parser.parse_args(argv)
    if args.repo is not None and args.format == "safetensors":
        parser.error("--push-to-hub uploads timm's folder: give --format timm or leave --format out")
    if args.repo is not None:
        path = push_run(args.source, args.repo, args.out, args.private)
        print(f"wrote {path} and pushed it to https://huggingface.co/{args.repo}\nload it with: "
              f"timm.create_model('hf-hub:{args.repo}', pretrained=True, num_classes=...)")
        return path
    fmt = args.format or "safetensors"
    path = export_run(args.source, fmt, args.out)
    if fmt == "timm":
        snippet = load_snippet("timm", path, "", {})
    else:
        _, name, kwargs = read_export(path)
        snippet = load_snippet("safetensors", path, name, kwargs)
    print(f"wrote {path}\nload it with: {snippet}")
    return path


cli = console_entry(main)
