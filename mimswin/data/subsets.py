"""Seeded, class-balanced subsets of a labeled split: the labeled part of a semi-supervised evaluation, and the
held-out part a probe picks its regularisation on. Each class is shuffled once per seed, so smaller subsets of the
same seed are nested in larger ones (the 1 % labels are among the 10 %)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from mimswin.config.evaluation import check_subset_size


def class_orders(labels: torch.Tensor, seed: int) -> List[torch.Tensor]:
    """For each class present (ascending), its sample indices in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        orders.append(members[torch.randperm(len(members), generator=generator)])
    return orders


def per_class_count(size: int, fraction: Optional[float], per_class: Optional[int]) -> int:
    if per_class is not None:
        return min(size, per_class)
    return min(size, max(1, round(fraction * size)))


def labeled_subset(labels: torch.Tensor, fraction: Optional[float] = None, per_class: Optional[int] = None,
                   seed: int = 0) -> torch.Tensor:
    """Sorted indices of a class-balanced subset: `per_class` samples of each class, or `fraction` of each (at least
    one). With neither, every index."""
    check_subset_size(fraction, per_class)
    if fraction is None and per_class is None:
        return torch.arange(len(labels))
    chosen = [order[:per_class_count(len(order), fraction, per_class)] for order in class_orders(labels, seed)]
    return torch.cat(chosen).sort().values


def balanced_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) sorted indices: `fraction` of each class held out, none from a class of one sample."""
    kept, held = [], []
    for order in class_orders(labels, seed):
        count = 0 if len(order) < 2 else min(len(order) - 1, max(1, round(fraction * len(order))))
        held.append(order[:count])
        kept.append(order[count:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values
