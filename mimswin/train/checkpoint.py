"""Resumable checkpoints that cannot run code: safetensors weights, `weights_only=True` tensors, JSON counters.

Layout of `checkpoints/step_00001000/`: model.safetensors, optimizer.pt, scaler.pt (fp16 only), rng_<rank>.pt per rank,
state.json (counters, metadata and a manifest: size and SHA-256 of every other file); extra state (e.g. a callback's
EMA weights) keeps its JSON values in state.json, its tensors in extra_<name>.safetensors. A checkpoint is written into
`.tmp-step_*`, fsynced and renamed when complete; the file `checkpoints/latest` (replaced atomically) names the newest
complete one. A kill at any point leaves the previous checkpoint usable; leftovers of a killed save are `.tmp-*` names,
never taken for a checkpoint and removed by the next save. Resuming checks the manifest: a damaged newest checkpoint
(truncated or corrupted after it was written) is skipped with a warning for the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

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
        named = re.search(r"GLOBAL (\S+)", str(err))
        blocked = named or re.search(r"Unsupported [^.:]*", str(err))
        if blocked:
            what = f"'{named.group(1)}'" if named else f"an unsupported operation ({blocked.group(0)[:80]})"
            raise CheckpointError(f"refusing to load '{path}': unpickling it would call {what}, which could run "
                                  "code; mimswin only loads plain tensor files (weights_only=True)") from None
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


def warn_stderr(message: str) -> None:
    print(f"mimswin: warning: {message}", file=sys.stderr)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(folder: Path) -> Dict[str, Dict[str, Any]]:
    """Size and SHA-256 of every file in a checkpoint dir but state.json (which holds this manifest)."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != "state.json"}


def checkpoint_damage(path: Path) -> Optional[str]:
    """Why the checkpoint dir `path` cannot be trusted (unreadable state.json, a file missing, truncated or changed
    since it was saved), or None when it is intact. Checkpoints saved without a manifest are checked for state.json
    alone."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        return f"unreadable state.json ({_first_line(err)})"
    if not isinstance(state, dict):
        return "state.json does not hold a mapping"
    for name, expected in (state.get("files") or {}).items():
        if not isinstance(expected, dict) or not {"bytes", "sha256"} <= expected.keys():
            return f"state.json has a malformed manifest entry for {name}"
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, {expected['bytes']} were saved (truncated or overwritten)"
        if file_sha256(file) != expected["sha256"]:
            return f"{name} does not match the SHA-256 saved with it (corrupted)"
    return None


def resumable_checkpoint(root: Path, warn: Callable[[str], None] = warn_stderr) -> Optional[Path]:
    """The newest intact checkpoint under `root` (the one `latest` names first, then by step, newest first), or None
    when there is no checkpoint. Each damaged one passed over is reported through `warn`; if all are damaged, that is
    an error rather than a silent fresh start."""
    if not root.is_dir():
        return None
    candidates = [p for p in [latest_checkpoint(root), *reversed(complete_checkpoints(root))] if p is not None]
    for candidate in dict.fromkeys(candidates):
        damage = checkpoint_damage(candidate)
        if damage is None:
            return candidate
        warn(f"checkpoint '{candidate}' is damaged ({damage}); falling back to the previous one")
    if candidates:
        raise CheckpointError(f"every checkpoint under '{root}' is damaged; move them away to start afresh")
    return None


def resolve_checkpoint(path: str | Path, warn: Callable[[str], None] = warn_stderr) -> Path:
    """A checkpoint dir (which must be intact), or a run dir / checkpoints dir whose newest intact checkpoint is
    taken."""
    path = Path(path).expanduser()
    if (path / "state.json").is_file():
        damage = checkpoint_damage(path)
        if damage is not None:
            raise CheckpointError(f"checkpoint '{path}' is damaged: {damage}")
        return path
    for root in (path / "checkpoints", path):
        found = resumable_checkpoint(root, warn)
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


def write_bytes(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_tensors(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    """Safetensors file, written by Python so a full disk is an OSError (safetensors' own writer raises its own
    error type); costs one in-memory copy of the weights."""
    write_bytes(path, safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}))


def write_torch(path: Path, obj: Any) -> None:
    """torch.save into a Python file; torch reports a failed write as RuntimeError, which is turned back into the
    OSError behind it (e.g. ENOSPC)."""
    try:
        with path.open("wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except RuntimeError as err:
        if isinstance(err.__context__, OSError):
            raise err.__context__ from None
        raise


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=1).encode())


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


def write_extra(folder: Path, extra: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Write the tensors of each named extra state to `extra_<name>.safetensors`; return the JSON values."""
    values = {}
    for name, state in extra.items():
        tensors = {k: v.detach().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
        if tensors:
            write_tensors(folder / f"extra_{name}.safetensors", tensors)
        values[name] = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return values


def read_extra(path: Path, name: str, state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The extra state `name` saved with checkpoint `path` (whose state.json is `state`): JSON values and tensors,
    or None when the checkpoint has none."""
    values = (state.get("extra") or {}).get(name)
    if values is None:
        return None
    file = path / f"extra_{name}.safetensors"
    if not file.is_file():
        return values
    try:
        return {**values, **safetensors.torch.load_file(str(file))}
    except Exception as err:
        raise CheckpointError(f"checkpoint '{path}': '{file.name}' is not a readable safetensors file: "
                              f"{_first_line(err)}") from None


def save_checkpoint(accelerator: Accelerator, root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    counters: Dict[str, Any], keep_last: int, meta: Dict[str, Any],
                    keep_every: Optional[int] = None, extra: Optional[Dict[str, Dict[str, Any]]] = None) -> Path:
    """Collective: every rank calls it. Each rank writes its RNG file, then rank 0 weights/optimizer and state.json
    (with the manifest of the others), all into `.tmp-step_*`, fsynced, then renamed; a failed write (e.g. a full
    disk) raises CheckpointError on every rank and leaves the previous checkpoint as it was. `extra`: named states
    (flat mappings of tensors and JSON values, the same on every rank) written by rank 0 and covered by the manifest."""
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
    _agree_on_failure(accelerator, error, root, tmp, final)
    state_dict = accelerator.get_state_dict(model)
    if main:
        try:
            write_tensors(tmp / "model.safetensors", state_dict)
            write_torch(tmp / "optimizer.pt", optimizer.state_dict())
            if accelerator.scaler is not None:
                write_torch(tmp / "scaler.pt", accelerator.scaler.state_dict())
            extra_values = {"extra": write_extra(tmp, extra)} if extra else {}
            write_json(tmp / "state.json", dict(counters, world_size=accelerator.num_processes, meta=meta,
                                                **extra_values, files=file_manifest(tmp)))
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
