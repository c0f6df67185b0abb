"""Labeled data for evaluation: one dispatch from `data.path` to a (train, val) pair of map-style datasets.

- no path: the embedded MNIST-5k with its fixed seeded train/val split;
- a folder with `train/` and `val/` subfolders, each holding one subfolder per class;
- webdataset shards (`*.tar` or a brace pattern) plug in here once `mimswin.data.shards` reads labeled shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from mimswin.config import DataConfig
from mimswin.data.build import EpochLoader
from mimswin.data.sampler import ResumableDistributedSampler
from mimswin.data.sources import EmbeddedMNIST, ImageFolder, collate_skipping_none
from mimswin.errors import DataError


def is_shard_spec(path: str) -> bool:
    """Whether `data.path` names webdataset shards rather than an image folder."""
    return path.endswith(".tar") or "{" in path or "::" in path


def labeled_source(cfg: DataConfig, split: str, transform: Callable) -> Tuple[Dataset, List[str]]:
    """The labeled split ('train' or 'val') of the configured source, and its class names."""
    if cfg.path is None:
        dataset = EmbeddedMNIST(split, transform)
        return dataset, dataset.classes
    if is_shard_spec(cfg.path):
        raise DataError(f"data.path '{cfg.path}': evaluation on webdataset shards needs a labeled shard reader "
                        "(mimswin.data.shards), not available in this version; use an image folder")
    root = Path(cfg.path).expanduser() / split
    if not root.is_dir():
        raise DataError(f"data.path: '{root}' is not a directory; labeled data needs train/ and val/ subfolders, "
                        "each with one subfolder per class")
    dataset = ImageFolder(root, transform)
    if not dataset.classes or any(label < 0 for _, label in dataset.samples):
        raise DataError(f"data.path: '{root}' has images outside class subfolders; put each class in its own folder")
    return dataset, dataset.classes


def labeled_pair(cfg: DataConfig, train_transform: Callable, val_transform: Callable
                 ) -> Tuple[Dataset, Dataset, int]:
    """(train, val, number of classes); the two splits must name the same classes."""
    train, classes = labeled_source(cfg, "train", train_transform)
    val, val_classes = labeled_source(cfg, "val", val_transform)
    if val_classes != classes:
        raise DataError(f"data.path: train and val class folders differ ({len(classes)} vs {len(val_classes)} "
                        "classes, or different names)")
    return train, val, len(classes)


def train_loader(dataset: Dataset, cfg: DataConfig, num_replicas: int, rank: int, seed: int,
                 device: torch.device, batch_multiple: int = 1, num_workers: int | None = None) -> EpochLoader:
    """The resumable per-rank loader of the loop core over a labeled dataset."""
    sampler = ResumableDistributedSampler(len(dataset), cfg.batch_size, num_replicas, rank, seed,
                                          batch_multiple=batch_multiple)
    if sampler.batches_per_epoch == 0:
        raise DataError(f"data: {len(dataset)} training samples cannot fill one batch of {cfg.batch_size} x "
                        f"{num_replicas} process(es) x {batch_multiple} accumulation step(s)")
    return EpochLoader(dataset, sampler, cfg.num_workers if num_workers is None else num_workers, device)


def rank_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int, world: int) -> DataLoader:
    """In order, this rank's share (indices rank, rank + world, ...) of a dataset, every sample once overall."""
    subset = Subset(dataset, range(rank, len(dataset), world))
    return DataLoader(subset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                      collate_fn=collate_skipping_none)


def feature_dataset(features: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
    """Cached features as a dataset the loop core's loader can sample."""
    return TensorDataset(features, labels)
