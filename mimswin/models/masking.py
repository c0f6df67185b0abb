"""Mask generators. A mask is a bool [B, N] tensor over the patch grid, True = hidden, with a fixed count per sample."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class MaskSample(NamedTuple):
    """`hidden[b, i]` is True where patch i of sample b is masked; `keep[b]` lists visible patch indices ascending;
    `predict[b]` the hidden patches the decoder reconstructs and the loss covers, ascending (None: every hidden one)."""

    hidden: torch.Tensor
    keep: torch.Tensor
    predict: Optional[torch.Tensor] = None

    @property
    def scored(self) -> torch.Tensor:
        """[B, N] bool: the patches the loss covers (the predicted subset, or every hidden patch)."""
        if self.predict is None:
            return self.hidden
        return torch.zeros_like(self.hidden).scatter_(1, self.predict, True)

    def hidden_positions(self) -> torch.Tensor:
        """[B, N - L] indices of every hidden patch, ascending (the count comes from `keep`: no host sync)."""
        count = self.hidden.shape[1] - self.keep.shape[1]
        return torch.argsort(self.hidden.to(torch.int8), dim=1, descending=True, stable=True)[:, :count]


def num_visible(num_cells: int, ratio: float) -> int:
    """Visible patches per sample for a mask ratio (MAE's rounding: int(N * (1 - ratio)), at least one)."""
    return max(1, int(num_cells * (1.0 - ratio)))


def random_mask(
    batch: int,
    num_cells: int,
    ratio: float,
    device: torch.device | str = "cpu",
    generator: Optional[torch.Generator] = None,
) -> MaskSample:
    """Per-sample uniform random masking by argsort of noise (MAE); made on `device`, no host sync."""
    keep_count = num_visible(num_cells, ratio)
    noise = torch.rand(batch, num_cells, device=device, generator=generator)
    keep = torch.argsort(noise, dim=1)[:, :keep_count].sort(dim=1).values
    hidden = torch.ones(batch, num_cells, dtype=torch.bool, device=device)
    hidden.scatter_(1, keep, False)
    return MaskSample(hidden=hidden, keep=keep)


def mask_from_hidden(hidden: torch.Tensor) -> MaskSample:
    """Build a MaskSample from a given bool mask with the same visible count in every row (tests, pictures)."""
    counts = (~hidden).sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every sample must have the same number of visible patches")
    keep = torch.argsort(hidden.to(torch.int8), dim=1, stable=True)[:, : int(counts[0])]
    return MaskSample(hidden=hidden, keep=keep)


def unit_mask(
    batch: int,
    grid: tuple[int, int],
    unit: int,
    ratio: float,
    device: torch.device | str = "cpu",
    generator: Optional[torch.Generator] = None,
) -> MaskSample:
    """Random masking of `unit` x `unit` blocks of grid cells (SimMIM's mask units), returned over the full grid."""
    rows, cols = grid
    if rows % unit or cols % unit:
        raise ValueError(f"mask unit of {unit} cells does not divide the {rows}x{cols} grid")
    if unit == 1:
        return random_mask(batch, rows * cols, ratio, device, generator)
    units = random_mask(batch, (rows // unit) * (cols // unit), ratio, device, generator)
    hidden = units.hidden.view(batch, rows // unit, 1, cols // unit, 1).expand(-1, -1, unit, -1, unit)
    hidden = hidden.reshape(batch, rows * cols)
    keep = torch.argsort(hidden.to(torch.int8), dim=1, stable=True)[:, : units.keep.shape[1] * unit * unit]
    return MaskSample(hidden=hidden, keep=keep)


def with_predicted_subset(mask: MaskSample, ratio: float, generator: Optional[torch.Generator] = None) -> MaskSample:
    """`mask` with `predict` drawn: per sample, `int(hidden * ratio)` (at least one) of its hidden patches, uniformly
    from `generator` (the step's RNG when None, so a resumed run draws the same); ratio 1 draws nothing."""
    if ratio >= 1.0:
        return mask
    hidden_count = mask.hidden.shape[1] - mask.keep.shape[1]
    count = max(1, int(hidden_count * ratio)) if hidden_count else 0
    noise = torch.rand(mask.hidden.shape, device=mask.hidden.device, generator=generator)
    noise = noise.masked_fill(~mask.hidden, 2.0)  # visible patches sort last: never predicted
    return mask._replace(predict=torch.argsort(noise, dim=1)[:, :count].sort(dim=1).values)
