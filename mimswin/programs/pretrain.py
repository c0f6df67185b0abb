"""Pretraining program: config -> data -> method -> the loop core -> checkpoints, pictures and the exported encoder."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Dict, List, Optional, Sequence

import torch
from accelerate.utils import set_seed

from mimswin.config.loading import load_config
from mimswin.config.pretrain import PretrainConfig
from mimswin.config.sections import size_pair
from mimswin.data.build import build_pretrain_data, device_step, online_probe_val, preview_images
from mimswin.data.hf import HFStreamLoader
from mimswin.eval.callbacks import log_eval
from mimswin.eval.metrics import evaluate
from mimswin.eval.pictures import reconstruction_grid, save_png
from mimswin.models.factory import build_method
from mimswin.models.online_probe import OnlineProbe
from mimswin.programs.common import console_entry, parse_with_resume, program_parser
from mimswin.runs.card import RunFacts, run_summary
from mimswin.runs.export import write_run_export
from mimswin.runs.open import PRETRAIN_PREFIX
from mimswin.train.loop import Trainer
from mimswin.train.optim import build_optimizer, build_scheduler
from mimswin.train.parallel import gather_state_dict, parallelize, unwrap
from mimswin.train.perf import apply_model_flags, optimizer_kwargs
from mimswin.train.setup import plan_steps, record_run, start_run
from mimswin.train.trackers import log_picture

PREVIEW_COUNT = 8


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, List[str]]:
    parser = program_parser("mimswin-pretrain", "Masked image modeling pretraining. Any config key can be overridden "
                            "as key=value, --key=value or --key value (e.g. optim.blr=1e-4 --data.path /images).")
    return parse_with_resume(parser, argv)


class PretrainPictures:
    """Reconstruction grid every `vis_every` steps and at the end, written by rank 0 and sent to the trackers. Every
    rank draws it (under FSDP each forward gathers the blocks from all ranks); DDP ranks draw the same picture.
    `preview`: the images in their own dtype (any but 8-bit is shown stretched band by band)."""

    def __init__(self, cfg: PretrainConfig, preview: torch.Tensor) -> None:
        self.cfg, self.stretch = cfg, preview.dtype != torch.uint8
        self.images = device_step(cfg.data)(preview, torch.device("cpu"))

    def draw(self, trainer: Trainer, name: str) -> None:
        method = unwrap(trainer.accelerator, trainer.model)
        picture = reconstruction_grid(method, self.images.to(trainer.accelerator.device), self.cfg.data.mean,
                                      self.cfg.data.std, self.cfg.vis.bands, self.stretch)
        if not trainer.accelerator.is_main_process:
            return
        save_png(picture, trainer.run_dir.pictures / f"{name}.png")
        save_png(picture, trainer.run_dir.picture)
        log_picture(trainer.accelerator, "reconstruction", picture, trainer.state.step)

    def on_step(self, trainer: Trainer) -> None:
        if trainer.state.step % self.cfg.train.vis_every == 0:
            self.draw(trainer, f"step_{trainer.state.step:08d}")

    def on_train_end(self, trainer: Trainer) -> None:
        self.draw(trainer, "final")


class ExportEncoder:
    """At the end, the encoder goes to the run dir as timm's hub folder `encoder/` (config.json, model.safetensors,
    README.md model card) and as `encoder.safetensors`, with the run's channels, size, mean and std (rank 0). Every
    rank takes part in gathering the weights (FSDP shards them)."""

    def __init__(self, cfg: PretrainConfig, images: Optional[int], command: Optional[str]) -> None:
        self.cfg, self.images, self.command = cfg, images, command

    @staticmethod
    def encoder_weights(trainer: Trainer) -> Optional[Dict[str, torch.Tensor]]:
        """The encoder's timm state dict on rank 0, None on the others: the one place the end of a run reads it
        (every rank calls it: under FSDP the whole state is gathered from the shards)."""
        state = gather_state_dict(trainer.accelerator, trainer.model)
        if state is None:
            return None
        return {k[len(PRETRAIN_PREFIX):]: v for k, v in state.items() if k.startswith(PRETRAIN_PREFIX)}

    def on_train_end(self, trainer: Trainer) -> None:
        weights = self.encoder_weights(trainer)
        if weights is not None:
            write_run_export(weights, RunFacts(self.cfg, trainer.run_dir.root, trainer.state.step, self.images,
                                               self.command))


class ProbeView(torch.nn.Module):
    """The method as a classifier for `evaluate`: whole images (mask ratio 0: every token visible, as the offline
    probe reads them) -> the online probe's scores; the masks' order comes from its own generator, so the run's RNG
    is left alone."""

    def __init__(self, method: torch.nn.Module, seed: int) -> None:
        super().__init__()
        self.method, self.seed = method, seed
        self.generator: Optional[torch.Generator] = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            self.generator = torch.Generator(images.device).manual_seed(self.seed)
        mask = self.method.draw_mask(images.shape[0], images.device, self.generator, ratio=0.0)
        return self.method(images, mask).probe_logits


class OnlineProbeEval:
    """The online probe's val top-1 every `online_probe.every` steps and at the end, logged as `online_probe_top1`
    (metrics.jsonl, trackers, console)."""

    def __init__(self, cfg: PretrainConfig, val_set: torch.utils.data.Dataset) -> None:
        self.cfg, self.val_set = cfg, val_set

    def read(self, trainer: Trainer) -> None:
        view = ProbeView(unwrap(trainer.accelerator, trainer.model), self.cfg.train.seed)
        result = evaluate(view, self.val_set, trainer.accelerator, self.cfg.data.batch_size, 0,
                          device_step(self.cfg.data))
        log_eval(trainer, {"online_probe_top1": result["top1"]})

    def on_step(self, trainer: Trainer) -> None:
        if trainer.state.step % self.cfg.online_probe.every == 0:
            self.read(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.state.step % self.cfg.online_probe.every:
            self.read(trainer)


def add_probe_groups(optimizer: torch.optim.Optimizer, probe: OnlineProbe, lr_scale: float) -> None:
    """The online probe's parameters as their own groups (weight with the run's weight decay, bias without), at
    `lr_scale` times the run's lr along the same schedule (the scheduler applies `lr_scale`), marked `watch_only`:
    the loop leaves them out of the clipped gradient norm and the logged lr."""
    base = optimizer.param_groups[0]
    decay = max(group["weight_decay"] for group in optimizer.param_groups)
    for params, weight_decay in (([probe.linear.weight], decay), ([probe.linear.bias], 0.0)):
        optimizer.add_param_group({"params": params, "lr": base["lr"], "weight_decay": weight_decay,
                                   "lr_scale": lr_scale, "watch_only": True})


def pretrain_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return model(batch[0]).loss


def probed_pretrain_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The pretraining loss with the online probe's zero-valued term (its gradient reaches the probe only)."""
    return model(batch[0], labels=batch[1]).loss


def build_trainer(cfg: PretrainConfig, resume: Optional[str] = None, command: Optional[str] = None) -> Trainer:
    """Everything a pretraining run needs, wired and (when asked) restored, ready for `fit()`; `command`: the line
    that started it, for the model card."""
    accelerator, run_dir, checkpoint = start_run(cfg.train, resume)

    set_seed(cfg.train.seed)
    method = apply_model_flags(build_method(cfg), cfg.train)
    set_seed(cfg.train.seed + accelerator.process_index)
    size = size_pair(cfg.model.img_size)
    data = build_pretrain_data(cfg.data, size, accelerator.num_processes, accelerator.process_index,
                               cfg.train.seed, accelerator.device, cfg.train.grad_accum_steps)
    plan = plan_steps(cfg.train, cfg.optim, cfg.data.batch_size, data.batches_per_epoch, accelerator.num_processes)
    probing = cfg.online_probe.every > 0
    if probing:
        val_set, num_classes = online_probe_val(cfg.data, cfg.online_probe.val_path, size, data.dataset,
                                                cfg.online_probe.val_samples)
        method.online_probe = OnlineProbe(method.encoder.embed_dim, num_classes,
                                          torch.Generator().manual_seed(cfg.train.seed))
    model = parallelize(method, cfg.train, accelerator)
    probe_params = list(method.online_probe.parameters()) if probing else []
    optimizer = build_optimizer(method, cfg.optim, plan.lr, exclude=probe_params,
                                **optimizer_kwargs(cfg.optim, accelerator.device))
    if probing:
        add_probe_groups(optimizer, method.online_probe, cfg.online_probe.lr / plan.lr)
    scheduler = build_scheduler(optimizer, cfg.optim, plan.total_steps, plan.steps_per_epoch)
    optimizer = accelerator.prepare_optimizer(optimizer)
    preview = preview_images(cfg.data, size, PREVIEW_COUNT)  # unusable data stops here, before config.yaml is written

    record_run(accelerator, run_dir, cfg)
    callbacks = [PretrainPictures(cfg, preview), ExportEncoder(cfg, data.source_size, command)]
    if isinstance(data, HFStreamLoader):
        callbacks.append(data)  # its position in the stream rides in each checkpoint
    if probing:
        callbacks.append(OnlineProbeEval(cfg, val_set))
    meta = {"method": cfg.method, "model": cfg.model.name, "img_size": cfg.model.img_size,
            "images": data.source_size, "command": command}
    trainer = Trainer(cfg.train, accelerator, model, optimizer, scheduler, data,
                      probed_pretrain_loss if probing else pretrain_loss, run_dir, plan.total_steps,
                      cfg.optim.clip_grad, callbacks, meta)
    if checkpoint is not None:
        trainer.resume(checkpoint)
    accelerator.print(f"pretraining {cfg.method} {cfg.model.name} on {cfg.data.channels}-channel {size[0]}x{size[1]} "
                      f"images: {plan.total_steps} steps, {plan.steps_per_epoch} "
                      f"per epoch, effective batch {plan.effective_batch}, lr {plan.lr:.3g}, "
                      f"{accelerator.num_processes} process(es) on {accelerator.device} ({cfg.train.strategy}), "
                      f"run dir {run_dir.root}")
    return trainer


def main(argv: Optional[Sequence[str]] = None) -> Trainer:
    """Parse, build, train. Returns the trainer (its `history` holds the logged metrics)."""
    args, overrides = parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, overrides)
    command = shlex.join(["mimswin", "pretrain", *(sys.argv[1:] if argv is None else argv)])
    trainer = build_trainer(cfg, args.resume, command)
    trainer.fit()
    if trainer.accelerator.is_main_process:
        print(run_summary(trainer.run_dir))
    return trainer


cli = console_entry(main)
