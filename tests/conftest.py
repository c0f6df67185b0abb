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


# The multi-rank pretraining run that tests/test_distributed.py and tests/test_fsdp.py share: 6 steps, checkpoints at
# 3 and 6, pictures and online-probe readings at 3 and 6 (33 probe images: 17 / 16 per rank, uneven on purpose).
MULTI_RANK_RUN = [*TINY, "train.max_steps=6", "train.log_every=1", "train.save_every=3", "train.vis_every=3",
                  "train.keep_last=5", "online_probe.every=3", "online_probe.val_samples=33"]
STRATEGIES = {"ddp": [], "fsdp": ["train.strategy=fsdp"]}  # strategy -> the overrides that select it
RANK_PROBE = REPO / "tests" / "helpers" / "rank_probe.py"


class Job(NamedTuple):
    """A finished torchrun job: its run dir, per global rank what the rank probe dumped, per agent its console."""

    run: Path
    ranks: list
    consoles: list


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_agents(out: Path, agents: list, overrides: list) -> Job:
    """Start one torchrun agent per entry of `agents` (its launcher arguments) at once, each running the rank probe
    on MULTI_RANK_RUN in the same run dir; wait for all of them."""
    import subprocess

    import torch

    run = out / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *agent, str(RANK_PROBE), str(out),
                               *MULTI_RANK_RUN, *overrides, f"train.output_dir={run}"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for agent in agents]
    consoles = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, console in zip(procs, consoles):
        assert proc.returncode == 0, console[-3000:]
    return Job(run, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)], consoles)


@pytest.fixture(scope="session")
def multi_rank_jobs(tmp_path_factory) -> dict:
    """Per strategy, the same tiny pretraining run as one torchrun agent with 2 ranks and as two agents ("nodes") of
    1 rank each meeting at a c10d rendezvous on this machine, as two nodes would. Shared by every test that needs
    them."""
    import uuid

    jobs = {}
    for strategy, overrides in STRATEGIES.items():
        one = launch_agents(tmp_path_factory.mktemp(f"{strategy}_one_agent"),
                            [["--standalone", "--nproc_per_node", "2"]], overrides)
        rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                      f"127.0.0.1:{free_port()}", "--rdzv-id", uuid.uuid4().hex]
        two = launch_agents(tmp_path_factory.mktemp(f"{strategy}_two_agents"), [rendezvous, rendezvous], overrides)
        jobs[strategy] = {"one agent": one, "two agents": two}
    return jobs


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
