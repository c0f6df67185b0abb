"""`mimswin visualize`: reconstruction pictures of any folder of images by a pretraining run's model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from mimswin.config import DataConfig
from mimswin.config.sections import Size, size_pair
from mimswin.data.build import device_step, first_usable, read_spec
from mimswin.data.sources import ImageFolder
from mimswin.data.transforms import eval_transform
from mimswin.errors import DataError
from mimswin.eval.pictures import reconstruction_grid, save_png
from mimswin.programs.common import console_entry
from mimswin.runs.layout import VISUALIZE
from mimswin.runs.open import find_run_config, load_pretrain_run


def load_images(folder: str | Path, img_size: Size, data: DataConfig, count: int) -> torch.Tensor:
    """The first `count` usable images of a folder (sorted names), read as the run reads them (channels, layout),
    resized and center-cropped to img_size, in their own dtype."""
    try:
        dataset = ImageFolder(folder, eval_transform(img_size), read_spec(data))
    except DataError as err:
        raise DataError(str(err).replace("data.path", "--images", 1)) from None
    return first_usable(dataset, count, range(len(dataset)), "--images", str(folder))


def visualize(source: str | Path, images_dir: str | Path, out: Optional[str | Path] = None, count: int = 16,
              per_picture: int = 8) -> List[Path]:
    """Write reconstruction grids (original | masked | reconstruction | pasted), `per_picture` rows each."""
    run = load_pretrain_run(source)
    cfg = run.cfg
    native = load_images(images_dir, size_pair(cfg.model.img_size), cfg.data, count)
    images = device_step(cfg.data)(native, torch.device("cpu"))
    out_dir = Path(out) if out else find_run_config(run.checkpoint).parent / VISUALIZE
    written = []
    for number, start in enumerate(range(0, images.shape[0], per_picture)):
        picture = reconstruction_grid(run.method, images[start:start + per_picture], cfg.data.mean, cfg.data.std,
                                      cfg.vis.bands, native.dtype != torch.uint8)
        path = out_dir / f"reconstruction_{number:03d}.png"
        save_png(picture, path)
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    """`mimswin visualize --from RUN --images DIR [--out DIR]`: parse, draw, print the written pictures."""
    parser = argparse.ArgumentParser(prog="mimswin visualize", description="Reconstruction pictures of any images "
                                     "by a pretraining run (its latest checkpoint: encoder and decoder).")
    parser.add_argument("--from", dest="source", required=True, help="run dir or checkpoint dir")
    parser.add_argument("--images", required=True, help="folder of images (flat or one subfolder per class)")
    parser.add_argument("--out", default=None, help="output folder (default RUN/visualize)")
    parser.add_argument("--count", type=int, default=16, help="how many images (first ones by name)")
    parser.add_argument("--per-picture", type=int, default=8, help="images (rows) per PNG")
    args = parser.parse_args(argv)
    if args.count < 1 or args.per_picture < 1:
        parser.error("--count and --per-picture must be >= 1")
    paths = visualize(args.source, args.images, args.out, args.count, args.per_picture)
    print("\n".join(f"wrote {path}" for path in paths))
    return paths


cli = console_entry(main)
