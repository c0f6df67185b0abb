"""The loader rows: the pretraining data path on photographs, one row per place the crop is resized and the JPEG
decoded, and the CPU cost per image of each path measured on one core.

Photographs come from `--data-path DIR` or are written offline from scikit-image's bundled photos (the bench extra:
`pip install "mimswin[bench]"`): 4:3 crops of them, resized to 500 x 375 and saved as JPEG quality 90 (~44 KB, like
ImageNet's). Without scikit-image the rows read the embedded digits and say so.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from mimswin.bench.contenders import LOADER_PLACES, Setup, mimswin_config
from mimswin.bench.measure import synchronize
from mimswin.bench.report import Row
from mimswin.config import PretrainConfig
from mimswin.data.batches import collate_samples
from mimswin.data.build import build_pretrain_data
from mimswin.data.device_crop import CropBatch, DeviceCrop, resize_crops
from mimswin.data.readers import ReadSpec, read_path
from mimswin.data.transforms import pretrain_transform

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "hubble_deep_field")
PHOTO_SIZE = (375, 500)  # height, width


def have_photos() -> bool:
    return importlib.util.find_spec("skimage") is not None


def write_photos(root: Path, count: int, classes: int = 10, quality: int = 90, seed: int = 0) -> Path:
    """`count` JPEG photographs in `classes` class folders under `root`: random 4:3 crops (half to all of the largest)
    of scikit-image's bundled colour photos, flipped at random, resized to 500 x 375."""
    import skimage.data

    rng = np.random.default_rng(seed)
    sources = [getattr(skimage.data, name)() for name in PHOTOS]
    height, width = PHOTO_SIZE
    for index in range(count):
        photo = sources[index % len(sources)]
        full_h, full_w = photo.shape[:2]
        side = min(full_h, full_w * height // width) * rng.uniform(0.5, 1.0)
        h, w = int(side), min(full_w, int(side * width / height))
        top, left = rng.integers(0, full_h - h + 1), rng.integers(0, full_w - w + 1)
        crop = photo[top:top + h, left:left + w]
        image = Image.fromarray(crop[:, ::-1] if rng.random() < 0.5 else crop).resize((width, height), Image.BICUBIC)
        folder = root / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:06d}.jpg", quality=quality)
    return root


@dataclass
class LoaderRun:
    """One loader path measured end to end: images/s through workers and the device step, bytes per batch moved."""

    images_per_s: float
    step_ms: float
    bytes_per_batch: float


def batch_bytes(images) -> int:
    return images.nbytes if isinstance(images, CropBatch) else images.numel() * images.element_size()


def measure_path(cfg: PretrainConfig, size: Tuple[int, int], device: torch.device, steps: int,
                 warmup: int) -> LoaderRun:
    """Images/s of the pretraining loader as configured (workers + device step, batches ready on `device`) over
    `steps` batches after `warmup`, and the mean bytes of the worker batches that crossed to the device."""
    data = build_pretrain_data(cfg.data, size, 1, 0, cfg.train.seed, device)
    data.epoch(0)  # positions the sampler (or shard stream) at epoch 0 for a look at the raw worker batches
    sizes = [batch_bytes(batch.images) for _, batch in zip(range(2), data.loader)]
    batches = data.epoch(0)
    count = min(warmup + steps, data.batches_per_epoch)
    start = time.perf_counter()
    for index in range(count):
        if index == warmup:
            synchronize(device)
            start = time.perf_counter()
        next(batches)
    synchronize(device)
    timed = max(1, count - warmup)
    elapsed = time.perf_counter() - start
    return LoaderRun(cfg.data.batch_size * timed / elapsed, elapsed / timed * 1e3, statistics.mean(sizes))


def legacy_transform(size: Tuple[int, int], scale: Sequence[float], mean: Sequence[float],
                     std: Sequence[float]) -> Callable[[Path], torch.Tensor]:
    """The path the issue measured as today's before the pixel contract: PIL decode, bicubic RandomResizedCrop and
    flip on the PIL image, ToTensor + Normalize in the worker (float32 out)."""
    augment = T.Compose([T.RandomResizedCrop(size, scale, interpolation=InterpolationMode.BICUBIC),
                         T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

    def run(path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            return augment(image.convert("RGB"))
    return run


def per_core_rates(files: Sequence[Path], size: Tuple[int, int], scale: Sequence[float], mean: Sequence[float],
                   std: Sequence[float], batch: int, repeats: int = 3) -> Dict[str, float]:
    """Images/s on one thread, in this process, of what a worker does per image on each path (best of `repeats`
    passes over `files`), and of the device half of the device paths on this process's device (the CPU)."""
    spec, deferred = ReadSpec(3), ReadSpec(3, defer_jpeg=True)
    worker_crop, device_crop = pretrain_transform(size, scale, 0.5), DeviceCrop(size, scale, 0.5)
    paths: Dict[str, Callable[[Path], object]] = {
        "decode only": lambda p: read_path(p, spec),
        "issue baseline: PIL, resize, float32 out": legacy_transform(size, scale, mean, std),
        "resize in the worker (uint8 out)": lambda p: worker_crop(read_path(p, spec)),
        "resize on the device: worker half": lambda p: device_crop(read_path(p, spec)),
        "decode on the device: worker half": lambda p: device_crop(read_path(p, deferred)),
    }
    work: Dict[str, Tuple[Callable[[], object], int]] = {
        name: ((lambda run=run: [run(p) for p in files]), len(files)) for name, run in paths.items()}
    for name, spec_used in (("resize on the device: device half (this CPU)", spec),
                            ("decode on the device: device half (this CPU)", deferred)):
        crops = collate_samples([(device_crop(read_path(p, spec_used)), 0) for p in files[:batch]]).images
        work[name] = ((lambda crops=crops: resize_crops(crops, size, 3, torch.device("cpu"))), crops.count)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return interleaved_rates(work, repeats)
    finally:
        torch.set_num_threads(threads)


def interleaved_rates(work: Dict[str, Tuple[Callable[[], object], int]], repeats: int) -> Dict[str, float]:
    """Items/s of each (callable, items) pair, best of `repeats` rounds after one untimed round; every round runs
    each in turn, so a busy or throttling machine slows them alike."""
    best = {name: float("inf") for name in work}
    for round_ in range(repeats + 1):
        for name, (run, _) in work.items():
            start = time.perf_counter()
            run()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: count / best[name] for name, (_, count) in work.items()}


def image_files(root: Path) -> List[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def photo_source(tmp: Path, data_path: Optional[str], count: int) -> Tuple[Optional[Path], str]:
    """(the folder the loader rows read, what it is): `data_path`, else photographs written into `tmp`, else None
    (the embedded digits) without scikit-image."""
    if data_path:
        return Path(data_path), f"{data_path}"
    if have_photos():
        return write_photos(tmp / "photos", count), f"{count} photographs 500x375 JPEG q90"
    return None, "embedded digits (pip install 'mimswin[bench]' for photographs)"


def photo_bytes(files: Sequence[Path]) -> float:
    return statistics.mean(len(Path(p).read_bytes()) for p in files)


def measure_loaders(setup: Setup, device: torch.device, steps: int, warmup: int, num_workers: int,
                    rows: Sequence[str], data_path: Optional[str] = None) -> Dict[str, Row]:
    """The requested loader rows: the pretraining data path alone (MAE crop + flip, batches normalized on the device)
    on photographs (`data_path`, else written offline; the embedded digits without scikit-image), with the crop
    resized in the workers, on the device, and the JPEGs decoded on the device too."""
    wanted = [row for row in rows if row in LOADER_PLACES]
    if not wanted:  # model rows only: no photographs to write
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        folder, what = photo_source(Path(tmp), data_path, setup.batch * (warmup + steps + 1))
        measured = {}
        for name in wanted:
            cfg = mimswin_config(setup)
            resize, decode = LOADER_PLACES[name]
            cfg.data.num_workers, cfg.data.resize, cfg.data.decode = num_workers, resize, decode
            if folder is not None:
                cfg.data.path = str(folder)
            run = measure_path(cfg, (setup.img_size, setup.img_size), device, steps, warmup)
            measured[name] = Row(name, images_per_s=run.images_per_s, step_ms=run.step_ms,
                                 note=f"{what}, {num_workers} worker(s), {run.bytes_per_batch / 1e6:.2f} MB/batch "
                                      f"moved")
    return measured
