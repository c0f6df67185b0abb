"""Shard writer: an image folder, a Hugging Face datasets split or the embedded data set -> webdataset tar shards
(image + cls + key).

`mimswin shards SRC OUT --maxcount N` writes OUT/<prefix>-000000.tar, ... with wds.ShardWriter, and OUT/sizes.json
(samples per shard, read by the shard loader to plan epochs and skip consumed shards on resume). Every file the
readers can decode (images, multi-band TIFF, `.npy` arrays) is stored byte for byte under its own extension, so the
shards hold exactly the pixels the folder holds; files that cannot be decoded are skipped and counted. With
`--max-side N` images larger than the training resolution needs are stored resized (FFCV and DailyMAE keep ImageNet
at ~256-350 px): decoding cost falls with the pixels.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import tifffile
import torch
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from mimswin.data.hf import HFSource, encoded_value, hf_images, is_hf_path
from mimswin.data.pixels import SampleError
from mimswin.data.readers import ReadSpec, read_bytes
from mimswin.data.shard_stream import CLASSES_FILE, SIZES_FILE
from mimswin.data.sources import EmbeddedMNIST, scan_folder
from mimswin.data.transforms import resize
from mimswin.errors import DataError

EXTENSION_KEYS = {"jpeg": "jpg", "tif": "tiff"}  # one webdataset key per format
EMBEDDED = "embedded"
PIL_BANDS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # 8-bit bands -> the PIL mode a PNG stores them in


@dataclass
class Record:
    """One image to write, or the reason it cannot be."""

    key: str
    label: int
    ext: str = ""
    data: bytes = b""
    source: str = ""
    error: str = ""
    resized: bool = False


@dataclass
class Summary:
    prefix: str = ""
    images: int = 0
    resized: int = 0
    shards: List[str] = field(default_factory=list)
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: Dict[str, List[str]] = field(default_factory=dict)

    def skip(self, reason: str, source: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(source)

    def lines(self, out: Path) -> List[str]:
        span = f"{self.prefix}-{{000000..{len(self.shards) - 1:06d}}}.tar" if self.shards else "(none)"
        lines = [f"wrote {self.images} images in {len(self.shards)} shards ({self.bytes / 1e6:.1f} MB): {out / span}"]
        if self.resized:
            lines.append(f"resized {self.resized} of them to the --max-side")
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values())} file(s):")
            lines += [f"  {reason}: {n} (e.g. {', '.join(self.examples[reason])})" for reason, n in
                      sorted(self.skipped.items())]
        return lines


def sample_key(relative: Path, taken: set) -> str:
    """A webdataset key from a relative path: no dots (they separate the extension), unique within the run."""
    key = re.sub(r"[^A-Za-z0-9_/-]", "_", relative.with_suffix("").as_posix())
    while key in taken:
        key += "_"
    taken.add(key)
    return key


@dataclass(frozen=True)
class Shrink:
    """`--max-side`: images whose long side exceeds `max_side` px are resized (aspect kept, antialiased bicubic in
    their own dtype) and re-encoded: JPEGs as JPEG at `quality`, other 8-bit images of up to 4 bands as PNG, the
    rest (16-bit, float, many bands) as uncompressed TIFF; None stores every file byte for byte."""

    max_side: int
    quality: int = 90


def reencode(image: torch.Tensor, ext: str, quality: int) -> Tuple[str, bytes]:
    """(extension key, bytes) of a C x H x W native image in the format `Shrink` says."""
    out = io.BytesIO()
    channels = image.shape[0]
    if image.dtype == torch.uint8 and channels in PIL_BANDS:
        array = image.permute(1, 2, 0).numpy()
        picture = Image.fromarray(array[..., 0] if channels == 1 else array, mode=PIL_BANDS[channels])
        if ext in ("jpg", "jpeg") and channels in (1, 3):
            picture.save(out, format="JPEG", quality=quality)
            return "jpg", out.getvalue()
        picture.save(out, format="PNG")
        return "png", out.getvalue()
    tifffile.imwrite(out, image.contiguous().numpy(), photometric="minisblack")
    return "tiff", out.getvalue()


def encode_file(path: Path, shrink: Optional[Shrink] = None) -> Tuple[str, bytes, bool]:
    """`encode_bytes` of a file (an unreadable one is a `SampleError`)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SampleError("unreadable image", err.strerror or str(err)) from None
    return encode_bytes(data, path.suffix.lower().lstrip("."), shrink)


def encode_bytes(data: bytes, ext: str, shrink: Optional[Shrink] = None) -> Tuple[str, bytes, bool]:
    """(extension key, bytes, whether it was resized) of an encoded image after a full decode check (`SampleError` if
    it fails): stored as it is, or re-encoded smaller when `shrink` says so."""
    image = read_bytes(data, ext, ReadSpec(channels=None, layout="chw"))  # decodable; channels, layout: the run's
    height, width = image.shape[1:]
    if shrink is None or max(height, width) <= shrink.max_side:
        return EXTENSION_KEYS.get(ext, ext), data, False
    scale = shrink.max_side / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return (*reencode(resize(image, size), ext, shrink.quality), True)


def folder_records(root: Path, shrink: Optional[Shrink] = None) -> Tuple[Iterator[Record], int, List[str]]:
    if not root.is_dir():
        raise DataError(f"shards: source '{root}' is not a directory (nor '{EMBEDDED}[:split]')")
    samples, classes = scan_folder(root)
    if not samples:
        raise DataError(f"shards: no images under '{root}'")

    def records() -> Iterator[Record]:
        taken: set = set()
        for path, label in samples:
            relative = path.relative_to(root)
            record = Record(sample_key(relative, taken), label, source=relative.as_posix())
            try:
                record.ext, record.data, record.resized = encode_file(path, shrink)
            except SampleError as err:
                record.error = err.reason
            yield record

    return records(), len(samples), classes


def embedded_records(split: str) -> Tuple[Iterator[Record], int, List[str]]:
    dataset = EmbeddedMNIST(split)

    def records() -> Iterator[Record]:
        for i in range(len(dataset)):
            buffer = io.BytesIO()
            Image.fromarray(dataset.images[i].numpy(), mode="L").save(buffer, format="PNG")
            yield Record(f"mnist_{split}_{i:05d}", int(dataset.labels[i]), "png", buffer.getvalue())

    return records(), len(dataset), dataset.classes


def hf_records(src: str, source: HFSource, shrink: Optional[Shrink] = None
               ) -> Tuple[Iterator[Record], int, List[str]]:
    """The rows of one split of a datasets source: encoded images stored as they are (a 16-bit PNG stays one),
    arrays as `.npy` in their own dtype and layout."""
    images = hf_images(src, source.split, source.image_key, source.label_key, None, ReadSpec(channels=None))

    def records() -> Iterator[Record]:
        for index in range(len(images)):
            record = Record(f"{source.split}_{index:08d}", -1, source=f"{src}:{source.split}[{index}]")
            try:
                row = images.split[index]
                record.label = images.columns.label_of(row)
                ext, data = encoded_value(row[source.image_key], images.columns.dtype)
                record.ext, record.data, record.resized = encode_bytes(data, ext, shrink)
            except SampleError as err:
                record.error = err.reason
            yield record

    return records(), len(images), images.classes


def source_records(src: str, shrink: Optional[Shrink] = None, hf: Optional[HFSource] = None
                   ) -> Tuple[Iterator[Record], int, List[str], str]:
    """(records, count, class names, default prefix) of `embedded[:split]`, a datasets source (`hf`: its split and
    columns) or an image folder."""
    if src == EMBEDDED or src.startswith(EMBEDDED + ":"):
        split = src.partition(":")[2] or "train"
        return (*embedded_records(split), split)
    if is_hf_path(src):
        source = hf or HFSource()
        return (*hf_records(src, source, shrink), source.split)
    return (*folder_records(Path(src).expanduser(), shrink), "train")


def update_json(path: Path, values: Dict[str, object]) -> None:
    """Merge into a JSON object file, so train and val shards can share a directory."""
    current = json.loads(path.read_text()) if path.is_file() else {}
    current.update(values)
    path.write_text(json.dumps(current, indent=1, sort_keys=True))


def write_shards(src: str, out: Path, maxcount: int = 1000, maxsize: float = 1e9, prefix: Optional[str] = None,
                 progress: bool = True, shrink: Optional[Shrink] = None, hf: Optional[HFSource] = None) -> Summary:
    """Write the shards and sizes.json; returns what was written, resized and skipped."""
    records, count, classes, default_prefix = source_records(src, shrink, hf)
    prefix = prefix or default_prefix
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob(f"{prefix}-*.tar")):
        raise DataError(f"shards: '{out}' already holds {prefix}-*.tar shards; choose another OUT or --prefix")
    summary = Summary(prefix)
    sizes: Dict[str, int] = {}

    def finished(fname: str) -> None:
        sizes[Path(fname).name] = writer.count
        summary.shards.append(fname)
        summary.bytes += Path(fname).stat().st_size

    writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=maxcount, maxsize=maxsize, post=finished,
                             verbose=0)
    with writer, tqdm(total=count, unit="img", desc="shards", disable=not progress) as bar:
        for record in records:
            bar.update(1)
            if record.error:
                summary.skip(record.error, record.source)
                continue
            writer.write({"__key__": record.key, record.ext: record.data, "cls": str(record.label).encode()})
            summary.images += 1
            summary.resized += record.resized
    update_json(out / SIZES_FILE, sizes)
    if classes:
        update_json(out / CLASSES_FILE, {prefix: classes})
    return summary

