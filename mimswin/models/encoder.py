"""The masked-encoder contract every MIM method relies on, and one word for each size it involves.

Sizes (square sides, in pixels unless the name says cells):

- `patch_px`: one patch embedding, the timm model's patch (or stride);
- `cell_px`: one cell of the encoder's output grid, i.e. what one final-stage token covers: a ViT patch, a Swin
  final-stage token (patch x 2^merges), a Hiera final-stage token (stride x q_stride^q_pool);
- `grid`: (rows, cols) of those cells, rectangular when the image is;
- `unit_px` / `unit_cells`: one mask unit, the square hidden or shown together, in pixels / in cells;
- `target_px`: the pixel square one prediction reconstructs (MAE: a cell; SimMIM: a mask unit).

A new encoder family is one wrapper that provides `MaskedEncoder` plus one line in `factory.py`'s table.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, Sequence, Tuple

import torch
from torch import nn


class EncoderOutput(NamedTuple):
    """Encoded visible tokens, the grid position of each, and the prefix (cls) tokens, all after the final norm;
    `features`: the outputs [B, P + L, E] (prefix first) of the blocks the encoder was asked for
    (`MaskedViT.feature_blocks`), in block order; empty unless asked."""

    tokens: torch.Tensor
    positions: torch.Tensor
    prefix: torch.Tensor
    features: Sequence[torch.Tensor] = ()


class MaskedEncoder(Protocol):
    """What a MIM method needs of its encoder. `model` is the plain timm model, exported as it is."""

    model: nn.Module

    @property
    def grid(self) -> Tuple[int, int]:
        """(rows, cols) of output cells."""

    @property
    def cell_px(self) -> int:
        """Pixels per side of one output cell."""

    @property
    def in_chans(self) -> int:
        """Channels of the images it reads."""

    @property
    def embed_dim(self) -> int:
        """Width of the tokens (or feature map) `forward_masked` returns."""

    def forward_masked(self, images: torch.Tensor, mask: torch.Tensor) -> Any:
        """Encode `images` [B, C, H, W] under `mask`: visible cell indices [B, L] for the MAE encoders (returning an
        `EncoderOutput`, or Hiera's per-stage units), a hidden map [B, rows, cols] of patches for SimMIM's mask-token
        encoder (returning the last feature map)."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to the wrapper) kept out of weight decay."""


def timm_in_chans(model: nn.Module) -> int:
    """Channels a timm model's patch embedding reads."""
    return model.patch_embed.proj.in_channels
