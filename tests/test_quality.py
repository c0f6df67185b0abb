"""The evaluation parts that make quality measurable: labeled subsets, probe features, the logistic probe, the
probe-initialised fine-tune head, legible pictures, and the quality benchmark end to end."""

import json
import statistics
import sys

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import REPO, RGB, TINY

from mimswin.config import PretrainConfig, TrainConfig, load_config
from mimswin.config.evaluation import FinetuneConfig, LabeledDataConfig
from mimswin.data.batches import DeviceStep
from mimswin.data.labeled import labeled_pair
from mimswin.data.sources import EmbeddedMNIST
from mimswin.data.subsets import balanced_split, labeled_subset
from mimswin.errors import ConfigError
from mimswin.eval.head_init import PreLogits, probe_initialised_head
from mimswin.eval.knn import knn_accuracy
from mimswin.eval.logistic import Standardize, fit_probe, folded, logistic_probe
from mimswin.eval.pictures import reconstruction_grid
from mimswin.eval.pooling import ProbeFeatures
from mimswin.models import build_method
from mimswin.programs import finetune, linprobe
from mimswin.programs.pretrain import main as pretrain
from mimswin.train.setup import make_accelerator

sys.path.insert(0, str(REPO / "benchmarks"))
import quality  # noqa: E402

FAST = ["data.batch_size=16", "data.num_workers=0", "train.progress=false", "train.log_every=1"]


def test_labeled_subset_is_class_balanced_seeded_and_nested():
    labels = torch.arange(10).repeat_interleave(400)
    ten = labeled_subset(labels, fraction=0.1, seed=3)
    assert torch.bincount(labels[ten]).tolist() == [40] * 10
    assert torch.equal(ten, labeled_subset(labels, fraction=0.1, seed=3))
    assert not torch.equal(ten, labeled_subset(labels, fraction=0.1, seed=4))
    one = labeled_subset(labels, per_class=4, seed=3)
    assert torch.bincount(labels[one]).tolist() == [4] * 10
    assert set(one.tolist()) <= set(ten.tolist())
    assert torch.equal(labeled_subset(labels), torch.arange(len(labels)))
    with pytest.raises(ConfigError, match="not both"):
        labeled_subset(labels, fraction=0.1, per_class=2)


def test_embedded_label_fraction_takes_train_images_only_and_keeps_val_whole():
    train, val, classes = labeled_pair(LabeledDataConfig(label_fraction=0.01), None, None)
    assert classes == 10 and len(train) == 40 and len(val) == 1000
    labels = [train[i][1] for i in range(len(train))]
    assert np.bincount(labels).tolist() == [4] * 10
    val_images = {np.asarray(val[i][0]).tobytes() for i in range(len(val))}
    assert not any(np.asarray(train[i][0]).tobytes() in val_images for i in range(len(train)))


def test_balanced_split_holds_out_a_fraction_of_each_class_disjointly():
    labels = torch.tensor([0] * 20 + [1] * 10 + [2])
    kept, held = balanced_split(labels, 0.1, seed=0)
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]
    assert sorted(kept.tolist() + held.tolist()) == list(range(len(labels)))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, depth=3, num_classes=0,
                             global_pool="token").eval()


def hand_block_outputs(model, x):
    """Each block's output tokens, computed by hand through timm's own modules."""
    tokens = model._pos_embed(model.patch_embed(x))
    outputs = []
    for block in model.blocks:
        tokens = block(tokens)
        outputs.append(model.norm(tokens))
    return outputs


@pytest.mark.parametrize("pool,blocks", [("cls", 1), ("avg", 1), ("cls+avg", 1), ("avg", 2), ("cls+avg", 3)])
def test_probe_features_match_a_hand_computation(vit, pool, blocks):
    x = torch.randn(3, 3, 28, 28)
    reader = ProbeFeatures(vit, pool, blocks)
    with torch.no_grad():
        got = reader(x)
        outs = hand_block_outputs(vit, x)
    parts = []
    for tokens in reversed(outs[-blocks:]):
        parts += {"cls": [tokens[:, 0]], "avg": [tokens[:, 1:].mean(1)],
                  "cls+avg": [tokens[:, 0], tokens[:, 1:].mean(1)]}[pool]
    expected = torch.cat(parts, dim=1)
    assert got.shape == (3, reader.num_features) == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_swin_features_average_its_stages_and_refuse_a_class_token():
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, embed_dim=32, depths=[2, 2],
                             num_heads=[2, 4], window_size=4, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        both = ProbeFeatures(swin, "avg", 4)
        assert both.blocks == 2 and both.num_features == 64 + 32
        torch.testing.assert_close(both(x)[:, :64], swin(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="class token"):
        ProbeFeatures(swin, "cls")


def test_logistic_probe_separates_separable_classes_whatever_the_feature_scale():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=generator) * 3
    labels = torch.arange(4).repeat(50)
    x = centers[labels] + torch.randn(200, 16, generator=generator)
    for scale in (1e-3, 1.0, 1e3):
        result = logistic_probe(x * scale, labels, x[:40] * scale, labels[:40], 4)
        assert result["top1"] == 100.0, scale


def test_folded_probe_equals_standardize_then_linear():
    x = torch.randn(50, 8) * 5 + 2
    y = torch.arange(5).repeat(10)
    scale, linear, _, _ = fit_probe(x, y, 5, l2_grid=[1e-2])
    weight, bias = folded(scale, linear)
    torch.testing.assert_close(x @ weight.T + bias, linear(scale(x)), rtol=1e-4, atol=1e-4)
    assert isinstance(scale, Standardize)


def test_pixel_tokens_are_the_4x4_patches_with_their_positions_beside_them():
    train_x = quality.raw_pixel_features()[0][:3]
    tokens = quality.pixel_tokens(train_x)
    assert tokens.shape == (3, 49, 32)
    images = train_x.reshape(3, 28, 28)
    torch.testing.assert_close(tokens[1, 7 + 2, :16], images[1, 4:8, 8:12].reshape(16))  # row 1, column 2
    assert torch.equal(tokens[0, :, 16:], tokens[2, :, 16:]) and len(set(map(tuple, tokens[0, :, 16:].tolist()))) == 49


def test_raw_pixel_baseline_reads_the_embedded_pixels_and_its_knn_is_brute_force():
    train_x, train_y, val_x, val_y = quality.raw_pixel_features()
    images = EmbeddedMNIST("train").images
    assert train_x.shape == (4000, 784) and val_x.shape == (1000, 784)
    torch.testing.assert_close(train_x[7], images[7].reshape(-1).float() / 255.0)
    a, b = train_x[:300], val_x[:50]
    sims = torch.nn.functional.normalize(b, dim=1) @ torch.nn.functional.normalize(a, dim=1).T
    nearest = train_y[:300][sims.argmax(dim=1)]
    expected = 100.0 * (nearest == val_y[:50]).double().mean().item()
    assert knn_accuracy(a, train_y[:300], b, val_y[:50], 10, 1, 0.07)["top1"] == pytest.approx(expected)


def test_probe_initialised_head_gives_the_probe_logits(vit):
    model = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, depth=2, num_classes=10,
                              global_pool="avg").eval()
    dataset = torch.utils.data.Subset(EmbeddedMNIST("train"), range(200))
    accelerator, step = make_accelerator(TrainConfig(cpu=True)), DeviceStep([0.1] * 3, [0.3] * 3)
    probe_initialised_head(model, dataset, 10, accelerator, 50, 0, step)
    inputs = step(torch.stack([dataset[i][0] for i in range(200)]), torch.device("cpu"))
    images, labels = inputs[:20], torch.tensor([dataset[i][1] for i in range(200)])
    with torch.no_grad():
        features = PreLogits(model)(inputs)
        scale, linear, _, _ = fit_probe(features, labels, 10)
        torch.testing.assert_close(model(images), linear(scale(features[:20])), rtol=1e-3, atol=1e-3)


def test_reconstruction_of_gray_digits_is_gray_and_upscaled():
    cfg = load_config(PretrainConfig, ["tiny_mae_vit_cpu"], [*TINY[2:], "model.img_size=28"])
    method = build_method(cfg)
    mean = torch.tensor(cfg.data.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, -1, 1, 1)
    digits = EmbeddedMNIST("val").images[:2].float()[:, None] / 255.0
    picture = reconstruction_grid(method, (digits - mean) / std, cfg.data.mean, cfg.data.std)
    assert torch.equal(picture[0], picture[1]) and torch.equal(picture[1], picture[2])
    assert picture.shape[-1] >= 4 * 96 and picture.shape[-2] >= 2 * 96
    rgb = load_config(PretrainConfig, ["tiny_mae_vit_cpu"], [*TINY[2:], *RGB, "model.img_size=28"])
    mean, std = torch.tensor(rgb.data.mean).view(1, 3, 1, 1), torch.tensor(rgb.data.std).view(1, 3, 1, 1)
    replicated = digits.expand(-1, 3, -1, -1)
    gray = reconstruction_grid(build_method(rgb), (replicated - mean) / std, rgb.data.mean, rgb.data.std)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    colour = torch.rand(2, 3, 28, 28)
    tinted = reconstruction_grid(build_method(rgb), (colour - mean) / std, rgb.data.mean, rgb.data.std)
    assert not torch.equal(tinted[0], tinted[1])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("pre") / "run"
    pretrain(TINY + [f"train.output_dir={run}", "train.max_steps=2"])
    return run


def test_logistic_linprobe_on_a_label_subset_trains_on_that_subset_only(pretrained, tmp_path):
    results = linprobe.main(["--config", "tiny_linprobe_cpu", "--from", str(pretrained), "data.labels_per_class=3",
                             f"train.output_dir={tmp_path / 'lp'}", *FAST])
    assert results["mode"] == "logistic" and results["train_samples"] == 30
    assert results["features"] == "cls+avg" and results["blocks"] == 2
    assert 0 <= results["last"]["val_top1"] <= 100 and "knn_top1" in results
    assert json.loads((tmp_path / "lp/results.json").read_text())["best"]["l2"] == results["best"]["l2"]


def test_label_subset_on_shards_is_one_clear_error(pretrained, tmp_path, capsys):
    code = finetune.cli(["--config", "tiny_finetune_cpu", "--from", str(pretrained), "data.label_fraction=0.1",
                         "data.shards=a.tar", "data.val_shards=b.tar", f"train.output_dir={tmp_path}", *FAST])
    assert code == 2 and "map-style source" in capsys.readouterr().err


@pytest.mark.parametrize("fraction", [0.1, 0.01])
@pytest.mark.parametrize("preset", ["tiny_finetune_cpu", "tiny_finetune_swin_cpu", "tiny_finetune_hiera_cpu"])
def test_few_label_finetune_runs_about_min_steps_in_a_batch_the_subset_fills_and_warms_up_over_a_fifth(fraction,
                                                                                                     preset):
    cfg = load_config(FinetuneConfig, [preset], [f"data.label_fraction={fraction}"])
    images = 10 * round(fraction * 400)
    recipe, line = finetune.few_label_recipe(cfg, images)
    batch, epochs = recipe.data.batch_size, recipe.train.epochs
    per_epoch = images // batch
    assert batch == min(64, images) and 150 <= epochs * per_epoch < 150 + per_epoch
    assert recipe.optim.warmup_epochs == epochs // 5 and recipe.eval_every == epochs // 4
    assert f"batch {batch}, {epochs} epochs of {per_epoch} steps" in line and "few_labels.min_steps" in line
    assert cfg.train.epochs * (images // cfg.data.batch_size) < 150, "the preset alone would run fewer steps"


def test_few_label_budget_leaves_full_labels_a_long_enough_subset_and_min_steps_0_alone():
    full = load_config(FinetuneConfig, ["tiny_finetune_cpu"])
    assert finetune.few_label_recipe(full, 4000) == (full, None)
    half = load_config(FinetuneConfig, ["tiny_finetune_cpu"], ["data.label_fraction=0.5"])
    assert finetune.few_label_recipe(half, 2000) == (half, None)
    off = load_config(FinetuneConfig, ["tiny_finetune_cpu"], ["data.labels_per_class=4", "few_labels.min_steps=0"])
    assert finetune.few_label_recipe(off, 40) == (off, None)
    two = load_config(FinetuneConfig, ["tiny_finetune_cpu"], ["data.labels_per_class=4"])
    recipe, _ = finetune.few_label_recipe(two, 40, num_processes=2)
    assert recipe.data.batch_size == 20 and recipe.train.epochs == 150, "each of 2 ranks fills its batch from its 20"


def test_a_one_percent_fine_tune_runs_the_few_label_steps_and_says_so_first(pretrained, tmp_path, capsys):
    capsys.readouterr()
    results = finetune.main(["--config", "tiny_finetune_cpu", "--from", str(pretrained), "train.epochs=1",
                             "few_labels.min_steps=12", "data.label_fraction=0.01", *FAST,
                             f"train.output_dir={tmp_path}"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("few labels: 40 images, 2 steps at batch 16 x 1 epochs -> about 12"), first
    assert results["steps"] == 12 and results["epochs"] == 12, "one epoch of 40 images at batch 16 is 2 steps"
    recorded = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert recorded["data"]["batch_size"] == 40 and recorded["train"]["epochs"] == 12


def test_mean_over_seeds_averages_accuracies_sums_times_and_keeps_each_seed():
    cell = quality.mean_over_seeds([{"probe": 40.0, "knn": None, "seconds": 2.0, "finetune": 50.0, "finetune_s": 3.0},
                                    {"probe": 44.0, "knn": None, "seconds": 1.0, "finetune": 53.0, "finetune_s": 4.0},
                                    {"probe": 45.0, "knn": None, "seconds": 1.5, "finetune": 56.0, "finetune_s": 5.0}])
    assert cell["probe"] == pytest.approx(43.0) and cell["probe_std"] == pytest.approx(statistics.stdev([40, 44, 45]))
    assert cell["finetune_seeds"] == [50.0, 53.0, 56.0] and cell["finetune_std"] == pytest.approx(3.0)
    assert cell["seconds"] == 4.5 and cell["finetune_s"] == 12.0 and cell["knn"] is None
    assert quality.mean_over_seeds([{"probe": 40.0, "seconds": 2.0}]) == {"probe": 40.0, "seconds": 2.0}


@pytest.mark.parametrize("option", ["--seeds", "--pretrain-seeds"])
def test_quality_benchmark_refuses_fewer_than_one_seed(capsys, option):
    with pytest.raises(SystemExit) as stop:
        quality.main([option, "0"])
    assert stop.value.code == 2 and f"{option} must be >= 1, got 0" in capsys.readouterr().err


def test_quality_benchmark_writes_its_table_json_and_plot(tmp_path, monkeypatch, capsys):
    out = tmp_path / "quality"
    monkeypatch.chdir(tmp_path)  # the presets are found from another directory
    assert quality.main(["--budget", "smoke", "--out", str(out), "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "quality.json").read_text())
    assert set(results["rows"]) == {"raw_pixels", "mae_vit", "random_vit", "mae_swin", "random_swin"}
    for key in ("mae_vit", "random_vit", "mae_swin", "random_swin"):
        for column in ("probe", "knn", "attentive", "finetune"):
            assert 0 <= results["rows"][key]["10%"][column] <= 100
        assert 0 <= results["rows"][key]["1%"]["probe"] <= 100 and "finetune" not in results["rows"][key]["1%"]
    assert results["rows"]["raw_pixels"]["10%"]["probe"] > 70
    raw = results["rows"]["raw_pixels"]["10%"]["probe_seeds"]
    assert len(raw) == 2 and raw[0] != raw[1], "each seed draws its own labeled subset"
    seeded = results["commands"]["mae_vit/finetune_10%_seed1"]
    assert "data.label_seed=1" in seeded and "train.seed=1" in seeded
    assert "label_seed" not in results["commands"]["mae_vit/finetune_10%"]
    assert results["curves"]["mae_vit"] and "launch/linprobe.py" in results["commands"]["mae_vit/probe_10%"]
    assert "mode=attentive" in results["commands"]["mae_vit/probe_10%_attentive"]
    assert 0 <= results["rows"]["raw_pixels"]["10%"]["attentive"] <= 100
    table = (out / "quality.md").read_text()
    assert "| MAE ViT |" in table and "raw pixels" in table and " ± " in table and table in printed
    assert "attentive probe 10%" in table
    assert (out / "quality_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_benchmark_skips_the_fine_tunes_and_curve_and_their_columns(tmp_path, monkeypatch):
    budget = quality.without_stages(quality.BUDGETS["full"], {"finetune", "curve"})
    assert budget.finetune_fractions == () and budget.curve_points == 0 and budget.fractions == (1.0, 0.1, 0.01)
    bench = quality.Bench(quality.replace(budget, methods=("mae_vit",), seeds=2), tmp_path)
    calls = []
    monkeypatch.setattr(bench, "raw_pixels", lambda: {})

    monkeypatch.setattr(bench, "pretrain", lambda key, method, seed=0: (tmp_path, 1.0))
    monkeypatch.setattr(bench, "probe", lambda key, source, fraction, random=False, seed=0, attentive=True:
                        calls.append(("probe", key, fraction, seed)) or {"probe": 50.0, "knn": 40.0, "attentive": 60.0})
    monkeypatch.setattr(bench, "finetune", lambda *a, **k: calls.append(("finetune",)) or {"finetune": 90.0})
    monkeypatch.setattr(bench, "curve", lambda *a: calls.append(("curve",)) or [])
    results = bench.run(["mae_vit"])
    assert [c[0] for c in calls] == ["probe"] * 10, "1 + 2 + 2 probes per row (MAE, random init), nothing else"
    table = quality.markdown_table(results, budget.fractions)
    assert "attentive probe 1%" in table and "fine-tune" not in table
    assert "| MAE ViT | 50.0 | 50.0 ± 0.0 |" in table


def test_pretrain_seeds_pretrain_each_seed_and_report_every_readout_over_them(tmp_path, monkeypatch):
    budget = quality.replace(quality.BUDGETS["quick"], fractions=(1.0, 0.1), curve_points=0, seeds=2,
                             pretrain_seeds=2, pretrain=["mask.ratio=0.6"])
    bench = quality.Bench(budget, tmp_path)
    monkeypatch.setattr(bench, "raw_pixels", lambda: {})
    argvs = []

    def call(key, program, script, argv):
        """A program's result read from its argv: 80 + 10 x the pretraining seed of the encoder + the label seed."""
        argvs.append((key, argv))
        origin = next((a for i, a in enumerate(argv) if argv[i - 1] == "--from"), "")
        value = 80.0 + 10 * ("_pretrain1" in origin) + ("data.label_seed=1" in argv) - 20 * ("random_init=true" in argv)
        return {"result": {"last": {"val_top1": value}, "knn_top1": value - 30}, "seconds": 1.0}

    monkeypatch.setattr(bench, "call", call)
    results = bench.run(["mae_vit"])
    pretrainings = [argv for key, argv in argvs if key.endswith("/pretrain")]
    assert len(pretrainings) == 2 and "train.seed=1" in pretrainings[1] and "mask.ratio=0.6" in pretrainings[1]
    assert not any(a.startswith("train.seed") for a in pretrainings[0]), "seed 0 is the preset's own command"
    sources = {argv[argv.index("--from") + 1] for key, argv in argvs if "--from" in argv}
    assert sources == {str(tmp_path / "mae_vit/pretrain"), str(tmp_path / "mae_vit_pretrain1/pretrain")}
    row = results["rows"]["mae_vit"]
    assert row["pretrain_s"] == 2.0 and len(row["pretrain_seeds"]) == 2
    assert row["100%"]["probe_seeds"] == [80.0, 90.0] and row["100%"]["finetune"] == 85.0
    assert row["100%"]["attentive_std"] == pytest.approx(statistics.stdev([80, 90]))
    assert row["10%"]["probe_seeds"] == [80.5, 90.5], "each pretraining's value is its mean over the label seeds"
    assert row["pretrain_seeds"][1]["10%"]["knn_seeds"] == [60.0, 61.0]
    random = results["rows"]["random_vit"]
    assert random["100%"]["probe"] == 60.0 and "probe_std" not in random["100%"], "random init is one network"
    assert "| MAE ViT | 85.0 ± 7.1 |" in quality.markdown_table(results, budget.fractions)
