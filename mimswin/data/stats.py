"""Per-channel statistics of a data source, in the units the loader hands the model (integer pixels divided by their
range, floats as they are), for `data.mean` / `data.std` and for judging a data set before training on it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from mimswin.data.hf import HFSource, hf_images, is_hf_path
from mimswin.data.pixels import SampleError, Skipped, to_float
from mimswin.data.readers import ReadSpec, read_bytes
from mimswin.data.shard_stream import expand_shards, read_shard
from mimswin.data.shard_write import EMBEDDED
from mimswin.data.sources import EmbeddedMNIST, ImageFolder
from mimswin.errors import DataError

PERCENTILE_PIXELS = 4096  # per image and channel: percentiles read at most this many (seeded random) pixels
PERCENTILES = (1.0, 99.0)


@dataclass
class ChannelStats:
    """What `mimswin stats` reports: per-channel mean, std (population), 1st / 99th percentiles, and what was read."""

    mean: List[float]
    std: List[float]
    low: List[float]
    high: List[float]
    images: int
    skipped: Counter = field(default_factory=Counter)
    dtypes: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)
    exact_percentiles: bool = True

    @property
    def channels(self) -> int:
        return len(self.mean)

    def config_line(self) -> str:
        """The overrides to paste into a shell command line: channels, mean and std (lists quoted, no spaces)."""
        def values(xs: List[float]) -> str:
            return "[" + ",".join(f"{x:.6g}" for x in xs) + "]"
        return f"data.channels={self.channels} 'data.mean={values(self.mean)}' 'data.std={values(self.std)}'"


Item = Union[torch.Tensor, Skipped]


def source_images(path: str, spec: ReadSpec, samples: int, seed: int = 0, hf: Optional[HFSource] = None
                  ) -> Iterator[Item]:
    """Raw images (C x H x W, own dtype) of `embedded[:split]`, shards (a .tar pattern), a datasets source (`hf`: its
    split and image column) or an image folder: a seeded random `samples` of a folder or dataset (all when 0 or more
    than it holds), the first `samples` of shards in order."""
    if path == EMBEDDED or path.startswith(EMBEDDED + ":"):
        digits = EmbeddedMNIST(path.partition(":")[2] or "train", channels=spec.channels or 1)
        yield from (digits[i][0] for i in chosen(len(digits), samples, seed))
    elif path.endswith(".tar") or "{" in path or "::" in path:
        count = 0
        for url in expand_shards(path):
            for sample in read_shard(url, lambda u, e: None):
                key = next((k for k in sample if not k.startswith("__") and k != "cls"), None)
                try:
                    yield read_bytes(sample[key], key, spec) if key else Skipped("no image", url)
                except SampleError as err:
                    yield Skipped(err.reason, f"{url}:{sample.get('__key__')}", err.detail)
                count += 1
                if samples and count >= samples:
                    return
    else:
        if is_hf_path(path):
            source = hf or HFSource()
            images: Dataset = hf_images(path, source.split, source.image_key, None, None, spec)
        else:
            images = ImageFolder(Path(path), None, spec)
        yield from (item if isinstance(item, Skipped) else item[0]
                    for item in (images[i] for i in chosen(len(images), samples, seed)))


def chosen(size: int, samples: int, seed: int) -> List[int]:
    """Indices of a seeded random subset of `samples` (all, in order, when 0 or at least `size`)."""
    if not samples or samples >= size:
        return list(range(size))
    return sorted(np.random.default_rng(seed).choice(size, samples, replace=False).tolist())


def channel_stats(images: Iterator[Item], seed: int = 0) -> ChannelStats:
    """Mean and population std of every pixel per channel (float64 sums), percentiles from up to
    `PERCENTILE_PIXELS` random pixels per image and channel (all of them in smaller images)."""
    rng = np.random.default_rng(seed)
    total = squares = None
    count, images_read, exact = 0, 0, True
    picked: List[np.ndarray] = []
    report = ChannelStats([], [], [], [], 0)
    for image in images:
        if isinstance(image, Skipped):
            report.skipped[image.reason] += 1
            continue
        values = to_float(image).double().flatten(1).numpy()
        if total is None:
            total, squares = np.zeros(values.shape[0]), np.zeros(values.shape[0])
        if values.shape[0] != total.shape[0]:
            report.skipped["wrong channels"] += 1
            continue
        total += values.sum(axis=1)
        squares += np.square(values).sum(axis=1)
        count += values.shape[1]
        images_read += 1
        report.dtypes[str(image.dtype).replace("torch.", "")] += 1
        report.sizes[f"{image.shape[1]}x{image.shape[2]}"] += 1
        if values.shape[1] > PERCENTILE_PIXELS:
            values, exact = values[:, rng.choice(values.shape[1], PERCENTILE_PIXELS, replace=False)], False
        picked.append(values)
    if not images_read:
        reasons = ", ".join(f"{n} {r}" for r, n in report.skipped.items()) or "no files"
        raise DataError(f"stats: no usable image ({reasons})")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    low, high = np.percentile(np.concatenate(picked, axis=1), PERCENTILES, axis=1)
    report.mean, report.std, report.low, report.high = mean.tolist(), std.tolist(), low.tolist(), high.tolist()
    report.images, report.exact_percentiles = images_read, exact
    return report


def stats_of(path: str, channels: Optional[int] = None, layout: str = "auto", samples: int = 1000,
             seed: int = 0, hf: Optional[HFSource] = None) -> ChannelStats:
    """`channel_stats` of a source read as `channels` (unset: as many as its first usable image has)."""
    return channel_stats(source_images(path, ReadSpec(channels, layout), samples, seed, hf), seed)
