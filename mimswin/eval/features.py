"""Features of a frozen encoder over a whole dataset, computed once and shared by every process."""

from __future__ import annotations

from typing import Tuple

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mimswin.eval.data import rank_loader


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: Dataset, accelerator: Accelerator, batch_size: int,
                     num_workers: int, progress: bool = False, desc: str = "features"
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32, labels [N]) of every sample on every rank, in dataset order (unreadable ones skipped).

    Each rank encodes its share (indices rank, rank + world, ...); the shares are padded, gathered and interleaved back.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    loader = rank_loader(dataset, batch_size, num_workers, accelerator.process_index, accelerator.num_processes)
    show = progress and accelerator.is_main_process
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True):
        with accelerator.autocast():
            feats.append(encoder(images.to(accelerator.device)).float())
        labels.append(targets.to(accelerator.device))
    encoder.train(was_training)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    local_f, local_y = torch.cat(feats), torch.cat(labels)
    if accelerator.num_processes == 1:
        return local_f.cpu(), local_y.cpu()
    count = torch.tensor([len(local_y)], device=accelerator.device)
    counts = accelerator.gather(count).tolist()
    padded_f = accelerator.pad_across_processes(local_f, dim=0)
    padded_y = accelerator.pad_across_processes(local_y, dim=0, pad_index=-1)
    width = padded_f.shape[0]
    all_f = accelerator.gather(padded_f).reshape(len(counts), width, -1).transpose(0, 1)
    all_y = accelerator.gather(padded_y).reshape(len(counts), width).transpose(0, 1)
    valid = torch.arange(width, device=all_y.device)[:, None] < torch.tensor(counts, device=all_y.device)[None, :]
    return all_f[valid].cpu(), all_y[valid].cpu()
