"""The pretraining config: encoder, mask, decoder and loss, over the shared data/optimizer/loop sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from mimswin.config.sections import (
    DataConfig,
    OptimConfig,
    TrainConfig,
    check,
    check_sections,
    resolve_pixels,
    size_pair,
)


@dataclass
class ModelConfig:
    """The encoder: any timm model name, with the size overrides timm's factory accepts. `img_size`: an int (square)
    or [height, width]. Its input channels are `data.channels`."""

    name: str = "vit_base_patch16_224"
    img_size: Union[int, List[int]] = 224
    patch_size: Optional[int] = None
    drop_path_rate: float = 0.0
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MaskConfig:
    """`unit`: side in px of the square hidden together (unset: the method's default, see docs/configuration.md)."""

    ratio: float = 0.75
    unit: Optional[int] = None


DECODER_KINDS = ("self", "cross")


@dataclass
class DecoderConfig:
    """The MAE decoder: a narrow transformer that only pretraining uses. `kind`: self (MAE's: self-attention over the
    whole grid, visible tokens among mask tokens) or cross (CrossMAE's: queries for the predicted cells only, each block
    cross-attends to the visible tokens). `predict_ratio`: the share of each image's hidden patches reconstructed and
    scored, drawn anew every step (1: all). `feature_blocks` (cross, ViT): the encoder blocks the decoder reads, each
    decoder block a learned weighted sum of them (negative counts from the end; must include the last, -1; unset: the
    encoder's output only)."""

    kind: str = "self"
    dim: int = 512
    depth: int = 8
    heads: int = 16
    mlp_ratio: float = 4.0
    predict_ratio: float = 1.0
    feature_blocks: Optional[List[int]] = None


@dataclass
class LossConfig:
    """`kind`: mse or l1 on hidden patches (unset: mse for mae, l1 for simmim)."""

    norm_pix: bool = True
    kind: Optional[str] = None


@dataclass
class VisConfig:
    """Reconstruction pictures: `bands`, the channels shown (one: gray; three: as red, green, blue); unset: the image
    as it is for 1 or 3 channels, else its first three (two channels: [0, 1, 0]). Channels other than plain RGB are
    each stretched between their own 1st and 99th percentiles."""

    bands: Optional[List[int]] = None


@dataclass
class OnlineProbeConfig:
    """A linear head on the encoder's pooled features of the visible tokens, trained on detached features alongside
    pretraining where the data has labels (the embedded set, class folders): no gradient reaches the encoder. Its val
    top-1 is logged every `every` steps (0: off) on the first `val_samples` images of `val_path` (class folders; unset
    with the embedded set: its val split). The head trains with the run's optimizer at `lr` (peak; the run's warmup
    and cosine scale it alike)."""

    every: int = 0
    val_path: Optional[str] = None
    val_samples: int = 1000
    lr: float = 1.0e-2


@dataclass
class PretrainConfig:
    """`mimswin pretrain`: a MIM method over a timm encoder."""

    method: str = "mae"
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vis: VisConfig = field(default_factory=VisConfig)
    online_probe: OnlineProbeConfig = field(default_factory=OnlineProbeConfig)

    def validate(self) -> None:
        """Semantic checks that types alone cannot express (run by `load_config`)."""
        check(self.method in ("mae", "simmim"), "method", f"unknown method '{self.method}' (known: mae, simmim)")
        check(0.0 <= self.mask.ratio < 1.0, "mask.ratio", f"must be in [0, 1), got {self.mask.ratio}")
        check(self.mask.unit is None or self.mask.unit > 0, "mask.unit", f"must be positive px, got {self.mask.unit}")
        check(self.loss.kind in (None, "mse", "l1"), "loss.kind", f"must be mse or l1, got '{self.loss.kind}'")
        check(self.decoder.dim % self.decoder.heads == 0, "decoder.dim",
              f"{self.decoder.dim} is not divisible by decoder.heads={self.decoder.heads}")
        check(self.decoder.dim % 4 == 0, "decoder.dim", "must be divisible by 4 (2-D sin-cos position embedding)")
        self.check_decoder()
        check_sections(self.data, self.optim, self.train)
        probe = self.online_probe
        check(probe.every >= 0, "online_probe.every", f"must be >= 0 steps (0: off), got {probe.every}")
        check(probe.val_samples >= 1, "online_probe.val_samples", f"must be >= 1, got {probe.val_samples}")
        check(probe.lr > 0, "online_probe.lr", f"must be > 0, got {probe.lr}")
        check(not probe.every or (self.data.shards is None and self.data.hf is None), "online_probe.every",
              "the online probe reads the embedded set or class folders (data.path), not data.shards or data.hf")
        check(not probe.every or self.data.path is None or probe.val_path is not None, "online_probe.val_path",
              "the online probe of an image folder needs a validation folder with the same class subfolders")
        size_pair(self.model.img_size)
        resolve_pixels(self.data)
        in_chans = self.model.kwargs.get("in_chans")
        check(in_chans is None or in_chans == self.data.channels, "model.kwargs.in_chans",
              f"{in_chans} conflicts with data.channels={self.data.channels}; set data.channels={in_chans} (the "
              "encoder's in_chans follows it)")
        bands = self.vis.bands
        check(bands is None or (len(bands) in (1, 3) and all(0 <= b < self.data.channels for b in bands)),
              "vis.bands", f"one or three channel indices in [0, {self.data.channels}), got {bands}")

    def check_decoder(self) -> None:
        """The decoder kind and the options it understands; SimMIM has no decoder to swap."""
        d = self.decoder
        check(d.kind in DECODER_KINDS, "decoder.kind", f"must be self or cross, got '{d.kind}'")
        check(0.0 < d.predict_ratio <= 1.0, "decoder.predict_ratio", f"must be in (0, 1], got {d.predict_ratio}")
        check(d.feature_blocks is None or len(d.feature_blocks) > 0, "decoder.feature_blocks",
              "must list at least one encoder block, or be unset (the encoder's output)")
        check(d.feature_blocks is None or d.kind == "cross", "decoder.feature_blocks",
              "needs decoder.kind=cross (the self decoder reads the encoder's output)")
        if self.method == "simmim":
            check(d.kind == "self", "decoder.kind", "cross needs method=mae (SimMIM predicts every hidden patch from "
                  "the encoder's own map, with no decoder to swap)")
            check(d.predict_ratio == 1.0, "decoder.predict_ratio", "needs method=mae (SimMIM scores every hidden "
                  "patch)")
