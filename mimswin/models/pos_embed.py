"""Fixed 2-D sine-cosine position embeddings (MAE layout: first half encodes columns, second half rows)."""

from __future__ import annotations

import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.flatten().to(torch.float64)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], prefix_tokens: int = 0) -> torch.Tensor:
    """[prefix + rows*cols, dim] float32 table; prefix (cls) rows are zero."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    table = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    return torch.cat([torch.zeros(prefix_tokens, dim, dtype=torch.float64), table]).float()
