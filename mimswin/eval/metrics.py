"""Top-k accuracy and evaluation of a classifier over a dataset, exact under several processes."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mimswin.data.batches import DeviceStep
from mimswin.data.labeled import rank_loader
from mimswin.train.parallel import lockstep


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the k highest scores, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks]).to(torch.float64)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Top-1 and top-5 (%), k capped at the class count."""
    top1, top5 = (100.0 * topk_correct(logits, labels) / max(1, len(labels))).tolist()
    return {"top1": top1, "top5": top5}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, accelerator: Accelerator, batch_size: int, num_workers: int,
             step: Optional[DeviceStep], progress: bool = False) -> Dict[str, float]:
    """Loss, top-1 and top-5 (%) of `model` on every sample of `dataset` (images through the device `step`; None:
    cached features); each rank runs its share, sums are reduced."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    loader = rank_loader(dataset, batch_size, num_workers, accelerator.process_index, accelerator.num_processes, step,
                         accelerator.device)
    show = progress and accelerator.is_main_process
    for (images, labels), real in tqdm(lockstep(loader, accelerator, model), desc="eval", leave=False,
                                       disable=not show, dynamic_ncols=True):
        with accelerator.autocast():
            logits = model(images).float()
        if not real:  # a sharded model's extra forward, run so that every rank takes part
            continue
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        totals += torch.cat([loss[None], topk_correct(logits, labels).to(totals.device),
                             torch.tensor([labels.numel()], dtype=torch.float64, device=totals.device)])
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    count = max(1.0, totals[3].item())
    return {"loss": totals[0].item() / count, "top1": 100 * totals[1].item() / count,
            "top5": 100 * totals[2].item() / count, "count": int(totals[3].item())}
