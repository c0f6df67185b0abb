"""A run's setup, shared by every program that trains: precision check, accelerator, run dir, the checkpoint to
resume from, config and trackers, and the step / learning-rate plan."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType

from mimswin.config.loading import flat_config, save_config
from mimswin.config.sections import OptimConfig, TrainConfig
from mimswin.errors import ConfigError
from mimswin.runs.discovery import latest_checkpoint, resolve_checkpoint, resumable_checkpoint, warn_stderr
from mimswin.runs.layout import RunDir
from mimswin.train.optim import scaled_lr
from mimswin.train.trackers import tracker_init_kwargs

FSDP_LAUNCH = "ACCELERATE_USE_FSDP"


def launched_with_fsdp() -> bool:
    """Whether `accelerate launch` was given an FSDP config (launch/accelerate/fsdp.yaml, or --use_fsdp)."""
    return os.environ.get(FSDP_LAUNCH, "false").lower() in ("1", "true", "yes")


def check_distribution(accelerator: Accelerator) -> Accelerator:
    """Refuse launches the loop cannot serve, before any step: DeepSpeed (FSDP2, `train.strategy=fsdp`, shards the
    same way)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("launched with DeepSpeed, which mimswin does not train under: use train.strategy=fsdp "
                          "(launch/accelerate/fsdp.yaml) for a model beyond DDP; see docs/scaling.md#fsdp")
    return accelerator


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """CPU (gloo) when asked or when no GPU exists, so `torchrun --nproc_per_node 2` really runs two ranks on CPU.
    An FSDP launch sets `train.strategy=fsdp`; accelerate itself then runs as a plain multi-process launch, since the
    sharding is mimswin's (train/parallel.py), the same on CPU ranks and GPUs."""
    if launched_with_fsdp():
        os.environ.pop(FSDP_LAUNCH)
        cfg.strategy = "fsdp"
    cpu = cfg.cpu or not torch.cuda.is_available()
    if restart_count() > 0:
        join_restarted_job("gloo" if cpu else "nccl")
    return check_distribution(Accelerator(
        cpu=cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=cfg.log_with or None,
        project_dir=cfg.output_dir,
        step_scheduler_with_optimizer=False,
    ))


def join_restarted_job(backend: str) -> None:
    """The process group of a job torchrun restarted, formed in a namespace of its own attempt. The workers of every
    attempt meet in the agent's one store, where the last attempt's addresses are still written: a worker reading
    them before its peer has replaced them would dial a dead process (seen as 'Gloo connectFullMesh failed ...
    Connection refused' after a restart)."""
    if dist.is_initialized() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group(backend, store=dist.PrefixStore(f"mimswin/attempt_{restart_count()}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def check_precision(cfg: TrainConfig) -> None:
    """fp16 needs a GPU (its grad scaler); refused before anything is built."""
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available() and not cfg.cpu:
        raise ConfigError("config key 'train.mixed_precision': fp16 needs a GPU; use bf16 or no on CPU")


def restart_count() -> int:
    """How many times torchrun restarted this job's workers (`torchrun --max-restarts`); 0 on the first start."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def resume_point(accelerator: Accelerator, output_dir: Path, checkpoints: Path,
                 resume: Optional[str]) -> Optional[Path]:
    """The checkpoint a run continues from: with `resume='auto'` the newest intact one under `checkpoints` (None:
    start fresh), with a path that checkpoint; without `resume`, an output dir holding checkpoints is refused, unless
    torchrun restarted the workers: a restarted run resumes by itself."""
    if resume is None and restart_count() > 0:
        accelerator.print(f"restart {restart_count()} by torchrun: resuming from the newest intact checkpoint")
        resume = "auto"
    if resume is None:
        if latest_checkpoint(checkpoints) is not None:
            raise ConfigError(f"train.output_dir '{output_dir}' already holds checkpoints: pass --resume to continue "
                              "that run, or choose another output_dir")
        return None
    warn = warn_stderr if accelerator.is_main_process else (lambda message: None)
    checkpoint = resumable_checkpoint(checkpoints, warn) if resume == "auto" else resolve_checkpoint(resume, warn)
    if checkpoint is None:
        accelerator.print(f"--resume: no checkpoint in {checkpoints}; starting fresh")
    return checkpoint


def start_run(train: TrainConfig, resume: Optional[str] = None) -> Tuple[Accelerator, RunDir, Optional[Path]]:
    """Precision check, accelerator, the run dir and the checkpoint to resume from (None: a fresh run; an output dir
    holding checkpoints needs `resume`)."""
    check_precision(train)
    accelerator = make_accelerator(train)
    run_dir = RunDir(train.output_dir, accelerator.is_main_process)
    return accelerator, run_dir, resume_point(accelerator, run_dir.root, run_dir.checkpoints, resume)


def record_run(accelerator: Accelerator, run_dir: RunDir, cfg: Any) -> None:
    """The resolved config into the run dir (rank 0), and the trackers started with it as flat keys."""
    if accelerator.is_main_process:
        save_config(cfg, run_dir.config)
    accelerator.init_trackers(cfg.train.project, config=flat_config(cfg), init_kwargs=tracker_init_kwargs(cfg.train))


@dataclass
class StepPlan:
    """How long a run is and how fast it learns: optimizer steps per epoch and in all, effective batch, lr."""

    steps_per_epoch: int
    total_steps: int
    effective_batch: int
    lr: float


def plan_steps(train: TrainConfig, optim: OptimConfig, batch_size: int, batches_per_epoch: int,
               num_processes: int) -> StepPlan:
    """Steps from the loader's length, epochs and `max_steps`; lr scaled by the effective batch (MAE's rule)."""
    steps_per_epoch = batches_per_epoch // train.grad_accum_steps
    total_steps = train.epochs * steps_per_epoch
    if train.max_steps is not None:
        total_steps = min(total_steps, train.max_steps)
    effective_batch = batch_size * train.grad_accum_steps * num_processes
    return StepPlan(steps_per_epoch, total_steps, effective_batch, scaled_lr(optim, effective_batch))
