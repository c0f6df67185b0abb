"""The cross-attention MAE decoder (CrossMAE, Fu et al. 2025): queries for the predicted positions only, each block
reading the visible tokens by cross-attention, with no attention among the queries, so its cost grows with the
number of predictions, not with the grid."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from timm.layers import Mlp
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from mimswin.models.decoders import mae_init
from mimswin.models.pos_embed import sincos_2d
from mimswin.models.tokens import gather_tokens


class CrossAttention(nn.Module):
    """Multi-head attention from queries x [B, Q, D] to a memory [B, S, D]: queries never attend to each other."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        batch, count, dim = x.shape
        head_dim = dim // self.heads
        q = self.q(x).view(batch, count, self.heads, head_dim).transpose(1, 2)  # [B, heads, Q, head_dim]
        kv = self.kv(memory).view(batch, memory.shape[1], 2, self.heads, head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, S, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, count, dim))


class CrossBlock(nn.Module):
    """One cross decoder block (pre-norm, as timm's Block): cross-attention of the queries to the memory, then an
    MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), memory)
        return x + self.mlp(self.norm2(x))


class CrossDecoder(nn.Module):
    """Reads the visible tokens and answers for the query positions: a query is the mask token plus the sin-cos
    position embedding of its cell; the visible tokens (and prefix) are embedded to the decoder width with their own
    cell's position embedding (prefix: none) and serve as every block's memory.

    `feature_count` 0: every block reads the encoder's output. k > 0: `forward` gets the outputs of k encoder blocks
    and each decoder block reads its own learned weighted sum of them, layer-normed (CrossMAE's inter-block readout;
    the weights start equal)."""

    answers_whole_grid = False  # asked for every hidden cell, it still computes those only

    def __init__(self, encoder_dim: int, grid: tuple[int, int], out_dim: int, dim: int = 512, depth: int = 8,
                 heads: int = 16, mlp_ratio: float = 4.0, prefix_tokens: int = 1, feature_count: int = 0) -> None:
        super().__init__()
        self.grid, self.prefix_tokens = grid, prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.register_buffer("pos_embed", sincos_2d(dim, grid, prefix_tokens), persistent=False)
        self.blocks = nn.ModuleList([CrossBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm, self.pred = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out_dim)
        if feature_count:
            self.feature_weights = nn.Parameter(torch.empty(depth, feature_count))
            self.feature_norms = nn.ModuleList([nn.LayerNorm(encoder_dim, eps=1e-6) for _ in range(depth)])
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE init (`mae_init`), an N(0, .02) mask token, equal feature weights."""
        nn.init.normal_(self.mask_token, std=0.02)
        mae_init(self)
        if hasattr(self, "feature_weights"):
            nn.init.constant_(self.feature_weights, 1.0 / self.feature_weights.shape[1])

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1]

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "feature_weights"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (timm's switch name)."""
        self.grad_checkpointing = enable

    def memory(self, sequence: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Encoder tokens [B, P + L, E] (prefix first, then the cells at `positions` [B, L]) -> the memory
        [B, P + L, dim]: embedded, each with its own position embedding."""
        batch = sequence.shape[0]
        cell_pos = gather_tokens(self.pos_embed[self.prefix_tokens:].expand(batch, -1, -1), positions)
        prefix_pos = self.pos_embed[: self.prefix_tokens].expand(batch, -1, -1)
        return self.embed(sequence) + torch.cat([prefix_pos, cell_pos], dim=1)

    def memories(self, tokens: torch.Tensor, positions: torch.Tensor, prefix: torch.Tensor,
                 features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """One memory per block: the encoder's output for all, or each block's own mix of `features`."""
        if not features:
            return [self.memory(torch.cat([prefix, tokens], dim=1), positions)] * len(self.blocks)
        mixed = torch.einsum("dk,kbse->dbse", self.feature_weights.to(features[0].dtype), torch.stack(list(features)))
        return [self.memory(norm(mix), positions) for norm, mix in zip(self.feature_norms, mixed)]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, prefix: torch.Tensor,
                queries: Optional[torch.Tensor] = None, features: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """tokens [B, L, E] at `positions` [B, L], prefix [B, P, E], `features` (k encoder blocks' outputs
        [B, P + L, E] each, when built with `feature_count` k) -> predictions [B, Q, out_dim] for the cells at
        `queries` [B, Q] (None: every cell of the grid)."""
        batch = tokens.shape[0]
        cell_pos = self.pos_embed[self.prefix_tokens:].expand(batch, -1, -1)
        x = self.mask_token + (cell_pos if queries is None else gather_tokens(cell_pos, queries))
        for block, memory in zip(self.blocks, self.memories(tokens, positions, prefix, features)):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, memory, use_reentrant=False)
            else:
                x = block(x, memory)
        return self.pred(self.norm(x))
