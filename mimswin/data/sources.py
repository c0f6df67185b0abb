"""Map-style image sources. Each item is (PIL RGB image, label); label -1 when a source has no classes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mimswin.errors import DataError

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parent / "assets"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
EMBEDDED_VAL_SIZE = 1000
EMBEDDED_SPLIT_SEED = 0


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, F, ...) -> 8-bit RGB; 16-bit and float images are rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


class EmbeddedMNIST(Dataset):
    """MNIST-5k (real handwritten digits, 500 per class) shipped inside the package, so a default run needs no download.

    The file is sorted by label; the train/val split is a fixed seeded shuffle (4000 / 1000), the same on every machine.
    """

    def __init__(self, split: str = "train", transform: Optional[Callable] = None) -> None:
        if split not in ("train", "val", "all"):
            raise DataError(f"embedded data set: unknown split '{split}' (train, val or all)")
        with np.load(ASSETS / "mnist5k.npz") as data:
            images, labels = data["images"], data["labels"].astype(np.int64)
        order = np.random.default_rng(EMBEDDED_SPLIT_SEED).permutation(len(images))
        if split == "train":
            order = order[EMBEDDED_VAL_SIZE:]
        elif split == "val":
            order = order[:EMBEDDED_VAL_SIZE]
        self.images, self.labels = images[order], labels[order]
        self.transform = transform
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[object, int]:
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
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
    """A folder of images, flat or with one subfolder per class. Unreadable images are skipped and counted."""

    def __init__(self, root: str | Path, transform: Optional[Callable] = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise DataError(f"data.path: '{self.root}' does not exist")
        if not self.root.is_dir():
            raise DataError(f"data.path: '{self.root}' is not a directory")
        self.samples, self.classes = scan_folder(self.root)
        if not self.samples:
            raise DataError(f"data.path: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under '{self.root}'")
        self.transform = transform
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)

    def __getitem__(self, index: int) -> Optional[Tuple[object, int]]:
        try:
            image = self.load(index)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            self.skipped += 1
            log.warning("skipping unreadable image %s: %s", self.samples[index][0], err)
            return None
        return (self.transform(image) if self.transform else image), self.samples[index][1]



def collate_skipping_none(batch: list) -> Tuple[torch.Tensor, torch.Tensor]:
    """Default collation after dropping the samples a source could not read (returned as None)."""
    kept = [item for item in batch if item is not None]
    if not kept:
        raise DataError("a whole batch of images was unreadable; check the data source")
    return torch.utils.data.default_collate(kept)


def collate_counting_skips(batch: list) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Like `collate_skipping_none`, plus the number of unreadable samples, so the count reaches the main process
    from DataLoader workers (a worker's own counters never do)."""
    kept = [item for item in batch if item is not None]
    return (*collate_skipping_none(kept), len(batch) - len(kept))
