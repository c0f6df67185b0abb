"""Moving tokens between the full patch grid and the visible subset, by explicit grid positions."""

from __future__ import annotations

import torch


def gather_tokens(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D], positions [B, L] -> [B, L, D] with row l = tokens[b, positions[b, l]]."""
    return torch.gather(tokens, 1, positions.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(tokens: torch.Tensor, positions: torch.Tensor, fill: torch.Tensor,
                   num_positions: int) -> torch.Tensor:
    """tokens [B, L, D] placed at `positions` of a [B, N, D] grid whose other entries are `fill` [D]."""
    batch, _, dim = tokens.shape
    grid = fill.to(tokens.dtype).expand(batch, num_positions, dim)
    return grid.scatter(1, positions.unsqueeze(-1).expand(-1, -1, dim), tokens)
