"""Typed configuration: dataclass schemas, YAML presets, command-line overrides and clear validation errors.

A config is built as: schema defaults <- YAML preset(s) <- overrides (`key.sub=value`). OmegaConf checks every key and
type against the schema; we turn its errors into one line that names the offending key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from mimswin.errors import ConfigError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
REPO_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = REPO_ROOT / "configs"


@dataclass
class ModelConfig:
    """The encoder: any timm model name, with the size overrides timm's factory accepts."""

    name: str = "vit_base_patch16_224"
    img_size: int = 224
    patch_size: Optional[int] = None
    drop_path_rate: float = 0.0
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MaskConfig:
    """`unit`: side in px of the square hidden together (unset: the method's default, see docs/configuration.md)."""

    ratio: float = 0.75
    unit: Optional[int] = None


@dataclass
class DecoderConfig:
    """The MAE decoder: a narrow transformer that only pretraining uses."""

    dim: int = 512
    depth: int = 8
    heads: int = 16
    mlp_ratio: float = 4.0


@dataclass
class LossConfig:
    """`kind`: mse or l1 on hidden patches (unset: mse for mae, l1 for simmim)."""

    norm_pix: bool = True
    kind: Optional[str] = None


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


@dataclass
class PretrainConfig:
    method: str = "mae"
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


C = TypeVar("C")


def resolve_preset(name_or_path: str) -> Path:
    """A preset is a YAML path, or a bare name looked up under configs/ (e.g. `tiny_mae_vit_cpu`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    matches = sorted(PRESET_DIR.rglob(f"{path.stem}.yaml")) if PRESET_DIR.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    raise ConfigError(f"config file '{name_or_path}' not found (nor a preset of that name under {PRESET_DIR})")


def list_presets() -> List[str]:
    """Names of the YAML presets shipped under configs/."""
    return sorted(p.relative_to(PRESET_DIR).with_suffix("").as_posix() for p in PRESET_DIR.rglob("*.yaml"))


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys, got {type(data).__name__}")
    return data


def _explain(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"{origin}: unknown config key '{key}'")
    message = str(err).splitlines()[0]
    if isinstance(err, ValidationError):
        return ConfigError(f"{origin}: config key '{key}' has the wrong type: {message}")
    return ConfigError(f"{origin}: config key '{key}': {message}")


def parse_overrides(overrides: Sequence[str]) -> List[str]:
    """Normalise `key=value`, `--key=value` and `--key value` tokens into `key=value` strings."""
    result, tokens = [], list(overrides)
    while tokens:
        token = tokens.pop(0)
        bare = token[2:] if token.startswith("--") else token
        if "=" in bare:
            result.append(log_with_alias(bare))
        elif token.startswith("--") and tokens and not tokens[0].startswith("--"):
            result.append(log_with_alias(f"{bare}={tokens.pop(0)}"))
        else:
            raise ConfigError(f"override '{token}' is not of the form key=value (e.g. optim.blr=1e-4)")
    return result


def log_with_alias(item: str) -> str:
    """`log_with=wandb,tensorboard` / `log_with=none` (as in accelerate's `--log_with`) -> `train.log_with=[...]`."""
    key, _, value = item.partition("=")
    if key != "log_with":
        return item
    names = [] if value.strip().lower() in ("none", "") else [n.strip() for n in value.strip("[]").split(",")]
    return f"train.log_with=[{', '.join(names)}]"


def load_config(
    schema: Type[C], presets: Sequence[str | Path] = (), overrides: Sequence[str] = ()
) -> C:
    """Build a validated config object of type `schema` from presets and `key=value` overrides."""
    merged = OmegaConf.structured(schema)
    for preset in presets:
        path = resolve_preset(str(preset))
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(_read_yaml(path)))
        except OmegaConfBaseException as err:
            raise _explain(err, str(path)) from None
    for item in parse_overrides(overrides):
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        try:
            merged = OmegaConf.merge(merged, _nested(key, value))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override '{item}'") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, "config") from None
    validate(cfg)
    return cfg


def _nested(key: str, value: Any) -> Any:
    node: Any = value
    for part in reversed(key.split(".")):
        node = {part: node}
    return OmegaConf.create(node)


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain nested dict of a config object, for YAML dumps and trackers."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML, so a run dir says exactly what produced it."""
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def validate(cfg: Any) -> None:
    """Semantic checks that types alone cannot express."""
    if hasattr(cfg, "method"):
        _check(cfg.method in ("mae", "simmim"), "method", f"unknown method '{cfg.method}' (known: mae, simmim)")
    if hasattr(cfg, "mask"):
        _check(0.0 <= cfg.mask.ratio < 1.0, "mask.ratio", f"must be in [0, 1), got {cfg.mask.ratio}")
        _check(cfg.mask.unit is None or cfg.mask.unit > 0, "mask.unit", f"must be positive px, got {cfg.mask.unit}")
    if hasattr(cfg, "loss"):
        _check(cfg.loss.kind in (None, "mse", "l1"), "loss.kind", f"must be mse or l1, got '{cfg.loss.kind}'")
    if hasattr(cfg, "decoder"):
        _check(cfg.decoder.dim % cfg.decoder.heads == 0, "decoder.dim",
               f"{cfg.decoder.dim} is not divisible by decoder.heads={cfg.decoder.heads}")
        _check(cfg.decoder.dim % 4 == 0, "decoder.dim", "must be divisible by 4 (2-D sin-cos position embedding)")
    data, optim, train = cfg.data, cfg.optim, cfg.train
    _check(data.batch_size > 0, "data.batch_size", f"must be positive, got {data.batch_size}")
    _check(data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {data.num_workers}")
    _check(len(data.crop_scale) == 2 and 0 < data.crop_scale[0] <= data.crop_scale[1] <= 1, "data.crop_scale",
           f"must be [min, max] with 0 < min <= max <= 1, got {data.crop_scale}")
    _check(len(data.mean) == len(data.std) == 3, "data.mean", "data.mean and data.std need three values each")
    _check(data.shards is None or data.path is None, "data.shards", "give data.shards or data.path, not both")
    _check(data.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {data.shuffle_buffer}")
    _check(data.samples_per_epoch is None or data.samples_per_epoch > 0, "data.samples_per_epoch",
           f"must be positive, got {data.samples_per_epoch}")
    _check(len(optim.betas) == 2, "optim.betas", f"needs two values, got {optim.betas}")
    _check(train.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    _check(train.mixed_precision in ("no", "bf16", "fp16"), "train.mixed_precision",
           f"must be one of no, bf16, fp16; got '{train.mixed_precision}'")
    unknown = set(train.log_with) - {"wandb", "tensorboard"}
    _check(not unknown, "train.log_with", f"unknown tracker(s) {sorted(unknown)} (known: wandb, tensorboard)")
    for key in ("log_every", "save_every", "vis_every", "keep_last", "epochs"):
        _check(getattr(train, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(train, key)}")
    for key in ("keep_every", "stop_check_every", "max_nonfinite_steps"):
        value = getattr(train, key)
        _check(value is None or value >= 1, f"train.{key}", f"must be >= 1, got {value}")
