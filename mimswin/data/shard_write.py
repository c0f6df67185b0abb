"""Shard writer: an image folder or the embedded data set -> webdataset tar shards (image + cls + key).

`mimswin shards SRC OUT --maxcount N` writes OUT/<prefix>-000000.tar, ... with wds.ShardWriter, and OUT/sizes.json
(samples per shard, read by the shard loader to plan epochs and skip consumed shards on resume). Every file the
readers can decode (images, multi-band TIFF, `.npy` arrays) is stored byte for byte under its own extension, so the
shards hold exactly the pixels the folder holds; files that cannot be decoded are skipped and counted.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from mimswin.data.pixels import SampleError
from mimswin.data.readers import ReadSpec, read_bytes
from mimswin.data.shard_stream import CLASSES_FILE, SIZES_FILE
from mimswin.data.sources import EmbeddedMNIST, scan_folder
from mimswin.errors import DataError

EXTENSION_KEYS = {"jpeg": "jpg", "tif": "tiff"}  # one webdataset key per format
EMBEDDED = "embedded"


@dataclass
class Record:
    """One image to write, or the reason it cannot be."""

    key: str
    label: int
    ext: str = ""
    data: bytes = b""
    source: str = ""
    error: str = ""


@dataclass
class Summary:
    prefix: str = ""
    images: int = 0
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


def encode_file(path: Path) -> Tuple[str, bytes]:
    """(extension key, bytes) of a file stored as it is, after a full decode check (`SampleError` if it fails)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SampleError("unreadable image", err.strerror or str(err)) from None
    ext = path.suffix.lower().lstrip(".")
    read_bytes(data, ext, ReadSpec(channels=None, layout="chw"))  # decodable; channels and layout are the run's
    return EXTENSION_KEYS.get(ext, ext), data


def folder_records(root: Path) -> Tuple[Iterator[Record], int, List[str]]:
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
                record.ext, record.data = encode_file(path)
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


def source_records(src: str) -> Tuple[Iterator[Record], int, List[str], str]:
    """(records, count, class names, default prefix) of `embedded[:split]` or an image folder."""
    if src == EMBEDDED or src.startswith(EMBEDDED + ":"):
        split = src.partition(":")[2] or "train"
        return (*embedded_records(split), split)
    return (*folder_records(Path(src).expanduser()), "train")


def update_json(path: Path, values: Dict[str, object]) -> None:
    """Merge into a JSON object file, so train and val shards can share a directory."""
    current = json.loads(path.read_text()) if path.is_file() else {}
    current.update(values)
    path.write_text(json.dumps(current, indent=1, sort_keys=True))


def write_shards(src: str, out: Path, maxcount: int = 1000, maxsize: float = 1e9, prefix: Optional[str] = None,
                 progress: bool = True) -> Summary:
    """Write the shards and sizes.json; returns what was written and skipped."""
    records, count, classes, default_prefix = source_records(src)
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
    update_json(out / SIZES_FILE, sizes)
    if classes:
        update_json(out / CLASSES_FILE, {prefix: classes})
    return summary

