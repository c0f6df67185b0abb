"""The run directory: where config, metrics, checkpoints, pictures and exports live. Only rank 0 writes here."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict

from mimswin.errors import ConfigError

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


class RunDir:
    """Paths of one run; `writer` is True on the one process that writes (rank 0)."""

    def __init__(self, root: str | Path, writer: bool) -> None:
        self.root, self.writer = Path(root).expanduser(), writer
        if writer:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = self.root / ".write-test"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as err:
                raise ConfigError(f"train.output_dir: cannot write to '{self.root}': {err.strerror}") from None

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoints")
    encoder = property(lambda self: self.root / "encoder.safetensors")
    pictures = property(lambda self: self.root / "recon")

    def log_metrics(self, record: Dict[str, Any]) -> None:
        """Append one JSON line; non-finite numbers are written as null (JSON has no NaN)."""
        if not self.writer:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
