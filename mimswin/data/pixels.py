"""The pixel contract. A sample is a C x H x W tensor in its file's own dtype and units (uint8, uint16, int16 or
float32) until its batch reaches the device; there `batches.DeviceStep` turns it into what the model reads: float,
integer dtypes scaled by their range (as torchvision's `to_dtype(..., scale=True)`: uint8 / 255, uint16 / 65535, int16 /
32767), normalized per channel with `data.mean` / `data.std`. Batches travel compact (a uint8 batch is a quarter of a
float32 one) and nothing is stretched per image, so absolute intensities and 16-bit precision reach the model.

A sample that cannot honour the contract raises `SampleError` with one of `REASONS`; sources skip and count it.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

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
    if any(stride < 0 for stride in array.strides):
        array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # e.g. np.asarray of a PIL image: torch tensors must own writable memory
        array = array.copy(order="K")  # in its memory order: a C x H x W view of H x W x C pixels stays one memcpy
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
