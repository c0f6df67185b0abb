"""From worker samples to model input: collating samples into batches that count what was skipped, and the device
step (`DeviceStep`) that turns a native batch into what the model reads (the pixel contract of `pixels.py`)."""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from mimswin.data.device_crop import CropBatch, PendingCrop, UndecodableJpegs, pack_crops, resize_crops
from mimswin.data.pixels import REASONS, Skipped, stack_samples, to_float
from mimswin.data.transforms import Size
from mimswin.errors import DataError


class DeviceStep:
    """Native batch -> model input: to the device, to float (integers scaled by their range), normalized per channel.
    A `CropBatch` (pending crops, `data.resize: device`) is decoded, cut, resized to `size` and flipped there first.
    Checks the channel count, the one place every batch passes."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: Optional[Size] = None) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.channels, self.size = len(mean), size
        self._on: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: Union[torch.Tensor, CropBatch], device: torch.device) -> torch.Tensor:
        device = torch.device(device)
        if isinstance(images, CropBatch):
            cut_channels = set(images.shapes[images.shapes[:, 0] > 0, 2].tolist())
            if self.size is None or cut_channels - {self.channels}:
                raise DataError(f"data: crops of {sorted(cut_channels)} channel(s) reached a device step for "
                                f"{self.channels} channel(s) (data.channels) and output size {self.size}")
            pixels = resize_crops(images, self.size, self.channels, device)
        else:
            if images.dim() != 4 or images.shape[1] != self.channels:
                raise DataError(f"data: a batch of shape {tuple(images.shape)} reached the model, which reads "
                                f"{self.channels} channel(s) (data.channels)")
            pixels = to_float(images.to(device, non_blocking=True))
        if device not in self._on:
            self._on[device] = (self.mean.to(device), self.std.to(device))
        mean, std = self._on[device]
        return (pixels - mean) / std


def skip_counts(skipped: List[Skipped]) -> torch.Tensor:
    """Skips per reason (in `REASONS` order), a tensor that crosses DataLoader worker processes."""
    return torch.tensor([sum(s.reason == reason for s in skipped) for reason in REASONS], dtype=torch.int64)


def first_example(skipped: List[Skipped]) -> str:
    """'' or the first skipped sample, described, for an error that must name a file."""
    return skipped[0].describe() if skipped else ""


def unusable_batch(counts: Dict[str, int], example: str, what: str = "images") -> DataError:
    """The error for a batch in which no sample could be used: a wrong source or config, not a bad file."""
    reasons = ", ".join(f"{n} {reason}" for reason, n in counts.items() if n) or "no samples"
    where = f"; e.g. {example}" if example else ""
    return DataError(f"data: a whole batch of {what} could not be used ({reasons}){where}; check data.path / "
                     f"data.shards, data.channels and data.layout")


def counts_of(skips: torch.Tensor) -> Dict[str, int]:
    """A `skip_counts` tensor back to {reason: count} (non-zero ones)."""
    return {reason: n for reason, n in zip(REASONS, skips.tolist()) if n}


class Batch(NamedTuple):
    """What a loader worker hands over: the usable samples stacked (or packed as pending crops), their labels, skips
    per reason, one example."""

    images: Union[torch.Tensor, CropBatch]
    labels: torch.Tensor
    skips: torch.Tensor
    example: str


def collate_samples(items: Sequence[object]) -> Batch:
    """Stack the (sample, label) items (pending crops: pack them) and count the `Skipped` ones; an empty batch when
    none is usable."""
    skipped = [item for item in items if isinstance(item, Skipped)]
    kept = [item for item in items if not isinstance(item, Skipped)]
    if not kept:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.int64), skip_counts(skipped), first_example(skipped))
    samples = [image for image, _ in kept]
    images = pack_crops(samples) if isinstance(samples[0], PendingCrop) else stack_samples(samples)
    labels = torch.tensor([int(label) for _, label in kept], dtype=torch.int64)
    return Batch(images, labels, skip_counts(skipped), first_example(skipped))


def batch_count(images: Union[torch.Tensor, CropBatch]) -> int:
    """Samples in a worker batch, stacked or pending crops."""
    return images.count if isinstance(images, CropBatch) else images.shape[0]


def ready_batches(batches: Iterable[Batch], step: Optional[DeviceStep], device: torch.device,
                  skip_reasons: Counter) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Worker batches -> (model input, labels) on `device`, counting skips into `skip_reasons`; a batch with no usable
    sample stops with one error. `step` None: the items are not images (cached features), moved as they are."""
    for images, labels, skips, example in batches:
        skip_reasons.update(counts_of(skips))
        if batch_count(images) == 0:
            raise unusable_batch(counts_of(skips), example)
        if step is None:
            ready = images.to(device, non_blocking=True)
        else:
            ready, labels = device_ready(images, labels, step, device, skip_reasons)
        yield ready, labels.to(device, non_blocking=True)


def device_ready(images: Union[torch.Tensor, CropBatch], labels: torch.Tensor, step: DeviceStep,
                 device: torch.device, skip_reasons: Counter) -> Tuple[torch.Tensor, torch.Tensor]:
    """(model input, labels) of a worker batch; JPEGs the device could not decode are dropped and counted as
    unreadable (their headers parsed in the workers, their bodies did not)."""
    while True:
        try:
            return step(images, device), labels
        except UndecodableJpegs as err:
            skip_reasons["unreadable image"] += len(err.indices)
            images, labels = images.without(err.indices), labels[images.kept(err.indices)]
            if images.count == 0:
                raise unusable_batch({"unreadable image": len(err.indices)}, "") from None
