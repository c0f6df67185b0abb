"""The `mimswin` command: help lists presets, dispatch, export loadable by plain timm, visualize pictures."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import TINY
from PIL import Image

from mimswin.cli import SUBCOMMANDS, main
from mimswin.config import list_presets
from mimswin.runs.open import load_pretrain_run

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["pretrain", *TINY, f"train.output_dir={run}", "train.max_steps=3"]) == 0
    return run


def encoder_of(run):
    return load_pretrain_run(run).method.encoder.model.eval()


def test_help_lists_every_subcommand_and_preset(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in ("pretrain", "finetune", "linprobe", "knn", "shards", "export", "visualize", "bench", *list_presets()):
        assert word in text


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_reaches_its_program(name, capsys):
    with pytest.raises(SystemExit) as stop:
        main([name, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_console_script_points_at_main_and_help_imports_no_program():
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^mimswin = "mimswin.cli:main"$', scripts, re.M)
    probe = ("import sys; from mimswin.cli import main; main(['--help']); "
             "print(sorted({'torch', 'timm'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "[]"


def test_unknown_subcommand_is_one_clear_error(capsys):
    assert main(["pretrian"]) == 2
    assert capsys.readouterr().err.startswith("mimswin: error: unknown subcommand 'pretrian' (choose from pretrain,")


def test_subcommand_whose_module_is_missing_is_one_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(__import__("mimswin.cli").cli.SUBCOMMANDS, "bench", ("mimswin.no_such_module", "x"))
    assert main(["bench"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mimswin: error: subcommand 'bench' is not available in this version of mimswin "
        "(module mimswin.no_such_module is missing)")


def test_pretrain_subcommand_errors_are_one_line(tmp_path, capsys):
    assert main(["pretrain", *TINY, f"train.output_dir={tmp_path}", "train.epoch=3"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mimswin: error: override 'train.epoch=3': unknown config key 'train.epoch'")


def test_safetensors_export_loads_with_plain_timm_and_pretrained_cfg_overlay(run, tmp_path, capsys):
    out = tmp_path / "encoder.safetensors"
    assert main(["export", "--from", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    assert "pretrained_cfg_overlay" in capsys.readouterr().out
    kwargs = dict(img_size=32, patch_size=4, depth=2, in_chans=1)  # the tiny preset reads one channel
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=10, **kwargs,
                              pretrained_cfg_overlay=dict(file=str(out), input_size=(1, 32, 32))).eval()
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(images), encoder_of(run).forward_features(images))
    headless = timm.create_model("vit_tiny_patch16_224", pretrained=True, **kwargs,
                                 pretrained_cfg_overlay=dict(file=str(out), num_classes=0))
    assert headless.num_classes == 0


def test_timm_folder_export_loads_as_local_dir_with_its_pretrained_cfg(run, tmp_path):
    folder = tmp_path / "timm"
    assert main(["export", "--from", str(run), "--format", "timm", "--out", str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["depth"] == 2 and config["model_args"]["patch_size"] == 4
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=10).eval()
    assert model.pretrained_cfg["input_size"] == (1, 32, 32) and config["model_args"]["in_chans"] == 1
    run_mean = yaml.safe_load((run / "config.yaml").read_text())["data"]["mean"]
    assert list(model.pretrained_cfg["mean"]) == pytest.approx(run_mean) == [0.1313]
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), encoder_of(run).forward_features(images))


def test_visualize_writes_pictures_of_the_expected_size_for_any_images(run, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.new("L", (60 + 7 * i, 45), 40 * i).save(images / f"{i}.png")
    Image.fromarray(np.full((30, 20), 30000, np.uint16)).save(images / "gray16.png")
    Image.new("RGB", (20, 30), (1, 2, 3)).save(images / "colour.jpg")  # 3 channels: skipped by a 1-channel run
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "pictures"
    checkpoint = run / "checkpoints" / "step_00000003"
    assert main(["visualize", "--from", str(checkpoint), "--images", str(images), "--out", str(out),
                 "--per-picture", "4"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["reconstruction_000.png", "reconstruction_001.png"]
    tile = 3 * 32 + 2  # 32-px images upscaled 3x, 2-px padding; columns: original | masked | recon | pasted
    with Image.open(out / "reconstruction_000.png") as first, Image.open(out / "reconstruction_001.png") as second:
        assert first.size == (4 * tile + 2, 4 * tile + 2)
        assert second.size == (4 * tile + 2, 2 * tile + 2)  # 6 usable images, 4 per picture


def test_visualize_and_export_report_bad_paths_in_one_line(run, tmp_path, capsys):
    assert main(["visualize", "--from", str(run), "--images", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip() == f"mimswin: error: --images: '{tmp_path / 'none'}' does not exist"
    assert main(["export", "--from", str(tmp_path / "norun")]) == 2
    assert capsys.readouterr().err.strip() == f"mimswin: error: checkpoint '{tmp_path / 'norun'}' does not exist"
    assert main(["visualize", "--from", str(run / "encoder.safetensors"), "--images", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"mimswin: error: '{run / 'encoder.safetensors'}' is a file; give the "
                                              "run dir or one of its checkpoints/step_* dirs")
