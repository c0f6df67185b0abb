"""Example data sets of the kinds mimswin reads beyond 8-bit RGB, written offline, with class folders (train/, val/),
for the "Your own data" walkthroughs (docs/own_data.md) and the end-to-end tests.

    python benchmarks/own_data.py photos /tmp/photos   # RGB JPEG crops of scikit-image's bundled photos
    python benchmarks/own_data.py ct /tmp/ct           # 16-bit gray CT-like slices (HU + 1024), 48 x 64, 3 levels
    python benchmarks/own_data.py s2 /tmp/s2           # 13-band float32 reflectance (.npy, C x H x W), 4 land covers
    python benchmarks/own_data.py tiff4 /tmp/cells     # 4-channel 16-bit TIFF (microscopy-like), 40 x 56
    python benchmarks/own_data.py raw /tmp/s2 --channels 13 --size 32   # the raw-pixel logistic probe baseline

Everything but `photos` is synthetic (numpy, seeded): shapes, value ranges and dtypes as the real data, classes a
pretrained encoder can learn to tell apart. `photos` needs `pip install scikit-image` (its photos ship in the wheel).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, Sequence

import numpy as np

# typical Sentinel-2 reflectance of its 13 bands (B1, B2, B3, B4, B5, B6, B7, B8, B8A, B9, B10, B11, B12)
SPECTRA = {
    "vegetation": [0.04, 0.04, 0.07, 0.05, 0.11, 0.26, 0.31, 0.34, 0.35, 0.13, 0.01, 0.19, 0.10],
    "soil": [0.09, 0.10, 0.13, 0.16, 0.19, 0.21, 0.22, 0.24, 0.25, 0.10, 0.01, 0.32, 0.26],
    "roof": [0.14, 0.14, 0.15, 0.16, 0.17, 0.18, 0.19, 0.20, 0.21, 0.08, 0.01, 0.24, 0.21],
    "water": [0.06, 0.05, 0.04, 0.03, 0.02, 0.02, 0.02, 0.015, 0.01, 0.005, 0.002, 0.01, 0.005],
}
S2_CLASSES = ("forest", "cropland", "grassland", "urban")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry")


def smooth_field(rng: np.random.Generator, height: int, width: int, waves: int = 4) -> np.ndarray:
    """A smooth random field in about [-1, 1]: a sum of a few low-frequency plane waves."""
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    field = sum(np.cos(2 * np.pi * (rng.uniform(0.5, 3) * (np.cos(a) * rows + np.sin(a) * cols)) + rng.uniform(0, 6))
                for a in rng.uniform(0, np.pi, waves))
    return field / waves


def ellipse(height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    return ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1


def s2_patch(rng: np.random.Generator, cover: str, size: int = 32) -> np.ndarray:
    """13 x size x size float32 reflectance of one land cover, told apart by texture more than by colour: forest is
    vegetation in blobs of crowns, cropland stripes of vegetation and soil, grassland smooth vegetation, urban blocks
    of roofs between vegetation; each patch has its own brightness and haze, a share of water or soil, and noise."""
    spectra = {name: np.array(values, np.float32)[:, None, None] for name, values in SPECTRA.items()}
    rows, cols = np.mgrid[0:size, 0:size]
    if cover == "forest":
        crowns = smooth_field(rng, size, size, waves=12) + 0.5 * np.cos(rows * rng.uniform(1.2, 1.8)) * np.cos(
            cols * rng.uniform(1.2, 1.8))
        base = spectra["vegetation"] * (0.75 + 0.25 * crowns)
    elif cover == "cropland":
        angle, period = rng.uniform(0, np.pi), rng.uniform(5, 9)
        stripes = (np.cos(2 * np.pi * (np.cos(angle) * rows + np.sin(angle) * cols) / period) > 0)
        base = np.where(stripes, spectra["vegetation"], spectra["soil"])
    elif cover == "grassland":
        base = spectra["vegetation"] * (0.9 + 0.1 * smooth_field(rng, size, size)) * 0.9 + 0.1 * spectra["soil"]
    else:
        block = int(rng.integers(4, 8))
        dy, dx = rng.integers(0, block, 2)
        roofs = ((rows + dy) // block + (cols + dx) // block) % 2 == 0
        base = np.where(roofs, spectra["roof"], 0.6 * spectra["vegetation"] + 0.4 * spectra["soil"])
    other = spectra["water" if rng.random() < 0.5 else "soil"]
    share = (smooth_field(rng, size, size) > rng.uniform(0.35, 0.7))[None]
    scene = np.where(share, other, base) * rng.uniform(0.7, 1.3)
    haze = rng.uniform(0, 0.03) * np.linspace(1, 0, 13, dtype=np.float32)[:, None, None]
    noisy = scene + haze + rng.normal(0, 0.01, (13, size, size))
    return np.clip(noisy, 0, 1).astype(np.float32)


def ct_slice(rng: np.random.Generator, level: str, height: int = 48, width: int = 64) -> np.ndarray:
    """An axial CT-like slice at one of three body levels, stored as HU + 1024 in uint16 (12 bits used): head (skull
    ring, brain), chest (two air-filled lungs, heart, spine), abdomen (liver, kidneys, spine, fat); sizes, positions
    and tissue values vary, with scanner-like noise."""
    hu = np.full((height, width), -1000.0)
    cy, cx = height / 2 + rng.uniform(-2, 2), width / 2 + rng.uniform(-3, 3)
    scale = rng.uniform(0.85, 1.0)

    def blob(dy: float, dx: float, ry: float, rx: float) -> np.ndarray:
        return ellipse(height, width, cy + dy * scale, cx + dx * scale, ry * scale, rx * scale)

    if level == "head":
        hu[blob(0, 0, 19, 17)] = 900.0 + rng.normal(0, 60)
        hu[blob(0, 0, 16.5, 14.5)] = 32.0 + rng.normal(0, 4)
        hu[blob(rng.uniform(-3, 3), 0, 3, 1.5)] = 8.0  # ventricle
    else:
        hu[blob(0, 0, 20, 29)] = -100.0 + rng.normal(0, 15)  # subcutaneous fat
        hu[blob(0, 0, 18, 26)] = 45.0 + rng.normal(0, 5)
        hu[blob(12, 0, 3.5, 3.5)] = 700.0 + rng.normal(0, 50)  # spine
        if level == "chest":
            for side in (-1, 1):
                hu[blob(-1, side * 12, 12, 8.5)] = -830.0 + rng.normal(0, 30)
            hu[blob(1, rng.uniform(-4, 1), 7, 7)] = 40.0  # heart
        else:
            hu[blob(-2, -9, 10, 11)] = 60.0 + rng.normal(0, 6)  # liver
            for side in (-1, 1):
                hu[blob(6, side * 8, 3.5, 2.5)] = 30.0
    hu += rng.normal(0, 12, hu.shape)
    return np.clip(hu + 1024, 0, 4095).astype(np.uint16)


def cells_tiff(rng: np.random.Generator, dividing: bool, height: int = 40, width: int = 56) -> np.ndarray:
    """4 x H x W uint16 fluorescence-like image: nuclei (ch 0), membranes (ch 1), cytoplasm (ch 2), background (ch 3);
    dividing cells have paired, condensed nuclei."""
    image = rng.normal(300, 40, (4, height, width))
    for _ in range(rng.integers(3, 6)):
        cy, cx, r = rng.uniform(6, height - 6), rng.uniform(6, width - 6), rng.uniform(4, 6)
        cell = ellipse(height, width, cy, cx, r, r * rng.uniform(0.8, 1.3))
        image[1][cell & ~ellipse(height, width, cy, cx, r - 1, r * 0.8)] += 3000
        image[2][cell] += 1200
        if dividing:
            for dy in (-r / 3, r / 3):
                image[0][ellipse(height, width, cy + dy, cx, r / 4, r / 4)] += 9000
        else:
            image[0][ellipse(height, width, cy, cx, r / 2, r / 2)] += 5000
    image[3] += 200 * smooth_field(rng, height, width)
    return np.clip(image, 0, 65535).astype(np.uint16)


def photo_crop(rng: np.random.Generator, photo: np.ndarray, size: int = 64) -> np.ndarray:
    """A random square crop (a quarter to three quarters of the short side) of an RGB photo, resized to `size`."""
    from PIL import Image

    side = int(min(photo.shape[:2]) * rng.uniform(0.25, 0.75))
    top, left = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
    crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
    return np.asarray(crop)


def write_split(root: Path, classes: Sequence[str], count: int, make: Callable[[str, int], None]) -> None:
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            make(name, index)


def write_example(kind: str, out: Path, per_class: int = 40, seed: int = 0) -> Dict[str, int]:
    """Write `out/train/<class>/...` (`per_class` each) and `out/val/<class>/...` (half as many); returns the counts."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(seed)
    if kind == "photos":
        try:
            from skimage import data as photos
        except ImportError:
            raise SystemExit("the photos example needs scikit-image: pip install scikit-image") from None
        sources = {name: getattr(photos, name)() for name in PHOTOS}
    classes: Dict[str, Sequence[str]] = {"s2": list(S2_CLASSES), "ct": ["head", "chest", "abdomen"],
                                         "tiff4": ["resting", "dividing"], "photos": list(PHOTOS)}

    for split, count in (("train", per_class), ("val", max(1, per_class // 2))):
        root = out / split

        def make(name: str, index: int) -> None:
            path = root / name / f"{name}_{index:04d}"
            if kind == "s2":
                np.save(path.with_suffix(".npy"), s2_patch(rng, name))
            elif kind == "ct":
                Image.fromarray(ct_slice(rng, name)).save(path.with_suffix(".png"))
            elif kind == "tiff4":
                tifffile.imwrite(path.with_suffix(".tif"), cells_tiff(rng, name == "dividing"))
            else:
                Image.fromarray(photo_crop(rng, sources[name])).save(path.with_suffix(".jpg"), quality=90)

        write_split(root, classes[kind], count, make)
    return {split: sum(1 for _ in (out / split).rglob("*.*")) for split in ("train", "val")}


def raw_pixel_probe(root: Path, channels: int, size: Sequence[int]) -> Dict[str, float]:
    """The baseline beside every probe: the logistic probe (the library's, L2 picked on a held-out tenth) on the
    flattened pixels of the same center views the encoder sees, in the loader's units."""
    import torch

    from mimswin.config.evaluation import LabeledDataConfig
    from mimswin.data.labeled import labeled_pair
    from mimswin.data.pixels import to_float
    from mimswin.data.transforms import eval_transform
    from mimswin.eval.logistic import logistic_probe

    view = eval_transform(tuple(size))
    cfg = LabeledDataConfig(path=str(root), channels=channels)
    train, val, classes = labeled_pair(cfg, view, view)

    def flat(dataset) -> tuple:
        items = [dataset[i] for i in range(len(dataset))]
        pixels = torch.stack([to_float(image).flatten() for image, _ in items])
        return pixels, torch.tensor([label for _, label in items])

    result = logistic_probe(*flat(train), *flat(val), classes)
    return {"top1": result["top1"], "l2": result["l2"]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("photos", "ct", "s2", "tiff4", "raw"))
    parser.add_argument("out", type=Path, help="folder to write (raw: the folder with train/ and val/ to probe)")
    parser.add_argument("--per-class", type=int, default=200, help="train images per class (val: half as many)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels", type=int, default=3, help="raw: channels to read")
    parser.add_argument("--size", type=int, nargs="+", default=[32], help="raw: the encoder's image size (H [W])")
    args = parser.parse_args(argv)
    if args.kind == "raw":
        size = args.size * 2 if len(args.size) == 1 else args.size
        result = raw_pixel_probe(args.out, args.channels, size)
        print(f"raw-pixel logistic probe of {args.out} at {size[0]}x{size[1]}: val top-1 {result['top1']:.2f} "
              f"(L2 {result['l2']:g})")
        return
    counts = write_example(args.kind, args.out, args.per_class, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val files under {args.out}")


if __name__ == "__main__":
    main()
