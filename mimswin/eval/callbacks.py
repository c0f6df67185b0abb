"""Loop-core callbacks and records of the evaluation programs: metrics records, per-epoch evaluation (and EMA), the
best weights kept as a dir `--from` accepts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import safetensors.torch
import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3
from torch.utils.data import Dataset

from mimswin.data.batches import DeviceStep
from mimswin.errors import CheckpointError
from mimswin.eval.metrics import evaluate
from mimswin.runs.files import atomic_write_bytes
from mimswin.runs.layout import MODEL, STATE, RunDir
from mimswin.train.loop import Trainer
from mimswin.train.parallel import gather_state_dict, unwrap


def log_record(accelerator: Accelerator, run_dir: RunDir, record: Dict[str, Any]) -> None:
    """One metrics record (with `step`) to metrics.jsonl and the trackers."""
    run_dir.log_metrics(record)
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def log_eval(trainer: Trainer, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """An evaluation record at the current step: to history, metrics.jsonl, trackers and the console."""
    record = {"step": trainer.state.step, "epoch": trainer.state.epoch, **metrics}
    trainer.history.append(record)
    log_record(trainer.accelerator, trainer.run_dir, record)
    shown = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    (trainer.progress.write if trainer.progress is not None and not trainer.progress.disable
     else trainer.accelerator.print)(f"step {trainer.state.step} epoch {trainer.state.epoch}: {shown}")
    return record


class EvaluateEachEpoch:
    """Top-1/top-5 on the val split after every `every`-th epoch and at the end (also of the EMA weights); keeps the
    best. `step`: the device step of the val images (None: cached features)."""

    def __init__(self, val_set: Dataset, step: Optional[DeviceStep], batch_size: int, num_workers: int, progress: bool,
                 meta: Dict[str, Any], ema: Optional[ModelEmaV3] = None, every: int = 1) -> None:
        self.val_set, self.ema, self.meta, self.every = val_set, ema, meta, every
        self.loader_args = dict(batch_size=batch_size, num_workers=num_workers, step=step, progress=progress)
        self.best: Dict[str, Any] = {"top1": -1.0}
        self.last: Dict[str, Any] = {}
        self.evaluated_step = -1

    def on_step(self, trainer: Trainer) -> None:
        if self.ema is not None:
            self.ema.update(unwrap(trainer.accelerator, trainer.model), step=trainer.state.step)

    def run(self, trainer: Trainer) -> None:
        if trainer.state.step == self.evaluated_step:
            return
        self.evaluated_step = trainer.state.step
        accelerator = trainer.accelerator
        model = unwrap(accelerator, trainer.model)
        kwargs = self.loader_args
        metrics = {f"val_{k}": v for k, v in evaluate(model, self.val_set, accelerator, **kwargs).items()}
        candidates = [("", model, metrics["val_top1"])]
        if self.ema is not None:
            ema_metrics = evaluate(self.ema.module, self.val_set, accelerator, **kwargs)
            metrics.update({f"val_ema_{k}": v for k, v in ema_metrics.items() if k != "count"})
            candidates.append(("ema", self.ema.module, ema_metrics["top1"]))
        self.last = log_eval(trainer, metrics)
        for tag, weights, top1 in candidates:
            if top1 > self.best["top1"]:
                self.best = {"top1": top1, "step": trainer.state.step, "epoch": trainer.state.epoch,
                             "weights": tag or "model"}
                save_weights(accelerator, trainer.run_dir.best, gather_state_dict(accelerator, weights),
                             {"step": trainer.state.step, "epoch": trainer.state.epoch, "val_top1": top1,
                              "meta": self.meta})

    def on_epoch_end(self, trainer: Trainer) -> None:
        if trainer.state.epoch % self.every == 0:
            self.run(trainer)

    def state_dict(self) -> Dict[str, Any]:
        """Saved with each checkpoint: the best-so-far record and the EMA weights (as `ema.*` tensors)."""
        ema = {f"ema.{k}": v for k, v in self.ema.module.state_dict().items()} if self.ema is not None else {}
        return {"best": self.best, **ema}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = state["best"]
        if self.ema is None:
            return
        weights = {k[len("ema."):]: v for k, v in state.items() if k.startswith("ema.")}
        if not weights:
            raise CheckpointError("the checkpoint holds no EMA weights (saved without ema_decay); resume without "
                                  "ema_decay or start a new run")
        self.ema.module.load_state_dict(weights)

    def on_train_end(self, trainer: Trainer) -> None:
        self.run(trainer)


def save_weights(accelerator: Accelerator, directory: Path, weights: Optional[Dict[str, torch.Tensor]],
                 state: Dict[str, Any]) -> None:
    """Rank 0 writes `weights` (`gather_state_dict`'s: the whole model on rank 0, None elsewhere) as
    `model.safetensors` + `state.json` (with meta naming the architecture): a dir `--from` accepts."""
    if not accelerator.is_main_process:
        return
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    atomic_write_bytes(directory / MODEL, safetensors.torch.save(tensors))
    atomic_write_bytes(directory / STATE, json.dumps(state, indent=1).encode())
