"""Streams webdataset tar shards as per-rank batches that resume exactly and give every rank the same step count.

An epoch is planned from (seed, epoch) alone: the shard list is shuffled and dealt to `ranks x workers` slots (or, when
resampled, each slot draws shards with replacement from its own seeded stream). A slot reads its shards in order and
shuffles them in windows of `shuffle_buffer` samples. Resuming at batch b skips whole consumed shards by their sizes
and re-reads (without decoding) only the consumed part of the current shard and window. Images are decoded after the
shuffle, each under its own seed, by the same readers as image folders (any format `readers.py` reads, kept in its own
dtype). See docs/data.md for what is guaranteed.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from mimswin.data.batches import Batch, DeviceStep, collate_samples, ready_batches
from mimswin.data.pixels import SampleError, Skipped, stack_samples
from mimswin.data.readers import ReadSpec, read_bytes
from mimswin.data.sampler import sample_seed
from mimswin.errors import DataError
from mimswin.signals import ignore_stop_signals

log = logging.getLogger(__name__)
RETRY_DELAY_S = 1.0  # before the first new try of a broken remote shard; doubled at each further try
CURL_SCHEMES = ("http", "https", "sftp", "ftps", "scp")  # the schemes webdataset's gopen reads with curl
SIZES_FILE = "sizes.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "npy")
CLASSES_FILE = "classes.json"


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def expand_shards(spec: str) -> List[str]:
    """Brace patterns, `::`-joined lists, globs and `pipe:` URLs -> shard URLs; local names must exist."""
    urls: List[str] = []
    for url in wds.shardlists.expand_urls(spec):
        if is_local(url) and any(c in url for c in "*?["):
            urls += sorted(str(p) for p in Path(url).parent.glob(Path(url).name))
        else:
            urls.append(url)
    missing = [u for u in urls if is_local(u) and not Path(u).is_file()]
    if not urls or len(missing) == len(urls):
        raise DataError(f"data.shards: '{spec}' matches no shard file")
    if missing:
        raise DataError(f"data.shards: {len(missing)} of {len(urls)} shards of '{spec}' do not exist "
                        f"(first: {missing[0]})")
    first_url: Dict[Optional[str], str] = {}
    for url in urls:
        first_url.setdefault(reader_program(url), url)
    for program, url in first_url.items():
        if program is not None and shutil.which(program) is None:
            raise DataError(f"data.shards: '{url}' is read with '{program}', which is not installed (not on PATH)")
    return urls


def reader_program(url: str) -> Optional[str]:
    """The program a remote shard is read with: curl for http(s) and the like, a `pipe:` command's own program (when
    it starts with a plain name); None for local files."""
    if url.startswith("pipe:"):
        try:
            words = shlex.split(url[len("pipe:"):])
        except ValueError:  # unbalanced quotes: the shell will say what is wrong
            return None
        return words[0] if words and re.fullmatch(r"[\w.+-]+", words[0]) else None
    scheme, separator, _ = url.partition("://")
    return "curl" if separator and scheme in CURL_SCHEMES else None


def shard_name(url: str) -> str:
    """The shard's file name, also inside a `pipe:` command (used as the key of sizes.json)."""
    names = re.findall(r"[^/\s'\"]+\.tar\b", url)
    return names[-1] if names else url.rsplit("/", 1)[-1]


def count_samples(path: str) -> int:
    """Samples in a local tar, from its headers only; a truncated tar counts what can be read."""
    count, last = 0, None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                prefix, _ = base_plus_ext(member.name)
                if member.isreg() and prefix is not None and not prefix.startswith("__") and prefix != last:
                    count, last = count + 1, prefix
    except (tarfile.TarError, OSError) as err:
        log.warning("shard %s is damaged (%s): counted %d readable samples", path, err, count)
    return count


def shard_sizes(urls: Sequence[str], sizes_file: Optional[str] = None) -> List[Optional[int]]:
    """Samples per shard from `sizes_file` (default: sizes.json beside local shards), else counted; None if unknown."""
    table: Dict[str, int] = {}
    path = Path(sizes_file).expanduser() if sizes_file else None
    if path is None and is_local(urls[0]):
        path = Path(urls[0]).parent / SIZES_FILE
    if path is not None and (sizes_file or path.is_file()):
        try:
            table = {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError, TypeError) as err:
            raise DataError(f"data.shard_sizes: cannot read '{path}' as a JSON object of shard: count ({err})")
    return [table.get(shard_name(u), count_samples(u) if is_local(u) else None) for u in urls]


def shard_classes(urls: Sequence[str], sizes_file: Optional[str] = None) -> List[str]:
    """Class names of labeled shards: the classes.json `mimswin shards` writes beside them (beside `data.shard_sizes`
    for remote shards), the entry of the shards' name prefix (`train` for train-000000.tar)."""
    if sizes_file:
        path = Path(sizes_file).expanduser().parent / CLASSES_FILE
    elif is_local(urls[0]):
        path = Path(urls[0]).parent / CLASSES_FILE
    else:
        raise DataError(f"data.shards: remote labeled shards need their {CLASSES_FILE}: put it beside the sizes.json "
                        "named by data.shard_sizes")
    if not path.is_file():
        raise DataError(f"data.shards: no '{path}'; labeled shards are written by `mimswin shards SRC OUT` from class "
                        "subfolders or the embedded set")
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"data.shards: cannot read '{path}' ({err})") from None
    prefix = shard_name(urls[0]).rsplit("-", 1)[0]
    classes = None
    if isinstance(table, dict):
        classes = table.get(prefix, next(iter(table.values())) if len(table) == 1 else None)
    if not isinstance(classes, list) or not classes:
        raise DataError(f"data.shards: '{path}' names no classes for the shards '{prefix}-*'")
    return [str(name) for name in classes]


def open_shard(url: str) -> Iterator[dict]:
    """Raw samples (extension -> bytes, plus __key__) of one shard, as one read. A reader stopped early (the consumer
    has its batches) closes quietly; a stream that fails, at any point until its reader exits, raises."""
    stream = wds.gopen(url, "rb")
    complete = False
    try:
        yield from group_by_keys(dict(file, __url__=url) for file in tar_file_iterator(stream))
        complete = True
    finally:
        if complete:
            stream.close()  # a pipe's exit status is checked here: curl's 18 (transfer cut short) raises
        else:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - stopped early or already failed: the status adds nothing
                pass


def read_shard(url: str, on_error: Callable[[str, Exception, int], None], retries: int = 0) -> Iterator[dict]:
    """Raw samples of one shard. A remote shard whose stream breaks is opened again up to `retries` times (after
    1, 2, 4 ... s), its samples already read passed over unyielded, so the samples come as if nothing broke; then (at
    once for a local file) the rest of the shard is given up: `on_error(url, error, samples yielded)`."""
    read = failures = 0
    while True:
        try:
            for index, sample in enumerate(open_shard(url)):
                if index >= read:
                    read += 1
                    yield sample
            return
        except Exception as err:  # noqa: BLE001 - any I/O or tar error of one shard must not stop the run
            if failures >= retries or is_local(url):
                on_error(url, err, read)
                return
            failures += 1
            log.warning("shard %s broke after %d sample(s) (%s: %s); reading it again (try %d of %d)", url, read,
                        type(err).__name__, err, failures, retries)
            time.sleep(RETRY_DELAY_S * 2 ** (failures - 1))


def decode_sample(sample: dict, transform: Callable, spec: ReadSpec, seed: int,
                  labeled: bool = False) -> Tuple[torch.Tensor, int] | Skipped:
    """(image tensor in its own dtype, label; -1 without a `cls`) or `Skipped`; the transform runs under the sample's
    own seed. `labeled`: a sample without a `cls` is skipped ("no label"), as evaluation needs one."""
    source = f"{sample.get('__url__')}:{sample.get('__key__')}"
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        return Skipped("no image", source)
    label = -1
    if labeled and "cls" not in sample:
        return Skipped("no label", source)
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            return Skipped("bad label", source)
    try:
        image = read_bytes(sample[key], key, spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return transform(image), label
    except SampleError as err:
        return Skipped(err.reason, source, err.detail)


@dataclass
class ShardPlan:
    """What each (rank, slot) reads in an epoch. `slots` = DataLoader workers per rank (1 without workers)."""

    urls: List[str]
    sizes: List[Optional[int]]
    batch_size: int
    num_replicas: int
    rank: int
    slots: int
    seed: int
    train: bool = True
    resampled: bool = False
    shuffle_buffer: int = 1000
    batches_per_epoch: int = 0
    labeled: bool = False
    retries: int = 0

    def shard_order(self, epoch: int, slot: int) -> Iterator[int]:
        """Shard indices this slot reads in `epoch`: its deal of the seeded shuffle (cycled when training) or draws."""
        if self.resampled:
            rng = np.random.default_rng([self.seed, epoch, self.rank, slot])
            while True:
                yield int(rng.integers(len(self.urls)))
        mine = self.slot_shards(epoch, slot)
        while mine:
            yield from mine
            if not self.train:
                return

    def slot_shards(self, epoch: int, slot: int) -> List[int]:
        """This slot's deal of the epoch's shard permutation (shard order as listed for evaluation)."""
        order = np.arange(len(self.urls))
        if self.train:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        return order[self.rank * self.slots + slot::self.num_replicas * self.slots].tolist()

    def pass_size(self, epoch: int, slot: int) -> Optional[int]:
        """Samples in one pass over this slot's shards; None when unknown, resampled, or empty."""
        if self.resampled:
            return None
        sizes = [self.sizes[i] for i in self.slot_shards(epoch, slot)]
        return None if None in sizes else sum(s for s in sizes if s is not None) or None

    def slot_batches(self, slot: int, start_batch: int) -> Tuple[int, int]:
        """(batches of this slot before start_batch, batches it yields from there); batch j is from slot j % slots."""
        before = max(0, (start_batch - slot + self.slots - 1) // self.slots)
        total = max(0, (self.batches_per_epoch - slot + self.slots - 1) // self.slots)
        return before, total - before

    def repeats(self, epoch: int) -> Tuple[int, int]:
        """(extra reads of samples already read, samples never read) by this rank in a training epoch: slots whose
        shards hold fewer or more samples than their share of batches; (0, 0): every sample of its shards once."""
        repeated = dropped = 0
        for slot in range(self.slots):
            period = self.pass_size(epoch, slot)
            if period is None:
                continue
            need = sum(self.slot_batches(slot, 0)) * self.batch_size
            repeated, dropped = repeated + max(0, need - period), dropped + max(0, period - need)
        return repeated, dropped


class ShardBatches(IterableDataset):
    """Yields the `Batch`es of one rank (samples in their own dtype, skips per reason); each DataLoader worker plays
    one slot."""

    def __init__(self, plan: ShardPlan, transform: Callable, spec: ReadSpec) -> None:
        self.plan, self.transform, self.spec = plan, transform, spec
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()

    def set_position(self, epoch: int, start_batch: int) -> None:
        """Shared with persistent workers: the next iteration starts at this epoch and batch."""
        self.position[0], self.position[1] = epoch, start_batch

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.plan.slots:
            raise DataError(f"shard loader planned for {self.plan.slots} worker(s) but runs with {workers}")
        epoch, start_batch = self.position.tolist()
        return self.batches(epoch, (worker + start_batch) % workers, start_batch)

    def samples(self, epoch: int, slot: int, skip: int, broken: List[Skipped]) -> Iterator[dict]:
        """This slot's raw samples from position `skip` on; whole shards of known size are skipped unopened; a shard
        that breaks for good adds to `broken` one skip per sample it still held (one when its size is unknown); the
        slot reads on into its next shard, so its batches stay full and its batch count holds. Three passes over the
        slot's shards without a sample (a server that stays down) stop the run."""
        empty_run = 0
        give_up_after = 3 * (len(self.plan.urls) if self.plan.resampled else len(self.plan.slot_shards(epoch, slot)))
        for index in self.plan.shard_order(epoch, slot):
            size = self.plan.sizes[index]
            if skip and size is not None and size <= skip:
                skip -= size
                continue

            def on_error(url: str, err: Exception, done: int, size: Optional[int] = size) -> None:
                lost = max(1, size - done) if size is not None else 1
                broken.extend([Skipped("unreadable shard", url, f"{type(err).__name__}: {err}")] * lost)
                log.warning("shard %s is unreadable after %d sample(s) (%s: %s); skipping its %s remaining sample(s)",
                            url, done, type(err).__name__, err, lost if size is not None else "unknown number of")

            read = 0
            for sample in read_shard(self.plan.urls[index], on_error, self.plan.retries):
                read += 1
                if skip:
                    skip -= 1
                    continue
                yield sample
            empty_run = 0 if read else empty_run + 1
            if empty_run >= give_up_after:
                last = f"; the last: {broken[-1].describe()}" if broken else ""
                raise DataError(f"data.shards: no readable sample in {empty_run} shards in a row{last}")

    def shuffled(self, epoch: int, slot: int, first: int, broken: List[Skipped]) -> Iterator[dict]:
        """Samples from output position `first` on, shuffled within windows of `shuffle_buffer` samples.

        Windows restart at every pass over the slot's shards (when its size is known), so no sample comes twice
        before every sample of the slot has come once. Windows depend on positions only, hence resume is exact.
        """
        size = max(1, self.plan.shuffle_buffer) if self.plan.train else 1
        period = self.plan.pass_size(epoch, slot)
        turn, within = divmod(first, period) if period else (0, first)
        window_index, offset = divmod(within, size)
        source = self.samples(epoch, slot, (turn * period if period else 0) + window_index * size, broken)
        while True:
            length = min(size, period - window_index * size) if period else size
            window = [sample for _, sample in zip(range(length), source)]
            if not window:
                return
            order = np.random.default_rng([self.plan.seed, epoch, self.plan.rank, slot, turn, window_index])
            for i in order.permutation(len(window))[offset:].tolist():
                yield window[i]
            window_index, offset = window_index + 1, 0
            if period and window_index * size >= period:
                turn, window_index = turn + 1, 0

    def batches(self, epoch: int, slot: int, start_batch: int) -> Iterator[Batch]:
        plan, size = self.plan, self.plan.batch_size
        before, count = plan.slot_batches(slot, start_batch)
        broken: List[Skipped] = []
        source = self.shuffled(epoch, slot, before * size, broken)
        index = before
        while not plan.train or index < before + count:
            raw = [sample for _, sample in zip(range(size), source)]
            if not raw:
                return
            batch_number = index * plan.slots + slot
            items = []
            for i, sample in enumerate(raw):
                seed = sample_seed(plan.seed, epoch, (plan.rank * max(1, plan.batches_per_epoch) + batch_number)
                                   * size + i)
                item = decode_sample(sample, self.transform, self.spec, seed, plan.labeled)
                if isinstance(item, Skipped):
                    log.warning("skipping sample %s: %s", item.source, item.detail or item.reason)
                items.append(item)
            yield collate_samples(items + broken)
            broken.clear()
            index += 1


class ShardLoader:
    """Same interface as `EpochLoader`: `batches_per_epoch`, `epoch(e, start_batch)` -> (model input, labels) on the
    device, through `step` (the device step).

    `skipped` / `skip_reasons` count the samples this rank dropped (corrupt images, unreadable shards, ...). The loader
    has its own generator: starting an epoch must not draw from the global RNG that masks come from (exact resume).
    """

    def __init__(self, stream: ShardBatches, num_workers: int, device: torch.device, step: DeviceStep) -> None:
        self.stream, self.device, self.step = stream, device, step
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                                 generator=torch.Generator(), worker_init_fn=ignore_stop_signals)
        self.skip_reasons: Counter = Counter()

    @property
    def batches_per_epoch(self) -> int:
        return self.stream.plan.batches_per_epoch

    @property
    def skipped(self) -> int:
        return sum(self.skip_reasons.values())

    @property
    def source_size(self) -> Optional[int]:
        """Samples in all the shards; None when a shard's size is unknown."""
        sizes = self.stream.plan.sizes
        return None if None in sizes else sum(s for s in sizes if s is not None)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if start_batch and not self.stream.plan.train:
            raise ValueError("an evaluation pass over shards always starts at batch 0")
        self.stream.set_position(epoch, start_batch)
        return ready_batches(self.loader, self.step, self.device, self.skip_reasons)


def build_shard_loader(spec: str, transform: Callable, read_spec: ReadSpec, step: DeviceStep, batch_size: int,
                       num_workers: int, num_replicas: int,
                       rank: int, seed: int, device: torch.device, *, train: bool = True, resampled: bool = False,
                       shuffle_buffer: int = 1000, sizes_file: Optional[str] = None,
                       samples_per_epoch: Optional[int] = None, batch_multiple: int = 1,
                       labeled: bool = False, retries: int = 0) -> ShardLoader:
    """A loader over `spec`. train: shuffled, equal batch count on every rank, resumable. Else one ordered pass over
    every sample exactly once across ranks and workers (the last batch may be short), for evaluation. `labeled`: skip
    and count samples without a class. `retries`: new tries of a remote shard whose stream breaks."""
    urls = expand_shards(spec)
    sizes = shard_sizes(urls, sizes_file)
    slots = max(1, num_workers)
    plan = ShardPlan(urls, sizes, batch_size, num_replicas, rank, slots, seed, train, resampled and train,
                     shuffle_buffer, labeled=labeled, retries=retries)
    known = None if None in sizes else sum(s for s in sizes if s is not None)
    if train:
        total = samples_per_epoch or known
        if total is None:
            raise DataError("data.shards: sample counts unknown (remote shards without sizes.json): set "
                            "data.shard_sizes to a sizes.json or data.samples_per_epoch")
        if not plan.resampled and len(urls) < num_replicas * slots:
            raise DataError(f"data.shards: {len(urls)} shard(s) cannot be split over {num_replicas} process(es) x "
                            f"{slots} worker(s); write more shards (smaller --maxcount), lower data.num_workers or "
                            "set data.resampled=true")
        plan.batches_per_epoch = total // num_replicas // batch_size // batch_multiple * batch_multiple
        if plan.batches_per_epoch == 0:
            raise DataError(f"data.shards: {total} samples cannot fill one batch of {batch_size} x {num_replicas} "
                            f"process(es) x {batch_multiple} accumulation step(s)")
        repeated, dropped = plan.repeats(0)
        if repeated or dropped:
            log.info("data.shards: shard sizes do not split evenly over %d process(es) x %d worker(s): rank %d reads "
                     "%d sample(s) again and leaves out %d per epoch (epoch 0)", num_replicas, slots, rank, repeated,
                     dropped)
    elif known is not None:
        stride = num_replicas * slots
        per_slot = [sum(sizes[rank * slots + s::stride]) for s in range(slots)]
        plan.batches_per_epoch = sum(-(-n // batch_size) for n in per_slot)
    return ShardLoader(ShardBatches(plan, transform, read_spec), num_workers, device, step)


def shard_preview(spec: str, transform: Callable, read_spec: ReadSpec, count: int) -> torch.Tensor:
    """The first `count` usable images of the shards in order (in their own dtype), for reconstruction pictures; a
    shard that breaks is passed over at once (only the pictures depend on it), a server that is down found fast."""
    images: List[torch.Tensor] = []
    first: Optional[Skipped] = None

    def on_error(url: str, err: Exception, done: int) -> None:
        nonlocal first
        first = first or Skipped("unreadable shard", url, f"{type(err).__name__}: {err}")

    for url in expand_shards(spec):
        for sample in read_shard(url, on_error):
            item = decode_sample(sample, transform, read_spec, 0)
            if isinstance(item, Skipped):
                first = first or item
            else:
                images.append(item[0])
            if len(images) == count:
                return stack_samples(images)
    if not images:
        reason = f": {first.describe()}" if first else ""
        raise DataError(f"data.shards: no usable image in '{spec}'{reason}")
    return stack_samples(images)
