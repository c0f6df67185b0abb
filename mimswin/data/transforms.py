"""MIM augmentations: random resized crop + flip for training, resize + center crop for pictures and evaluation."""

from __future__ import annotations

from typing import Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode


def pretrain_transform(img_size: int, crop_scale: Sequence[float], hflip: float,
                       mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """MAE's augmentation: RandomResizedCrop(scale) + horizontal flip, then normalize."""
    steps = [T.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC)]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0) -> T.Compose:
    """Deterministic view: resize the short side to img_size / crop_pct, center crop, normalize."""
    return T.Compose([
        T.Resize(int(round(img_size / crop_pct)), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(img_size), T.ToTensor(), T.Normalize(mean, std),
    ])
