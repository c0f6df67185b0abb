"""Config -> data: the source, its transforms and a resumable per-rank loader."""

from __future__ import annotations

from typing import Iterator, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

from mimswin.config import DataConfig
from mimswin.data.sampler import ResumableDistributedSampler, SeededSamples
from mimswin.data.shard_stream import ShardLoader, build_shard_loader, shard_preview
from mimswin.data.sources import EmbeddedMNIST, ImageFolder, collate_counting_skips
from mimswin.data.transforms import eval_transform, pretrain_transform
from mimswin.errors import DataError
from mimswin.signals import ignore_stop_signals


class EpochLoader:
    """Yields (images, labels) batches on `device` for one epoch, from any batch index (for mid-epoch resume).

    The loader has its own generator, so starting an epoch never draws from the global RNG that masks come from.
    `skipped` counts the unreadable images this rank dropped (counted in the batches, so workers' counts arrive).
    """

    def __init__(self, dataset: Dataset, sampler: ResumableDistributedSampler, num_workers: int,
                 device: torch.device) -> None:
        self.dataset, self.sampler, self.device = dataset, sampler, device
        self.loader = DataLoader(
            SeededSamples(dataset), batch_size=sampler.batch_size, sampler=sampler, num_workers=num_workers,
            drop_last=True, collate_fn=collate_counting_skips, pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0, generator=torch.Generator(), worker_init_fn=ignore_stop_signals,
        )
        self.skipped = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch, start_batch)
        for images, labels, skipped in self.loader:
            self.skipped += skipped
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def image_source(cfg: DataConfig, transform, split: str = "train") -> Dataset:
    """The embedded MNIST-5k split when no path is given, else the image folder at `data.path`."""
    if cfg.path is None:
        return EmbeddedMNIST(split, transform)
    return ImageFolder(cfg.path, transform)


def shard_source(cfg: DataConfig, transform, num_replicas: int, rank: int, seed: int, device: torch.device,
                 batch_multiple: int = 1, train: bool = True) -> ShardLoader:
    """The shard loader for `data.shards`: training (shuffled, equal steps per rank) or one evaluation pass."""
    return build_shard_loader(cfg.shards, transform, cfg.batch_size, cfg.num_workers, num_replicas, rank, seed, device,
                              train=train, resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer,
                              sizes_file=cfg.shard_sizes, samples_per_epoch=cfg.samples_per_epoch,
                              batch_multiple=batch_multiple)


def build_pretrain_data(cfg: DataConfig, img_size: int, num_replicas: int, rank: int, seed: int,
                        device: torch.device, batch_multiple: int = 1) -> Union[EpochLoader, ShardLoader]:
    """Training loader with MIM augmentations; every rank gets the same number of batches per epoch."""
    transform = pretrain_transform(img_size, cfg.crop_scale, cfg.hflip, cfg.mean, cfg.std)
    if cfg.shards is not None:
        return shard_source(cfg, transform, num_replicas, rank, seed, device, batch_multiple)
    dataset = image_source(cfg, transform)
    sampler = ResumableDistributedSampler(len(dataset), cfg.batch_size, num_replicas, rank, seed,
                                          batch_multiple=batch_multiple)
    if sampler.batches_per_epoch == 0:
        raise DataError(f"data: {len(dataset)} images cannot fill one batch of {cfg.batch_size} x "
                        f"{num_replicas} process(es) x {batch_multiple} accumulation step(s)")
    return EpochLoader(dataset, sampler, cfg.num_workers, device)


def preview_images(cfg: DataConfig, img_size: int, count: int) -> torch.Tensor:
    """A fixed batch of un-augmented images (the first of the held-out split) for reconstruction pictures."""
    if cfg.shards is not None:
        return shard_preview(cfg.shards, eval_transform(img_size, cfg.mean, cfg.std), count)
    dataset = image_source(cfg, eval_transform(img_size, cfg.mean, cfg.std), split="val")
    items = [dataset[i] for i in range(min(len(dataset), count * 2))]
    return torch.stack([item[0] for item in items if item is not None][:count])
