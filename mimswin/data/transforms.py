"""Augmentations on C x H x W tensors in their own dtype (any channel count, 8/16-bit or float), made in the loader's
workers: random resized crop + flip for training, resize + center crop for pictures and evaluation. Conversion to
float and normalization happen later, on the device (`batches.DeviceStep`). Sizes are (height, width).

Colour operations (RandAugment, colour jitter) exist for 8-bit RGB only; the configs refuse them for other channel
counts and a sample of another dtype is skipped with the reason.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from mimswin.data.pixels import SampleError

Size = Tuple[int, int]
ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
POSTERIZE_MAX_MAGNITUDE = 9.99


def resize(image: torch.Tensor, size: Size) -> torch.Tensor:
    """Antialiased bicubic resize in the image's own dtype. uint8 and float through torchvision directly (uint8
    rounded and clamped as PIL does); 16-bit integers through float32, rounded and clamped to their range (torchvision's
    own 16-bit path wraps the bicubic overshoot around)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if image.dtype in (torch.uint8, torch.float32):
        return F.resize(image, list(size), InterpolationMode.BICUBIC, antialias=True)
    info = torch.iinfo(image.dtype)
    resized = F.resize(image.float(), list(size), InterpolationMode.BICUBIC, antialias=True)
    return resized.round_().clamp_(info.min, info.max).to(image.dtype)


class RandomResizedCrop:
    """torchvision's RandomResizedCrop for tensors of any dtype: the same box draws (area fraction in `scale`,
    log-uniform aspect ratio, from the torch RNG that each sample's seed sets), the aspect range centred on the output's
    own aspect so a non-square output is not stretched on average."""

    def __init__(self, size: Size, scale: Sequence[float], ratio: Sequence[float] = ASPECT_RANGE) -> None:
        aspect = size[1] / size[0]
        self.size, self.scale = tuple(size), list(scale)
        self.ratio = [ratio[0] * aspect, ratio[1] * aspect]

    def box(self, height: int, width: int) -> Tuple[int, int, int, int]:
        """(top, left, height, width) of a crop of an image of this size: torchvision's draws, which read only the
        size (an empty stand-in of that shape, so a JPEG not yet decoded gets the same box)."""
        return tuple(T.RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(1, height, width), self.scale,
                                                    self.ratio))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, height, width = self.box(*image.shape[-2:])
        return resize(image[..., top:top + height, left:left + width], self.size)


class RandomFlip:
    """Horizontal flip with probability `p` (one draw per sample, as torchvision's)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.flip(-1) if torch.rand(1) < self.p else image


class CenterView:
    """The deterministic view: resize so that the image covers `size` / `crop_pct` (aspect kept), center crop `size`."""

    def __init__(self, size: Size, crop_pct: float = 1.0) -> None:
        self.size, self.crop_pct = tuple(size), crop_pct

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        (target_h, target_w), pct = self.size, self.crop_pct
        if target_h / height >= target_w / width:  # height is the binding side: match it, width follows (torchvision)
            new_h = int(round(target_h / pct))
            new_w = max(int(round(target_w / pct)), int(new_h * width / height))
        else:
            new_w = int(round(target_w / pct))
            new_h = max(int(round(target_h / pct)), int(new_w * height / width))
        return F.center_crop(resize(image, (new_h, new_w)), list(self.size))


class Rgb8Only:
    """Runs a PIL or uint8 colour operation on an 8-bit RGB sample; any other sample is a `SampleError` naming `key`."""

    def __init__(self, operation: Callable, key: str, on_pil: bool) -> None:
        self.operation, self.key, self.on_pil = operation, key, on_pil

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8 or image.shape[0] != 3:
            raise SampleError("unsupported pixels", f"{self.key} works on 8-bit RGB, got {image.shape[0]} channel(s) "
                                                    f"of {str(image.dtype).replace('torch.', '')}")
        if not self.on_pil:
            return self.operation(image)
        return F.pil_to_tensor(self.operation(F.to_pil_image(image)))


def pretrain_transform(size: Size, crop_scale: Sequence[float], hflip: float) -> T.Compose:
    """MAE's augmentation: RandomResizedCrop(scale) + horizontal flip, in the sample's own dtype."""
    steps: list = [RandomResizedCrop(size, crop_scale)]
    if hflip > 0:
        steps.append(RandomFlip(hflip))
    return T.Compose(steps)


def eval_transform(size: Size, crop_pct: float = 1.0) -> CenterView:
    """Deterministic view for evaluation and pictures."""
    return CenterView(size, crop_pct)


def rand_augment(config: str, size: Size, mean: Sequence[float]) -> Callable:
    """timm's RandAugment as timm's training transform builds it (translate 45 % of the short side, fill with the
    mean colour, bicubic). At magnitude 10 its PosterizeIncreasing asks Pillow to keep 0 bits, which Pillow >= 11
    refuses; its magnitude is capped just below 10 (1 bit kept, where old Pillow returned a black image)."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    params = dict(translate_const=int(min(size) * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean),
                  interpolation=str_to_pil_interp("bicubic"))
    augment = rand_augment_transform(config, params)
    for op in augment.ops:
        if op.name.startswith("Posterize"):
            op.magnitude_max = POSTERIZE_MAX_MAGNITUDE
    return augment


def finetune_transform(size: Size, crop_scale: Sequence[float], hflip: float, auto_augment: Optional[str],
                       color_jitter: Optional[float], mean: Sequence[float]) -> T.Compose:
    """Fine-tuning's sample augmentation: random resized crop, flip, then RandAugment or colour jitter (8-bit RGB
    only). Random erasing and Mixup/CutMix work on whole normalized batches on the device (see programs/finetune)."""
    steps = pretrain_transform(size, crop_scale, hflip).transforms
    if auto_augment:
        steps.append(Rgb8Only(rand_augment(auto_augment, size, mean), "aug.auto_augment", on_pil=True))
    elif color_jitter:
        steps.append(Rgb8Only(T.ColorJitter(color_jitter, color_jitter, color_jitter), "aug.color_jitter",
                              on_pil=False))
    return T.Compose(steps)

