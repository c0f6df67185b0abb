"""Reconstruction pictures: original | masked | reconstruction | reconstruction with the visible patches pasted."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torchvision.utils import make_grid

from mimswin.models.patches import denormalize_prediction, unpatchify
from mimswin.runs.files import atomic_write_bytes

PICTURE_MASK_SEED = 0
LEGIBLE_SIDE = 96  # tiles smaller than this are upscaled (nearest neighbour, whole factors) to at least this side


@torch.no_grad()
def reconstruction_grid(method: torch.nn.Module, images: torch.Tensor, mean: Sequence[float],
                        std: Sequence[float]) -> torch.Tensor:
    """A [3, H, W] picture in [0, 1], one row per image; norm-pix predictions are un-normalized patch by patch.
    Gray inputs (three equal channels) are shown with gray reconstructions (the channel mean of the prediction);
    images under 96 px are upscaled by a whole factor so the grid is legible."""
    was_training = method.training
    method.eval()
    generator = torch.Generator(images.device).manual_seed(PICTURE_MASK_SEED)
    mask = method.draw_mask(images.shape[0], images.device, generator)
    out = method(images, mask)
    pred = denormalize_prediction(out.pred.float(), images, method.target_px) if method.norm_pix else out.pred
    channels, p = images.shape[1], method.target_px
    recon = unpatchify(pred.float(), p, method.grid, channels)
    hidden = unpatchify(mask.hidden[..., None].expand(-1, -1, p * p * channels).float(), p, method.grid, channels)
    method.train(was_training)

    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)

    original = (images * std_t + mean_t).clamp(0, 1)
    gray = channels == 3 and bool((original == original[:, :1]).all())

    def show(x: torch.Tensor) -> torch.Tensor:
        x = (x * std_t + mean_t).clamp(0, 1)
        return x.mean(dim=1, keepdim=True).expand_as(x) if gray else x

    masked = original * (1 - hidden) + 0.5 * hidden
    columns = [original, masked, show(recon), show(images * (1 - hidden) + recon * hidden)]
    tiles = torch.stack(columns, dim=1).flatten(0, 1)
    factor = -(-LEGIBLE_SIDE // min(tiles.shape[-2:]))
    if factor > 1:
        tiles = tiles.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return make_grid(tiles.cpu(), nrow=len(columns), padding=2, pad_value=1.0)


def save_png(picture: torch.Tensor, path: Path) -> None:
    """[3, H, W] in [0, 1] -> PNG, written atomically."""
    array = (picture.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
