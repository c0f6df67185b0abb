"""Resumable checkpoints that cannot run code: safetensors weights, `weights_only=True` tensors, JSON counters.

Layout of `checkpoints/step_00001000/`: model.safetensors, optimizer.pt, scaler.pt (fp16 only), rng_<rank>.pt per rank,
state.json (counters and metadata). A checkpoint is written into `.tmp-step_*`, fsynced and renamed when complete; the
file `checkpoints/latest` (replaced atomically) names the newest complete one. A kill at any point leaves the previous
checkpoint usable; leftovers of a killed save are `.tmp-*` names, never taken for a checkpoint and removed by the next
save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator

from mimswin.errors import CheckpointError
from mimswin.train.rundir import atomic_write_bytes

STEP_PREFIX = "step_"
LATEST = "latest"
TMP_PREFIX = ".tmp-"


def _first_line(err: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


def safe_torch_load(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers: a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file '{path}' is missing") from None
    except Exception as err:
        blocked = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        if blocked:
            raise CheckpointError(f"refusing to load '{path}': it holds more than tensors ({blocked[0][:150]}); "
                                  "unpickling it could run code, so mimswin only loads plain tensor files") from None
        raise CheckpointError(f"cannot load '{path}': not a readable tensor file ({type(err).__name__}: "
                              f"{_first_line(err)})") from None


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


def step_of(path: Path) -> Optional[int]:
    """The step of a `step_XXXXXXXX` name, or None for any other name."""
    digits = path.name[len(STEP_PREFIX):]
    return int(digits) if path.name.startswith(STEP_PREFIX) and digits.isdigit() else None


def complete_checkpoints(root: Path) -> List[Path]:
    """Step dirs under `root`, oldest first. Only a fully written dir is ever renamed to `step_*` (and a pruned one
    is renamed away before it is deleted), so every one listed is complete."""
    found = [p for p in root.glob(f"{STEP_PREFIX}*") if step_of(p) is not None and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: step_of(p))


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under `root` (per the `latest` file, else the highest step dir), or None."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if step_of(candidate) is not None and (candidate / "state.json").is_file():
            return candidate
    complete = complete_checkpoints(root) if root.is_dir() else []
    return complete[-1] if complete else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir / checkpoints dir whose latest complete checkpoint is taken."""
    path = Path(path).expanduser()
    if (path / "state.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root) if root.is_dir() else None
        if found is not None:
            return found
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    raise CheckpointError(f"'{path}' holds no complete checkpoint (expected state.json or checkpoints/step_*)")


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk: a rename survives a power cut only once both are synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensors(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    fsync_path(path)


def write_torch(path: Path, obj: Any) -> None:
    torch.save(obj, path)
    fsync_path(path)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))
    fsync_path(path)


def remove_stale(root: Path) -> None:
    """Delete what a killed save or prune left behind (`.tmp-*` dirs, `.latest.*` temp files); never a checkpoint."""
    for leftover in [*root.glob(f"{TMP_PREFIX}*"), *root.glob(f".{LATEST}.*")]:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def prune_checkpoints(root: Path, keep_last: int, keep_every: Optional[int] = None) -> None:
    """Keep the newest `keep_last`, every `keep_every`-th step and the one `latest` names; delete the rest.

    Each is renamed to `.tmp-*` first, so a kill during the deletion never leaves a half-deleted `step_*`.
    """
    complete = complete_checkpoints(root)
    keep = set(complete[-keep_last:])
    keep |= {p for p in complete if keep_every and step_of(p) % keep_every == 0}
    latest = latest_checkpoint(root)
    for old in complete:
        if old in keep or old == latest:
            continue
        trash = root / f"{TMP_PREFIX}pruned-{old.name}"
        old.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


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


def _agree_on_failure(accelerator: Accelerator, error: Optional[OSError], root: Path, tmp: Path,
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
    reason = (error.strerror or str(error)) if error is not None else "another process failed to write its part"
    previous = latest_checkpoint(root)
    kept = f"the previous checkpoint '{previous}' is intact" if previous else "no earlier checkpoint exists"
    raise CheckpointError(f"cannot save checkpoint '{final}': {reason}; {kept}")


def save_checkpoint(accelerator: Accelerator, root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    counters: Dict[str, Any], keep_last: int, meta: Dict[str, Any],
                    keep_every: Optional[int] = None) -> Path:
    """Collective: every rank calls it. Rank 0 writes weights/optimizer/state, each rank its RNG file, all into
    `.tmp-step_*`, fsynced, then renamed; a failed write (e.g. a full disk) raises CheckpointError on every rank."""
    name = f"{STEP_PREFIX}{counters['step']:08d}"
    final, tmp = root / name, root / f"{TMP_PREFIX}{name}"
    main = accelerator.is_main_process
    error: Optional[OSError] = None
    if main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            remove_stale(root)
            tmp.mkdir()
        except OSError as err:
            error = err
    _agree_on_failure(accelerator, error, root, tmp, final)
    try:
        write_torch(tmp / f"rng_{accelerator.process_index}.pt", rng_state())
    except OSError as err:
        error = err
    state_dict = accelerator.get_state_dict(model)
    if main and error is None:
        try:
            write_tensors(tmp / "model.safetensors", state_dict)
            write_torch(tmp / "optimizer.pt", optimizer.state_dict())
            if accelerator.scaler is not None:
                write_torch(tmp / "scaler.pt", accelerator.scaler.state_dict())
            write_json(tmp / "state.json", dict(counters, world_size=accelerator.num_processes, meta=meta))
        except OSError as err:
            error = err
    _agree_on_failure(accelerator, error, root, tmp, final)
    if main:
        try:
            _publish(root, tmp, final)
        except OSError as err:
            error = err
    _agree_on_failure(accelerator, error, root, tmp, final)
    if main:
        try:
            prune_checkpoints(root, keep_last, keep_every)
        except OSError as err:
            accelerator.print(f"warning: could not delete old checkpoints in '{root}': {err}")
    accelerator.wait_for_everyone()
    return final


def load_model_weights(model: torch.nn.Module, path: Path, what: str = "checkpoint") -> None:
    """Strict load of a safetensors file, with a clear message when it belongs to another architecture."""
    try:
        weights = safetensors.torch.load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{what} file '{path}' is missing") from None
    except Exception as err:
        raise CheckpointError(f"{what} '{path}' is not a readable safetensors file: {_first_line(err)}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(f"{k} {list(weights[k].shape)} vs {list(own[k].shape)}" for k in set(own) & set(weights)
                   if own[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        details = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("shape mismatch (file vs model)", wrong)) if keys)
        raise CheckpointError(f"{what} '{path}' does not match this model's architecture ({details})")
    model.load_state_dict(weights)


def load_checkpoint(accelerator: Accelerator, path: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Restore weights, optimizer, scaler and this rank's RNG; return the saved counters and metadata."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{path}': unreadable state.json ({err})") from None
    load_model_weights(accelerator.unwrap_model(model), path / "model.safetensors")
    try:
        optimizer.load_state_dict(safe_torch_load(path / "optimizer.pt"))
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint '{path}': its optimizer state does not fit this optimizer "
                              f"({_first_line(err)})") from None
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(safe_torch_load(path / "scaler.pt"))
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(safe_torch_load(rng_file))
    return state
