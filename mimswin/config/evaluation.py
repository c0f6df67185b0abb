"""The evaluation programs' configs (fine-tune, linear probe, k-NN), over the shared data/optimizer/loop sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from mimswin.config.sections import DataConfig, OptimConfig, TrainConfig, check, check_sections, size_pair
from mimswin.errors import ConfigError

FEATURES = ("cls", "avg", "cls+avg")
POOLS = ("avg", "token")
PROBE_MODES = ("logistic", "mae", "cached", "attentive", "layers")
HEAD_INITS = ("random", "probe")
L2_GRID = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)


@dataclass
class ClassifierConfig:
    """The plain timm classifier around the encoder; name and sizes come from the checkpoint unless set here.
    `global_pool`: avg (+ fc_norm for ViT) or token (the class token); null = token where the encoder has one, else
    avg (the linear probe's default: MAE probes the class token, a Swin has none). `img_size`: an int or
    [height, width]; unset: the encoder's."""

    name: Optional[str] = None
    img_size: Optional[Union[int, List[int]]] = None
    global_pool: Optional[str] = "avg"
    drop_path_rate: float = 0.0
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class AugmentConfig:
    """Fine-tuning augmentation from timm: RandAugment or colour jitter (8-bit RGB only), random erasing, Mixup/CutMix,
    label smoothing (any channel count). `color_jitter` (brightness/contrast/saturation strength) is off by default,
    as in MAE's fine-tuning."""

    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    color_jitter: Optional[float] = None
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1


@dataclass
class KnnConfig:
    """Weighted k-NN (DINO) on cosine similarity of cached features; `k: 0` turns it off."""

    k: int = 20
    temperature: float = 0.07


@dataclass
class FeatureConfig:
    """What the probe and k-NN read from the frozen encoder: `pool` cls | avg | cls+avg of each of the last `blocks`
    blocks (ViT) or stages (Swin), concatenated. `pool: null` = from `model.global_pool` when set (token -> cls),
    else cls+avg where the encoder has a class token, avg where it has none."""

    pool: Optional[str] = None
    blocks: int = 1


@dataclass
class LogisticConfig:
    """`mode: logistic`: the L2 penalty strengths tried, picked on a class-balanced `holdout` fraction of train."""

    penalties: List[float] = field(default_factory=lambda: list(L2_GRID))
    holdout: float = 0.1
    max_iter: int = 300


@dataclass
class AttentiveConfig:
    """`mode: attentive`: `queries` learned queries over `heads` heads attend to the tokens of the last `blocks`
    blocks (ViT; a Swin or Hiera: its last stages whose maps share a grid, side by side), their outputs concatenated,
    then LayerNorm + Linear; AdamW (`lr`, `weight_decay`), a cosine schedule over `epochs` of cached tokens in batches
    of `batch_size` (more epochs where that is under `min_steps` optimizer steps: small labeled subsets), `token_drop`
    of each sample's tokens left out in training; one pooler per seed in `seeds`, the mean reported. `heads` unset:
    the most heads up to 12 that divide the token width (12 at ViT-Tiny's 192, 8 at a 64-wide Swin stage)."""

    queries: int = 8
    heads: Optional[int] = None
    blocks: int = 1
    lr: float = 2.0e-2
    weight_decay: float = 0.05
    epochs: int = 30
    min_steps: int = 480
    batch_size: int = 256
    token_drop: float = 0.25
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])


def check_subset_size(fraction: Optional[float], per_class: Optional[int]) -> None:
    """One clear error for a subset size that cannot be taken (both given, a fraction outside (0, 1], a count < 1)."""
    if fraction is not None and per_class is not None:
        raise ConfigError("config keys 'data.label_fraction' and 'data.labels_per_class': give one, not both")
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"config key 'data.label_fraction': must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise ConfigError(f"config key 'data.labels_per_class': must be >= 1, got {per_class}")



@dataclass
class LabeledDataConfig(DataConfig):
    """Pretraining's data section; labeled webdataset shards give the train split in `shards` and the validation split
    in `val_shards` (class names from the classes.json `mimswin shards` writes beside them); a `data.hf` dataset its
    train split in `hf_split` and the validation split in `hf_val_split` (unset: validation, val or test).
    `label_fraction` / `labels_per_class`: train on a seeded (`label_seed`), class-balanced labeled subset only."""

    val_shards: Optional[str] = None
    hf_val_split: Optional[str] = None
    label_fraction: Optional[float] = None
    labels_per_class: Optional[int] = None
    label_seed: int = 0


def check_labeled(cfg: "FinetuneConfig | LinprobeConfig") -> None:
    """Checks both evaluation programs share: pooling, eval crop, labeled shards and subsets, the common sections."""
    pool = cfg.model.global_pool
    if cfg.model.img_size is not None:
        size_pair(cfg.model.img_size)
    check(pool is None or pool in POOLS, "model.global_pool", f"must be one of {POOLS} or null, got '{pool}'")
    check(0 < cfg.eval_crop_pct <= 1, "eval_crop_pct", f"must be in (0, 1], got {cfg.eval_crop_pct}")
    for key, default in (("resize", "auto"), ("decode", "worker")):
        check(getattr(cfg.data, key) == default, f"data.{key}", "is a pretraining setting: evaluation crops, "
              "augments and decodes in the loader's workers (leave it unset)")
    check(not cfg.data.hf_streaming, "data.hf_streaming", "evaluation reads data.hf map-style (random access for "
          "subsets and cached features); leave it unset")
    check((cfg.data.shards is None) == (cfg.data.val_shards is None), "data.val_shards",
          "labeled shards need both splits: data.shards (train) and data.val_shards (validation)")
    fraction, per_class = cfg.data.label_fraction, cfg.data.labels_per_class
    check_subset_size(fraction, per_class)
    check((fraction is None and per_class is None) or cfg.data.shards is None, "data.label_fraction",
          "labeled subsets need a map-style source (the embedded set, an image folder or data.hf), not data.shards")
    check_sections(cfg.data, cfg.optim, cfg.train)


@dataclass
class FewLabelConfig:
    """The step budget of a fine-tune on a labeled subset, which does not shrink with the label fraction.

    A fine-tune on `data.label_fraction` / `data.labels_per_class` whose own epochs would take fewer than `min_steps`
    optimizer steps runs about `min_steps`: batches of up to `batch_size` that the subset fills (an even count), as
    many epochs as that takes, the lr warmed up over the first fifth of them, four evaluations. `min_steps: 0` keeps
    the run's own epochs and batch."""

    min_steps: int = 150
    batch_size: int = 64


@dataclass
class FinetuneConfig:
    """`mimswin finetune`: the pretrained encoder as a timm classifier, trained end to end."""

    checkpoint: Optional[str] = None
    random_init: bool = False
    model: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(drop_path_rate=0.1))
    data: LabeledDataConfig = field(default_factory=lambda: LabeledDataConfig(crop_scale=[0.08, 1.0]))
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        blr=5e-4, min_lr=1e-6, weight_decay=0.05, betas=[0.9, 0.999], warmup_epochs=5.0))
    layer_decay: float = 0.75
    head_init: str = "random"
    ema_decay: Optional[float] = None
    eval_every: int = 1
    eval_crop_pct: float = 1.0
    few_labels: FewLabelConfig = field(default_factory=FewLabelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, output_dir="runs/finetune"))

    def validate(self) -> None:
        """Semantic checks that types alone cannot express (run by `load_config`)."""
        check_labeled(self)
        check(0 < self.layer_decay <= 1, "layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        check(self.eval_every >= 1, "eval_every", f"must be >= 1 (epochs), got {self.eval_every}")
        check(self.few_labels.min_steps >= 0, "few_labels.min_steps", f"must be >= 0, got {self.few_labels.min_steps}")
        check(self.few_labels.batch_size >= 1, "few_labels.batch_size",
              f"must be >= 1, got {self.few_labels.batch_size}")
        check(self.head_init in HEAD_INITS, "head_init", f"must be one of {HEAD_INITS}, got '{self.head_init}'")
        check(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay",
              f"must be in (0, 1), got {self.ema_decay}")
        check(self.ema_decay is None or self.train.strategy != "fsdp", "ema_decay",
              "an EMA of the weights is not kept under train.strategy=fsdp (each rank holds a shard); unset it or "
              "use train.strategy=ddp")
        check(0 <= self.aug.smoothing < 1, "aug.smoothing", f"must be in [0, 1), got {self.aug.smoothing}")
        check(self.aug.color_jitter is None or self.aug.color_jitter >= 0, "aug.color_jitter",
              f"must be >= 0 or null, got {self.aug.color_jitter}")
        check(not (self.aug.auto_augment and self.aug.color_jitter), "aug.color_jitter",
              "give aug.auto_augment (RandAugment) or aug.color_jitter, not both")
        check_colour_augment(self)
        mixing = self.aug.mixup > 0 or self.aug.cutmix > 0
        check(not mixing or self.data.batch_size % 2 == 0, "data.batch_size",
              f"Mixup/CutMix needs an even batch size, got {self.data.batch_size} (or set aug.mixup=0 aug.cutmix=0)")


def check_colour_augment(cfg: FinetuneConfig) -> None:
    """RandAugment and colour jitter are 8-bit RGB operations: refused once the channel count is known to differ."""
    channels = cfg.data.channels
    for key, value in (("aug.auto_augment", cfg.aug.auto_augment), ("aug.color_jitter", cfg.aug.color_jitter)):
        check(channels in (None, 3) or not value, key, f"colour augmentation works on RGB images, not on "
              f"{channels} channel(s); set {key}=null (random erasing and Mixup/CutMix work on any channels)")


@dataclass
class LinprobeConfig:
    """`mimswin linprobe` (and `mimswin knn`): a linear classifier and k-NN on the frozen encoder's features."""

    checkpoint: Optional[str] = None
    random_init: bool = False
    mode: str = "mae"
    model: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(global_pool=None))
    features: FeatureConfig = field(default_factory=FeatureConfig)
    logistic: LogisticConfig = field(default_factory=LogisticConfig)
    attentive: AttentiveConfig = field(default_factory=AttentiveConfig)
    data: LabeledDataConfig = field(default_factory=lambda: LabeledDataConfig(crop_scale=[0.08, 1.0]))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        blr=0.1, weight_decay=0.0, warmup_epochs=10.0))
    momentum: float = 0.9
    knn: KnnConfig = field(default_factory=KnnConfig)
    eval_crop_pct: float = 1.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=90, output_dir="runs/linprobe"))

    def validate(self) -> None:
        """Semantic checks that types alone cannot express (run by `load_config`)."""
        check_labeled(self)
        check(self.mode in PROBE_MODES, "mode", f"must be one of {PROBE_MODES}, got '{self.mode}'")
        check(self.knn.k >= 0, "knn.k", f"must be >= 0, got {self.knn.k}")
        check(self.knn.temperature > 0, "knn.temperature", f"must be > 0, got {self.knn.temperature}")
        pool = self.features.pool
        check(pool is None or pool in FEATURES, "features.pool", f"must be one of {FEATURES} or null, got '{pool}'")
        check(self.features.blocks >= 1, "features.blocks", f"must be >= 1, got {self.features.blocks}")
        check(len(self.logistic.penalties) > 0 and min(self.logistic.penalties) >= 0, "logistic.penalties",
              f"needs one or more strengths >= 0, got {self.logistic.penalties}")
        check(0 <= self.logistic.holdout < 1, "logistic.holdout", f"must be in [0, 1), got {self.logistic.holdout}")
        a = self.attentive
        for key, value in (("queries", a.queries), ("heads", 1 if a.heads is None else a.heads), ("blocks", a.blocks),
                           ("epochs", a.epochs), ("batch_size", a.batch_size)):
            check(value >= 1, f"attentive.{key}", f"must be >= 1, got {value}")
        check(a.min_steps >= 0, "attentive.min_steps", f"must be >= 0, got {a.min_steps}")
        check(a.lr > 0 and a.weight_decay >= 0, "attentive.lr", f"lr must be > 0 and weight_decay >= 0, got "
              f"{a.lr} / {a.weight_decay}")
        check(len(a.seeds) > 0, "attentive.seeds", "needs one or more seeds")
        check(0 <= a.token_drop < 1, "attentive.token_drop", f"must be in [0, 1), got {a.token_drop}")
