"""Data beyond 8-bit RGB end to end, seconds each: a 13-band float .npy folder and a 4-channel 16-bit TIFF folder
through `mimswin stats` -> pretrain -> export -> plain `timm.create_model(..., in_chans=C)` -> linear probe, from the
folder and from shards; files the run cannot use are skipped and counted; statistics equal numpy's."""

import shlex
import sys

import numpy as np
import pytest
import safetensors.torch
import tifffile
import timm
import torch
from conftest import REPO
from PIL import Image

from mimswin.cli import main
from mimswin.config import DataConfig, PretrainConfig, load_config
from mimswin.data.build import preview_images
from mimswin.data.stats import stats_of
from mimswin.eval.pictures import reconstruction_grid
from mimswin.export import load_exported_timm
from mimswin.models.factory import build_method
from mimswin.runs.export import export_metadata
from mimswin.runs.layout import read_metrics
from mimswin.runs.open import load_pretrain_run

sys.path.insert(0, str(REPO / "benchmarks"))
import own_data  # noqa: E402

QUICK = ["data.batch_size=8", "data.num_workers=0", "train.progress=false", "train.log_every=1", "train.max_steps=4",
         "model.kwargs={depth: 2}", "decoder.dim=32", "decoder.depth=1", "decoder.heads=2"]
KINDS = {  # example kind, channels, model.img_size
    "s2_npy": ("s2", 13, "[24,32]"),
    "cells_tiff": ("tiff4", 4, "[32,48]"),
}


@pytest.fixture(scope="module", params=KINDS, ids=KINDS)
def example(request, tmp_path_factory):
    kind, channels, size = KINDS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    own_data.write_example(kind, root, per_class=8)
    return root, channels, size


def pasted_config(capsys, argv):
    """Run `mimswin stats` and return the overrides it prints to paste."""
    assert main(["stats", *argv]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1].strip()
    assert line.startswith("data.channels=")
    return shlex.split(line)


def test_stats_equal_numpy_over_the_same_files(tmp_path):
    own_data.write_example("s2", tmp_path, per_class=3)
    files = sorted((tmp_path / "train").rglob("*.npy"))
    pixels = np.concatenate([np.load(f).reshape(13, -1) for f in files], axis=1).astype(np.float64)
    stats = stats_of(str(tmp_path / "train"), samples=0)
    assert stats.images == len(files) == 12 and stats.exact_percentiles
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(stats.std, pixels.std(axis=1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(stats.low, np.percentile(pixels, 1, axis=1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(stats.high, np.percentile(pixels, 99, axis=1), rtol=0, atol=1e-5)

    counts = np.random.default_rng(0).integers(0, 4096, (3, 5, 7), dtype=np.uint16)
    for i, image in enumerate(counts):
        tifffile.imwrite(tmp_path / f"slice{i}.tif", image)
    deep = stats_of(str(tmp_path), channels=1, samples=0)
    assert deep.mean[0] == pytest.approx(counts.mean() / 65535, abs=1e-7)
    assert deep.images == 3 and deep.skipped["wrong channels"] == 16  # the 13-band arrays of train/ and val/


def test_pretrain_export_timm_and_probe_on_multichannel_files(example, capsys, tmp_path):
    root, channels, size = example
    pixels = pasted_config(capsys, [str(root / "train"), "--samples", "0"])
    assert pixels[0] == f"data.channels={channels}"
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "tiny_mae_vit_cpu", f"data.path={root / 'train'}", *pixels,
                 f"model.img_size={size}", *QUICK, f"train.output_dir={run}"]) == 0
    records = read_metrics(run / "metrics.jsonl")
    assert len(records) == 4 and all(np.isfinite(r["loss"]) for r in records) and records[-1]["skipped"] == 0

    height, width = map(int, size.strip("[]").split(","))
    recorded = export_metadata(run / "encoder.safetensors")["pretrained_cfg"]
    assert recorded["input_size"] == [channels, height, width] and len(recorded["mean"]) == channels
    plain = timm.create_model("vit_tiny_patch16_224", in_chans=channels, img_size=[height, width], patch_size=4,
                              depth=2, num_classes=0).eval()
    plain.load_state_dict(safetensors.torch.load_file(str(run / "encoder.safetensors")))
    loaded = load_exported_timm(run / "encoder.safetensors", num_classes=0).eval()
    encoder = load_pretrain_run(run).method.encoder.model.eval()
    images = torch.randn(2, channels, height, width)
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(images), encoder.forward_features(images))
        torch.testing.assert_close(loaded.forward_features(images), encoder.forward_features(images))

    results = main(["linprobe", "--config", "tiny_linprobe_cpu", "--from", str(run), f"data.path={root}",
                    "data.num_workers=0", "train.progress=false", f"train.output_dir={tmp_path / 'probe'}"])
    assert results == 0
    probe = (tmp_path / "probe" / "results.json").read_text()
    assert '"val_top1"' in probe and f'"in_chans": {channels}' in probe


def test_the_same_files_train_from_shards(example, capsys, tmp_path):
    root, channels, size = example
    assert main(["shards", str(root / "train"), str(tmp_path / "shards"), "--maxcount", "10", "--no-progress"]) == 0
    assert "skipped" not in capsys.readouterr().out
    pixels = pasted_config(capsys, [f"{tmp_path}/shards/train-*.tar", "--samples", "0"])
    folder_pixels = pasted_config(capsys, [str(root / "train"), "--samples", "0"])
    assert pixels == folder_pixels, "shards hold the folder's pixels exactly"
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "tiny_mae_vit_cpu", f"data.shards={tmp_path}/shards/train-*.tar",
                 *pixels, f"model.img_size={size}", *QUICK, "train.max_steps=2", f"train.output_dir={run}"]) == 0
    assert read_metrics(run / "metrics.jsonl")[-1]["skipped"] == 0


def test_unusable_files_are_skipped_counted_and_named(tmp_path, capsys, caplog):
    own_data.write_example("s2", tmp_path, per_class=4)
    first = own_data.S2_CLASSES[0]
    train = tmp_path / "train" / first
    broken = np.load(train / f"{first}_0000.npy")
    broken[3, 5, 5] = np.nan
    np.save(train / "nan.npy", broken)
    np.save(train / "eight_bands.npy", broken[:8])
    np.save(train / "flat.npy", broken[0])
    pixels = ["data.channels=13", f"data.mean={[0.1] * 13}", f"data.std={[0.1] * 13}"]
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "tiny_mae_vit_cpu", f"data.path={tmp_path / 'train'}", *pixels,
                 "model.img_size=32", *QUICK, "data.batch_size=19", "train.max_steps=1",
                 f"train.output_dir={run}"]) == 0
    assert read_metrics(run / "metrics.jsonl")[-1]["skipped"] == 3
    warned = caplog.text
    assert "nan.npy: non-finite values" in warned and "eight_bands.npy: wrong channels: 8 channel(s)" in warned
    assert "flat.npy: wrong channels: 1 channel(s), data.channels=13" in warned

    code = main(["pretrain", "--config", "tiny_mae_vit_cpu", f"data.path={tmp_path / 'train'}",
                 "model.img_size=32", *QUICK, f"train.output_dir={tmp_path / 'gray'}"])
    message = capsys.readouterr().err.strip().splitlines()[-1]  # the config is wrong (1 channel): one line, a file
    assert code == 2 and message.startswith("mimswin: error: data")
    assert ".npy (wrong channels: 13 channel(s), data.channels=1)" in message


def test_layout_and_size_mistakes_are_one_line_errors(tmp_path, capsys):
    for path, array in (("a.npy", np.zeros((6, 6, 6), np.float32)), ("b.npy", np.zeros((6, 6, 6), np.float32))):
        np.save(tmp_path / path, array)
    common = ["--config", "tiny_mae_vit_cpu", f"data.path={tmp_path}", "data.channels=6", f"data.mean={[0.1] * 6}",
              f"data.std={[0.1] * 6}", *QUICK, "data.batch_size=2"]
    assert main(["pretrain", *common, f"train.output_dir={tmp_path / 'r1'}"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("mimswin: error:") and "ambiguous layout" in line and "set data.layout=hwc or chw" in line
    assert main(["pretrain", *common, "data.layout=diagonal", f"train.output_dir={tmp_path / 'r2'}"]) == 2
    assert capsys.readouterr().err.startswith("mimswin: error: config key 'data.layout'")
    assert main(["pretrain", *common, "data.layout=chw", "model.img_size=[8,12]",
                 f"train.output_dir={tmp_path / 'r3'}"]) == 0
    assert main(["pretrain", *common, "data.layout=chw", "model.img_size=[8,10]",
                 f"train.output_dir={tmp_path / 'r4'}"]) == 2
    assert "10 px is not a whole number of 4x4 px patches" in capsys.readouterr().err


def test_an_rgb_folder_under_a_one_channel_preset_stops_in_one_line_naming_the_fix(tmp_path, capsys, caplog):
    folder = tmp_path / "rgb"
    folder.mkdir()
    for i in range(40):
        Image.new("RGB", (32, 32), (i, 2 * i, 3 * i)).save(folder / f"{i:02d}.png")
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "tiny_mae_vit_cpu", f"data.path={folder}", *QUICK,
                 f"train.output_dir={run}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mimswin: error: data.path: the images have 3 channel(s) but data.channels=1: set data.channels=3 and its "
        f"data.mean / data.std (`mimswin stats {folder} --channels 3` prints them); first: {folder / '00.png'}")
    assert not [record for record in caplog.records if "skipping" in record.getMessage()]
    assert not (run / "config.yaml").exists()


def test_preview_pictures_spread_over_a_class_sorted_folder(tmp_path):
    for label in range(3):
        (tmp_path / f"class{label}").mkdir()
        for i in range(20):
            Image.new("L", (16, 16), 60 * label + 30).save(tmp_path / f"class{label}" / f"{i:02d}.png")
    data = DataConfig(path=str(tmp_path), channels=1, mean=[0.0], std=[1.0])
    images = preview_images(data, (16, 16), 8)
    shown = sorted({round(value) for value in images.float().mean(dim=(1, 2, 3)).tolist()})
    assert images.shape == (8, 1, 16, 16) and images.dtype == torch.uint8 and shown == [30, 90, 150]


def test_16bit_gray_pictures_are_stretched_between_their_own_percentiles():
    cfg = load_config(PretrainConfig, ["tiny_mae_vit_cpu"], ["model.img_size=32", "data.mean=[0.02]",
                                                             "data.std=[0.005]"])
    method = build_method(cfg)
    counts = torch.from_numpy(np.random.default_rng(0).integers(1000, 2000, (2, 1, 32, 32)).astype(np.float32))
    images = (counts / 65535 - 0.02) / 0.005
    tile = slice(2, 2 + 3 * 32)  # the original: 32 px upscaled 3x after 2 px of padding
    raw = reconstruction_grid(method, images, cfg.data.mean, cfg.data.std)[:, tile, tile]
    stretched = reconstruction_grid(method, images, cfg.data.mean, cfg.data.std, stretch=True)[:, tile, tile]
    assert raw.max() < 0.04
    assert stretched.min() == 0 and stretched.max() == 1 and torch.equal(stretched[0], stretched[2])
