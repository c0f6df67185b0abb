"""timm's Hiera for MAE: an encoder that runs on the visible mask units only, through timm's own masked forward.

Hiera (Ryali et al. 2023) unrolls its tokens so that each mask unit (8x8 tokens, 32x32 px at 224) is contiguous; its
q-pooling and its mask-unit attention stay inside a unit, and its global stages attend over whatever tokens are there.
Dropping the tokens of hidden units is therefore exact for the local stages and visible-only for the global ones, and
timm's `forward_features(x, mask=keep)` does it after a patch embedding that sees hidden pixels as zeros: the blocks
run on visible tokens only, so compute falls with the mask ratio.
"""

from __future__ import annotations

from typing import List, NamedTuple

import torch
from timm.models.hiera import Hiera
from torch import nn

from mimswin.errors import ConfigError
from mimswin.models.encoder import timm_in_chans


class HieraStages(NamedTuple):
    """The visible units' output of every stage, each [B, L, side, side, C] (a unit's tokens in raster order), and
    `positions` [B, L]: the raster index on the mask-unit grid of each of the L units (ascending)."""

    stages: List[torch.Tensor]
    positions: torch.Tensor


def check_hiera(model: nn.Module) -> Hiera:
    """A 2-D timm Hiera whose unrolled token order puts mask units innermost (what its masked forward relies on),
    or one clear ConfigError."""
    if not isinstance(model, Hiera):
        raise ConfigError(f"config key 'model.name': expected a timm Hiera, got {type(model).__name__}")
    if len(model.tokens_spatial_shape) != 2 or model.pos_embed_spatial is not None:
        raise ConfigError("config key 'model.kwargs': only 2-D (image) Hiera is supported, not sep_pos_embed / video")
    if model.patch_drop_rate > 0:
        raise ConfigError("config key 'model.kwargs': patch_drop_rate is not supported (MAE masks the units itself)")
    unit, stride = tuple(model.mask_unit_size), tuple(model.q_stride)
    if unit[0] != unit[1] or stride[0] != stride[1]:
        raise ConfigError(f"config key 'model.kwargs': square mask_unit_size and q_stride needed, got {unit} and "
                          f"{stride}")
    unrolls = len(model.stage_ends) - 1
    if unit[0] != stride[0] ** unrolls:
        raise ConfigError(f"config key 'model.kwargs': mask_unit_size {unit} must be q_stride^(stages - 1) = "
                          f"{stride[0] ** unrolls} tokens a side, so that unrolling makes each mask unit contiguous")
    tokens = model.tokens_spatial_shape
    if tokens[0] % unit[0] or tokens[1] % unit[1]:
        raise ConfigError(f"config key 'model.img_size': the {tokens[0]}x{tokens[1]} token grid does not tile into "
                          f"mask units of {unit[0]}x{unit[1]} tokens")
    conv = model.patch_embed.proj
    if any((2 * p - k) // s != -1 for k, s, p in zip(conv.kernel_size, conv.stride, conv.padding)):
        raise ConfigError(f"config key 'model.kwargs': patch_kernel {conv.kernel_size}, patch_stride {conv.stride} "
                          f"and patch_padding {conv.padding} do not give one token per stride (need "
                          f"kernel - stride <= 2 * padding < kernel)")
    return model


class MaskedHiera(nn.Module):
    """Wraps `timm.create_model(hiera name)`: `model` holds exactly the timm weights; `forward_masked` encodes only the
    visible mask units and returns every stage's output per unit, for the decoder's multi-scale fusion. A
    `MaskedEncoder` whose cells are the final-stage tokens; it takes the indices of visible *units*."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = check_hiera(model)

    @property
    def unit_grid(self) -> tuple[int, int]:
        return tuple(self.model.mask_spatial_shape)

    @property
    def num_units(self) -> int:
        return self.unit_grid[0] * self.unit_grid[1]

    @property
    def stage_dims(self) -> List[int]:
        return [self.model.blocks[end].dim_out for end in self.model.stage_ends]

    @property
    def stage_sides(self) -> List[int]:
        """Tokens per mask-unit side in each stage's output (q-pooling halves it in the first `q_pool` stage steps)."""
        unit, stride, pools = self.model.mask_unit_size[0], self.model.q_stride[0], self.model.q_pool
        return [unit // stride ** min(stage, pools) for stage in range(len(self.model.stage_ends))]

    @property
    def grid(self) -> tuple[int, int]:
        """The final-stage token grid: where MAE predicts, one `cell_px` footprint per token."""
        side = self.stage_sides[-1]
        return self.unit_grid[0] * side, self.unit_grid[1] * side

    @property
    def cell_px(self) -> int:
        """Pixels per final-stage token side: patch stride x q_stride^q_pool."""
        return self.model.patch_stride[0] * self.model.q_stride[0] ** self.model.q_pool

    @property
    def in_chans(self) -> int:
        return timm_in_chans(self.model)

    @property
    def embed_dim(self) -> int:
        """Width of the last stage."""
        return self.stage_dims[-1]

    @property
    def unit_px(self) -> int:
        return self.model.patch_stride[0] * self.model.mask_unit_size[0]

    @property
    def norm(self) -> nn.Module:
        """timm keeps Hiera's final norm in its head (`head.norm`); MAE applies it to the fused stages."""
        return self.model.head.norm

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    def forward_masked(self, images: torch.Tensor, keep: torch.Tensor) -> HieraStages:
        """Encode only the mask units listed in `keep` [B, L] (any order); units come back in ascending order, with
        their indices in `positions`. Honours timm's `set_grad_checkpointing()` (timm's own forward runs)."""
        visible = torch.zeros(keep.shape[0], self.num_units, dtype=torch.bool, device=keep.device)
        visible.scatter_(1, keep, True)
        _, stages = self.model.forward_features(images, mask=visible, return_intermediates=True)
        return HieraStages(stages=stages, positions=keep.sort(dim=1).values)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked features, exactly timm's `forward_features`."""
        return self.model.forward_features(images)
