"""LP-FT (Kumar et al., 2022): before fine-tuning, the classifier's last layer is set to the logistic probe of the
frozen pre-logits features, so training starts from a working head instead of distorting the pretrained features
with the gradients of a random one. It matters most for short fine-tunes of small data sets."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import Dataset

from mimswin.data.batches import DeviceStep
from mimswin.eval.features import extract_features
from mimswin.eval.logistic import fit_probe, folded


class PreLogits(nn.Module):
    """A timm classifier's input to its last layer (pooling, fc_norm and all)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


@torch.no_grad()
def probe_initialised_head(model: nn.Module, dataset: Dataset, num_classes: int, accelerator: Accelerator,
                           batch_size: int, num_workers: int, step: DeviceStep, seed: int = 0) -> float:
    """Set `model.get_classifier()` to the logistic probe of the frozen pre-logits on `dataset` (un-augmented);
    every rank fits the same probe on the same gathered features. Returns the picked L2 strength."""
    device = next(model.parameters()).device
    features, labels = extract_features(PreLogits(model).to(accelerator.device), dataset, accelerator,
                                        batch_size, num_workers, step, desc="head features")
    model.to(device)
    scale, linear, l2, _ = fit_probe(features, labels, num_classes, seed=seed)
    weight, bias = folded(scale, linear)
    head = model.get_classifier()
    head.weight.copy_(weight.to(head.weight))
    head.bias.copy_(bias.to(head.bias))
    return l2
