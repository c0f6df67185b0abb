"""Multinomial logistic regression on cached features, solved to convergence: a probe that measures the features, not
the optimizer. Features are standardized with the train statistics; full-batch L-BFGS minimises cross-entropy + an L2
penalty whose strength is picked on a seeded, class-balanced held-out part of the train split, then refit on all of it.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from mimswin.config.evaluation import L2_GRID
from mimswin.data.subsets import balanced_split
from mimswin.eval.metrics import topk_accuracy

STD_EPS = 1e-6


class Standardize(nn.Module):
    """x -> (x - mean) / std with fixed train statistics."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", features.mean(dim=0))
        self.register_buffer("std", features.std(dim=0).clamp_min(STD_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 300,
               init: nn.Linear | None = None) -> nn.Linear:
    """The linear layer minimising mean cross-entropy + l2/2 * |W|^2 on (x, y), by full-batch L-BFGS."""
    linear = nn.Linear(x.shape[1], num_classes).to(x.dtype)
    with torch.no_grad():
        if init is None:
            linear.weight.zero_()
            linear.bias.zero_()
        else:
            linear.load_state_dict(init.state_dict())
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(linear(x), y) + 0.5 * l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear.requires_grad_(False)


@torch.no_grad()
def _accuracy(linear: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return topk_accuracy(linear(x), y)["top1"]


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, l2_grid: Sequence[float] = L2_GRID,
              holdout: float = 0.1, seed: int = 0, max_iter: int = 300
              ) -> Tuple[Standardize, nn.Linear, float, Dict[str, float]]:
    """(standardization, linear layer on standardized features, picked L2 strength, held-out top-1 per strength)."""
    train_x = train_x.float()
    scale = Standardize(train_x)
    train_x = scale(train_x)
    fit_idx, held_idx = balanced_split(train_y, holdout, seed)
    strongest_first = sorted(l2_grid, reverse=True)  # each fit warm-starts the next, weaker one
    sweep: Dict[str, float] = {}
    linear = None
    for l2 in strongest_first:
        linear = fit_linear(train_x[fit_idx], train_y[fit_idx], num_classes, l2, max_iter, init=linear)
        sweep[f"{l2:g}"] = _accuracy(linear, train_x[held_idx], train_y[held_idx]) if len(held_idx) else 0.0
    best = max(strongest_first, key=lambda l2: sweep[f"{l2:g}"])
    return scale, fit_linear(train_x, train_y, num_classes, best, max_iter), best, sweep


def folded(scale: Standardize, linear: nn.Linear) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one linear layer on raw features equal to `linear(scale(x))`."""
    weight = linear.weight / scale.std
    return weight, linear.bias - weight @ scale.mean


def logistic_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                   num_classes: int, l2_grid: Sequence[float] = L2_GRID, holdout: float = 0.1,
                   seed: int = 0, max_iter: int = 300) -> Dict[str, object]:
    """Val top-1/top-5 (%) of the logistic probe, the picked L2 strength and each grid point's held-out top-1."""
    scale, linear, best, sweep = fit_probe(train_x, train_y, num_classes, l2_grid, holdout, seed, max_iter)
    with torch.no_grad():
        result = topk_accuracy(linear(scale(val_x.float())), val_y)
    return {**result, "l2": best, "holdout_top1": sweep}
