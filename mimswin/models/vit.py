"""A timm VisionTransformer that encodes only the visible patches (MAE), with fixed 2-D sin-cos position embeddings."""

from __future__ import annotations

from typing import List, Tuple

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimswin.errors import ConfigError
from mimswin.models.encoder import EncoderOutput, timm_in_chans
from mimswin.models.pos_embed import sincos_2d
from mimswin.models.tokens import gather_tokens


def check_patch_grid(model: VisionTransformer) -> None:
    """The image must be a whole number of patches: timm would build the model and fail at the first forward."""
    (height, width), patch = model.patch_embed.img_size, model.patch_embed.patch_size
    if height % patch[0] or width % patch[1]:
        raise ConfigError(f"config key 'model.img_size': {height}x{width} px is not a whole number of "
                          f"{patch[0]}x{patch[1]} px patches")


def run_blocks(vit: VisionTransformer, x: torch.Tensor, collect: Tuple[int, ...]) -> Tuple[torch.Tensor, List]:
    """timm's blocks over x, honouring `set_grad_checkpointing()`; returns the last output and the outputs of the
    blocks whose indices are in `collect`, in block order."""
    if not collect:
        return checkpoint_seq(vit.blocks, x) if vit.grad_checkpointing else vit.blocks(x), []
    outputs = []
    for index, block in enumerate(vit.blocks):
        recompute = vit.grad_checkpointing and torch.is_grad_enabled()
        x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        if index in collect:
            outputs.append(x)
    return x, outputs


class MaskedViT(nn.Module):
    """Wraps `timm.create_model(name)`: `model` holds exactly the timm weights, `forward_masked` runs visible tokens.
    A `MaskedEncoder` whose cells are the patches; `feature_blocks` (ascending block indices ending with the last
    block, set by the method's builder) are the blocks whose outputs `forward_masked` also returns, for a decoder that
    reads several: the last one as the encoder outputs it (after the final norm), the others as their blocks leave
    them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, VisionTransformer):
            raise ConfigError(f"config key 'model.name': MAE's ViT path needs a timm VisionTransformer, "
                              f"got {type(model).__name__}")
        if model.reg_token is not None or model.no_embed_class or model.pos_embed is None:
            raise ConfigError("config key 'model.name': register tokens, no_embed_class and models without "
                              "absolute position embeddings are not supported by the MAE ViT path")
        if model.patch_drop.__class__ is not nn.Identity or getattr(model, "dynamic_img_size", False):
            raise ConfigError("config key 'model.kwargs': patch_drop_rate and dynamic_img_size are not supported")
        check_patch_grid(model)
        self.model = model
        self.grid: tuple[int, int] = tuple(model.patch_embed.grid_size)
        self.cell_px: int = model.patch_embed.patch_size[0]
        self.num_cells = self.grid[0] * self.grid[1]
        self.embed_dim, self.num_prefix_tokens = model.embed_dim, model.num_prefix_tokens
        table = sincos_2d(model.embed_dim, self.grid, model.num_prefix_tokens)
        model.pos_embed.data.copy_(table.unsqueeze(0))
        model.pos_embed.requires_grad_(False)
        self.feature_blocks: Tuple[int, ...] = ()

    @property
    def in_chans(self) -> int:
        return timm_in_chans(self.model)

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    def forward_masked(self, images: torch.Tensor, keep: torch.Tensor) -> EncoderOutput:
        """Encode only the patches at `keep` [B, L] (plus cls); tokens stay in the order of `keep`, and so do those of
        the `feature_blocks` outputs. Honours timm's `set_grad_checkpointing()` like timm's own `forward_features`."""
        vit = self.model
        prefix_count = vit.num_prefix_tokens
        x = vit.patch_embed(images) + vit.pos_embed[:, prefix_count:]
        x = gather_tokens(x, keep)
        if vit.cls_token is not None:
            cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        x = vit.norm_pre(vit.pos_drop(x))
        x, features = run_blocks(vit, x, self.feature_blocks[:-1])
        x = vit.norm(x)
        return EncoderOutput(tokens=x[:, prefix_count:], positions=keep, prefix=x[:, :prefix_count],
                             features=(*features, x) if self.feature_blocks else ())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked features, exactly timm's `forward_features`."""
        return self.model.forward_features(images)
