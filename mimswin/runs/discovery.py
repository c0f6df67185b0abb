"""Finding checkpoints in a run: the newest intact one (manifest-checked), damage reports, pruning, leftovers."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from mimswin.errors import CheckpointError
from mimswin.runs.files import file_sha256, first_line
from mimswin.runs.layout import CHECKPOINTS, LATEST, STATE, STEP_PREFIX, TMP_PREFIX


def step_of(path: Path) -> Optional[int]:
    """The step of a `step_XXXXXXXX` name, or None for any other name."""
    digits = path.name[len(STEP_PREFIX):]
    return int(digits) if path.name.startswith(STEP_PREFIX) and digits.isdigit() else None


def complete_checkpoints(root: Path) -> List[Path]:
    """Step dirs under `root`, oldest first. Only a fully written dir is ever renamed to `step_*` (and a pruned one
    is renamed away before it is deleted), so every one listed is complete."""
    found = [p for p in root.glob(f"{STEP_PREFIX}*") if step_of(p) is not None and (p / STATE).is_file()]
    return sorted(found, key=lambda p: step_of(p))


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under `root` (per the `latest` file, else the highest step dir), or None."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if step_of(candidate) is not None and (candidate / STATE).is_file():
            return candidate
    complete = complete_checkpoints(root) if root.is_dir() else []
    return complete[-1] if complete else None


def warn_stderr(message: str) -> None:
    print(f"mimswin: warning: {message}", file=sys.stderr)


def file_manifest(folder: Path, files: Optional[Iterable[Path]] = None) -> Dict[str, Dict[str, Any]]:
    """Size and SHA-256 of `files` (default: every file in a checkpoint dir but state.json, which holds this
    manifest)."""
    chosen = files if files is not None else (p for p in sorted(folder.iterdir()) if p.is_file() and p.name != STATE)
    return {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in chosen}


def checkpoint_damage(path: Path) -> Optional[str]:
    """Why the checkpoint dir `path` cannot be trusted (unreadable state.json, a file missing, truncated or changed
    since it was saved), or None when it is intact. Checkpoints saved without a manifest are checked for state.json
    alone."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as err:
        return f"unreadable state.json ({first_line(err)})"
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
    if (path / STATE).is_file():
        damage = checkpoint_damage(path)
        if damage is not None:
            raise CheckpointError(f"checkpoint '{path}' is damaged: {damage}")
        return path
    for root in (path / CHECKPOINTS, path):
        found = resumable_checkpoint(root, warn)
        if found is not None:
            return found
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    raise CheckpointError(f"'{path}' holds no complete checkpoint (expected state.json or checkpoints/step_*)")


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

