"""Patchify / unpatchify and the per-patch normalized pixel targets of MAE (einops, channel-last inside a patch)."""

from __future__ import annotations

import torch
from einops import rearrange

NORM_PIX_EPS = 1e-6


def patchify(images: torch.Tensor, px: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C] for squares of p = `px` pixels in raster order, pixels as (row, col, channel)."""
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=px, p2=px)


def unpatchify(patches: torch.Tensor, px: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: [B, N, p*p*C] -> [B, C, H, W] for a grid of (rows, cols) squares of `px` pixels."""
    return rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)",
                     h=grid[0], w=grid[1], p1=px, p2=px, c=channels)


def patch_stats(patches: torch.Tensor, eps: float = NORM_PIX_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std (unbiased variance, `(var + eps) ** .5`), each [B, N, 1]."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True, unbiased=True) + eps) ** 0.5
    return mean, std


def pixel_targets(images: torch.Tensor, px: int, norm_pix: bool = True) -> torch.Tensor:
    """Reconstruction targets: patchified pixels, each patch normalized by its own mean/std when `norm_pix`."""
    patches = patchify(images, px)
    if not norm_pix:
        return patches
    mean, std = patch_stats(patches)
    return (patches - mean) / std


def denormalize_prediction(pred: torch.Tensor, images: torch.Tensor, px: int) -> torch.Tensor:
    """Undo norm-pix on predicted patches with each target patch's own statistics (for pictures)."""
    mean, std = patch_stats(patchify(images, px))
    return pred * std + mean
