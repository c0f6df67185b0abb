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
    "model.img_size=32", "model.kwargs={depth: 2}", "decoder.dim=64", "decoder.depth=1", "decoder.heads=4",
    "data.batch_size=16", "data.num_workers=0", "train.progress=false",
]
TINY = ["--config", TINY_PRESET, *TINY_OVERRIDES]


def pretrain_briefly(tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str], steps: int,
                     save_every: int) -> tuple:
    """An in-process pretraining run of `steps` steps logging every step; returns (trainer, run dir)."""
    from mimswin.programs.pretrain import main

    run = tmp_path_factory.mktemp(name) / "run"
    trainer = main([*args, f"train.output_dir={run}", f"train.max_steps={steps}", "train.log_every=1",
                    f"train.save_every={save_every}", f"train.vis_every={save_every}"])
    return trainer, run


def loss_at_both_ends(run: Path, steps: int, window: int) -> tuple[float, float]:
    """Mean logged loss of the first and of the last `window` steps of a run that logged each of its `steps`."""
    from mimswin.runs.layout import read_metrics

    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert len(losses) == steps
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


@pytest.fixture
def tiny_args(tmp_path: Path) -> list[str]:
    """CLI arguments of a seconds-long pretraining run writing into a fresh run dir."""
    return TINY + [f"train.output_dir={tmp_path / 'run'}"]
