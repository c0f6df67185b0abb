"""Resumable checkpoints that cannot run code: safetensors weights, `weights_only=True` tensors, JSON counters.

Layout of `checkpoints/step_00001000/`: model.safetensors, optimizer.pt, scaler.pt (fp16 only), rng_<rank>.pt per rank,
state.json (counters, metadata and a manifest: size and SHA-256 of every other file); under FSDP the model and optimizer
are sharded instead (`__<rank>_0.distcp` per rank and DCP's index `.metadata`, runs/sharded.py); extra state (e.g. a
callback's EMA weights) keeps its JSON values in state.json, its tensors in extra_<name>.safetensors. A checkpoint is
written into `.tmp-step_*`, fsynced and renamed when complete; the file `checkpoints/latest` (replaced atomically)
names the newest complete one. A kill at any point leaves the previous checkpoint usable; leftovers of a killed save
are `.tmp-*` names, never taken for a checkpoint and removed by the next save. Resuming checks the manifest: a damaged
newest checkpoint (truncated or corrupted after it was written) is skipped with a warning for the previous good one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.fsdp import FSDPModule

from mimswin.errors import CheckpointError
from mimswin.runs.discovery import file_manifest, latest_checkpoint, prune_checkpoints, remove_stale
from mimswin.runs.files import (
    atomic_write_bytes,
    first_line,
    fsync_path,
    read_safetensors,
    safe_torch_load,
    write_json,
    write_tensors,
    write_torch,
)
from mimswin.runs.layout import LATEST, MODEL, OPTIMIZER, SCALER, STATE, STEP_PREFIX, TMP_PREFIX, extra_file, rng_file
from mimswin.runs.sharded import (
    is_sharded_checkpoint,
    load_sharded,
    rank_files,
    read_sharded_tensors,
    save_sharded,
    shape_mismatch,
)


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain values."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)),
             pos, has_gauss, cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` dir to `final`, then point `latest` at it; each step is synced before the next."""
    fsync_path(tmp)
    if final.exists():
        replaced = root / f"{TMP_PREFIX}replaced-{final.name}"
        final.rename(replaced)
        shutil.rmtree(replaced, ignore_errors=True)
    tmp.rename(final)
    fsync_path(root)
    atomic_write_bytes(root / LATEST, final.name.encode())
    fsync_path(root)


def _agree_on_failure(accelerator: Accelerator, error: Optional[Exception], root: Path, tmp: Path,
                      final: Path) -> None:
    """Collective: if any rank failed to write, every rank raises the same one-line error (no rank is left waiting),
    after the partial `tmp` dir is removed. The previous checkpoint and `latest` are untouched."""
    failed = torch.tensor(0.0 if error is None else 1.0, device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")
    if not failed.item():
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    reason = ((getattr(error, "strerror", None) or first_line(error)) if error is not None
              else "another process failed to write its part")
    previous = latest_checkpoint(root)
    kept = f"the previous checkpoint '{previous}' is intact" if previous else "no earlier checkpoint exists"
    raise CheckpointError(f"cannot save checkpoint '{final}': {reason}; {kept}")


def write_extra(folder: Path, extra: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Write the tensors of each named extra state to `extra_<name>.safetensors`; return the JSON values."""
    values = {}
    for name, state in extra.items():
        tensors = {k: v.detach().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
        if tensors:
            write_tensors(folder / extra_file(name), tensors)
        values[name] = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return values


def read_extra(path: Path, name: str, state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The extra state `name` saved with checkpoint `path` (whose state.json is `state`): JSON values and tensors,
    or None when the checkpoint has none."""
    values = (state.get("extra") or {}).get(name)
    if values is None:
        return None
    file = path / extra_file(name)
    if not file.is_file():
        return values
    return {**values, **read_safetensors(file, f"checkpoint '{path}': extra state")}


def save_checkpoint(accelerator: Accelerator, root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    counters: Dict[str, Any], keep_last: int, meta: Dict[str, Any],
                    keep_every: Optional[int] = None, extra: Optional[Dict[str, Dict[str, Any]]] = None) -> Path:
    """Collective: every rank calls it. Each rank writes its RNG file; a whole model is written by rank 0
    (model.safetensors, optimizer.pt), a model sharded by FSDP by every rank (its shard, through DCP); rank 0 writes
    state.json (with the manifest of every file: under FSDP each rank hashes its own). All into `.tmp-step_*`, fsynced,
    then renamed; a failed write (e.g. a full disk) raises CheckpointError on every rank and leaves the previous
    checkpoint as it was. `extra`: named states (flat mappings of tensors and JSON values, the same on every rank)
    written by rank 0 and covered by the manifest."""
    name = f"{STEP_PREFIX}{counters['step']:08d}"
    final, tmp = root / name, root / f"{TMP_PREFIX}{name}"
    main, rank = accelerator.is_main_process, accelerator.process_index
    sharded = isinstance(model, FSDPModule)
    record = dict(counters, world_size=accelerator.num_processes, meta=meta)

    def open_tmp() -> None:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        tmp.mkdir()

    def write_main(state_dict: Optional[Dict[str, torch.Tensor]], manifest: Dict[str, Any]) -> None:
        if state_dict is not None:
            write_tensors(tmp / MODEL, state_dict)
            write_torch(tmp / OPTIMIZER, optimizer.state_dict())
        if accelerator.scaler is not None:
            write_torch(tmp / SCALER, accelerator.scaler.state_dict())
        extra_values = {"extra": write_extra(tmp, extra)} if extra else {}
        unhashed = [p for p in sorted(tmp.iterdir()) if p.is_file() and p.name != STATE and p.name not in manifest]
        write_json(tmp / STATE, dict(record, **extra_values, files={**file_manifest(tmp, unhashed), **manifest}))

    def stage(action: Callable[[], Any], everyone: bool = False) -> Any:
        """One write step on rank 0 (or on every rank), then all ranks agree on whether any failed."""
        error: Optional[Exception] = None
        result = None
        if main or everyone:
            try:
                result = action()
            except (OSError, CheckpointException) as err:
                error = err
        _agree_on_failure(accelerator, error, root, tmp, final)
        return result

    stage(open_tmp)
    stage(lambda: write_torch(tmp / rng_file(rank), rng_state()), everyone=True)
    if sharded:
        inner = getattr(optimizer, "optimizer", optimizer)
        record["optimizer_groups"] = stage(lambda: save_sharded(tmp, model, inner), everyone=True)
        own = stage(lambda: file_manifest(tmp, [*rank_files(tmp, rank), tmp / rng_file(rank)]), everyone=True)
        hashed = {k: v for part in gather_object([own]) for k, v in part.items()}
        stage(lambda: write_main(None, hashed))
    else:
        state_dict = accelerator.get_state_dict(model)
        stage(lambda: write_main(state_dict, {}))
    stage(lambda: _publish(root, tmp, final))
    if main:
        try:
            prune_checkpoints(root, keep_last, keep_every)
        except OSError as err:
            accelerator.print(f"warning: could not delete old checkpoints in '{root}': {err}")
    accelerator.wait_for_everyone()
    return final


def load_model_weights(model: torch.nn.Module, path: Path, what: str = "checkpoint") -> None:
    """Strict load of a safetensors file, with a clear message when it belongs to another architecture."""
    load_state(model, read_safetensors(path, what), f"{what} '{path}'")


def load_state(model: torch.nn.Module, weights: Dict[str, torch.Tensor], what: str) -> None:
    """Strict load of `weights` into `model`, or one CheckpointError naming `what` and the keys that differ."""
    mismatch = shape_mismatch({k: tuple(v.shape) for k, v in weights.items()},
                              {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if mismatch:
        raise CheckpointError(f"{what} does not match this model's architecture ({mismatch})")
    model.load_state_dict(weights)


def checkpoint_weights(path: Path) -> Dict[str, torch.Tensor]:
    """The whole model's weights of checkpoint dir `path`, saved whole or sharded (then read by this process alone)."""
    return read_sharded_tensors(path) if is_sharded_checkpoint(path) else read_safetensors(path / MODEL)


def load_checkpoint(accelerator: Accelerator, path: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Restore weights, optimizer, scaler and this rank's RNG; return the saved counters and metadata. A sharded
    checkpoint loads into any model through DCP (collective, any world size); a whole one into a whole model."""
    state = read_state(path)
    if is_sharded_checkpoint(path):
        load_sharded(path, model if isinstance(model, FSDPModule) else accelerator.unwrap_model(model),
                     getattr(optimizer, "optimizer", optimizer), state.get("optimizer_groups") or [])
    elif isinstance(model, FSDPModule):
        raise CheckpointError(f"checkpoint '{path}' holds a whole model (saved with train.strategy=ddp): resume it "
                              "with train.strategy=ddp, or start this FSDP run afresh")
    else:
        load_model_weights(accelerator.unwrap_model(model), path / MODEL)
        try:
            optimizer.load_state_dict(safe_torch_load(path / OPTIMIZER))
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint '{path}': its optimizer state does not fit this optimizer "
                                  f"({first_line(err)})") from None
    if accelerator.scaler is not None and (path / SCALER).is_file():
        accelerator.scaler.load_state_dict(safe_torch_load(path / SCALER))
    rng = path / rng_file(accelerator.process_index)
    if rng.is_file():
        set_rng_state(safe_torch_load(rng))
    return state


def read_state(path: Path) -> Dict[str, Any]:
    """The state.json of checkpoint dir `path` (counters, meta, manifest), or one CheckpointError."""
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{path}': unreadable state.json ({err})") from None
