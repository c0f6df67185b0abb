"""MIM decoders. The MAE decoder receives each encoded token with its grid position, so order can never be lost."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn

from mimswin.models.pos_embed import sincos_2d
from mimswin.models.tokens import gather_tokens, scatter_tokens


def decoder_trunk(dim: int, depth: int, heads: int, mlp_ratio: float, out_dim: int
                  ) -> Tuple[nn.Sequential, nn.LayerNorm, nn.Linear]:
    """The body every MAE decoder shares: timm Blocks (with qkv bias, as MAE), a final LayerNorm, the pixel head."""
    blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
    return blocks, nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out_dim)


def mae_init(root: nn.Module) -> None:
    """MAE's init: xavier-uniform linears and convs (weights as matrices), zero biases, unit LayerNorms."""
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def answers_for(pred: torch.Tensor, queries: Optional[torch.Tensor]) -> torch.Tensor:
    """Whole-grid predictions [B, N, D] -> those of the cells at `queries` [B, Q] (None: all of them)."""
    return pred if queries is None else gather_tokens(pred, queries)


class MAEDecoder(nn.Module):
    """Light transformer: embed, put tokens at their positions among mask tokens, add sin-cos pos, predict pixels."""

    answers_whole_grid = True  # it computes every cell whatever it is asked for

    def __init__(self, encoder_dim: int, grid: tuple[int, int], out_dim: int, dim: int = 512, depth: int = 8,
                 heads: int = 16, mlp_ratio: float = 4.0, prefix_tokens: int = 1) -> None:
        super().__init__()
        self.grid, self.prefix_tokens = grid, prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.register_buffer("pos_embed", sincos_2d(dim, grid, prefix_tokens).unsqueeze(0), persistent=False)
        self.blocks, self.norm, self.pred = decoder_trunk(dim, depth, heads, mlp_ratio, out_dim)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE init (`mae_init`) and an N(0, .02) mask token."""
        nn.init.normal_(self.mask_token, std=0.02)
        mae_init(self)

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1]

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (timm's switch name)."""
        self.grad_checkpointing = enable

    def place(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embedded visible tokens [B, L, dim] put at their grid positions; every other position is the mask token."""
        return scatter_tokens(tokens, positions, self.mask_token, self.num_cells)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, prefix: torch.Tensor,
                queries: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, L, E] at `positions` [B, L], prefix [B, P, E] -> predictions [B, Q, out_dim] for the cells at
        `queries` [B, Q] (None: every cell, [B, N, out_dim])."""
        grid = self.place(self.embed(tokens), positions) + self.pos_embed[:, self.prefix_tokens:]
        head = self.embed(prefix) + self.pos_embed[:, : self.prefix_tokens]
        x = torch.cat([head, grid], dim=1)
        x = checkpoint_seq(self.blocks, x) if self.grad_checkpointing else self.blocks(x)
        return answers_for(self.pred(self.norm(x))[:, self.prefix_tokens:], queries)
