"""The one loop core: accumulate, clip, step, schedule, log, checkpoint, resume. Programs add a loss and callbacks."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Protocol, Tuple, Union

import torch
from accelerate import Accelerator
from timm.scheduler.scheduler import Scheduler
from tqdm.auto import tqdm

from mimswin.config import TrainConfig
from mimswin.data.build import EpochLoader
from mimswin.errors import CheckpointError, TrainingError
from mimswin.runs.checkpoint import load_checkpoint, read_extra, save_checkpoint
from mimswin.runs.discovery import latest_checkpoint
from mimswin.runs.layout import RunDir
from mimswin.signals import EXIT_PREEMPTED, STOP_SIGNALS, Preempted, StopSignals, signal_name
from mimswin.train.parallel import local_value, sync_gradients

LossFn = Callable[[torch.nn.Module, Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


@dataclass
class TrainState:
    """Counters saved with every checkpoint; `batch_in_epoch` counts micro-batches, so resume is exact mid-epoch.
    `skipped_steps` counts optimizer steps skipped for a non-finite loss or gradient, `nonfinite_in_row` the current
    run of them."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0
    nonfinite_in_row: int = 0


class Callback(Protocol):
    """Each hook is optional. A callback with state to keep across a resume also has `state_dict() -> dict` (a flat
    mapping of tensors and JSON values) and `load_state_dict(state)`; it is saved in each checkpoint under its class
    name."""

    def on_step(self, trainer: "Trainer") -> None: ...

    def on_epoch_end(self, trainer: "Trainer") -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...


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
        self._loss_count = torch.zeros((), device=accelerator.device)
        self._grad_norm_sum = torch.zeros((), device=accelerator.device)
        self._good_steps = torch.zeros((), device=accelerator.device)
        # device copy of the skip counters: [skipped in all, in a row now, longest run in a row since last read]
        self._nonfinite = torch.zeros(3, dtype=torch.long, device=accelerator.device)
        # the parameters the run trains, clipped and measured: all but those of param groups marked `watch_only` (an
        # online probe's head, which neither counts in the gradient norm nor sets the logged lr)
        groups = optimizer.param_groups
        watched = any(group.get("watch_only") for group in groups)
        self._run_parameters = ([p for group in groups if not group.get("watch_only") for p in group["params"]]
                                if watched else list(model.parameters()))
        self._micro_batches = 0
        self._saved_step = -1
        self._images = 0
        self._clock = time.perf_counter()

    @property
    def grad_accum_steps(self) -> int:
        return self.accelerator.gradient_accumulation_steps

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, RNG of this rank, the exact data position and the state of
        each stateful callback."""
        saved = load_checkpoint(self.accelerator, path, self.model, self.optimizer)
        self.state = TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})
        self._convert_data_position(saved.get("world_size", self.accelerator.num_processes))
        counts = [self.state.skipped_steps, self.state.nonfinite_in_row, self.state.nonfinite_in_row]
        self._nonfinite = torch.tensor(counts, device=self._nonfinite.device)
        for name, callback in self._stateful_callbacks().items():
            state = read_extra(path, name, saved)
            if state is None:
                raise CheckpointError(f"checkpoint '{path}' holds no state of {name} (saved by another program?)")
            callback.load_state_dict(state)
        self._saved_step = self.state.step
        self.accelerator.print(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, "
                               f"batch {self.state.batch_in_epoch})")

    def _convert_data_position(self, saved_world: int) -> None:
        """A checkpoint of another world size: the same samples of the epoch count as used. Each rank's first b
        batches of an epoch deal out its first b x batch x world samples, so b becomes b x saved / current batches
        (exact where that divides; the weights and optimizer state are resharded by DCP or replicated as they are)."""
        world = self.accelerator.num_processes
        if saved_world == world:
            return
        consumed = self.state.batch_in_epoch * saved_world
        self.state.batch_in_epoch = consumed // world
        self.accelerator.print(f"resuming a {saved_world}-process checkpoint on {world} process(es): batch "
                               f"{consumed // saved_world} of epoch {self.state.epoch} on each of {saved_world} is "
                               f"batch {self.state.batch_in_epoch} on each of {world}"
                               + ("" if consumed % world == 0 else f" ({consumed % world} batch(es) seen again)"))

    def save(self) -> Path:
        """Checkpoint the current step (once: a step already saved, e.g. just resumed, is not written again)."""
        if self._saved_step == self.state.step:
            return latest_checkpoint(self.run_dir.checkpoints) or self.run_dir.checkpoints
        self._read_nonfinite()
        extra = {name: callback.state_dict() for name, callback in self._stateful_callbacks().items()}
        path = save_checkpoint(self.accelerator, self.run_dir.checkpoints, self.model, self.optimizer,
                               asdict(self.state), self.cfg.keep_last, self.meta, self.cfg.keep_every, extra)
        self._saved_step = self.state.step
        return path

    def _stateful_callbacks(self) -> Dict[str, Any]:
        return {type(callback).__name__: callback for callback in self.callbacks if hasattr(callback, "state_dict")}

    def current_lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups if not group.get("watch_only"))

    def _train_micro_batch(self, batch: Tuple[torch.Tensor, torch.Tensor]) -> Optional[Union[bool, torch.Tensor]]:
        """Forward/backward one micro-batch; at the last of an accumulation window also the guarded optimizer step,
        whose outcome (weights updated, or skipped as non-finite: a bool, or a device bool tensor where the optimizer
        skipped on the device) is returned, else None."""
        self.scheduler.step_update(self.state.step)
        stepped = None
        with self.accelerator.accumulate(self.model):
            sync_gradients(self.model, self.accelerator.sync_gradients)
            loss = self.loss_fn(self.model, batch)
            finite = torch.isfinite(loss.detach())
            # A non-finite loss poisons this rank's gradients (x NaN), so the gradient check below, made after DDP has
            # reduced gradients over ranks, skips the step on every rank alike without an extra collective.
            self.accelerator.backward(loss * torch.where(finite, 1.0, math.nan).to(loss.dtype))
            if self.accelerator.sync_gradients:
                stepped = self._guarded_optimizer_step()
            self.optimizer.zero_grad(set_to_none=True)
        self._loss_sum += torch.where(finite, loss.detach().float(), 0.0)
        self._loss_count += finite
        self._micro_batches += 1
        self._images += batch[0].shape[0] * self.accelerator.num_processes
        self.state.batch_in_epoch += 1
        return stepped

    def _guarded_optimizer_step(self) -> Union[bool, torch.Tensor]:
        """Clip (or only measure) the gradient norm; step unless it is non-finite, so a NaN never reaches the weights
        or the optimizer moments. Returns whether the weights moved. A fused optimizer skips on the device (its
        `found_inf`, as under a GradScaler) and the answer stays a device tensor: no host sync in the step. Others read
        the norm on the host. fp16: the GradScaler skips such steps itself (and lowers its scale)."""
        norm = self.accelerator.clip_grad_norm_(self._run_parameters, self.clip_grad or math.inf)
        norm = local_value(norm) if norm is not None else None
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        if self.accelerator.scaler is not None:
            self.optimizer.step()
            stepped = not self.optimizer.step_was_skipped
        elif norm is not None and inner.defaults.get("fused"):
            stepped = torch.isfinite(norm)
            inner.found_inf = (~stepped).float()
            self.optimizer.step()
        else:
            stepped = norm is None or bool(torch.isfinite(norm))
            if stepped:
                self.optimizer.step()
        if norm is not None:
            self._grad_norm_sum += torch.where(torch.as_tensor(stepped, device=norm.device), norm.detach().float(), 0.0)
            self._good_steps += stepped
        return stepped

    def _count_nonfinite(self, stepped: Union[bool, torch.Tensor]) -> None:
        """Count a skipped step on the device. The counts are read (a host sync) at once when the outcome is on the
        host already, else at log intervals; after `max_nonfinite_steps` in a row the run stops with one clear line
        (on the device path at the first log interval after, the skipped steps in between changing nothing)."""
        skipped = ~torch.as_tensor(stepped, device=self._nonfinite.device)
        total, in_row, longest = self._nonfinite.unbind()
        in_row = torch.where(skipped, in_row + 1, 0)
        self._nonfinite = torch.stack([total + skipped, in_row, torch.maximum(longest, in_row)])
        if isinstance(stepped, torch.Tensor) and self.state.step % self.cfg.log_every:
            return
        longest = self._read_nonfinite()
        self._nonfinite[2] = self.state.nonfinite_in_row
        if longest >= self.cfg.max_nonfinite_steps:
            self.log()
            last = latest_checkpoint(self.run_dir.checkpoints)
            raise TrainingError(
                f"stopping at step {self.state.step}: {longest} steps in a row had a non-finite "
                f"loss or gradient (train.max_nonfinite_steps={self.cfg.max_nonfinite_steps}); last checkpoint: "
                f"{last or 'none'}; try a lower optim.blr, optim.clip_grad or train.mixed_precision=bf16")

    def _read_nonfinite(self) -> int:
        """Copy the device counts of skipped steps into the state and print what is new; returns the longest run in a
        row since the last check."""
        total, in_row, longest = self._nonfinite.tolist()
        if total > self.state.skipped_steps:
            self.accelerator.print(f"step {self.state.step}: non-finite loss or gradient, "
                                   f"{total - self.state.skipped_steps} update(s) skipped since the last check "
                                   f"({in_row} in a row, {total} in all)")
        self.state.skipped_steps, self.state.nonfinite_in_row = total, in_row
        return longest

    def log(self, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Mean loss over ranks and micro-batches since the last log, lr, images/s; to JSONL, trackers, progress bar."""
        loss_sum, loss_count = self.accelerator.reduce(torch.stack([self._loss_sum, self._loss_count]),
                                                       reduction="sum").tolist()
        mean_loss = loss_sum / loss_count if loss_count else math.nan
        self._read_nonfinite()
        grad_sum, good_steps = torch.stack([self._grad_norm_sum, self._good_steps]).tolist()
        grad_norm = grad_sum / good_steps if good_steps else math.nan
        elapsed = time.perf_counter() - self._clock
        record = {"step": self.state.step, "epoch": self.state.epoch, "loss": mean_loss, "lr": self.current_lr(),
                  "grad_norm": grad_norm, "skipped_steps": self.state.skipped_steps,
                  "images_per_s": self._images / elapsed if elapsed > 0 else 0.0, **(extra or {})}
        if hasattr(self.data, "skipped"):
            skipped = torch.tensor(float(self.data.skipped), device=self.accelerator.device)
            record["skipped"] = int(self.accelerator.reduce(skipped, reduction="sum").item())
        for total in (self._loss_sum, self._loss_count, self._grad_norm_sum, self._good_steps):
            total.zero_()
        self._micro_batches = self._images = 0
        self._clock = time.perf_counter()
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

    def _stop_requested(self, signals: StopSignals) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1. Ranks agree by a sum all-reduce every `stop_check_every` steps
        (default: every step on CPU, every 10 on GPU, where reading the result is a host sync); one process needs no
        collective and checks every step."""
        if self.accelerator.num_processes == 1:
            return signals.received is not None
        every = self.cfg.stop_check_every or (1 if self.accelerator.device.type == "cpu" else 10)
        if self.state.step % every:
            return False
        flag = torch.tensor(0.0 if signals.received is None else 1.0, device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item())

    def _preempt(self, signals: StopSignals) -> Preempted:
        """Save the finished step and say how to continue; the caller raises the result."""
        if self._micro_batches:
            self.log()
        path = self.save()
        signum = signals.received or STOP_SIGNALS[0]
        self.accelerator.print(f"stopped by {signal_name(signum) if signals.received else 'another rank'} after "
                               f"step {self.state.step}: checkpoint '{path}' saved; continue with --resume "
                               f"(exit code {EXIT_PREEMPTED})")
        return Preempted(signum, self.state.step, path)

    def _end_epoch(self) -> None:
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        self._call("on_epoch_end")

    def _run_steps(self, signals: StopSignals) -> None:
        """Optimizer steps from the saved data position until `total_steps`; epochs end as their last batch is used."""
        while self.state.step < self.total_steps:
            for batch in self.data.epoch(self.state.epoch, self.state.batch_in_epoch):
                stepped = self._train_micro_batch(batch)
                if self.state.batch_in_epoch % self.grad_accum_steps:
                    continue
                self.state.step += 1
                self.progress.update(1)
                self._count_nonfinite(stepped)
                if self.state.step % self.cfg.log_every == 0:
                    self.log()
                self._call("on_step")
                if self.state.step % self.cfg.save_every == 0 and self.state.step < self.total_steps:
                    self.save()
                if self.state.step >= self.total_steps:
                    break
                if self._stop_requested(signals):
                    raise self._preempt(signals)
            else:
                self._end_epoch()
        if self.state.batch_in_epoch >= self.data.batches_per_epoch:
            self._end_epoch()

    def fit(self) -> TrainState:
        """Train until `total_steps`; save every `save_every` steps and at the end. On SIGTERM/SIGUSR1: finish the
        step, save, raise `Preempted` (exit code 75). Trackers are ended however the run stops."""
        self.progress = tqdm(total=self.total_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
                             disable=not (self.accelerator.is_main_process and self.cfg.progress))
        self.model.train()
        try:
            with StopSignals() as signals:
                self._run_steps(signals)
            if self._micro_batches:
                self.log()
            self.save()
            self._call("on_train_end")
        finally:
            self.progress.close()
            self.accelerator.end_training()
        return self.state
