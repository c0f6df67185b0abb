"""Config sections every program shares: data, optimizer, loop; with the checks types alone cannot express."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from mimswin.errors import ConfigError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def check(condition: bool, key: str, message: str) -> None:
    """One config error naming the key, when `condition` fails."""
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


@dataclass
class DataConfig:
    """Where images come from and how they are augmented. `path` set means an image folder, else the embedded set."""

    path: Optional[str] = None
    batch_size: int = 64
    num_workers: int = 2
    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: float = 0.5
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))
    shards: Optional[str] = None
    shard_sizes: Optional[str] = None
    shuffle_buffer: int = 1000
    resampled: bool = False
    samples_per_epoch: Optional[int] = None


@dataclass
class OptimConfig:
    """AdamW with the MAE recipe; lr = blr * effective batch / lr_batch_divisor unless `lr` is given."""

    blr: float = 1.5e-4
    lr: Optional[float] = None
    lr_batch_divisor: int = 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_epochs: float = 40.0
    clip_grad: Optional[float] = None
    fused: Optional[bool] = None  # fused AdamW kernel; None = fused on CUDA and CPU, torch's default elsewhere


@dataclass
class TrainConfig:
    """Loop settings shared by every program: length, precision, logging, checkpoints."""

    epochs: int = 800
    max_steps: Optional[int] = None
    grad_accum_steps: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    output_dir: str = "runs/pretrain"
    log_every: int = 20
    save_every: int = 1000
    vis_every: int = 1000
    keep_last: int = 2
    log_with: List[str] = field(default_factory=list)
    project: str = "mimswin"
    cpu: bool = False
    progress: bool = True
    compile: bool = False  # nn.Module.compile() in place (inductor); state_dict keys unchanged
    grad_checkpointing: bool = False  # recompute transformer blocks in backward: less memory, ~1/3 more compute
    keep_every: Optional[int] = None
    max_nonfinite_steps: int = 20
    stop_check_every: Optional[int] = None



def check_sections(data: DataConfig, optim: OptimConfig, train: TrainConfig) -> None:
    """The shared sections' checks, run by every program's schema."""
    check(data.batch_size > 0, "data.batch_size", f"must be positive, got {data.batch_size}")
    check(data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {data.num_workers}")
    check(len(data.crop_scale) == 2 and 0 < data.crop_scale[0] <= data.crop_scale[1] <= 1, "data.crop_scale",
          f"must be [min, max] with 0 < min <= max <= 1, got {data.crop_scale}")
    check(len(data.mean) == len(data.std) == 3, "data.mean", "data.mean and data.std need three values each")
    check(data.shards is None or data.path is None, "data.shards", "give data.shards or data.path, not both")
    check(data.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {data.shuffle_buffer}")
    check(data.samples_per_epoch is None or data.samples_per_epoch > 0, "data.samples_per_epoch",
          f"must be positive, got {data.samples_per_epoch}")
    check(len(optim.betas) == 2, "optim.betas", f"needs two values, got {optim.betas}")
    check(train.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    check(train.mixed_precision in ("no", "bf16", "fp16"), "train.mixed_precision",
          f"must be one of no, bf16, fp16; got '{train.mixed_precision}'")
    unknown = set(train.log_with) - {"wandb", "tensorboard"}
    check(not unknown, "train.log_with", f"unknown tracker(s) {sorted(unknown)} (known: wandb, tensorboard)")
    for key in ("log_every", "save_every", "vis_every", "keep_last", "epochs"):
        check(getattr(train, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(train, key)}")
    for key in ("keep_every", "stop_check_every", "max_nonfinite_steps"):
        value = getattr(train, key)
        check(value is None or value >= 1, f"train.{key}", f"must be >= 1, got {value}")
