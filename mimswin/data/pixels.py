"""The pixel contract. A sample is a C x H x W tensor in its file's own dtype and units (uint8, uint16, int16 or
float32) until its batch reaches the device; there `DeviceStep` turns it into what the model reads: float, integer
dtypes scaled by their range (as torchvision's `to_dtype(..., scale=True)`: uint8 / 255, uint16 / 65535, int16 /
32767), normalized per channel with `data.mean` / `data.std`. Batches travel compact (a uint8 batch is a quarter of a
float32 one) and nothing is stretched per image, so absolute intensities and 16-bit precision reach the model.

A sample that cannot honour the contract raises `SampleError` with one of `REASONS`; sources skip and count it.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from mimswin.errors import DataError

# Why a sample was skipped; counted per reason and carried from loader workers to the main process in this order.
REASONS = ("unreadable image", "wrong channels", "non-finite values", "unsupported pixels", "ambiguous layout",
           "no image", "bad label", "no label", "unreadable shard")
NATIVE = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.uint16, np.dtype(np.int16): torch.int16,
          np.dtype(np.float32): torch.float32}
WIDENED = {np.dtype(np.bool_): np.uint8, np.dtype(np.float16): np.float32, np.dtype(np.float64): np.float32}
INTEGER_RANGE = {torch.uint8: 255.0, torch.uint16: 65535.0, torch.int16: 32767.0}


class SampleError(Exception):
    """One sample cannot be used; `reason` is one of `REASONS`, `detail` says what was found."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class Skipped(NamedTuple):
    """What a source returns in place of a sample it could not use."""

    reason: str
    source: str
    detail: str = ""

    def describe(self) -> str:
        return f"{self.source} ({self.reason}: {self.detail})" if self.detail else f"{self.source} ({self.reason})"


def native_tensor(array: np.ndarray) -> torch.Tensor:
    """A C x H x W array -> a tensor of one of the native dtypes: bool -> uint8 (0/1 as 0/255), float16/float64 ->
    float32; float samples holding NaN or Inf and other dtypes (int32, complex, ...) raise `SampleError`."""
    array = array.astype(array.dtype.newbyteorder("="), copy=False)  # big-endian files (16-bit PNG, FITS-like arrays)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype in WIDENED:
        array = array.astype(WIDENED[array.dtype])
    dtype = NATIVE.get(array.dtype)
    if dtype is None:
        raise SampleError("unsupported pixels", f"pixel type {array.dtype} (read: uint8, uint16, int16, float)")
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # e.g. np.asarray of a PIL image: torch tensors must own writable memory
        array = array.copy()
    if dtype == torch.float32 and not np.isfinite(array).all():
        raise SampleError("non-finite values", "NaN or Inf pixels")
    return torch.from_numpy(array)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """float32 pixels; integer dtypes divided by their range (so 8-bit images land in [0, 1] as ToTensor did)."""
    scale = INTEGER_RANGE.get(images.dtype)
    return images.float() if scale is None else images.float() / scale


def common_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype a batch of these sample dtypes is stacked in without losing anything: the one dtype they share;
    uint16 for uint8 + uint16 (exact: x 257); float32 for any other mix."""
    kinds = set(dtypes)
    if len(kinds) == 1:
        return dtypes[0]
    return torch.uint16 if kinds == {torch.uint8, torch.uint16} else torch.float32


def promote(sample: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A sample in `dtype` with the same meaning after `to_float` (uint8 -> uint16 x 257; -> float32 scaled)."""
    if sample.dtype == dtype:
        return sample
    if dtype == torch.uint16:
        return (sample.to(torch.int32) * 257).to(torch.uint16)
    return to_float(sample)


def stack_samples(samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """One batch of C x H x W samples, promoted (never truncated) to a common dtype when they differ."""
    dtype = common_dtype([s.dtype for s in samples])
    return torch.stack([promote(s, dtype) for s in samples])


class DeviceStep:
    """Native batch -> model input: to the device, to float (integers scaled by their range), normalized per channel.
    Checks the channel count, the one place every batch passes."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.channels = len(mean)
        self._on: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise DataError(f"data: a batch of shape {tuple(images.shape)} reached the model, which reads "
                            f"{self.channels} channel(s) (data.channels)")
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = (self.mean.to(device), self.std.to(device))
        mean, std = self._on[device]
        return (to_float(images.to(device, non_blocking=True)) - mean) / std


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
    """What a loader worker hands over: the usable samples stacked, their labels, skips per reason, one example."""

    images: torch.Tensor
    labels: torch.Tensor
    skips: torch.Tensor
    example: str


def collate_samples(items: Sequence[object]) -> Batch:
    """Stack the (sample, label) items and count the `Skipped` ones; an empty batch when none is usable."""
    skipped = [item for item in items if isinstance(item, Skipped)]
    kept = [item for item in items if not isinstance(item, Skipped)]
    if not kept:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.int64), skip_counts(skipped), first_example(skipped))
    images = stack_samples([image for image, _ in kept])
    labels = torch.tensor([int(label) for _, label in kept], dtype=torch.int64)
    return Batch(images, labels, skip_counts(skipped), first_example(skipped))


def ready_batches(batches: Iterable[Batch], step: Optional[DeviceStep], device: torch.device,
                  skip_reasons: Counter) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Worker batches -> (model input, labels) on `device`, counting skips into `skip_reasons`; a batch with no usable
    sample stops with one error. `step` None: the items are not images (cached features), moved as they are."""
    for images, labels, skips, example in batches:
        skip_reasons.update(counts_of(skips))
        if images.shape[0] == 0:
            raise unusable_batch(counts_of(skips), example)
        ready = images.to(device, non_blocking=True) if step is None else step(images, device)
        yield ready, labels.to(device, non_blocking=True)
