"""Every file name a run writes or reads, once; and the run directory. Only rank 0 writes there.

A run dir: config.yaml, metrics.jsonl, results.json (evaluation), encoder/ (pretraining: timm's hub folder,
config.json + model.safetensors + README.md) and encoder.safetensors (the same weights in one file), recon/ and
reconstruction.png (pictures), best/ (evaluation's best weights), export/, visualize/, checkpoints/ holding
step_XXXXXXXX dirs (model.safetensors, optimizer.pt, rng_<rank>.pt, extra_<name>.safetensors, state.json; under FSDP
the shards __<rank>_0.distcp and their index .metadata instead of model and optimizer files) and the `latest` pointer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict

from mimswin.errors import ConfigError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
ENCODER = "encoder.safetensors"
ENCODER_DIR = "encoder"  # timm's hub folder of the encoder: config.json, model.safetensors, README.md
FOLDER_CONFIG = "config.json"
CARD = "README.md"
PICTURES = "recon"
PICTURE = "reconstruction.png"
BEST = "best"
EXPORT = "export"
VISUALIZE = "visualize"
CHECKPOINTS = "checkpoints"
STATE = "state.json"  # in a checkpoint dir: counters, meta and the manifest of the other files
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.pt"
SCALER = "scaler.pt"
STEP_PREFIX = "step_"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
SHARD_INDEX = ".metadata"  # in a sharded checkpoint dir: DCP's index of every rank's shard files (__<rank>_0.distcp)
SHARD_SUFFIX = ".distcp"


def rng_file(rank: int) -> str:
    return f"rng_{rank}.pt"


def extra_file(name: str) -> str:
    return f"extra_{name}.safetensors"



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

    config = property(lambda self: self.root / CONFIG)
    metrics = property(lambda self: self.root / METRICS)
    results = property(lambda self: self.root / RESULTS)
    checkpoints = property(lambda self: self.root / CHECKPOINTS)
    encoder = property(lambda self: self.root / ENCODER)
    encoder_dir = property(lambda self: self.root / ENCODER_DIR)
    pictures = property(lambda self: self.root / PICTURES)
    picture = property(lambda self: self.root / PICTURE)
    best = property(lambda self: self.root / BEST)

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
