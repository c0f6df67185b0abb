"""Shared test settings: no trackers, no network, small CPU models."""

import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

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
RGB = ["data.channels=3", "data.mean=null", "data.std=null"]  # 3 channels, ImageNet statistics (colour test data)


def preset_channels(preset: str = TINY_PRESET) -> int:
    """Channels a pretraining preset reads (the tiny presets: the embedded digits as they are, one channel)."""
    from mimswin.config import PretrainConfig, load_config

    return load_config(PretrainConfig, [preset]).data.channels


def write_digit_shards(out: Path) -> str:
    """12 shards of 20 real digits each (PNG + cls) and their sizes.json; the 6th sample of every shard is a corrupt
    JPEG. Returns the brace pattern of the shards."""
    import io
    import json

    import webdataset as wds
    from PIL import Image

    from mimswin.data.sources import EmbeddedMNIST

    digits = EmbeddedMNIST("val")
    for s in range(12):
        with wds.TarWriter(str(out / f"digits-{s:06d}.tar")) as tar:
            for i in range(s * 20, s * 20 + 20):
                if i % 20 == 5:
                    tar.write({"__key__": f"d{i:04d}", "jpg": b"\xff\xd8\xff\xe0 not a jpeg", "cls": b"0"})
                    continue
                buffer = io.BytesIO()
                Image.fromarray(digits.images[i].numpy()).save(buffer, format="PNG")
                tar.write({"__key__": f"d{i:04d}", "png": buffer.getvalue(), "cls": str(digits.labels[i]).encode()})
    (out / "sizes.json").write_text(json.dumps({f"digits-{s:06d}.tar": 20 for s in range(12)}))
    return f"{out}/digits-{{000000..000011}}.tar"


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


def norm_pix_mse_by_hand(pred, images, hidden, patch: int) -> tuple[float, int]:
    """Reference MAE loss, one patch at a time in float64: MSE against the patch normalized by its own mean and
    unbiased variance, averaged over the hidden patches only. Returns (loss, hidden patch count)."""
    from mimswin.models.patches import patchify

    raw = patchify(images, patch)
    total, count = 0.0, 0
    for b in range(hidden.shape[0]):
        for i in range(hidden.shape[1]):
            if not hidden[b, i]:
                continue
            values = raw[b, i].double()
            mean = values.sum() / values.numel()
            var = ((values - mean) ** 2).sum() / (values.numel() - 1)
            total += ((pred[b, i].double() - (values - mean) / (var + 1e-6) ** 0.5) ** 2).mean().item()
            count += 1
    return total / max(count, 1), count


def export_of_run(trainer, run: Path, head_keys: set):
    """(the run's export loaded by `load_exported_timm`, the run's encoder), both in eval mode, after checking that the
    export loads into a plain `timm.create_model` with only `head_keys` missing and nothing unexpected."""
    import timm

    from mimswin.export import load_exported_timm
    from mimswin.runs.export import read_export

    weights, name, kwargs = read_export(run / "encoder.safetensors")
    plain = timm.create_model(name, pretrained=False, **kwargs)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    assert unexpected == [] and set(missing) == head_keys
    loaded = load_exported_timm(run / "encoder.safetensors", num_classes=0).eval()
    return loaded, trainer.accelerator.unwrap_model(trainer.model).encoder.eval()


class ResumedPair(NamedTuple):
    """An uninterrupted pretraining run and one resumed from its checkpoint: run dirs, trainers, final weights."""

    full: Path
    resumed: Path
    full_trainer: Any
    resumed_trainer: Any
    full_weights: dict
    resumed_weights: dict


def run_and_resume(tmp_path: Path, args: list[str], resume_at: int, steps: int) -> ResumedPair:
    """A pretraining run of `steps` steps, and a second one resumed from the first's checkpoint at `resume_at`."""
    import shutil

    import safetensors.torch

    from mimswin.programs.pretrain import main

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full_trainer = main([*args, f"train.output_dir={full}"])
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / f"checkpoints/step_{resume_at:08d}", resumed / f"checkpoints/step_{resume_at:08d}")
    resumed_trainer = main([*args, f"train.output_dir={resumed}", "--resume"])
    weights = [safetensors.torch.load_file(run / f"checkpoints/step_{steps:08d}/model.safetensors")
               for run in (full, resumed)]
    return ResumedPair(full, resumed, full_trainer, resumed_trainer, *weights)
