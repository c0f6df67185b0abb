"""Example data sets of the kinds mimswin reads beyond 8-bit RGB, written offline, with class folders (train/, val/),
for the "Your own data" walkthroughs (docs/own_data.md) and the end-to-end tests.

    python benchmarks/own_data.py photos /tmp/photos   # RGB JPEG crops of scikit-image's bundled photos
    python benchmarks/own_data.py ct /tmp/ct           # 16-bit gray CT-like slices (HU + 1024), 48 x 64, lesion or not
    python benchmarks/own_data.py s2 /tmp/s2           # 13-band float32 reflectance arrays (.npy, C x H x W), 4 covers
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
S2_SPECTRA = {
    "water": [0.06, 0.05, 0.04, 0.03, 0.02, 0.02, 0.02, 0.015, 0.01, 0.005, 0.002, 0.01, 0.005],
    "forest": [0.03, 0.03, 0.05, 0.03, 0.08, 0.22, 0.28, 0.30, 0.31, 0.12, 0.01, 0.15, 0.07],
    "cropland": [0.05, 0.06, 0.09, 0.07, 0.15, 0.30, 0.35, 0.38, 0.40, 0.15, 0.02, 0.25, 0.14],
    "urban": [0.12, 0.12, 0.13, 0.14, 0.16, 0.18, 0.19, 0.20, 0.21, 0.08, 0.01, 0.25, 0.22],
}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "retina")


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
    """13 x size x size float32 reflectance: the cover's spectrum, smooth texture, a patch of another cover, noise."""
    spectra = np.array(list(S2_SPECTRA.values()), np.float32)
    own = spectra[list(S2_SPECTRA).index(cover)]
    other = spectra[rng.integers(len(spectra))]
    share = (smooth_field(rng, size, size) > rng.uniform(0.3, 0.6))[None]  # a minority region of some other cover
    base = np.where(share, other[:, None, None], own[:, None, None])
    texture = 1 + 0.2 * smooth_field(rng, size, size)[None]
    noisy = base * texture + rng.normal(0, 0.008, (13, size, size))
    return np.clip(noisy, 0, 1).astype(np.float32)


def ct_slice(rng: np.random.Generator, lesion: bool, height: int = 48, width: int = 64) -> np.ndarray:
    """A CT-like slice, stored as HU + 1024 in uint16 (12 bits used): air, a body of soft tissue with fat and an organ,
    a bone ring, noise; with `lesion`, a small hyperdense spot inside the organ."""
    hu = np.full((height, width), -1000.0)
    cy, cx = height / 2 + rng.uniform(-2, 2), width / 2 + rng.uniform(-3, 3)
    body = ellipse(height, width, cy, cx, height * rng.uniform(0.38, 0.45), width * rng.uniform(0.38, 0.45))
    hu[body] = -90.0
    inner = ellipse(height, width, cy, cx, height * 0.33, width * 0.34)
    hu[inner] = 40.0
    oy, ox = cy + rng.uniform(-4, 4), cx + rng.uniform(-8, 8)
    organ = ellipse(height, width, oy, ox, rng.uniform(7, 10), rng.uniform(9, 13))
    hu[organ & inner] = 60.0
    hu[inner & ~ellipse(height, width, cy, cx, height * 0.29, width * 0.30)] = 700.0
    if lesion:
        hu[ellipse(height, width, oy + rng.uniform(-3, 3), ox + rng.uniform(-4, 4), rng.uniform(2, 3.5),
                   rng.uniform(2, 3.5)) & organ] = 220.0
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
    classes: Dict[str, Sequence[str]] = {"s2": list(S2_SPECTRA), "ct": ["normal", "lesion"],
                                         "tiff4": ["resting", "dividing"], "photos": list(PHOTOS)}

    for split, count in (("train", per_class), ("val", max(1, per_class // 2))):
        root = out / split

        def make(name: str, index: int) -> None:
            path = root / name / f"{name}_{index:04d}"
            if kind == "s2":
                np.save(path.with_suffix(".npy"), s2_patch(rng, name))
            elif kind == "ct":
                Image.fromarray(ct_slice(rng, name == "lesion")).save(path.with_suffix(".png"))
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
