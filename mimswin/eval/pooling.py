"""What a probe reads from a frozen timm encoder: the class token, the mean of the patch tokens, or both, from each of
the last `blocks` blocks (ViT) or stages (Swin and other pyramids), concatenated as DINO's linear probe does; or, for
the attentive probe, the tokens themselves."""

from __future__ import annotations

from typing import List

import torch
from einops import rearrange
from timm.models.hiera import Hiera
from torch import nn

from mimswin.config.evaluation import FEATURES
from mimswin.errors import ConfigError


def has_class_token(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None


def is_token_encoder(model: nn.Module) -> bool:
    """A plain ViT-like timm model: a sequence of blocks over (prefix + patch) tokens."""
    return hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")


def depth_of(model: nn.Module) -> int:
    """Blocks a probe can read: a ViT's transformer blocks, a pyramid's stages."""
    return len(model.blocks) if is_token_encoder(model) else len(model.feature_info)


def block_widths(model: nn.Module, blocks: int) -> List[int]:
    """Token widths of the last `blocks` blocks (or stages), first of them first."""
    if is_token_encoder(model):
        return [model.embed_dim] * blocks
    return [info["num_chs"] for info in model.feature_info[-blocks:]]


class ProbeFeatures(nn.Module):
    """Frozen features of a timm model for probes and k-NN: `features` in cls | avg | cls+avg, read from the outputs
    of the last `blocks` blocks (each through the encoder's final norm) and concatenated, last block first.

    A ViT's blocks are its transformer blocks; a Swin's (or any pyramid's) are its stages, averaged over space.
    `blocks` beyond the encoder's depth read them all (so one preset serves a 6-block ViT and a 2-stage Swin).
    """

    def __init__(self, model: nn.Module, features: str = "avg", blocks: int = 1) -> None:
        super().__init__()
        if features not in FEATURES:
            raise ConfigError(f"config key 'features.pool': must be one of {FEATURES}, got '{features}'")
        if "cls" in features and not has_class_token(model):
            raise ConfigError(f"config key 'features.pool': '{features}' needs a class token and "
                              f"{type(model).__name__} has none; use avg")
        if blocks < 1:
            raise ConfigError(f"config key 'features.blocks': must be >= 1, got {blocks}")
        blocks = min(blocks, depth_of(model))
        self.model, self.features, self.blocks = model, features, blocks
        widths = block_widths(model, blocks)
        self.widths = [w * (2 if features == "cls+avg" else 1) for w in reversed(widths)]  # per block, last first
        self.num_features = sum(self.widths)

    def pooled(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Per block (last first): [B, D] pooled features."""
        return pooled_features(self.model, x, self.features, self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.pooled(x), dim=1)


class ProbeTokens(nn.Module):
    """Frozen tokens [B, N, D] of a timm model for the attentive probe: a ViT's class and patch tokens, a pyramid's
    cells of its last stage maps; from the last `blocks` blocks (or stages) concatenated along the width, last first,
    each through the encoder's final norm. Stages of different grids cannot be concatenated: one block then."""

    def __init__(self, model: nn.Module, blocks: int = 1) -> None:
        super().__init__()
        if blocks < 1:
            raise ConfigError(f"config key 'attentive.blocks': must be >= 1, got {blocks}")
        blocks = min(blocks, depth_of(model))
        self.model, self.blocks, self.num_features = model, blocks, sum(block_widths(model, blocks))
        self.features = "tokens"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = block_tokens(self.model, x, self.blocks)
        if len({t.shape[1] for t in tokens}) > 1:  # the maps' own sizes: timm's feature_info reductions can be wrong
            raise ConfigError(f"config key 'attentive.blocks': the last {self.blocks} stages of "
                              f"{type(self.model).__name__} have different grids "
                              f"({' / '.join(str(t.shape[1]) for t in tokens)} tokens); the attentive probe reads "
                              f"stages of one grid (attentive.blocks=1)")
        return torch.cat(tokens, dim=-1)


def block_tokens(model: nn.Module, x: torch.Tensor, blocks: int) -> List[torch.Tensor]:
    """Per block (last first): [B, N, D] tokens of `model` on `x` as `ProbeTokens` reads them."""
    if is_token_encoder(model):
        outs = model.forward_intermediates(x, indices=blocks, norm=True, output_fmt="NLC", intermediates_only=True,
                                           return_prefix_tokens=True)
        return [torch.cat([prefix, patches], dim=1) for patches, prefix in reversed(outs)]
    hiera = isinstance(model, Hiera)  # its final norm is the head's (see pooled_features)
    options = {} if hiera else {"norm": True}
    maps = model.forward_intermediates(x, indices=blocks, intermediates_only=True, **options)
    tokens = [rearrange(m, "b c h w -> b (h w) c") for m in reversed(maps)]
    return [model.head.norm(tokens[0]), *tokens[1:]] if hiera else tokens


def pooled_features(model: nn.Module, x: torch.Tensor, features: str, blocks: int) -> List[torch.Tensor]:
    """Per block (last first): [B, D] features of `model` on `x` as `ProbeFeatures` reads them."""
    if isinstance(model, Hiera):  # timm's Hiera has no `norm` option: its final norm is the head's, after pooling
        maps = model.forward_intermediates(x, indices=blocks, intermediates_only=True)
        pooled = [m.mean(dim=(-2, -1)) for m in reversed(maps)]
        return [model.head.norm(pooled[0]), *pooled[1:]]
    if not is_token_encoder(model):
        maps = model.forward_intermediates(x, indices=blocks, norm=True, intermediates_only=True)
        return [m.mean(dim=(-2, -1)) for m in reversed(maps)]
    outs = model.forward_intermediates(x, indices=blocks, norm=True, output_fmt="NLC", intermediates_only=True,
                                       return_prefix_tokens=True)
    pooled = []
    for patches, prefix in reversed(outs):
        parts = {"cls": [prefix[:, 0]], "avg": [patches.mean(dim=1)],
                 "cls+avg": [prefix[:, 0], patches.mean(dim=1)]}[features]
        pooled.append(torch.cat(parts, dim=1))
    return pooled
