"""Reconstruction pictures: original | masked | reconstruction | reconstruction with the visible patches pasted.
Cells the decoder did not predict (a cross decoder answers for hidden cells only, and with `decoder.predict_ratio` < 1
for a subset of them) are mid-gray, as the hidden cells of the masked column."""

from __future__ import annotations

import io
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.utils import make_grid

from mimswin.models.patches import denormalize_prediction, unpatchify
from mimswin.runs.files import atomic_write_bytes

PICTURE_MASK_SEED = 0
LEGIBLE_SIDE = 96  # tiles whose short side is under this are upscaled (nearest neighbour, whole factors) to reach it
LARGEST_SIDE = 384  # tiles whose long side is over this are scaled down (area) to it
STRETCH_PERCENTILES = (0.01, 0.99)
QUANTILE_VALUES = 2 ** 20


def default_bands(channels: int) -> Optional[List[int]]:
    """The channels a picture shows when `vis.bands` is unset: None (the image as it is) for gray and RGB, the first
    three for more, [0, 1, 0] for two."""
    if channels in (1, 3):
        return None
    return [0, 1, 0] if channels == 2 else [0, 1, 2]


def stretch_limits(original: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the 1st and 99th percentiles of the original images [B, C, H, W] (shared by every column, so the
    reconstruction is shown on the original's scale)."""
    values = original.transpose(0, 1).flatten(1).float()
    values = values[:, ::max(1, values.shape[1] // QUANTILE_VALUES)]  # torch.quantile takes at most 2^24 values
    low, high = torch.quantile(values, torch.tensor(STRETCH_PERCENTILES), dim=1).view(2, 1, -1, 1, 1)
    return low[0], torch.maximum(high[0], low[0] + 1e-6)


def display(x: torch.Tensor, bands: Optional[List[int]], limits: Optional[tuple]) -> torch.Tensor:
    """Pixels in the loader's units [B, C, H, W] -> RGB in [0, 1]: as they are (clamped) without `bands`, else the
    chosen channels, each stretched between its own percentile limits (one band: gray)."""
    if bands is None:
        shown = x.clamp(0, 1)
        return shown.expand(-1, 3, -1, -1) if shown.shape[1] == 1 else shown
    low, high = limits
    shown = ((x - low) / (high - low)).clamp(0, 1)[:, bands]
    return shown.expand(-1, 3, -1, -1) if len(bands) == 1 else shown


def legible(tiles: torch.Tensor) -> torch.Tensor:
    """Tiles [N, 3, H, W] at a size a person can read: small ones upscaled by a whole factor, large ones scaled down."""
    short, long = min(tiles.shape[-2:]), max(tiles.shape[-2:])
    factor = -(-LEGIBLE_SIDE // short)
    if factor > 1 and long * factor <= 4 * LARGEST_SIDE:
        return tiles.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    if long > LARGEST_SIDE:
        size = [max(1, round(side * LARGEST_SIDE / long)) for side in tiles.shape[-2:]]
        return F.interpolate(tiles, size=size, mode="area")
    return tiles


@torch.no_grad()
def reconstruction_grid(method: torch.nn.Module, images: torch.Tensor, mean: Sequence[float],
                        std: Sequence[float], bands: Optional[Sequence[int]] = None,
                        stretch: bool = False) -> torch.Tensor:
    """A [3, H, W] picture in [0, 1], one row per image (model input, normalized); norm-pix predictions are
    un-normalized patch by patch. 8-bit gray and RGB images are shown as they are (gray inputs in three equal channels
    with gray reconstructions); other channel counts in false colour from `bands` (default: the first three), and with
    `stretch` (pixels that are not 8-bit: 16-bit counts fill a few % of their range) gray and RGB too, each band
    stretched between its own percentiles. Cells without a prediction (`MIMOutput.answered`) are mid-gray in the two
    reconstruction columns. Tiles are scaled to a legible size."""
    was_training = method.training
    method.eval()
    generator = torch.Generator(images.device).manual_seed(PICTURE_MASK_SEED)
    mask = method.draw_mask(images.shape[0], images.device, generator)
    out = method(images, mask)
    pred = denormalize_prediction(out.pred.float(), images, method.target_px) if method.norm_pix else out.pred
    channels, p = images.shape[1], method.target_px
    recon = unpatchify(pred.float(), p, method.grid, channels)

    def cell_map(cells: torch.Tensor) -> torch.Tensor:  # [B, N] bool -> [B, C, H, W] float, 1 on those cells
        return unpatchify(cells[..., None].expand(-1, -1, p * p * channels).float(), p, method.grid, channels)

    hidden = cell_map(mask.hidden)
    unanswered = cell_map(~out.answered)[:, :1].expand(-1, 3, -1, -1) if out.answered is not None else None
    method.train(was_training)

    mean_t = torch.tensor(list(mean), device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), device=images.device).view(1, -1, 1, 1)
    original = images * std_t + mean_t
    chosen = list(bands) if bands is not None else default_bands(channels)
    if chosen is None and stretch:
        chosen = list(range(channels))
    limits = stretch_limits(original) if chosen is not None else None
    gray = channels == 3 and chosen is None and bool(((original - original[:, :1]).abs() < 1e-4).all())

    def show(normalized: torch.Tensor) -> torch.Tensor:
        shown = display(normalized * std_t + mean_t, chosen, limits)
        return shown.mean(dim=1, keepdim=True).expand_as(shown) if gray else shown

    hidden_rgb = hidden[:, :1].expand(-1, 3, -1, -1)
    first = show(images)
    masked = first * (1 - hidden_rgb) + 0.5 * hidden_rgb
    columns = [first, masked, show(recon), show(images * (1 - hidden) + recon * hidden)]
    if unanswered is not None:
        columns[2] = columns[2] * (1 - unanswered) + 0.5 * unanswered
        blank = unanswered * hidden_rgb  # the pasted column keeps its visible cells
        columns[3] = columns[3] * (1 - blank) + 0.5 * blank
    tiles = legible(torch.stack(columns, dim=1).flatten(0, 1).float().cpu())
    return make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0)


def save_png(picture: torch.Tensor, path: Path) -> None:
    """[3, H, W] in [0, 1] -> PNG, written atomically."""
    array = (picture.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
