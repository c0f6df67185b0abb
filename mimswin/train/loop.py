"""The one loop core: accumulate, clip, step, schedule, log, checkpoint, resume. Programs add a loss and callbacks."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Protocol, Tuple

import torch
from accelerate import Accelerator
from timm.scheduler.scheduler import Scheduler
from tqdm.auto import tqdm

from mimswin.config import TrainConfig
from mimswin.data.build import EpochLoader
from mimswin.train.checkpoint import load_checkpoint, save_checkpoint
from mimswin.train.rundir import RunDir

LossFn = Callable[[torch.nn.Module, Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


@dataclass
class TrainState:
    """Counters saved with every checkpoint; `batch_in_epoch` counts micro-batches, so resume is exact mid-epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


class Callback(Protocol):
    def on_step(self, trainer: "Trainer") -> None: ...

    def on_epoch_end(self, trainer: "Trainer") -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """CPU (gloo) when asked or when no GPU exists, so `torchrun --nproc_per_node 2` really runs two ranks on CPU."""
    return Accelerator(
        cpu=cfg.cpu or not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=cfg.log_with or None,
        project_dir=cfg.output_dir,
        step_scheduler_with_optimizer=False,
    )


class Trainer:
    """Runs `loss_fn` over `data` until `total_steps` optimizer steps, with every step's bookkeeping in one place."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Scheduler, data: EpochLoader, loss_fn: LossFn,
                 run_dir: RunDir, total_steps: int, clip_grad: Optional[float] = None,
                 callbacks: Iterable[Any] = (), meta: Optional[Dict[str, Any]] = None) -> None:
        self.cfg, self.accelerator, self.model = cfg, accelerator, model
        self.optimizer, self.scheduler, self.data, self.loss_fn = optimizer, scheduler, data, loss_fn
        self.run_dir, self.total_steps, self.callbacks = run_dir, total_steps, list(callbacks)
        self.clip_grad, self.meta = clip_grad, meta or {}
        self.progress: Optional[tqdm] = None
        self.state = TrainState()
        self.history: list[Dict[str, Any]] = []
        self._loss_sum = torch.zeros((), device=accelerator.device)
        self._loss_count = 0
        self._images = 0
        self._clock = time.perf_counter()

    @property
    def grad_accum_steps(self) -> int:
        return self.accelerator.gradient_accumulation_steps

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, RNG of this rank and the exact data position."""
        saved = load_checkpoint(self.accelerator, path, self.model, self.optimizer)
        self.state = TrainState(saved["step"], saved["epoch"], saved["batch_in_epoch"])
        self.accelerator.print(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, "
                               f"batch {self.state.batch_in_epoch})")

    def save(self) -> Path:
        return save_checkpoint(self.accelerator, self.run_dir.checkpoints, self.model, self.optimizer,
                               asdict(self.state), self.cfg.keep_last, self.meta)

    def current_lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def _train_micro_batch(self, batch: Tuple[torch.Tensor, torch.Tensor]) -> None:
        self.scheduler.step_update(self.state.step)
        with self.accelerator.accumulate(self.model):
            loss = self.loss_fn(self.model, batch)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and self.clip_grad is not None:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._loss_sum += loss.detach().float()
        self._loss_count += 1
        self._images += batch[0].shape[0] * self.accelerator.num_processes
        self.state.batch_in_epoch += 1

    def log(self, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Mean loss over ranks and micro-batches since the last log, lr, images/s; to JSONL, trackers, progress bar."""
        mean_loss = self.accelerator.reduce(self._loss_sum / max(1, self._loss_count), reduction="mean").item()
        elapsed = time.perf_counter() - self._clock
        record = {"step": self.state.step, "epoch": self.state.epoch, "loss": mean_loss, "lr": self.current_lr(),
                  "images_per_s": self._images / elapsed if elapsed > 0 else 0.0, **(extra or {})}
        if hasattr(self.data, "skipped"):
            skipped = torch.tensor(float(self.data.skipped), device=self.accelerator.device)
            record["skipped"] = int(self.accelerator.reduce(skipped, reduction="sum").item())
        self._loss_sum.zero_()
        self._loss_count, self._images, self._clock = 0, 0, time.perf_counter()
        self.history.append(record)
        self.run_dir.log_metrics(record)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=self.state.step)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}",
                                      img_s=f"{record['images_per_s']:.0f}")
        return record

    def _call(self, hook: str) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self)

    def fit(self) -> TrainState:
        """Train until `total_steps`; save every `save_every` steps and at the end."""
        self.progress = tqdm(total=self.total_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
                             disable=not (self.accelerator.is_main_process and self.cfg.progress))
        self.model.train()
        while self.state.step < self.total_steps:
            for batch in self.data.epoch(self.state.epoch, self.state.batch_in_epoch):
                self._train_micro_batch(batch)
                if self.state.batch_in_epoch % self.grad_accum_steps:
                    continue
                self.state.step += 1
                self.progress.update(1)
                if self.state.step % self.cfg.log_every == 0:
                    self.log()
                self._call("on_step")
                if self.state.step % self.cfg.save_every == 0 and self.state.step < self.total_steps:
                    self.save()
                if self.state.step >= self.total_steps:
                    break
            else:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                self._call("on_epoch_end")
        if self._loss_count:
            self.log()
        self.save()
        self._call("on_train_end")
        self.progress.close()
        self.accelerator.end_training()
        return self.state
