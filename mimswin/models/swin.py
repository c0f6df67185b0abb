"""timm SwinTransformer for masked image modeling: a mask-token forward (SimMIM) and a visible-tokens-only forward.

The visible-only forward works at the granularity of one *cell*: the image area of one final-stage token (32 px for a
patch-4, 4-stage Swin). Masks hide whole cells, so every 2x2 patch merge sees four visible or four hidden tokens and
the visible cells can be carried as small NHWC tiles through timm's own modules. Window attention runs on the
windows that hold at least one visible token, each visible token at its true slot of its true (shifted) window, with
hidden slots masked as keys: timm's relative position bias and shifted-window region mask apply unchanged. With every
cell visible this is exactly timm's forward (see docs/swin.md).
"""

from __future__ import annotations

from types import MethodType
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from einops import rearrange
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from mimswin.errors import ConfigError
from mimswin.models.encoder import EncoderOutput, timm_in_chans

HIDDEN_KEY_BIAS = -1.0e4


def num_merges(model: SwinTransformer) -> int:
    """How many 2x2 patch-merging steps the stages perform."""
    return sum(not isinstance(stage.downsample, nn.Identity) for stage in model.layers)


def output_stride(model: SwinTransformer) -> int:
    """Pixels per final-stage token side (32 for the standard patch-4, 4-stage Swin)."""
    return model.patch_embed.patch_size[0] * 2 ** num_merges(model)


def side_tiles(side: int, patch: int, merges: int, window: int) -> bool:
    """Whether an image side of `side` px tiles: a whole number of final-stage tokens, and at every stage a token
    grid no larger than the window (timm shrinks the window to it) or a multiple of it."""
    if side % (patch * 2 ** merges):
        return False
    grids = [side // (patch * 2 ** stage) for stage in range(merges + 1)]
    return all(grid <= window or grid % window == 0 for grid in grids)


def tiling_sizes(model: SwinTransformer) -> str:
    """The sizes nearest the model's own (below and above, per side, so the aspect stays close) that tile with its
    patch, merges and windows, as the override to write."""
    patch, merges, stride = model.patch_embed.patch_size[0], num_merges(model), output_stride(model)
    windows = [max(block.window_size[dim] for stage in model.layers for block in stage.blocks) for dim in (0, 1)]
    below, above = [], []
    for side, window in zip(model.patch_embed.img_size, windows):
        reach = max(4 * side, 2 * stride * window)
        fits = [n * stride for n in range(1, reach // stride + 2) if side_tiles(n * stride, patch, merges, window)]
        below.append(max((f for f in fits if f <= side), default=min(fits)))
        above.append(min((f for f in fits if f >= side), default=max(fits)))
    return " or ".join(f"model.img_size=[{h},{w}]" for h, w in sorted({tuple(below), tuple(above)}))


def check_swin(model: nn.Module) -> SwinTransformer:
    """A timm SwinTransformer whose image, merges and windows tile exactly, or one clear ConfigError that names the
    nearest sizes that would."""
    if not isinstance(model, SwinTransformer):
        raise ConfigError(f"config key 'model.name': expected a timm SwinTransformer, got {type(model).__name__}")
    if model.dynamic_img_size:
        raise ConfigError("config key 'model.kwargs': dynamic_img_size / strict_img_size=False is not supported")
    patch = model.patch_embed.patch_size
    if patch[0] != patch[1]:
        raise ConfigError(f"config key 'model.patch_size': square patches needed, got {tuple(patch)}")
    img, stride = tuple(model.patch_embed.img_size), output_stride(model)
    if img[0] % stride or img[1] % stride:
        raise ConfigError(f"config key 'model.img_size': {img[0]}x{img[1]} px is not divisible by the Swin output "
                          f"stride {stride} px (patch {patch[0]} x 2^{num_merges(model)} merges); nearest sizes that "
                          f"tile: {tiling_sizes(model)}")
    for index, stage in enumerate(model.layers):
        for block in stage.blocks:
            if getattr(block, "dynamic_mask", False):
                raise ConfigError("config key 'model.kwargs': dynamic_mask is not supported (the shifted-window "
                                  "mask must be precomputed)")
            res, win = block.input_resolution, block.window_size
            if res[0] % win[0] or res[1] % win[1]:
                raise ConfigError(
                    f"config key 'model.kwargs': window {win[0]}x{win[1]} does not divide the {res[0]}x{res[1]} "
                    f"token grid of stage {index} ({img[0]}x{img[1]} px image); nearest sizes that tile with this "
                    f"window: {tiling_sizes(model)} (or another model.kwargs.window_size)")
    return model


def swin_forward_with_mask_token(model: SwinTransformer, images: torch.Tensor, hidden: torch.Tensor,
                                 mask_token: torch.Tensor) -> torch.Tensor:
    """SimMIM: hidden patch embeddings [B, H, W] become `mask_token`; all tokens run. Returns NHWC after the norm."""
    x = model.patch_embed(images)
    x = torch.where(hidden.unsqueeze(-1), mask_token.to(x.dtype), x)
    return model.norm(model.layers(x))


class WindowLayout(NamedTuple):
    """Where each visible token sits among the occupied windows of one block geometry. Packed (`pairs` given): the
    n_w visible tokens of window w fill its first n_w of L = max n_w slots; else each token sits at its true slot."""

    scatter: torch.Tensor  # [B * N]: slot of each visible token among the W * L slots of the occupied windows
    bias: torch.Tensor  # [W, L, L]: empty-slot key mask plus timm's shifted-window region mask at the true positions
    pairs: Optional[torch.Tensor]  # [W, L, L] if packed: true (query, key) positions, flat index into area * area


def window_layout(block: SwinTransformerBlock, rows: torch.Tensor, cols: torch.Tensor, tile: int) -> WindowLayout:
    """Layout of the visible tokens of cells at (`rows`, `cols`) [B, L], each a `tile` x `tile` token square.

    Packing pays for a relative-position bias gathered per (query, key) pair in every block; it is used where it at
    least halves the slot pairs of a window (at mask 0.75 for Swin-T: stages 3 and 4, not the busier early stages)."""
    height, width = block.input_resolution
    (win_h, win_w), (shift_h, shift_w) = block.window_size, block.shift_size
    area, windows_per_row = win_h * win_w, width // win_w
    windows_per_image = (height // win_h) * windows_per_row
    offsets = torch.arange(tile, device=rows.device)
    r = (rows[..., None, None] * tile + offsets[:, None] - shift_h) % height  # token coordinates in the
    c = (cols[..., None, None] * tile + offsets[None, :] - shift_w) % width  # cyclically shifted frame
    window = (r // win_h) * windows_per_row + c // win_w
    batch_index = torch.arange(rows.shape[0], device=rows.device).view(-1, 1, 1, 1)
    window_ids, compact = torch.unique((batch_index * windows_per_image + window).flatten(), return_inverse=True)
    position = ((r % win_h) * win_w + c % win_w).flatten()
    counts = torch.bincount(compact, minlength=window_ids.numel())
    length = int(counts.max())  # a host sync, like torch.unique's
    packed = 2 * length * length <= area * area
    if packed:
        order = torch.argsort(compact, stable=True)  # tokens grouped by window; rank: place within its window
        rank = torch.arange(order.numel(), device=rows.device) - (counts.cumsum(0) - counts)[compact[order]]
        scatter = torch.empty_like(order).index_put_((order,), compact[order] * length + rank)
    else:
        length, scatter = area, compact * area + position
    slots = window_ids.numel() * length
    filled = torch.zeros(slots, dtype=torch.bool, device=rows.device).index_fill_(0, scatter, True)
    true_slot = position.new_zeros(slots).index_copy(0, scatter, position).view(-1, length)  # empty slots: 0
    pairs = true_slot[:, :, None] * area + true_slot[:, None, :]
    bias = torch.zeros(pairs.shape, device=rows.device).masked_fill(~filled.view(-1, 1, length), HIDDEN_KEY_BIAS)
    if block.attn_mask is not None:
        region = block.attn_mask[window_ids % windows_per_image].flatten(1)
        bias = bias + region.gather(1, pairs.flatten(1)).view_as(bias)
    return WindowLayout(scatter=scatter, bias=bias, pairs=pairs if packed else None)


def visible_window_attention(attn: WindowAttention, x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """timm's WindowAttention with its own weights, the projections computed for visible tokens x [T, C] only.

    q, k, v are placed at their window slots (empty slots are zero and masked as keys), so only the small
    slot-by-slot products pay for the empty part of an occupied window; packed windows have few empty slots.
    """
    qkv = attn.qkv(x)
    windows, length = layout.bias.shape[:2]
    slots = qkv.new_zeros(windows * length, qkv.shape[-1]).index_copy(0, layout.scatter, qkv)
    head_dim = qkv.shape[-1] // (3 * attn.num_heads)
    q, k, v = slots.view(-1, length, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    relative = attn._get_rel_pos_bias()  # [1, heads, area, area]
    if layout.pairs is not None:  # torch.gather: on CPU its backward is far faster than advanced indexing's
        relative = relative.flatten(2)[0].t().gather(0, layout.pairs.view(-1, 1).expand(-1, attn.num_heads))
        relative = relative.view(*layout.pairs.shape, -1).permute(0, 3, 1, 2)
    bias = (relative + layout.bias.unsqueeze(1)).to(q.dtype)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        out = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(-1, attn.num_heads * head_dim)
    return attn.proj_drop(attn.proj(out.index_select(0, layout.scatter)))


def visible_block(block: SwinTransformerBlock, x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """timm's block on visible tokens x [B, N, C]: window attention over occupied windows, then the MLP."""
    batch, count, dim = x.shape
    attended = visible_window_attention(block.attn, block.norm1(x).reshape(-1, dim), layout)
    x = x + block.drop_path1(attended.view(batch, count, dim))
    return x + block.drop_path2(block.mlp(block.norm2(x)))


class VisibleSwin(nn.Module):
    """Wraps `timm.create_model(swin name)`: `model` holds exactly the timm weights; `forward_masked` encodes only the
    visible cells, so compute falls with the mask ratio. A `MaskedEncoder`: grid and positions refer to final-stage
    cells of `cell_px` pixels."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = check_swin(model)
        self.cell_px = output_stride(self.model)
        img = self.model.patch_embed.img_size
        self.grid = (img[0] // self.cell_px, img[1] // self.cell_px)
        self.num_cells = self.grid[0] * self.grid[1]
        self.embed_dim, self.num_prefix_tokens = self.model.num_features, 0
        for stage in self.model.layers:  # each block runs on visible tokens through its own method, which a
            for block in stage.blocks:  # strategy that shards blocks (FSDP) can gather around like `forward`
                block.forward_visible = MethodType(visible_block, block)

    @property
    def in_chans(self) -> int:
        return timm_in_chans(self.model)

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    def window_layouts(self, keep: torch.Tensor) -> Dict[Tuple, WindowLayout]:
        """The layout of every (stage, window size, shift) for the cells in `keep`, all built before any block runs:
        on a GPU their few host syncs (`torch.unique`) then wait only for the mask, not for encoder work."""
        rows, cols = keep // self.grid[1], keep % self.grid[1]
        tile, layouts = 2 ** num_merges(self.model), {}
        for index, stage in enumerate(self.model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                tile //= 2
            for block in stage.blocks:
                key = (index, block.window_size, block.shift_size)
                if key not in layouts:
                    layouts[key] = window_layout(block, rows, cols, tile)
        return layouts

    def forward_masked(self, images: torch.Tensor, keep: torch.Tensor) -> EncoderOutput:
        """Encode only the cells listed in `keep` [B, L] (final-grid indices); tokens stay in the order of `keep`.
        Honours timm's `set_grad_checkpointing()` per stage, like timm's own forward."""
        swin, (batch, length) = self.model, keep.shape
        layouts = self.window_layouts(keep)
        tile = 2 ** num_merges(swin)
        x = rearrange(swin.patch_embed(images), "b (h t1) (w t2) c -> b (h w) t1 t2 c", t1=tile, t2=tile)
        x = torch.gather(x, 1, keep.view(batch, length, 1, 1, 1).expand(-1, -1, *x.shape[2:]))
        for index, stage in enumerate(swin.layers):
            if not isinstance(stage.downsample, nn.Identity):
                x = stage.downsample(x.flatten(0, 1)).unflatten(0, (batch, length))
            shape = x.shape
            x = x.reshape(batch, -1, shape[-1])
            for block in stage.blocks:
                layout = layouts[index, block.window_size, block.shift_size]
                if stage.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block.forward_visible, x, layout, use_reentrant=False)
                else:
                    x = block.forward_visible(x, layout)
            x = x.view(shape)
        tokens = swin.norm(x.reshape(batch, length, -1))
        return EncoderOutput(tokens=tokens, positions=keep, prefix=tokens.new_zeros(batch, 0, tokens.shape[-1]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked features, exactly timm's `forward_features` (NHWC)."""
        return self.model.forward_features(images)

