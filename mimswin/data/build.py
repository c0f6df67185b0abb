"""Config -> data: the source, its transforms, a resumable per-rank loader and the device step every batch takes."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from mimswin.config import DataConfig
from mimswin.config.sections import Size
from mimswin.data.batches import DeviceStep, collate_samples, ready_batches
from mimswin.data.device_crop import DeviceCrop
from mimswin.data.hf import HFStreamLoader, hf_images, hf_stream_loader, stream_preview
from mimswin.data.pixels import Skipped, stack_samples
from mimswin.data.readers import ReadSpec, channels_found
from mimswin.data.sampler import ResumableDistributedSampler, SeededSamples
from mimswin.data.shard_stream import ShardLoader, build_shard_loader, shard_preview
from mimswin.data.sources import EmbeddedMNIST, ImageFolder
from mimswin.data.transforms import eval_transform, pretrain_transform
from mimswin.errors import DataError
from mimswin.signals import ignore_stop_signals


def read_spec(cfg: DataConfig, defer_jpeg: bool = False) -> ReadSpec:
    """How files are read for this config: its channel count and array layout (and whether JPEGs stay undecoded)."""
    return ReadSpec(cfg.channels, cfg.layout, defer_jpeg)


def device_step(cfg: DataConfig, crop_size: Optional[Size] = None) -> DeviceStep:
    """The config's conversion of native batches to model input (its mean and std, one value per channel; pending
    crops resized to `crop_size`)."""
    return DeviceStep(cfg.mean, cfg.std, crop_size)


def resize_on_device(cfg: DataConfig, device: torch.device) -> bool:
    """Whether pretraining crops are resized on the device: asked for, implied by device decoding, or `auto` on a
    GPU (on a CPU the workers resize in parallel, while the main process is busy with the model)."""
    return cfg.resize == "device" or cfg.decode == "device" or (cfg.resize == "auto" and device.type == "cuda")


class EpochLoader:
    """Yields (model input, labels) batches on `device` for one epoch, from any batch index (for mid-epoch resume).

    Workers read and augment samples in their own dtype; `step` (the device step; None for cached features) makes the
    model's input on the device. The loader has its own generator, so starting an epoch never draws from the global
    RNG that masks come from. `skip_reasons` counts the samples this rank could not use (counted in the batches, so
    workers' counts arrive).
    """

    def __init__(self, dataset: Dataset, sampler: ResumableDistributedSampler, num_workers: int,
                 device: torch.device, step: Optional[DeviceStep]) -> None:
        self.dataset, self.sampler, self.device, self.step = dataset, sampler, device, step
        self.loader = DataLoader(
            SeededSamples(dataset), batch_size=sampler.batch_size, sampler=sampler, num_workers=num_workers,
            drop_last=True, collate_fn=collate_samples, pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0, generator=torch.Generator(), worker_init_fn=ignore_stop_signals,
        )
        self.skip_reasons: Counter = Counter()

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def skipped(self) -> int:
        return sum(self.skip_reasons.values())

    @property
    def source_size(self) -> int:
        """Samples in the source."""
        return len(self.dataset)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch, start_batch)
        return ready_batches(self.loader, self.step, self.device, self.skip_reasons)


def image_source(cfg: DataConfig, transform, split: str = "train", spec: Optional[ReadSpec] = None) -> Dataset:
    """The map-style source: the split `data.hf_split` of `data.hf`, the image folder at `data.path`, else the
    embedded MNIST-5k split `split`."""
    if cfg.hf is not None:
        return hf_images(cfg.hf, cfg.hf_split, cfg.hf_image_key, cfg.hf_label_key, transform, spec or read_spec(cfg))
    if cfg.path is None:
        return EmbeddedMNIST(split, transform, cfg.channels)
    return ImageFolder(cfg.path, transform, spec or read_spec(cfg))


def shard_source(cfg: DataConfig, transform, num_replicas: int, rank: int, seed: int, device: torch.device,
                 batch_multiple: int = 1, train: bool = True, step: Optional[DeviceStep] = None,
                 spec: Optional[ReadSpec] = None) -> ShardLoader:
    """The shard loader for `data.shards`: training (shuffled, equal steps per rank) or one evaluation pass."""
    return build_shard_loader(cfg.shards, transform, spec or read_spec(cfg), step or device_step(cfg), cfg.batch_size,
                              cfg.num_workers, num_replicas, rank, seed, device, train=train,
                              resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer,
                              sizes_file=cfg.shard_sizes, samples_per_epoch=cfg.samples_per_epoch,
                              batch_multiple=batch_multiple, retries=cfg.shard_retries)


def build_pretrain_data(cfg: DataConfig, img_size: Size, num_replicas: int, rank: int, seed: int,
                        device: torch.device, batch_multiple: int = 1
                        ) -> Union[EpochLoader, ShardLoader, HFStreamLoader]:
    """Training loader with MIM augmentations; every rank gets the same number of batches per epoch. Crops are
    resized in the workers or, `resize_on_device`, on the device (the workers draw the same boxes and flips)."""
    on_device = resize_on_device(cfg, device)
    transform = DeviceCrop(img_size, cfg.crop_scale, cfg.hflip) if on_device else pretrain_transform(
        img_size, cfg.crop_scale, cfg.hflip)
    spec, step = read_spec(cfg, cfg.decode == "device"), device_step(cfg, img_size if on_device else None)
    if cfg.shards is not None:
        return shard_source(cfg, transform, num_replicas, rank, seed, device, batch_multiple, step=step, spec=spec)
    if cfg.hf_streaming:
        return hf_stream_loader(cfg.hf, cfg.hf_split, cfg.hf_image_key, cfg.hf_label_key, transform, spec, step,
                                cfg.batch_size, cfg.num_workers, num_replicas, rank, seed, device, cfg.shuffle_buffer,
                                cfg.samples_per_epoch, batch_multiple)
    dataset = image_source(cfg, transform, spec=spec)
    sampler = ResumableDistributedSampler(len(dataset), cfg.batch_size, num_replicas, rank, seed,
                                          batch_multiple=batch_multiple)
    if sampler.batches_per_epoch == 0:
        raise DataError(f"data: {len(dataset)} images cannot fill one batch of {cfg.batch_size} x "
                        f"{num_replicas} process(es) x {batch_multiple} accumulation step(s)")
    return EpochLoader(dataset, sampler, cfg.num_workers, device, step)


def online_probe_val(cfg: DataConfig, val_path: Optional[str], img_size: Size, train: Dataset,
                     samples: int) -> Tuple[Dataset, int]:
    """(the online probe's validation images, un-augmented, at most `samples` of them; its class count): the
    embedded val split, or the class folders of `val_path`, which must name the classes of the training folder."""
    view = eval_transform(img_size)
    classes = getattr(train, "classes", [])
    if not classes:
        raise DataError(f"online_probe: '{cfg.path}' has no class subfolders, so there are no labels to probe")
    val = EmbeddedMNIST("val", view, cfg.channels) if cfg.path is None else ImageFolder(val_path, view, read_spec(cfg))
    if val.classes != classes:
        raise DataError(f"online_probe.val_path: its classes {val.classes[:5]} differ from data.path's {classes[:5]}")
    return Subset(val, range(min(samples, len(val)))), len(classes)


def spread(size: int, count: int, tries: int) -> List[int]:
    """Up to `tries` indices of a source of `size` in the order a preview tries them: `count` evenly spaced over the
    whole source first (class-sorted splits show every part), then the same shifted, round after round."""
    rounds = max(1, -(-tries // count))
    picked = dict.fromkeys(min(size - 1, int((k + r / rounds) * size / count)) for r in range(rounds)
                           for k in range(count))
    return list(picked)[:tries]


def unusable(first: Optional[Skipped], tried: int, what: str, where: str) -> DataError:
    """The error of a source none of whose first images could be used: for a channel mismatch, the settings that
    fix it; else the first file and why."""
    counts = channels_found(first.detail) if first is not None and first.reason == "wrong channels" else None
    if counts is not None:
        found, wanted = counts
        return DataError(f"{what}: the images have {found} channel(s) but data.channels={wanted}: set "
                         f"data.channels={found} and its data.mean / data.std (`mimswin stats {where} --channels "
                         f"{found}` prints them); first: {first.source}")
    reason = f": {first.describe()}" if first else ""
    return DataError(f"{what}: none of the first {tried} images could be used{reason}")


def first_usable(dataset: Dataset, count: int, indices: Sequence[int], what: str, where: str = "PATH"
                 ) -> torch.Tensor:
    """The first `count` usable samples of a map-style source among `indices`, stacked; when none is usable, one
    error (a wrong data.channels or data.layout shows here, before training)."""
    usable, first, tried = [], None, 0
    for tried, index in enumerate(indices, 1):
        item = dataset[index]
        if isinstance(item, Skipped):
            first = first or item
        else:
            usable.append(item[0])
        if len(usable) == count:
            break
    if not usable:
        raise unusable(first, tried, what, where)
    return stack_samples(usable)


@contextlib.contextmanager
def quiet_skips() -> Iterator[None]:
    """Sources' per-file skip warnings held back (a preview of the wrong channels ends in one line, not 32)."""
    loggers = [logging.getLogger(name) for name in ("mimswin.data.sources", "mimswin.data.hf")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def preview_images(cfg: DataConfig, img_size: Size, count: int) -> torch.Tensor:
    """A fixed batch of un-augmented images spread over the source (the held-out split of the embedded set), in their
    own dtype, for reconstruction pictures."""
    view, tries = eval_transform(img_size), count * 4
    where = cfg.hf or cfg.path or "embedded"
    what = "data.hf" if cfg.hf is not None else "data.path"
    with quiet_skips():
        if cfg.shards is not None:
            images = shard_preview(cfg.shards, view, read_spec(cfg), count)
        elif cfg.hf_streaming:
            items = stream_preview(cfg.hf, cfg.hf_split, cfg.hf_image_key, view, read_spec(cfg), count, tries)
            images = first_usable(items, count, range(len(items)), what, where)
        else:
            source = image_source(cfg, view, split="val")
            images = first_usable(source, count, spread(len(source), count, tries), what, where)
    return images
