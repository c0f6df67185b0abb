"""Hugging Face `datasets` as a source (`data.hf`): a `save_to_disk` folder, parquet / arrow files (a file, a folder
or a glob), or a Hub name already in the local cache (never downloaded: the load runs in offline mode).

Rows become samples under the pixel contract (`readers.read_image`): an `Image` column is read from its encoded bytes
(a 16-bit PNG stays 16-bit), a bytes column likewise, an array column (`Array2D/3D`, nested lists) in the dtype its
feature declares. Map-style datasets (`HFImages`) go through the resumable sampler like image folders;
`data.hf_streaming` reads an `IterableDataset` (`HFStreamLoader`): each rank its `split_dataset_by_node` part, rows
read in the main process and shuffled in windows of `data.shuffle_buffer`, decoded in the workers; the stream's
`state_dict()` at the current window's start rides in each checkpoint, so a resumed run reads exactly the rows the
uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from mimswin.data.batches import DeviceStep, collate_samples, ready_batches
from mimswin.data.pixels import SampleError, Skipped
from mimswin.data.readers import ReadSpec, read_bytes, read_image, sniff_extension
from mimswin.data.sampler import SeededSamples, sample_seed
from mimswin.errors import DataError
from mimswin.signals import ignore_stop_signals

log = logging.getLogger(__name__)
DISK_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes (a DatasetDict, one Dataset)
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
VAL_SPLITS = ("validation", "val", "test")
Item = Tuple[torch.Tensor, int] | Skipped


@dataclass(frozen=True)
class HFSource:
    """Which split and columns of a datasets source a command reads (`mimswin stats`, `mimswin shards`)."""

    split: str = "train"
    image_key: str = "image"
    label_key: Optional[str] = "label"


def datasets_module() -> Any:
    """The `datasets` package, or one line naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise DataError('data.hf: reading Hugging Face datasets needs the `datasets` package: pip install '
                        '"mimswin[hf]"') from None
    return datasets


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face libraries in offline mode while a dataset is opened: a Hub name resolves from the local cache or
    fails, nothing is downloaded."""
    import huggingface_hub.constants as hub
    datasets = datasets_module()
    before = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = before


def is_disk_folder(path: Path) -> bool:
    """Whether `path` is a folder `save_to_disk` wrote."""
    return path.is_dir() and any((path / marker).is_file() for marker in DISK_MARKERS)


def is_hf_path(path: str) -> bool:
    """Whether a local path names a datasets source: a parquet / arrow file or glob, a `save_to_disk` folder, or a
    folder holding parquet / arrow files."""
    local = Path(path).expanduser()
    if local.suffix in FILE_BUILDERS:
        return True
    if not local.is_dir():
        return False
    return is_disk_folder(local) or any(next(local.rglob(f"*{suffix}"), None) is not None for suffix in FILE_BUILDERS)


def load_splits(spec: str, streaming: bool = False) -> Mapping[str, Any]:
    """Every split of `data.hf`, map-style or (`streaming`) iterable; one DataError when it cannot be read."""
    datasets = datasets_module()
    path = Path(spec).expanduser()
    try:
        with offline():
            if is_disk_folder(path):
                loaded = datasets.load_from_disk(str(path))
                splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {
                    str(loaded.split or "train"): loaded}
                return {name: split.to_iterable_dataset() for name, split in splits.items()} if streaming else splits
            if path.is_dir():
                return dict(datasets.load_dataset(str(path), streaming=streaming))
            if path.suffix in FILE_BUILDERS:
                if not glob.glob(str(path)):
                    raise DataError(f"data.hf: no file matches '{spec}'")
                return dict(datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path),
                                                  streaming=streaming))
            if path.exists():
                raise DataError(f"data.hf: '{spec}' is neither a save_to_disk folder nor parquet / arrow files")
            return dict(datasets.load_dataset(spec, streaming=streaming))
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        if "/" in spec and not path.exists():
            raise DataError(f"data.hf: '{spec}' is not a local path and not in the local Hugging Face cache (mimswin "
                            f"never downloads; load it once with datasets.load_dataset on a connected machine, or "
                            f"save it with save_to_disk / to_parquet): {reason}") from None
        raise DataError(f"data.hf: cannot read '{spec}': {reason}") from None


def open_split(spec: str, split: str, streaming: bool = False, key: str = "data.hf_split") -> Any:
    """One split of `data.hf`; a missing one is a DataError naming `key` and the splits there are."""
    splits = load_splits(spec, streaming)
    if split not in splits:
        raise DataError(f"{key}: '{split}' is not a split of '{spec}' (it has: {', '.join(splits)})")
    return splits[split]


def val_split_name(spec: str, wanted: Optional[str]) -> str:
    """The validation split: `wanted`, else the first of validation / val / test the dataset has."""
    if wanted is not None:
        return wanted
    names = list(load_splits(spec))
    found = next((name for name in VAL_SPLITS if name in names), None)
    if found is None:
        raise DataError(f"data.hf_val_split: '{spec}' has no validation, val or test split (it has: "
                        f"{', '.join(names)}); name the one to evaluate on")
    return found


def element_dtype(feature: Any) -> Optional[np.dtype]:
    """The dtype an array feature declares (Array2D/3D, nested List / Sequence of Value); None for other features."""
    datasets = datasets_module()
    while feature is not None:
        if isinstance(feature, datasets.Value):
            return np.dtype(feature.dtype) if feature.dtype not in ("binary", "large_binary", "string") else None
        if hasattr(feature, "shape") and hasattr(feature, "dtype"):  # Array2D ... Array5D
            return np.dtype(feature.dtype)
        feature = getattr(feature, "feature", None)
    return None


@dataclass
class Columns:
    """How rows of one split become samples: the image column (`dtype`: its array feature's element dtype), the label
    column (None: unlabeled), the class names and, for labels that are not class indices, their index."""

    image: str
    label: Optional[str]
    dtype: Optional[np.dtype]
    classes: List[str]
    index: Optional[Dict[Any, int]] = None

    def label_of(self, row: Mapping[str, Any]) -> int:
        """A row's class index (-1 without a label column); `SampleError` for a missing or unknown one."""
        if self.label is None:
            return -1
        value = row.get(self.label)
        if value is None:
            raise SampleError("no label")
        if isinstance(value, np.ndarray):
            value = value.item()
        if self.index is not None:
            if value not in self.index:
                raise SampleError("bad label", f"{value!r}")
            return self.index[value]
        return int(value)


def columns_of(split: Any, image_key: str, label_key: Optional[str], spec: str, labeled: bool) -> Columns:
    """The `Columns` of a split: the image column must exist; the label column too when `labeled` (evaluation).
    Class names: a ClassLabel's, else the sorted distinct values (map-style splits; a stream's are unknown)."""
    datasets = datasets_module()
    features = split.features or {}
    if image_key not in features:
        raise DataError(f"data.hf_image_key: '{spec}' has no column '{image_key}' (columns: {', '.join(features)})")
    if label_key not in features:
        if labeled:
            raise DataError(f"data.hf_label_key: '{spec}' has no column '{label_key}' (columns: "
                            f"{', '.join(features)}); evaluation needs labels")
        label_key = None
    dtype = element_dtype(features[image_key])
    if label_key is None:
        return Columns(image_key, None, dtype, [])
    feature = features[label_key]
    if isinstance(feature, datasets.ClassLabel):
        return Columns(image_key, label_key, dtype, list(feature.names))
    if not isinstance(split, datasets.Dataset):
        return Columns(image_key, label_key, dtype, [])
    values = sorted(v for v in split.unique(label_key) if v is not None)
    return Columns(image_key, label_key, dtype, [str(v) for v in values], {v: i for i, v in enumerate(values)})


def prepared(split: Any, columns: Columns) -> Any:
    """The split reduced to its image and label columns, images left encoded (their bytes are read by our readers,
    in their own depth), arrays formatted as numpy where the split allows random access."""
    datasets = datasets_module()
    keep = [name for name in (columns.image, columns.label) if name is not None]
    split = split.select_columns(keep)
    if isinstance(split.features[columns.image], datasets.Image):
        split = split.cast_column(columns.image, datasets.Image(decode=False))
    elif columns.dtype is not None and isinstance(split, datasets.Dataset):
        split = split.with_format("numpy", columns=[columns.image], output_all_columns=True)
    return split


def image_file(value: Mapping[str, Any]) -> Tuple[str, bytes]:
    """(extension, bytes) of an `Image` feature's value left encoded: its bytes (the extension from its path, else
    sniffed), or the file its path names."""
    path = value.get("path") or ""
    if value.get("bytes") is not None:
        data = bytes(value["bytes"])
        return Path(path).suffix or sniff_extension(data), data
    if not path:
        raise SampleError("no image")
    try:
        return Path(path).suffix, Path(path).read_bytes()
    except OSError as err:
        raise SampleError("unreadable image", err.strerror or str(err)) from None


def encoded_value(value: Any, dtype: Optional[np.dtype]) -> Tuple[str, bytes]:
    """(extension without the dot, bytes) that store an image column's value as a file: encoded images as they are,
    arrays as `.npy` in their own dtype and layout."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = {"bytes": value}
    if isinstance(value, Mapping):
        ext, data = image_file(value)
        return (ext or f".{image_format(data)}").lstrip("."), data
    if value is None:
        raise SampleError("no image")
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(value, dtype=dtype), allow_pickle=False)
    return "npy", buffer.getvalue()


def image_format(data: bytes) -> str:
    """The file extension of encoded image bytes, as PIL names their format."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return (image.format or "").lower()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as err:
        raise SampleError("unreadable image", str(err)) from None


class RowReader:
    """A row -> (C x H x W sample in its own dtype, transformed; label) or `Skipped` with the reason."""

    def __init__(self, columns: Columns, transform: Optional[Callable], spec: ReadSpec, labeled: bool) -> None:
        self.columns, self.transform, self.spec, self.labeled = columns, transform, spec, labeled

    def image(self, value: Any) -> Any:
        if isinstance(value, Mapping):  # an Image feature left encoded
            ext, data = image_file(value)
            return read_bytes(data, ext, self.spec)
        return read_image(value, self.spec, self.columns.dtype)

    def __call__(self, row: Mapping[str, Any], source: str) -> Item:
        try:
            label = self.columns.label_of(row)
            if self.labeled and label < 0:
                raise SampleError("no label")
            image = self.image(row[self.columns.image])
            return (self.transform(image) if self.transform else image), label
        except SampleError as err:
            log.warning("skipping %s: %s", source, err)
            return Skipped(err.reason, source, err.detail)


class HFImages(Dataset):
    """One map-style split of a datasets source as (sample, label) items (`Skipped` for rows that cannot be used);
    `classes` from its label column."""

    def __init__(self, split: Any, columns: Columns, transform: Optional[Callable], spec: ReadSpec, name: str,
                 labeled: bool = False) -> None:
        self.split, self.columns, self.name = prepared(split, columns), columns, name
        self.classes = columns.classes
        self.read = RowReader(columns, transform, spec, labeled)

    def __len__(self) -> int:
        return len(self.split)

    def labels(self) -> torch.Tensor:
        """Every row's class index, read from the label column alone."""
        values = self.split.with_format(None)[self.columns.label]
        index = self.columns.index
        return torch.tensor([index[v] if index is not None else int(v) for v in values])

    def __getitem__(self, index: int) -> Item:
        return self.read(self.split[int(index)], f"{self.name}[{index}]")


def hf_images(spec: str, split_name: str, image_key: str, label_key: Optional[str], transform: Optional[Callable],
              read_spec: ReadSpec, labeled: bool = False, key: str = "data.hf_split") -> HFImages:
    """The map-style `HFImages` of one split of `spec`."""
    split = open_split(spec, split_name, key=key)
    columns = columns_of(split, image_key, label_key, spec, labeled)
    return HFImages(split, columns, transform, read_spec, f"{spec}:{split_name}", labeled)


class Passes:
    """This rank's rows of a stream from a saved position on, starting a new pass at each end of the stream (a rank
    whose part is shorter than its batches reads it again)."""

    def __init__(self, stream: Any, first: Dict[str, Any], at: Dict[str, Any]) -> None:
        self.stream, self.first, self.passes = stream, first, at["pass"]
        stream.load_state_dict(at["stream"])
        self.rows, self.fresh = iter(stream), False

    def position(self) -> Dict[str, Any]:
        """Where the next row comes from: the pass and the stream's `state_dict()`."""
        return {"pass": self.passes, "stream": self.stream.state_dict()}

    def take(self, count: int) -> List[Any]:
        rows: List[Any] = []
        while len(rows) < count:
            row = next(self.rows, None)
            if row is not None:
                rows.append(row)
                self.fresh = False
                continue
            if self.fresh:
                raise DataError("data.hf: this rank's part of the stream holds no rows")
            self.passes, self.fresh = self.passes + 1, True
            self.stream.load_state_dict(self.first)
            self.rows = iter(self.stream)
        return rows


class StreamRows(Sampler):
    """Batches of ((row, position), sample seed) of one rank's part of a stream, read in the main process (the
    workers decode): rows are shuffled within windows of `window` positions, each permuted by (seed, epoch, rank,
    window). The position where each window of the epoch starts is kept, for `HFStreamLoader.state_dict`."""

    def __init__(self, stream: Any, batch_size: int, batches: int, window: int, seed: int, rank: int) -> None:
        self.stream, self.batch_size, self.batches = stream, batch_size, batches
        self.window, self.seed, self.rank = max(1, window), seed, rank
        self.first = stream.state_dict()
        self.epoch, self.start_batch, self.resume_at = 0, 0, None
        self.window_starts: Dict[int, Dict[str, Any]] = {}

    def set_epoch(self, epoch: int, start_batch: int, resume_at: Optional[Dict[str, Any]] = None) -> None:
        """The next iteration reads `epoch` from `start_batch`; `resume_at`: the saved start of its window."""
        self.epoch, self.start_batch, self.resume_at = epoch, start_batch, resume_at
        self.window_starts = {}

    def __iter__(self) -> Iterator[List[Tuple[Tuple[Any, int], int]]]:
        index, offset = divmod(self.start_batch * self.batch_size, self.window)
        at = self.resume_at if self.resume_at is not None else {"pass": 0, "stream": self.first} if index == 0 else None
        if at is None:
            raise DataError(f"data.hf_streaming: no saved stream position for batch {self.start_batch} of epoch "
                            f"{self.epoch} (a checkpoint without the stream's state)")
        source, end = Passes(self.stream, self.first, at), self.batches * self.batch_size
        self.window_starts[index] = at
        batch: List[Tuple[Tuple[Any, int], int]] = []
        for start in range(index * self.window, end, self.window):
            window = source.take(min(self.window, end - start))
            self.window_starts[index + 1] = source.position()
            order = np.random.default_rng([self.seed, self.epoch, self.rank, index]).permutation(len(window))
            for i in order[offset:].tolist():
                spot = start + i
                batch.append(((window[i], spot), sample_seed(self.seed, self.epoch, self.rank * end + spot)))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            index, offset = index + 1, 0

    def __len__(self) -> int:
        return self.batches - self.start_batch


class StreamDecoder(Dataset):
    """Decodes the rows `StreamRows` hands over (in the workers): item (row, position) -> `RowReader`'s item."""

    def __init__(self, read: RowReader, name: str) -> None:
        self.read, self.name = read, name

    def __getitem__(self, item: Tuple[Any, int]) -> Item:
        row, position = item
        return self.read(row, f"{self.name}@{position}")


def all_ranks(state: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every rank's `state` (a collective where several processes run; this one alone otherwise)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    gathered: List[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, state)
    return gathered


class HFStreamLoader:
    """`EpochLoader`'s interface over a stream (`data.hf_streaming`), with `state_dict` / `load_state_dict`: handed
    to the Trainer as a callback, where every rank's position in the stream rides in each checkpoint (its
    `state_dict` is a collective: every rank calls it, as the Trainer's save does)."""

    def __init__(self, rows: StreamRows, read: RowReader, name: str, num_workers: int, device: torch.device,
                 step: DeviceStep, size: Optional[int]) -> None:
        self.rows, self.device, self.step, self.size = rows, device, step, size
        self.loader = DataLoader(
            SeededSamples(StreamDecoder(read, name)), batch_sampler=rows, num_workers=num_workers,
            collate_fn=collate_samples, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
            generator=torch.Generator(), worker_init_fn=ignore_stop_signals)
        self.skip_reasons: Counter = Counter()
        self.used = (0, 0)  # (epoch, batches of it handed out)
        self.saved: Optional[Dict[str, Any]] = None

    @property
    def batches_per_epoch(self) -> int:
        return self.rows.batches

    @property
    def skipped(self) -> int:
        return sum(self.skip_reasons.values())

    @property
    def source_size(self) -> Optional[int]:
        """Rows in the split (None: unknown)."""
        return self.size

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        saved = self.saved
        at = saved["at"] if saved is not None and (saved["epoch"], saved["batch"]) == (epoch, start_batch) else None
        self.rows.set_epoch(epoch, start_batch, at)
        self.used = (epoch, start_batch)
        for batch in ready_batches(self.loader, self.step, self.device, self.skip_reasons):
            self.used = (epoch, self.used[1] + 1)  # counted before the loop uses it: a save then includes it
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        epoch, batch = self.used
        window = batch * self.rows.batch_size // self.rows.window
        here = {"epoch": epoch, "batch": batch, "at": self.rows.window_starts[window]}
        return {"ranks": all_ranks(here)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        ranks = state["ranks"]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if len(ranks) != (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1):
            raise DataError(f"data.hf_streaming: the checkpoint holds the stream positions of {len(ranks)} "
                            "process(es); resume with as many")
        self.saved = ranks[rank]


def parquet_rows(spec: str, split_name: str) -> Optional[int]:
    """Rows of a split held in local parquet files, from their footers (no row is read); None for other sources."""
    import pyarrow.parquet

    datasets, path = datasets_module(), Path(spec).expanduser()
    if path.suffix not in FILE_BUILDERS and not path.is_dir():
        return None
    with offline():
        builder = (datasets.load_dataset_builder(str(path)) if path.is_dir() else
                   datasets.load_dataset_builder(FILE_BUILDERS[path.suffix], data_files=str(path)))
    files = (builder.config.data_files or {}).get(split_name) or []
    if not files or not all(str(file).endswith(".parquet") for file in files):
        return None
    return sum(pyarrow.parquet.ParquetFile(file).metadata.num_rows for file in files)


def stream_size(split: Any, spec: str, split_name: str) -> Optional[int]:
    """Rows of a streamed split where they are known without reading it: its split info, the length of a
    `save_to_disk` split, or the row counts of parquet files; None otherwise."""
    splits = split.info.splits or {}
    if split_name in splits and splits[split_name].num_examples:
        return splits[split_name].num_examples
    if is_disk_folder(Path(spec).expanduser()):
        return len(open_split(spec, split_name))
    return parquet_rows(spec, split_name)


def hf_stream_loader(spec: str, split_name: str, image_key: str, label_key: Optional[str], transform: Callable,
                     read_spec: ReadSpec, step: DeviceStep, batch_size: int, num_workers: int, num_replicas: int,
                     rank: int, seed: int, device: torch.device, shuffle_buffer: int,
                     samples_per_epoch: Optional[int], batch_multiple: int = 1) -> HFStreamLoader:
    """The streaming loader of one split: this rank's part (`split_dataset_by_node`), equal batches on every rank
    (from the split's size or `data.samples_per_epoch`)."""
    from datasets.distributed import split_dataset_by_node

    split = open_split(spec, split_name, streaming=True)
    columns = columns_of(split, image_key, label_key, spec, labeled=False)
    size = stream_size(split, spec, split_name)
    total = samples_per_epoch or size
    if total is None:
        raise DataError(f"data.hf_streaming: the length of '{spec}' ({split_name}) is unknown; set "
                        "data.samples_per_epoch")
    batches = total // num_replicas // batch_size // batch_multiple * batch_multiple
    if batches == 0:
        raise DataError(f"data.hf: {total} samples cannot fill one batch of {batch_size} x {num_replicas} "
                        f"process(es) x {batch_multiple} accumulation step(s)")
    part = split_dataset_by_node(prepared(split, columns), rank=rank, world_size=num_replicas)
    rows = StreamRows(part, batch_size, batches, shuffle_buffer, seed, rank)
    return HFStreamLoader(rows, RowReader(columns, transform, read_spec, False), f"{spec}:{split_name}",
                          num_workers, device, step, size)


def stream_preview(spec: str, split_name: str, image_key: str, transform: Callable, read_spec: ReadSpec,
                   count: int, tries: int) -> List[Item]:
    """The first `tries` rows of a streamed split, read (for the preview pictures)."""
    split = open_split(spec, split_name, streaming=True)
    columns = columns_of(split, image_key, None, spec, labeled=False)
    read = RowReader(columns, transform, read_spec, False)
    items: List[Item] = []
    for position, row in zip(range(tries), prepared(split, columns)):
        items.append(read(row, f"{spec}:{split_name}@{position}"))
        if sum(not isinstance(item, Skipped) for item in items) == count:
            break
    return items
