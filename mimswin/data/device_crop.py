"""Random resized crop with its resize on the device (`data.resize: device`), and JPEG decoding there too
(`data.decode: device`).

A worker draws the crop box and the flip exactly as `transforms.RandomResizedCrop` + `RandomFlip` do (same torch RNG
draws, so a sample's crop depends on its seed only and resume stays exact), then hands over only the cut region in
the file's dtype (or, for a deferred JPEG, its undecoded bytes and the box). `resize_crops` then decodes what is
encoded, resizes every crop with the same antialiased bicubic as the worker path, clamps integer sources to their
range, and flips: on a GPU that is microseconds per image instead of most of a worker's time per image.
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence, Tuple, Union

import torch
from torch.nn import functional as nnf
from torchvision.io import ImageReadMode, decode_jpeg

from mimswin.data.pixels import INTEGER_RANGE, common_dtype, promote, to_float
from mimswin.data.transforms import RandomResizedCrop, Size

Box = Tuple[int, int, int, int]  # top, left, height, width


class Encoded(NamedTuple):
    """A gray or RGB JPEG left undecoded for the device: its bytes, and the channels, height and width it decodes
    to (read from its header)."""

    data: torch.Tensor
    channels: int
    height: int
    width: int

    @property
    def shape(self) -> Tuple[int, int, int]:
        return self.channels, self.height, self.width


class PendingCrop(NamedTuple):
    """A sample whose resize is left to the device: the cut region as H x W x C (rows copied out of the decoder's
    H x W x C buffer) or an `Encoded` JPEG, the box to cut from it, and the flip drawn."""

    source: Union[torch.Tensor, Encoded]
    box: Box
    flip: bool


class DeviceCrop:
    """The worker half of RandomResizedCrop(size, scale) + horizontal flip(p): draws the box and the flip, cuts the
    box out of decoded pixels (a deferred JPEG keeps its bytes and the box)."""

    def __init__(self, size: Size, scale: Sequence[float], hflip: float) -> None:
        self.crop, self.hflip = RandomResizedCrop(size, scale), hflip

    def __call__(self, image: Union[torch.Tensor, Encoded]) -> PendingCrop:
        _, height, width = image.shape
        top, left, h, w = self.crop.box(height, width)
        flip = bool(torch.rand(1) < self.hflip) if self.hflip > 0 else False
        if isinstance(image, Encoded):
            return PendingCrop(image, (top, left, h, w), flip)
        cut = image.permute(1, 2, 0)[top:top + h, left:left + w].contiguous()
        return PendingCrop(cut, (0, 0, h, w), flip)


class CropBatch(NamedTuple):
    """Pending crops packed into a few tensors (what crosses from the workers, pinned, to the device): decoded cuts
    flattened H x W x C into `pixels` (one promoted dtype) with their `shapes` [B, 3]; JPEG bytes back to back in
    `encoded` with their `lengths` [B]; `boxes` [B, 4] (top, left, height, width); `flips` [B]."""

    pixels: torch.Tensor
    shapes: torch.Tensor
    encoded: torch.Tensor
    lengths: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor

    @property
    def count(self) -> int:
        return self.flips.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes this batch moves to the device: the cuts and the JPEG bytes (boxes and flips are a few bytes)."""
        return self.pixels.numel() * self.pixels.element_size() + self.encoded.numel()

    def kept(self, drop: Sequence[int]) -> torch.Tensor:
        """[B] bool: False at the samples in `drop` (to drop the same ones from their labels)."""
        keep = torch.ones(self.count, dtype=torch.bool)
        keep[list(drop)] = False
        return keep

    def without(self, drop: Sequence[int]) -> "CropBatch":
        """The batch less the samples at `drop`."""
        keep = self.kept(drop)
        cut_sizes = self.shapes.prod(dim=1)
        pixels = [part for part, kept in zip(self.pixels.split(cut_sizes.tolist()), keep.tolist()) if kept]
        blobs = [part for part, kept in zip(self.encoded.split(self.lengths.tolist()), keep.tolist()) if kept]
        return CropBatch(torch.cat(pixels) if pixels else self.pixels[:0], self.shapes[keep],
                         torch.cat(blobs) if blobs else self.encoded[:0], self.lengths[keep], self.boxes[keep],
                         self.flips[keep])


class UndecodableJpegs(Exception):
    """Deferred JPEGs the device decoder refused (a header that parsed over a broken body): their batch indices."""

    def __init__(self, indices: List[int]) -> None:
        super().__init__(f"{len(indices)} JPEG(s) could not be decoded on the device")
        self.indices = indices


def pack_crops(crops: Sequence[PendingCrop]) -> CropBatch:
    """One `CropBatch` of pending crops; decoded cuts of different dtypes are promoted (never truncated) as
    `stack_samples` does."""
    cuts = [c.source for c in crops if isinstance(c.source, torch.Tensor)]
    dtype = common_dtype([cut.dtype for cut in cuts]) if cuts else torch.uint8
    pixels = torch.cat([promote(cut, dtype).reshape(-1) for cut in cuts]) if cuts else torch.empty(0, dtype=dtype)
    shapes = torch.tensor([tuple(c.source.shape) if isinstance(c.source, torch.Tensor) else (0, 0, 0) for c in crops],
                          dtype=torch.int64)
    blobs = [c.source.data for c in crops if isinstance(c.source, Encoded)]
    encoded = torch.cat(blobs) if blobs else torch.empty(0, dtype=torch.uint8)
    lengths = torch.tensor([c.source.data.numel() if isinstance(c.source, Encoded) else 0 for c in crops],
                           dtype=torch.int64)
    return CropBatch(pixels, shapes, encoded, lengths, torch.tensor([c.box for c in crops], dtype=torch.int64),
                     torch.tensor([c.flip for c in crops], dtype=torch.bool))


def decode_jpegs(batch: CropBatch, channels: int, device: torch.device) -> List[torch.Tensor]:
    """The batch's deferred JPEGs decoded on `device` as C x H x W uint8 (one batched nvJPEG call on a GPU; libjpeg on
    the CPU), in batch order. When the batched call fails, each is tried alone and `UndecodableJpegs` names the
    ones that fail."""
    lengths = batch.lengths.tolist()
    blobs = list(batch.encoded.split([n for n in lengths if n]))
    if not blobs:
        return []
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        return list(decode_jpeg(blobs, mode=mode, device=device))
    except RuntimeError:
        positions = [index for index, n in enumerate(lengths) if n]
        bad = [index for index, blob in zip(positions, blobs) if not decodes(blob, mode, device)]
        if not bad:
            raise
        raise UndecodableJpegs(bad) from None


def decodes(blob: torch.Tensor, mode: ImageReadMode, device: torch.device) -> bool:
    try:
        decode_jpeg(blob, mode=mode, device=device)
    except RuntimeError:
        return False
    return True


def value_range(dtype: torch.dtype) -> Tuple[float, float]:
    """The range of an integer dtype after `to_float` (uint8, uint16: [0, 1]; int16: [-32768 / 32767, 1])."""
    info = torch.iinfo(dtype)
    return info.min / INTEGER_RANGE[dtype], info.max / INTEGER_RANGE[dtype]


def resize_crops(batch: CropBatch, size: Size, channels: int, device: torch.device) -> torch.Tensor:
    """[B, C, H, W] float pixels on `device` (integers scaled by their range, as `to_float`): every crop cut and
    resized to `size` with antialiased bicubic, integer sources clamped to their range (the worker path rounds and
    clamps), flipped where drawn."""
    pixels = batch.pixels.to(device, non_blocking=True)
    decoded = iter(decode_jpegs(batch, channels, device))
    out = torch.empty(batch.count, channels, *size, device=device)
    offset = 0
    for index, ((h, w, c), (top, left, bh, bw)) in enumerate(zip(batch.shapes.tolist(), batch.boxes.tolist())):
        if h:
            image = pixels[offset:offset + h * w * c].view(h, w, c).permute(2, 0, 1)
            offset += h * w * c
        else:
            image = next(decoded)[:, top:top + bh, left:left + bw]
        resized = nnf.interpolate(to_float(image)[None], size=tuple(size), mode="bicubic", align_corners=False,
                                  antialias=True)[0]
        out[index] = resized if image.is_floating_point() else resized.clamp_(*value_range(image.dtype))
    return torch.where(batch.flips.to(device).view(-1, 1, 1, 1), out.flip(-1), out)
