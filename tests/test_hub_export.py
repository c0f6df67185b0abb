"""The encoder a run hands on: timm's hub folder `encoder/` with a model card, loadable by timm alone with the run's
channels, size and statistics; the same pretrained_cfg on every path that rebuilds it; a push through timm's
`push_to_hf_hub` with only the network calls mocked."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import yaml
from conftest import TINY, pretrain_briefly
from huggingface_hub import HfApi
from PIL import Image

from mimswin.cli import main as cli
from mimswin.config import PretrainConfig, load_config
from mimswin.config.evaluation import ClassifierConfig
from mimswin.config.sections import size_pair
from mimswin.errors import CheckpointError
from mimswin.eval.classifier import build_classifier
from mimswin.export import load_exported_timm
from mimswin.models.factory import build_method
from mimswin.runs.card import RunFacts
from mimswin.runs.export import export_timm_folder, pretrained_cfg, write_run_export
from mimswin.runs.open import read_encoder_weights

STEPS = 3
FAMILIES = {"vit": "tiny_mae_vit_cpu", "swin": "tiny_mae_swin_cpu", "hiera": "tiny_mae_hiera_cpu"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny pretraining run (3 steps): its trainer, run dir and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer, root = pretrain_briefly(tmp_path_factory, "hub", TINY, STEPS, STEPS)
    return trainer, root, printed.getvalue()


def data_config(model) -> dict:
    config = timm.data.resolve_model_data_config(model)
    return {"input_size": tuple(config["input_size"]), "mean": list(config["mean"]), "std": list(config["std"])}


def pixels(channels: int) -> tuple:
    return [round(0.1 + 0.05 * c, 4) for c in range(channels)], [round(0.2 + 0.01 * c, 4) for c in range(channels)]


@pytest.mark.parametrize("channels", [1, 3, 13])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_run_export_loads_as_local_dir_with_the_encoders_features_and_data_config(family, channels, tmp_path):
    mean, std = pixels(channels)
    cfg = load_config(PretrainConfig, [FAMILIES[family]], [f"data.channels={channels}", f"data.mean={mean}",
                                                           f"data.std={std}"])
    torch.manual_seed(0)
    encoder = build_method(cfg).encoder.model.eval()
    with torch.no_grad():
        for parameter in encoder.parameters():  # weights no initialisation would give
            parameter.add_(torch.randn_like(parameter) * 0.1)
    write_run_export(encoder.state_dict(), RunFacts(cfg, tmp_path, step=7, images=100))
    loaded = timm.create_model(f"local-dir:{tmp_path / 'encoder'}", pretrained=True).eval()
    size = size_pair(cfg.model.img_size)
    images = torch.randn(2, channels, *size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(images), encoder.forward_features(images), rtol=0, atol=0)
    expected = {"input_size": (channels, *size), "mean": mean, "std": std}
    assert data_config(loaded) == expected
    assert data_config(load_exported_timm(tmp_path / "encoder.safetensors")) == expected
    assert data_config(load_exported_timm(tmp_path / "encoder", num_classes=5)) == expected


def test_the_run_dir_folder_loads_with_timm_alone_in_a_fresh_process(run, tmp_path):
    trainer, root, printed = run
    images = torch.randn(2, 1, 32, 32)
    safetensors.torch.save_file({"images": images}, str(tmp_path / "in.safetensors"))
    script = (
        "import sys, timm, torch, safetensors.torch\n"
        f"model = timm.create_model('local-dir:{root / 'encoder'}', pretrained=True, num_classes=10).eval()\n"
        f"images = safetensors.torch.load_file('{tmp_path / 'in.safetensors'}')['images']\n"
        "with torch.no_grad():\n"
        "    features = model.forward_features(images)\n"
        f"safetensors.torch.save_file({{'features': features}}, '{tmp_path / 'out.safetensors'}')\n"
        "config = timm.data.resolve_model_data_config(model)\n"
        "ours = [m for m in sys.modules if m.split('.')[0] == 'mimswin']\n"
        "print(tuple(config['input_size']), list(config['mean']), ours)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(1,", "32,", "32)", "[0.1313]", "[]"]
    encoder = trainer.accelerator.unwrap_model(trainer.model).encoder.model.eval()
    with torch.no_grad():
        expected = encoder.forward_features(images)
    torch.testing.assert_close(safetensors.torch.load_file(str(tmp_path / "out.safetensors"))["features"], expected,
                               rtol=0, atol=0)


def test_pretraining_ends_with_a_summary_and_a_hub_model_card(run):
    trainer, root, printed = run
    front, body = (root / "encoder" / "README.md").read_text().split("---\n")[1:3]
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "timm" and meta["license"] == "other"
    assert {"timm", "mimswin", "mae", "image-feature-extraction"} <= set(meta["tags"])
    first, last = trainer.history[0], trainer.history[-1]
    for text in ("MAE", "vit_tiny_patch16_224", "the embedded MNIST-5k digits: 4000 images of 1 channel(s) at 32 x 32",
                 "**Mean:** 0.1313", "**Std:** 0.3086", f"**Steps:** {STEPS}", f"{last['loss']:.4f} at step {STEPS}",
                 f"$ mimswin pretrain {' '.join(TINY[:2])}", "model:\n  name: vit_tiny_patch16_224",
                 f"timm.create_model(\"local-dir:{root / 'encoder'}\", pretrained=True"):
        assert text in body, text
    assert (root / "encoder.safetensors").is_file()
    speed = sorted(r["images_per_s"] for r in trainer.history)[1]
    assert printed.splitlines()[-1] == (
        f"done: {root}: loss {first['loss']:.3f} at step 1 -> {last['loss']:.3f} at step {STEPS}, {speed:.0f} "
        f"images/s; encoder: {root / 'encoder'} (timm.create_model('local-dir:{root / 'encoder'}', pretrained=True)), "
        f"picture: {root / 'reconstruction.png'}")


def test_every_path_that_rebuilds_the_encoder_carries_the_runs_pretrained_cfg(run):
    _, root, _ = run
    checkpoint = root / "checkpoints" / f"step_{STEPS:08d}"
    for source in (root / "encoder", root / "encoder.safetensors", root, checkpoint):
        model, *_ = build_classifier(read_encoder_weights(source), ClassifierConfig(), 10)
        assert data_config(model) == {"input_size": (1, 32, 32), "mean": [0.1313], "std": [0.3086]}, source
        assert model.pretrained_cfg["architecture"] == "vit_tiny_patch16_224"
        assert "license" not in model.pretrained_cfg and "hf_hub_id" not in model.pretrained_cfg


def write_gray_classes(root: Path) -> None:
    """Two classes of 32 px gray images (dark, light), 8 train and 4 val images each."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for label, base in (("dark", 30), ("light", 200)):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = (base + rng.integers(0, 40, (32, 32))).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")


def test_card_lists_the_evaluations_in_the_run_dir_beside_their_random_init_baseline(run, tmp_path):
    _, root, _ = run
    write_gray_classes(tmp_path / "gray")
    probe = ["--config", "tiny_linprobe_cpu", "--from", str(root), f"data.path={tmp_path / 'gray'}",
             "data.num_workers=0", "train.progress=false", "data.labels_per_class=4", "knn.k=3",
             "logistic.penalties=[0.01]"]
    assert cli(["linprobe", *probe, f"train.output_dir={root / 'probe'}"]) == 0
    assert cli(["linprobe", *probe, "random_init=true", f"train.output_dir={root / 'probe_random'}"]) == 0
    results = [json.loads((root / name / "results.json").read_text()) for name in ("probe", "probe_random")]
    assert cli(["export", "--from", str(root), "--format", "timm", "--out", str(tmp_path / "timm")]) == 0
    card = (tmp_path / "timm" / "README.md").read_text()
    (pretrained, baseline) = (f"{r['last']['val_top1']:.2f} (k-NN {r['knn_top1']:.2f})" for r in results)
    assert f"| linprobe (logistic) | 4 per class | {pretrained} | {baseline} | `probe` |" in card
    assert f"timm.create_model(\"local-dir:{tmp_path / 'timm'}\"" in card


def test_push_to_hub_uploads_the_folder_it_writes_with_the_card_naming_the_repo(run, tmp_path, monkeypatch):
    _, root, _ = run
    uploaded = tmp_path / "uploaded"

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, uploaded)
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "file_exists", lambda self, **kwargs: False)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    local = tmp_path / "local"
    assert cli(["export", "--from", str(root), "--push-to-hub", "someone/tiny-mae", "--out", str(local)]) == 0
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for name in ("README.md", "config.json", "model.safetensors"):
        assert (uploaded / name).read_bytes() == (local / name).read_bytes(), name
    card = (uploaded / "README.md").read_text()
    assert "# Model card for tiny-mae" in card and 'timm.create_model("hf-hub:someone/tiny-mae"' in card
    model = timm.create_model(f"local-dir:{uploaded}", pretrained=True)
    assert data_config(model) == {"input_size": (1, 32, 32), "mean": [0.1313], "std": [0.3086]}


def test_an_export_never_replaces_a_folder_that_is_not_one(run, tmp_path):
    _, root, _ = run
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    source = read_encoder_weights(root)
    with pytest.raises(CheckpointError, match="is not a timm export folder"):
        export_timm_folder(source.weights, keep, source.timm_name, source.timm_kwargs,
                           pretrained_cfg(source.timm_kwargs, [0.1], [0.2], "mine"))
    assert [p.name for p in keep.iterdir()] == ["notes.txt"] and not list(tmp_path.glob(".tmp-*"))
    assert Path(root / "encoder" / "config.json").is_file()
