"""Labeled data for evaluation: one dispatch from `data.path` to a (train, val) pair of map-style datasets.

- no path: the embedded MNIST-5k with its fixed seeded train/val split;
- a folder with `train/` and `val/` subfolders, each holding one subfolder per class;
- a Hugging Face `datasets` source (`data.hf`): its `data.hf_split` and `data.hf_val_split` splits, classes from the
  label column (`data.hf_label_key`);
- labeled webdataset shards: `data.shards` (train) and `data.val_shards` (validation), streamed for training and read
  once, each sample on one rank, for evaluation.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from mimswin.config import DataConfig
from mimswin.config.evaluation import LabeledDataConfig
from mimswin.data.batches import DeviceStep, collate_samples, ready_batches
from mimswin.data.build import EpochLoader, device_step, read_spec
from mimswin.data.hf import HFImages, hf_images, val_split_name
from mimswin.data.sampler import ResumableDistributedSampler
from mimswin.data.shard_stream import ShardLoader, build_shard_loader, expand_shards, shard_classes, shard_sizes
from mimswin.data.sources import EmbeddedMNIST, ImageFolder
from mimswin.data.subsets import labeled_subset
from mimswin.errors import DataError


class LabeledShards:
    """One split of labeled webdataset shards where the programs take a map-style dataset: shuffled and streamed for
    training, read once for evaluation; samples without a class are skipped and counted."""

    def __init__(self, spec: str, transform: Callable, cfg: DataConfig) -> None:
        self.spec, self.transform, self.cfg = spec, transform, cfg
        self.urls = expand_shards(spec)
        self.classes = shard_classes(self.urls, cfg.shard_sizes)

    def __len__(self) -> int:
        """Samples in the split, as far as sizes.json or the local shards tell."""
        return sum(size or 0 for size in shard_sizes(self.urls, self.cfg.shard_sizes))

    def loader(self, batch_size: int, num_workers: int, num_replicas: int, rank: int, seed: int,
               device: torch.device, train: bool, batch_multiple: int = 1) -> ShardLoader:
        cfg = self.cfg
        return build_shard_loader(self.spec, self.transform, read_spec(cfg), device_step(cfg), batch_size, num_workers,
                                  num_replicas, rank, seed, device, train=train, resampled=cfg.resampled,
                                  shuffle_buffer=cfg.shuffle_buffer, sizes_file=cfg.shard_sizes,
                                  samples_per_epoch=cfg.samples_per_epoch,
                                  batch_multiple=batch_multiple, labeled=True, retries=cfg.shard_retries)


LabeledData = Union[Dataset, LabeledShards]


def is_shard_spec(path: str) -> bool:
    """Whether `data.path` names webdataset shards rather than an image folder."""
    return path.endswith(".tar") or "{" in path or "::" in path


def labeled_source(cfg: LabeledDataConfig, split: str, transform: Callable) -> Tuple[LabeledData, List[str]]:
    """The labeled split ('train' or 'val') of the configured source, and its class names."""
    if cfg.shards is not None:
        shards = LabeledShards(cfg.shards if split == "train" else cfg.val_shards, transform, cfg)
        return shards, shards.classes
    if cfg.hf is not None:
        name, key = (cfg.hf_split, "data.hf_split") if split == "train" else (
            val_split_name(cfg.hf, cfg.hf_val_split), "data.hf_val_split")
        dataset = hf_images(cfg.hf, name, cfg.hf_image_key, cfg.hf_label_key, transform, read_spec(cfg), labeled=True,
                            key=key)
        return dataset, dataset.classes
    if cfg.path is None:
        dataset = EmbeddedMNIST(split, transform, cfg.channels or 3)
        return dataset, dataset.classes
    if is_shard_spec(cfg.path):
        raise DataError(f"data.path '{cfg.path}' names webdataset shards: pass labeled shards as data.shards (train) "
                        "and data.val_shards (validation)")
    root = Path(cfg.path).expanduser() / split
    if not root.is_dir():
        raise DataError(f"data.path: '{root}' is not a directory; labeled data needs train/ and val/ subfolders, "
                        "each with one subfolder per class")
    dataset = ImageFolder(root, transform, read_spec(cfg))
    if not dataset.classes or any(label < 0 for _, label in dataset.samples):
        raise DataError(f"data.path: '{root}' has images outside class subfolders; put each class in its own folder")
    return dataset, dataset.classes


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Every sample's label of a map-style source, read without decoding a single image."""
    if isinstance(dataset, EmbeddedMNIST):
        return torch.as_tensor(dataset.labels)
    if isinstance(dataset, ImageFolder):
        return torch.tensor([label for _, label in dataset.samples])
    if isinstance(dataset, HFImages):
        return dataset.labels()
    raise DataError(f"data: cannot take a labeled subset of a {type(dataset).__name__}")


def labeled_part(train: LabeledData, cfg: DataConfig) -> LabeledData:
    """The train split, or its seeded class-balanced subset when `label_fraction` / `labels_per_class` is set (a
    plain `DataConfig`, which has neither, keeps the whole split)."""
    fraction, per_class = getattr(cfg, "label_fraction", None), getattr(cfg, "labels_per_class", None)
    if fraction is None and per_class is None:
        return train
    keep = labeled_subset(dataset_labels(train), fraction, per_class, cfg.label_seed)
    return Subset(train, keep.tolist())


def labeled_pair(cfg: LabeledDataConfig, train_transform: Callable, val_transform: Callable
                 ) -> Tuple[LabeledData, LabeledData, int]:
    """(train, val, number of classes); the two splits must name the same classes. The train split is cut to its
    labeled subset when one is configured; val always stays whole."""
    train, classes = labeled_source(cfg, "train", train_transform)
    val, val_classes = labeled_source(cfg, "val", val_transform)
    if val_classes != classes:
        raise DataError(f"data: the train and val splits name different classes ({len(classes)} vs {len(val_classes)} "
                        "classes, or different names)")
    return labeled_part(train, cfg), val, len(classes)


def train_loader(dataset: LabeledData, cfg: DataConfig, num_replicas: int, rank: int, seed: int,
                 device: torch.device, batch_multiple: int = 1, num_workers: int | None = None,
                 features: bool = False) -> Union[EpochLoader, ShardLoader]:
    """The resumable per-rank loader of the loop core over a labeled dataset or labeled shards (`features`: over cached
    features, which skip the device step of images)."""
    workers = cfg.num_workers if num_workers is None else num_workers
    if isinstance(dataset, LabeledShards):
        return dataset.loader(cfg.batch_size, workers, num_replicas, rank, seed, device, True, batch_multiple)
    sampler = ResumableDistributedSampler(len(dataset), cfg.batch_size, num_replicas, rank, seed,
                                          batch_multiple=batch_multiple)
    if sampler.batches_per_epoch == 0:
        raise DataError(f"data: {len(dataset)} training samples cannot fill one batch of {cfg.batch_size} x "
                        f"{num_replicas} process(es) x {batch_multiple} accumulation step(s)")
    return EpochLoader(dataset, sampler, workers, device, None if features else device_step(cfg))


def rank_loader(dataset: LabeledData, batch_size: int, num_workers: int, rank: int, world: int,
                step: Optional[DeviceStep], device: torch.device) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
    """In order, this rank's share (indices rank, rank + world, ...; for shards, its shards) of the data, every sample
    once overall, as (model input, labels) on `device` (`step` None: cached features, moved as they are)."""
    if isinstance(dataset, LabeledShards):
        return dataset.loader(batch_size, num_workers, world, rank, 0, device, False).epoch(0)
    subset = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        collate_fn=collate_samples, generator=torch.Generator())  # leaves the global RNG alone
    return ready_batches(loader, step, device, Counter())


def feature_dataset(features: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
    """Cached features as a dataset the loop core's loader can sample."""
    return TensorDataset(features, labels)
