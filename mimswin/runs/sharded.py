"""Sharded checkpoints through torch.distributed.checkpoint (DCP): every rank writes its own shard of the weights and
optimizer state, and any number of processes reads them back (DCP reshards to the reader's layout).

DCP pickles its index (`.metadata`) and would unpickle any non-tensor value it stored. mimswin stores tensors only
(the optimizer's param groups go to state.json) and reads the index with an unpickler that knows DCP's own record
classes and nothing else, so loading a checkpoint never runs code; tensors are read with `torch.load(weights_only=True)`
by DCP itself.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from mimswin.errors import CheckpointError
from mimswin.runs.files import first_line
from mimswin.runs.layout import SHARD_INDEX, SHARD_SUFFIX

# (module, name) of every class and function a DCP index refers to; torch dtypes are allowed besides these
INDEX_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}
MODEL_KEY, OPTIMIZER_KEY = "model", "optimizer"


class IndexUnpickler(pickle.Unpickler):
    """Unpickles a DCP index, refusing any global outside `INDEX_GLOBALS` and torch's dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in INDEX_GLOBALS and not dtype:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a checkpoint index never holds")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """DCP's file reader with the index read by `IndexUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / SHARD_INDEX
        try:
            metadata = IndexUnpickler(io.BytesIO(path.read_bytes())).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
            raise CheckpointError(f"checkpoint '{self.path}': unusable {SHARD_INDEX} ({err})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"checkpoint '{self.path}': {SHARD_INDEX} is not a DCP index")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner, refusing stored non-tensor values (DCP would unpickle them with code execution allowed)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CheckpointError(f"checkpoint holds a pickled value at '{read_item.dest_index.fqn}'; mimswin checkpoints "
                              "hold tensors only, so it was not written by mimswin and is not loaded")


def is_sharded_checkpoint(folder: Path) -> bool:
    return (folder / SHARD_INDEX).is_file()


def rank_files(folder: Path, rank: int) -> List[Path]:
    """The shard files rank `rank` wrote into `folder` (DCP names them `__<rank>_<n>.distcp`)."""
    return sorted(folder.glob(f"__{rank}_*{SHARD_SUFFIX}"))


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """Collective: every rank writes its shard of the model and optimizer state into `folder` (fsynced); rank 0 the
    index. Returns the optimizer's param groups (hyperparameters, parameters by name) for state.json."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    groups = optimizer_state.pop("param_groups")
    dcp.save({MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state},
             storage_writer=FileSystemWriter(folder, single_file_per_rank=True, sync_files=True),
             planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))  # replicated buffers: rank 0's, as DDP
    return groups


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 param_groups: List[Dict[str, Any]]) -> None:
    """Collective: load a sharded checkpoint into `model` and `optimizer`, sharded or not, at any world size."""
    reader = SafeReader(folder)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    optimizer_state.pop("param_groups")
    check_architecture(folder, reader.read_metadata(), model_state)
    try:
        dcp.load({MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}, storage_reader=reader,
                 planner=TensorsOnlyPlanner())
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - DCP gathers every rank's failure into one
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint '{folder}' does not fit this model and optimizer "
                              f"({first_failure(err)})") from None
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict={**optimizer_state, "param_groups": param_groups})


def check_architecture(folder: Path, metadata: Metadata, model_state: Dict[str, Any]) -> None:
    """One CheckpointError naming the keys that differ when the checkpoint's model is not this model."""
    saved = {key[len(MODEL_KEY) + 1:]: tuple(meta.size) for key, meta in metadata.state_dict_metadata.items()
             if key.startswith(MODEL_KEY + ".") and isinstance(meta, TensorStorageMetadata)}
    mismatch = shape_mismatch(saved, {k: tuple(v.shape) for k, v in model_state.items() if isinstance(v, torch.Tensor)})
    if mismatch:
        raise CheckpointError(f"checkpoint '{folder}' does not match this model's architecture ({mismatch})")


def shape_mismatch(saved: Dict[str, Tuple[int, ...]], own: Dict[str, Tuple[int, ...]]) -> Optional[str]:
    """How saved tensor shapes differ from a model's (keys missing, unexpected, of another shape), or None."""
    differences = {
        "missing": sorted(set(own) - set(saved)),
        "unexpected": sorted(set(saved) - set(own)),
        "shape mismatch (file vs model)": sorted(f"{k} {list(saved[k])} vs {list(own[k])}"
                                                 for k in set(own) & set(saved) if own[k] != saved[k]),
    }
    if not any(differences.values()):
        return None
    return "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                     for label, keys in differences.items() if keys)


def read_sharded_tensors(folder: Path, prefix: str = MODEL_KEY + ".") -> Dict[str, torch.Tensor]:
    """Whole tensors of a sharded checkpoint whose names start with `prefix` (prefix removed), read by this process
    alone: what export, pictures and `--from` need of a run saved under FSDP."""
    metadata = SafeReader(folder).read_metadata()
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items()
               if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not tensors:
        raise CheckpointError(f"checkpoint '{folder}' holds no tensors under '{prefix}'")
    dcp.load(tensors, storage_reader=SafeReader(folder), planner=TensorsOnlyPlanner(), no_dist=True)
    return {key[len(prefix):]: value for key, value in tensors.items()}


def first_failure(err: BaseException) -> str:
    """The first line of the first rank's failure inside DCP's collected exception (or of `err` itself)."""
    failures = getattr(err, "failures", None)
    if failures:
        inner = next(iter(failures.values()))
        err = inner[0] if isinstance(inner, tuple) else inner
    return first_line(err)
