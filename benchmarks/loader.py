"""Loader benchmark on photographs: the CPU cost per image of each data path on one core, the bytes each moves to the
device, the whole loader with its workers, and whether a GPU machine's cores would feed a ViT-B/16 MAE.

    pip install "mimswin[bench]"        # scikit-image: its bundled photographs, cropped and saved as JPEG offline
    python benchmarks/loader.py --photos 512 --workers 2
    python benchmarks/loader.py --data-path /my/photos --size 224
    python benchmarks/loader.py --write-photos .device/photos --photos 2048   # for the GPU check's loader rows

Paths: the issue's baseline (PIL, bicubic resize on PIL, ToTensor + Normalize in the worker: float32 out), the resize
in the worker (uint8 out; `data.resize: worker`, the CPU default), the resize on the device (`data.resize: device`,
the GPU default: the worker decodes and cuts the box), and the decode on the device too (`data.decode: device`: the
worker reads bytes and the JPEG header). The device halves are timed here on the CPU; on a GPU they are a batched
kernel sequence (the GPU check script times the loader rows there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mimswin.bench.contenders import LOADER_PLACES  # noqa: E402
from mimswin.bench.loader import (  # noqa: E402
    have_photos,
    image_files,
    measure_path,
    per_core_rates,
    photo_bytes,
    write_photos,
)
from mimswin.config import PretrainConfig, load_config  # noqa: E402
from mimswin.data.batches import collate_samples  # noqa: E402
from mimswin.data.device_crop import DeviceCrop  # noqa: E402
from mimswin.data.readers import ReadSpec, read_path  # noqa: E402
from mimswin.data.shard_write import Shrink, encode_file, write_shards  # noqa: E402

BASELINE = "issue baseline: PIL, resize, float32 out"
# ViT-B/16 MAE at 224 (75 % mask, 512 x 8 decoder) on one H100: DailyMAE's ~2,000 images/s per A100 times ~2.5-3 for
# an H100 in bf16 gives ~5,000-6,000; the 43.5 GFLOP/image at 50 % MFU gives 8,000-9,000. The upper figure.
VIT_B_MAE_H100 = 9000.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=512, help="photographs to write (without --data-path)")
    parser.add_argument("--data-path", default=None, help="a folder of your own images instead")
    parser.add_argument("--max-side", type=int, default=None,
                        help="read the images as `mimswin shards --max-side N` stores them (resized, re-encoded)")
    parser.add_argument("--write-photos", default=None, metavar="DIR",
                        help="only write the photographs into DIR (e.g. to carry them to a GPU machine) and exit")
    parser.add_argument("--size", type=int, default=224, help="training resolution")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the whole-loader rows")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the whole-loader rows")
    parser.add_argument("--batches", type=int, default=6, help="batches timed per whole-loader row")
    parser.add_argument("--cores", type=int, default=16, help="cores of the GPU machine in the estimate")
    parser.add_argument("--model-rate", type=float, default=VIT_B_MAE_H100,
                        help="images/s the model consumes (default: ViT-B/16 MAE on one H100, estimated)")
    args = parser.parse_args(argv)
    if args.data_path is None and not have_photos():
        sys.exit("benchmarks/loader.py: pip install 'mimswin[bench]' (scikit-image's photographs), or --data-path")
    if args.write_photos:
        print(f"wrote {args.photos} photographs under {write_photos(Path(args.write_photos), args.photos)}")
        return
    size, scale = (args.size, args.size), (0.2, 1.0)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_path) if args.data_path else write_photos(Path(tmp) / "photos", args.photos)
        if args.max_side:
            root = shrunk_copy(root, Path(tmp) / f"max_side_{args.max_side}", args.max_side)
        files = image_files(root)
        sample = files[:256]
        rates = per_core_rates(sample, size, scale, mean, std, min(args.batch, len(sample)))
        moved = bytes_per_sample(sample, size, scale)
        print(f"{len(files)} images under {root}, {photo_bytes(sample) / 1e3:.1f} KB per file; crops to {args.size} px,"
              f" scale {scale}; one core (torch threads 1)\n")
        print("| path (one core) | images/s | CPU cost vs baseline | bytes/sample to the device | vs float32 |")
        print("|---|---:|---:|---:|---:|")
        for name, rate in rates.items():
            sent = moved.get(name)
            sent_text = f"{sent / 1e3:.0f} KB | {sent / moved[BASELINE]:.2f}" if sent else "- | -"
            print(f"| {name} | {rate:.0f} | {rate / rates[BASELINE]:.2f}x less | {sent_text} |")
        print()
        whole = loader_rows(root, args, tmp)
        print(f"| whole loader ({args.workers} workers, batch {args.batch}, this machine) | images/s | MB/batch |")
        print("|---|---:|---:|")
        for name, (rate, batch_mb) in whole.items():
            print(f"| {name} | {rate:.0f} | {batch_mb:.2f} |")
        print(f"\nestimate, {args.cores}-core GPU machine ({args.cores - 1} workers), model {args.model_rate:.0f} "
              "images/s:")
        for name in ("resize in the worker (uint8 out)", "resize on the device: worker half",
                     "decode on the device: worker half"):
            supply = rates[name] * (args.cores - 1)
            print(f"  {name}: {supply:.0f} images/s, loader/model {supply / args.model_rate:.2f}")


def shrunk_copy(root: Path, out: Path, max_side: int) -> Path:
    """The images of `root` as `mimswin shards --max-side` stores them, written as a folder."""
    for path in image_files(root):
        ext, data, _ = encode_file(path, Shrink(max_side))
        target = out / path.relative_to(root).with_suffix(f".{ext}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return out


def bytes_per_sample(files, size, scale) -> dict:
    """Mean bytes per sample that each path hands to the device."""
    channels, pixels = 3, size[0] * size[1]
    crop = DeviceCrop(size, scale, 0.5)
    torch.manual_seed(0)
    cuts = collate_samples([(crop(read_path(p, ReadSpec(3))), 0) for p in files]).images
    jpegs = collate_samples([(crop(read_path(p, ReadSpec(3, defer_jpeg=True))), 0) for p in files]).images
    return {BASELINE: 4 * channels * pixels, "resize in the worker (uint8 out)": channels * pixels,
            "resize on the device: worker half": cuts.nbytes / cuts.count,
            "decode on the device: worker half": jpegs.nbytes / jpegs.count}


def loader_rows(root: Path, args, tmp: str) -> dict:
    """images/s and MB per batch of the real pretraining loader on this machine, per place, and from shards."""
    overrides = [f"data.path={root}", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
                 f"model.img_size={args.size}", "data.channels=3"]
    rows = {}
    for name, (resize, decode) in LOADER_PLACES.items():
        cfg = load_config(PretrainConfig, [], [*overrides, f"data.resize={resize}", f"data.decode={decode}"])
        run = measure_path(cfg, (args.size, args.size), torch.device("cpu"), args.batches, 1)
        rows[f"folder, {name}"] = (run.images_per_s, run.bytes_per_batch / 1e6)
    summary = write_shards(str(root), Path(tmp) / "shards", maxcount=max(1, len(image_files(root)) // 8),
                           progress=False)
    shards = f"{Path(tmp) / 'shards'}/train-{{000000..{len(summary.shards) - 1:06d}}}.tar"
    cfg = load_config(PretrainConfig, [], [*overrides[1:], f"data.shards={shards}", "data.resize=worker"])
    run = measure_path(cfg, (args.size, args.size), torch.device("cpu"), args.batches, 1)
    rows["shards, loader"] = (run.images_per_s, run.bytes_per_batch / 1e6)
    return rows


if __name__ == "__main__":
    main()
