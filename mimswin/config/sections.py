"""Config sections every program shares: data, optimizer, loop; with the checks types alone cannot express."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

from mimswin.errors import ConfigError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
LAYOUTS = ("auto", "hwc", "chw")
RESIZE_PLACES = ("auto", "worker", "device")
DECODE_PLACES = ("worker", "device")
STRATEGIES = ("ddp", "fsdp")
Size = Tuple[int, int]


def check(condition: bool, key: str, message: str) -> None:
    """One config error naming the key, when `condition` fails."""
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def size_pair(value: Union[int, Sequence[int]], key: str = "model.img_size") -> Size:
    """An image size as (height, width): an int means a square, a list is [height, width]."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    check(len(pair) == 2 and all(isinstance(v, int) and v > 0 for v in pair), key,
          f"must be a positive int or [height, width], got {value}")
    return pair


@dataclass
class DataConfig:
    """Where images come from, what their pixels are and how they are augmented. `path` set means an image folder,
    else the embedded set. `channels`: bands per image (unset: 3 for pretraining, the encoder's for evaluation);
    `layout`: hwc | chw | auto for 3-D .npy arrays; `mean` / `std`: one value per channel, in the loader's units
    (integer pixels divided by their range; `mimswin stats PATH` prints them), unset: the encoder's (evaluation) or
    ImageNet's (3 channels). Pretraining only: `resize` (auto | worker | device) is where its random crops are resized
    (auto: on the device when it is a GPU, else in the workers); `decode` (worker | device) where JPEGs are decoded
    (device: the workers only read bytes; needs the resize on the device too). `hf`: a Hugging Face `datasets` source
    instead (a `save_to_disk` folder, parquet / arrow files: a file, folder or glob, or a Hub name already in the local
    cache), its split `hf_split`, image column `hf_image_key`, label column `hf_label_key` (optional for pretraining);
    `hf_streaming`: read it as a stream (`data.samples_per_epoch` where its length is unknown)."""

    path: Optional[str] = None
    batch_size: int = 64
    num_workers: int = 2
    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: float = 0.5
    channels: Optional[int] = None
    layout: str = "auto"
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    shards: Optional[str] = None
    shard_sizes: Optional[str] = None
    shard_retries: int = 3  # new tries of a remote shard whose stream breaks (after 1, 2, 4 ... s), then skipped
    shuffle_buffer: int = 1000
    resampled: bool = False
    samples_per_epoch: Optional[int] = None
    resize: str = "auto"
    decode: str = "worker"
    hf: Optional[str] = None
    hf_split: str = "train"
    hf_image_key: str = "image"
    hf_label_key: Optional[str] = "label"
    hf_streaming: bool = False


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
    """Loop settings shared by every program: length, precision, parallelism, logging, checkpoints. `strategy`: ddp
    (every rank holds the whole model) or fsdp (FSDP2: parameters, gradients and optimizer state sharded per
    transformer block; `reshard_after_forward` frees the gathered block after its forward, ZeRO-3, else keeps it for
    the backward, ZeRO-2)."""

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
    activation_checkpointing: bool = False  # recompute each transformer block in backward: less memory, 1/3 more work
    strategy: str = "ddp"
    reshard_after_forward: bool = True
    keep_every: Optional[int] = None
    max_nonfinite_steps: int = 20
    stop_check_every: Optional[int] = None



def resolve_pixels(data: DataConfig, channels: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None, origin: str = "the encoder") -> DataConfig:
    """Fill `data.channels`, `data.mean` and `data.std` where the config leaves them unset: from what `origin`
    recorded (`channels`, `mean`, `std`), else 3 channels with ImageNet's statistics. One ConfigError when the config
    contradicts `origin`'s channels or no statistics fit the channel count."""
    if data.channels is not None and channels is not None and data.channels != channels:
        raise ConfigError(f"config key 'data.channels': {data.channels}, but {origin} reads {channels} channel(s)")
    data.channels = data.channels or channels or 3
    if data.mean is None:
        if mean is not None and std is not None and len(mean) == data.channels:
            data.mean, data.std = list(mean), list(std)
        elif data.channels == 3:
            data.mean, data.std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        else:
            raise ConfigError(f"config key 'data.mean': {data.channels} channel(s) need their own data.mean and "
                              f"data.std (one value per channel); `mimswin stats PATH --channels {data.channels}` "
                              "prints them")
    check(len(data.mean) == data.channels, "data.mean", f"{len(data.mean)} value(s) for {data.channels} channel(s) "
          "(data.channels); give one value per channel")
    return data


def check_sections(data: DataConfig, optim: OptimConfig, train: TrainConfig) -> None:
    """The shared sections' checks, run by every program's schema."""
    check(data.batch_size > 0, "data.batch_size", f"must be positive, got {data.batch_size}")
    check(data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {data.num_workers}")
    check(len(data.crop_scale) == 2 and 0 < data.crop_scale[0] <= data.crop_scale[1] <= 1, "data.crop_scale",
          f"must be [min, max] with 0 < min <= max <= 1, got {data.crop_scale}")
    check(data.channels is None or data.channels >= 1, "data.channels", f"must be >= 1, got {data.channels}")
    check(data.layout in LAYOUTS, "data.layout", f"must be one of {', '.join(LAYOUTS)}, got '{data.layout}'")
    check(data.resize in RESIZE_PLACES, "data.resize", f"must be one of {', '.join(RESIZE_PLACES)}, got "
          f"'{data.resize}'")
    check(data.decode in DECODE_PLACES, "data.decode", f"must be one of {', '.join(DECODE_PLACES)}, got "
          f"'{data.decode}'")
    check(data.decode == "worker" or data.resize != "worker", "data.decode",
          "device decoding cuts and resizes on the device too; set data.resize=device (or auto)")
    check((data.mean is None) == (data.std is None), "data.mean", "give data.mean and data.std together")
    if data.mean is not None and data.std is not None:
        check(len(data.mean) == len(data.std), "data.std", f"{len(data.std)} value(s) for {len(data.mean)} in "
              "data.mean; give one value per channel in each")
        check(all(s > 0 for s in data.std), "data.std", f"must be positive, got {data.std}")
        check(data.channels is None or len(data.mean) == data.channels, "data.mean",
              f"{len(data.mean)} value(s) for data.channels={data.channels}; give one value per channel")
    check(data.shards is None or data.path is None, "data.shards", "give data.shards or data.path, not both")
    check(data.shard_retries >= 0, "data.shard_retries", f"must be >= 0, got {data.shard_retries}")
    check(data.hf is None or (data.path is None and data.shards is None), "data.hf",
          "give one source: data.hf, data.path or data.shards")
    check(not data.hf_streaming or data.hf is not None, "data.hf_streaming", "streams a data.hf source; set data.hf")
    check(data.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {data.shuffle_buffer}")
    check(data.samples_per_epoch is None or data.samples_per_epoch > 0, "data.samples_per_epoch",
          f"must be positive, got {data.samples_per_epoch}")
    check(len(optim.betas) == 2, "optim.betas", f"needs two values, got {optim.betas}")
    check(train.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    check(train.mixed_precision in ("no", "bf16", "fp16"), "train.mixed_precision",
          f"must be one of no, bf16, fp16; got '{train.mixed_precision}'")
    check(train.strategy in STRATEGIES, "train.strategy", f"must be one of {', '.join(STRATEGIES)}, got "
          f"'{train.strategy}'")
    if train.strategy == "fsdp":
        check(train.mixed_precision != "fp16", "train.mixed_precision", "fp16 is not supported with "
              "train.strategy=fsdp (its gradient scaler would see sharded gradients); use bf16")
        check(not train.compile, "train.compile", "not supported with train.strategy=fsdp yet (compile each block "
              "after sharding is untested here); leave it off or use train.strategy=ddp")
    unknown = set(train.log_with) - {"wandb", "tensorboard"}
    check(not unknown, "train.log_with", f"unknown tracker(s) {sorted(unknown)} (known: wandb, tensorboard)")
    for key in ("log_every", "save_every", "vis_every", "keep_last", "epochs"):
        check(getattr(train, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(train, key)}")
    for key in ("keep_every", "stop_check_every", "max_nonfinite_steps"):
        value = getattr(train, key)
        check(value is None or value >= 1, f"train.{key}", f"must be >= 1, got {value}")
