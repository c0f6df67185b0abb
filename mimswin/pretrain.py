"""Pretraining program: config -> data -> method -> the loop core -> checkpoints, pictures and the exported encoder."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

import torch
from accelerate.utils import set_seed

from mimswin.config import PretrainConfig, list_presets, load_config, save_config, to_dict
from mimswin.data.build import build_pretrain_data, preview_images
from mimswin.errors import ConfigError
from mimswin.export import export_encoder
from mimswin.models import build_method
from mimswin.models.vit import timm_kwargs
from mimswin.program import parse_with_resume, resume_point, run_cli
from mimswin.trackers import log_picture, tracker_init_kwargs
from mimswin.train.loop import Trainer, make_accelerator
from mimswin.train.optim import build_optimizer, build_scheduler, scaled_lr
from mimswin.train.perf import apply_model_flags, optimizer_kwargs
from mimswin.train.rundir import RunDir
from mimswin.viz import reconstruction_grid, save_png

PREVIEW_COUNT = 8


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, List[str]]:
    parser = argparse.ArgumentParser(
        prog="mimswin-pretrain",
        description="Masked image modeling pretraining. Any config key can be overridden as key=value, "
                    "--key=value or --key value (e.g. optim.blr=1e-4 --data.path /images).",
        epilog="presets: " + ", ".join(list_presets()))
    parser.add_argument("--config", action="append", default=[],
                        help="YAML preset path or name under configs/ (repeatable; later ones win)")
    return parse_with_resume(parser, argv)


class PretrainPictures:
    """Reconstruction grid every `vis_every` steps and at the end, written by rank 0 and sent to the trackers."""

    def __init__(self, cfg: PretrainConfig, images: torch.Tensor) -> None:
        self.cfg, self.images = cfg, images

    def draw(self, trainer: Trainer, name: str) -> None:
        if not trainer.accelerator.is_main_process:
            return
        method = trainer.accelerator.unwrap_model(trainer.model)
        picture = reconstruction_grid(method, self.images.to(trainer.accelerator.device), self.cfg.data.mean,
                                      self.cfg.data.std)
        save_png(picture, trainer.run_dir.pictures / f"{name}.png")
        save_png(picture, trainer.run_dir.root / "reconstruction.png")
        log_picture(trainer.accelerator, "reconstruction", picture, trainer.state.step)

    def on_step(self, trainer: Trainer) -> None:
        if trainer.state.step % self.cfg.train.vis_every == 0:
            self.draw(trainer, f"step_{trainer.state.step:08d}")

    def on_train_end(self, trainer: Trainer) -> None:
        self.draw(trainer, "final")


class ExportEncoder:
    """At the end, the encoder's timm weights go to encoder.safetensors (rank 0)."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg

    def on_train_end(self, trainer: Trainer) -> None:
        if not trainer.accelerator.is_main_process:
            return
        m = self.cfg.model
        method = trainer.accelerator.unwrap_model(trainer.model)
        export_encoder(method.encoder.model, trainer.run_dir.encoder, m.name,
                       timm_kwargs(m.img_size, m.patch_size, m.drop_path_rate, m.kwargs),
                       {"method": self.cfg.method, "step": trainer.state.step})


def pretrain_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return model(batch[0]).loss


def build_trainer(cfg: PretrainConfig, resume: Optional[str] = None) -> Trainer:
    """Everything a pretraining run needs, wired and (when asked) restored, ready for `fit()`."""
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available() and not cfg.train.cpu:
        raise ConfigError("config key 'train.mixed_precision': fp16 needs a GPU; use bf16 or no on CPU")
    accelerator = make_accelerator(cfg.train)
    run_dir = RunDir(cfg.train.output_dir, accelerator.is_main_process)
    checkpoint = resume_point(accelerator, run_dir.root, run_dir.checkpoints, resume)

    set_seed(cfg.train.seed)
    method = apply_model_flags(build_method(cfg), cfg.train)
    set_seed(cfg.train.seed + accelerator.process_index)
    data = build_pretrain_data(cfg.data, cfg.model.img_size, accelerator.num_processes, accelerator.process_index,
                               cfg.train.seed, accelerator.device, cfg.train.grad_accum_steps)
    steps_per_epoch = data.batches_per_epoch // cfg.train.grad_accum_steps
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    effective_batch = cfg.data.batch_size * cfg.train.grad_accum_steps * accelerator.num_processes
    lr = scaled_lr(cfg.optim, effective_batch)
    optimizer = build_optimizer(method, cfg.optim, lr, **optimizer_kwargs(cfg.optim, accelerator.device))
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps, steps_per_epoch)
    model, optimizer = accelerator.prepare(method, optimizer)

    if accelerator.is_main_process:
        save_config(cfg, run_dir.config)
    accelerator.init_trackers(cfg.train.project, config=flat_config(cfg), init_kwargs=tracker_init_kwargs(cfg.train))
    callbacks = [PretrainPictures(cfg, preview_images(cfg.data, cfg.model.img_size, PREVIEW_COUNT)),
                 ExportEncoder(cfg)]
    meta = {"method": cfg.method, "model": cfg.model.name, "img_size": cfg.model.img_size}
    trainer = Trainer(cfg.train, accelerator, model, optimizer, scheduler, data, pretrain_loss, run_dir,
                      total_steps, cfg.optim.clip_grad, callbacks, meta)
    if checkpoint is not None:
        trainer.resume(checkpoint)
    accelerator.print(f"pretraining {cfg.method} {cfg.model.name}: {total_steps} steps, {steps_per_epoch} per epoch, "
                      f"effective batch {effective_batch}, lr {lr:.3g}, {accelerator.num_processes} process(es) "
                      f"on {accelerator.device}, run dir {run_dir.root}")
    return trainer


def flat_config(cfg: PretrainConfig) -> dict:
    """Config as flat `a.b` keys with scalar values, the form every tracker accepts."""
    flat: dict = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", to_dict(cfg))
    return flat


def main(argv: Optional[Sequence[str]] = None) -> Trainer:
    """Parse, build, train. Returns the trainer (its `history` holds the logged metrics)."""
    args, overrides = parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, overrides)
    trainer = build_trainer(cfg, args.resume)
    trainer.fit()
    trainer.accelerator.print(f"done: {trainer.run_dir.root} (encoder: {trainer.run_dir.encoder.name}, "
                              f"picture: reconstruction.png)")
    return trainer


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: user errors become one line on stderr and exit code 2; a preempted run (SIGTERM/SIGUSR1,
    checkpoint saved) exits with code 75 so a scheduler requeues it."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
