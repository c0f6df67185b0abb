"""Loader throughput: images/s of the shard loader vs the image-folder loader, and vs the model's training step.

Writes a synthetic JPEG folder (and the same images as shards) into a temp dir, then times one pass of each loader
with the pretraining transforms of the chosen preset, and the model's forward + backward + step on one fixed batch.

    python benchmarks/loader.py --images 2000 --workers 2 --config tiny_mae_vit_cpu

A loader/model ratio below 1 means the data path would be the bottleneck at that config.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mimswin.config import PretrainConfig, load_config  # noqa: E402
from mimswin.config.sections import size_pair  # noqa: E402
from mimswin.data.build import build_pretrain_data  # noqa: E402
from mimswin.data.shard_write import write_shards  # noqa: E402
from mimswin.models import build_method  # noqa: E402
from mimswin.train.optim import build_optimizer  # noqa: E402

CPU = torch.device("cpu")


def write_folder(root: Path, count: int, side: int) -> None:
    """`count` JPEGs of smooth random colour fields (compress like photos, unlike noise) in 10 class folders."""
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((side, side), Image.BICUBIC)
        image.save(root / f"class{i % 10}" / f"{i:06d}.jpg", quality=90)


def loader_rate(cfg: PretrainConfig, batches: int) -> float:
    """Images/s over up to `batches` batches of epoch 0, after the first batch (worker start-up excluded)."""
    data = build_pretrain_data(cfg.data, size_pair(cfg.model.img_size), 1, 0, cfg.train.seed, CPU)
    images, start = 0, None
    for n, (batch, _) in enumerate(data.epoch(0)):
        if n == 0:
            start = time.perf_counter()
            continue
        images += batch.shape[0]
        if n >= batches:
            break
    return images / (time.perf_counter() - start)


def model_rate(cfg: PretrainConfig, steps: int) -> float:
    """Images/s of the training step alone (forward, backward, optimizer) on one fixed batch, on the GPU if any."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    method = build_method(cfg).to(device)
    optimizer = build_optimizer(method, cfg.optim, 1e-4)
    images = torch.randn(cfg.data.batch_size, cfg.data.channels, *size_pair(cfg.model.img_size), device=device)
    for n in range(steps + 1):
        if n == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        method(images).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.data.batch_size / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny_mae_vit_cpu", help="pretraining preset (model, batch, transforms)")
    parser.add_argument("--images", type=int, default=2000, help="synthetic images to write")
    parser.add_argument("--side", type=int, default=256, help="their side in pixels")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--batches", type=int, default=30, help="batches timed per loader")
    parser.add_argument("--steps", type=int, default=5, help="model steps timed")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    rgb = ["data.channels=3", "data.mean=null", "data.std=null"]  # the synthetic images are colour JPEGs
    cfg = load_config(PretrainConfig, [args.config], [*rgb, f"data.num_workers={args.workers}", *args.overrides])
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "images", Path(tmp) / "shards"
        write_folder(folder, args.images, args.side)
        summary = write_shards(str(folder), shards, maxcount=max(1, args.images // (4 * max(1, args.workers))),
                               progress=False)
        cfg.data.path = str(folder)
        folder_rate = loader_rate(cfg, args.batches)
        cfg.data.path, cfg.data.shards = None, f"{shards}/train-{{000000..{len(summary.shards) - 1:06d}}}.tar"
        shard_rate = loader_rate(cfg, args.batches)
    step_rate = model_rate(cfg, args.steps)
    print(f"config {args.config}: {cfg.model.name} at {cfg.model.img_size}px, batch {cfg.data.batch_size}, "
          f"{args.workers} worker(s), {args.images} JPEGs of {args.side}px, {len(summary.shards)} shards")
    print(f"folder loader : {folder_rate:9.1f} images/s")
    print(f"shard loader  : {shard_rate:9.1f} images/s   (shard / folder = {shard_rate / folder_rate:.2f})")
    print(f"model step    : {step_rate:9.1f} images/s   (shard loader / model = {shard_rate / step_rate:.2f})")


if __name__ == "__main__":
    main()
