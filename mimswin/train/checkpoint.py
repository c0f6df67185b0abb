"""Resumable checkpoints that cannot run code: safetensors weights, `weights_only=True` tensors, JSON counters.

Layout of `checkpoints/step_00001000/`: model.safetensors, optimizer.pt, scaler.pt (fp16 only), rng_<rank>.pt per rank,
state.json (counters and metadata). A checkpoint is written into `.tmp-step_*` and renamed when complete; the file
`checkpoints/latest` names the newest complete one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator

from mimswin.errors import CheckpointError
from mimswin.train.rundir import atomic_write_bytes

STEP_PREFIX = "step_"
LATEST = "latest"


def safe_torch_load(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers: a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file '{path}' is missing") from None
    except Exception as err:
        raise CheckpointError(f"refusing to load '{path}': not a plain tensor file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from None


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


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under `root` (per the `latest` file, else the highest step dir), or None."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    complete = sorted(p for p in root.glob(f"{STEP_PREFIX}*") if (p / "state.json").is_file())
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


def save_checkpoint(accelerator: Accelerator, root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    counters: Dict[str, Any], keep_last: int, meta: Dict[str, Any]) -> Path:
    """Collective: every rank calls it. Rank 0 writes weights/optimizer/state, each rank its RNG file."""
    name = f"{STEP_PREFIX}{counters['step']:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    state_dict = accelerator.get_state_dict(model)
    if main:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        payload = dict(counters, world_size=accelerator.num_processes, meta=meta)
        (tmp / "state.json").write_text(json.dumps(payload, indent=1))
    accelerator.wait_for_everyone()
    if main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_bytes(root / LATEST, name.encode())
        for old in sorted(root.glob(f"{STEP_PREFIX}*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_model_weights(model: torch.nn.Module, path: Path, what: str = "checkpoint") -> None:
    """Strict load of a safetensors file, with a clear message when it belongs to another architecture."""
    try:
        weights = safetensors.torch.load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{what} file '{path}' is missing") from None
    except Exception as err:
        raise CheckpointError(f"{what} '{path}' is not a readable safetensors file: {err}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        details = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("shape mismatch", wrong)) if keys)
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
    optimizer.load_state_dict(safe_torch_load(path / "optimizer.pt"))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(safe_torch_load(path / "scaler.pt"))
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(safe_torch_load(rng_file))
    return state
