"""Online probe: a linear classifier on the pooled encoder features of the visible tokens, trained alongside
pretraining on detached features, so it watches the encoder learn without steering it (no gradient reaches the
encoder). Its loss joins the pretraining loss with value zero (`ce - ce.detach()`): the logged loss stays the MIM loss
while the head still gets its gradient from the one backward pass and the one optimizer step."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

HEAD_INIT_STD = 0.01
BN_EPS = 1e-6


class OnlineProbe(nn.Module):
    """BatchNorm1d without affine parameters + Linear (MAE's linear-probe head) on detached pooled features."""

    def __init__(self, dim: int, num_classes: int, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=BN_EPS)
        with torch.random.fork_rng(devices=[]):  # adding a probe leaves the run's global RNG stream alone
            self.linear = nn.Linear(dim, num_classes)
        with torch.no_grad():  # drawn from its own generator
            self.linear.weight.normal_(0.0, HEAD_INIT_STD, generator=generator).clamp_(-2 * HEAD_INIT_STD,
                                                                                      2 * HEAD_INIT_STD)
            self.linear.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features.detach().float()))


def probe_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labeled samples (label >= 0), 0 when there are none; no host sync."""
    total = nn.functional.cross_entropy(logits, labels, ignore_index=-1, reduction="sum")
    return total / (labels >= 0).sum().clamp_min(1)


PROBE_ATTRIBUTE = "online_probe"  # where a method holds its probe: its weights are `online_probe.*` in checkpoints


def with_online_probe(method: nn.Module, loss: torch.Tensor, pooled: Callable[[], torch.Tensor],
                      labels: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(the method's loss, plus the probe's zero-valued term when labels are given; the probe's logits, or None
    without a probe). `pooled` gives the encoder's pooled features of this forward, only called with a probe."""
    probe = getattr(method, PROBE_ATTRIBUTE, None)
    if probe is None:
        return loss, None
    logits = probe(pooled())
    if labels is None:
        return loss, logits
    ce = probe_loss(logits, labels)
    return loss + (ce - ce.detach()), logits
