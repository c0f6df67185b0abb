"""Shared test settings: no trackers, no network, small CPU models."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY_PRESET = "tiny_mae_vit_cpu"
TINY_OVERRIDES = [
    "model.kwargs={depth: 2}", "decoder.dim=64", "decoder.depth=1", "decoder.heads=4",
    "data.batch_size=16", "data.num_workers=0", "train.progress=false",
]
TINY = ["--config", TINY_PRESET, *TINY_OVERRIDES]


@pytest.fixture
def tiny_args(tmp_path: Path) -> list[str]:
    """CLI arguments of a seconds-long pretraining run writing into a fresh run dir."""
    return TINY + [f"train.output_dir={tmp_path / 'run'}"]
