"""Files that survive a kill: atomic and fsynced writes, and reads that cannot run code (safetensors, weights_only)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict

import safetensors.torch
import torch

from mimswin.errors import CheckpointError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def first_line(err: BaseException, limit: int = 200) -> str:
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
                              f"{first_line(err)})") from None


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()



def read_safetensors(path: Path, what: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing or unreadable one is one CheckpointError naming `what` it is."""
    try:
        return safetensors.torch.load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{what} file '{path}' is missing") from None
    except Exception as err:
        raise CheckpointError(f"{what} '{path}' is not a readable safetensors file: {first_line(err)}") from None
