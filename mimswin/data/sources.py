"""Map-style image sources. Each item is (C x H x W tensor in the file's own dtype, label), label -1 when a source has
no classes, or a `Skipped` saying why the file could not be used."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from mimswin.data.pixels import SampleError, Skipped
from mimswin.data.readers import IMAGE_EXTENSIONS, ReadSpec, read_path
from mimswin.errors import DataError

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_VAL_SIZE = 1000
EMBEDDED_SPLIT_SEED = 0
Item = Union[Tuple[torch.Tensor, int], Skipped]


class EmbeddedMNIST(Dataset):
    """MNIST-5k (real handwritten digits, 500 per class) shipped inside the package, so a default run needs no download.

    The file is sorted by label; the train/val split is a fixed seeded shuffle (4000 / 1000), the same on every machine.
    Items are 8-bit gray 1 x 28 x 28 tensors, repeated to 3 x 28 x 28 for `channels=3`.
    """

    def __init__(self, split: str = "train", transform: Optional[Callable] = None, channels: int = 3) -> None:
        if split not in ("train", "val", "all"):
            raise DataError(f"embedded data set: unknown split '{split}' (train, val or all)")
        if channels not in (1, 3):
            raise DataError(f"config key 'data.channels': the embedded digits are gray, read as 1 or 3 channels, not "
                            f"{channels}; set data.path to your own images")
        with np.load(ASSETS / "mnist5k.npz") as data:
            images, labels = data["images"], data["labels"].astype(np.int64)
        order = np.random.default_rng(EMBEDDED_SPLIT_SEED).permutation(len(images))
        if split == "train":
            order = order[EMBEDDED_VAL_SIZE:]
        elif split == "val":
            order = order[:EMBEDDED_VAL_SIZE]
        self.images, self.labels = torch.from_numpy(images[order]), labels[order]
        self.transform, self.channels = transform, channels
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image = self.images[index][None].expand(self.channels, -1, -1).contiguous()
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def scan_folder(root: Path) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """Image files under `root`: class subfolders give labels (sorted names), files directly under root get -1."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    index = {name: i for i, name in enumerate(classes)}
    samples: List[Tuple[Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        label = index[rel.parts[0]] if rel.parts else -1
        samples += [(Path(dirpath) / f, label) for f in sorted(filenames)
                    if Path(f).suffix.lower() in IMAGE_EXTENSIONS and not f.startswith(".")]
    return samples, classes


class ImageFolder(Dataset):
    """A folder of images or arrays, flat or with one subfolder per class, read as `spec` says. Files that cannot be
    used (unreadable, another channel count, NaN pixels, ...) come back as `Skipped` with the reason."""

    def __init__(self, root: str | Path, transform: Optional[Callable] = None, spec: ReadSpec = ReadSpec()) -> None:
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise DataError(f"data.path: '{self.root}' does not exist")
        if not self.root.is_dir():
            raise DataError(f"data.path: '{self.root}' is not a directory")
        self.samples, self.classes = scan_folder(self.root)
        if not self.samples:
            raise DataError(f"data.path: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under '{self.root}'")
        self.transform, self.spec = transform, spec

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        path, label = self.samples[index]
        try:
            image = read_path(path, self.spec)
            return (self.transform(image) if self.transform else image), label
        except SampleError as err:
            log.warning("skipping %s: %s", path, err)
            return Skipped(err.reason, str(path), err.detail)
