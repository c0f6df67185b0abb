import json
import os
import shutil
import signal

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from conftest import RGB, TINY
from PIL import Image
from torchvision.transforms import ColorJitter

from mimswin.config import OptimConfig, TrainConfig, load_config
from mimswin.config.evaluation import ClassifierConfig, FinetuneConfig
from mimswin.data.shard_write import write_shards
from mimswin.data.transforms import Rgb8Only
from mimswin.errors import ConfigError
from mimswin.eval.callbacks import EvaluateEachEpoch
from mimswin.eval.classifier import build_classifier, classifier_kwargs
from mimswin.eval.knn import knn_accuracy, knn_predict
from mimswin.eval.metrics import evaluate, topk_correct
from mimswin.programs import finetune, knn, linprobe
from mimswin.programs.finetune import sample_transform
from mimswin.programs.linprobe import FrozenEncoderProbe
from mimswin.programs.pretrain import main as pretrain
from mimswin.runs.export import export_encoder, read_export
from mimswin.runs.layout import read_metrics
from mimswin.runs.open import read_encoder_weights
from mimswin.signals import EXIT_PREEMPTED
from mimswin.train.optim import build_optimizer, build_scheduler
from mimswin.train.setup import make_accelerator

FAST = ["data.batch_size=16", "data.num_workers=0", "train.progress=false", "train.log_every=1"]


def write_colour_folder(root, per_class):
    """Three classes of noisy images of one dominant colour each: separable by any sensible feature."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for c, colour in enumerate(("red", "green", "blue")):
            folder = root / split / colour
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (32, 32, 3))
                pixels[..., c] += 160
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """A small labeled image folder (3 classes, 24 train / 12 val images each)."""
    root = tmp_path_factory.mktemp("colours")
    write_colour_folder(root, 24)
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny MAE pretraining run (2 steps, 3 channels): its run dir, with a checkpoint and the exported encoder."""
    run = tmp_path_factory.mktemp("pre") / "run"
    pretrain(TINY + RGB + [f"train.output_dir={run}", "train.max_steps=2"])
    return run


def encoder_keys_equal(model_state, exported, prefix=""):
    for key, tensor in exported.items():
        if key.startswith(("head.", "fc_norm.")):
            continue
        torch.testing.assert_close(model_state[prefix + key], tensor, rtol=0, atol=0, msg=key)


def test_classifier_gets_exactly_the_exported_weights_from_file_run_dir_and_checkpoint(pretrained):
    exported, name, kwargs = read_export(pretrained / "encoder.safetensors")
    checkpoint = next((pretrained / "checkpoints").glob("step_*"))
    for source in (pretrained / "encoder.safetensors", pretrained, checkpoint):
        weights = read_encoder_weights(source)
        assert weights.timm_name == name and weights.timm_kwargs["img_size"] == 32
        model, _, _, report = build_classifier(weights, ClassifierConfig(global_pool="token"), 10)
        encoder_keys_equal(model.state_dict(), exported)
        assert report.missing == ["head.bias", "head.weight"]
    model, _, _, report = build_classifier(read_encoder_weights(pretrained), ClassifierConfig(), 10)
    assert set(report.missing) == {"head.bias", "head.weight", "fc_norm.bias", "fc_norm.weight"}
    assert report.unexpected == ["norm.bias", "norm.weight"]


def test_larger_image_size_resamples_the_position_embedding(pretrained):
    model, _, _, _ = build_classifier(read_encoder_weights(pretrained), ClassifierConfig(img_size=48), 10)
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 192)
    exported, _, _ = read_export(pretrained / "encoder.safetensors")
    torch.testing.assert_close(model.pos_embed[:, 0], exported["pos_embed"][:, 0])
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, exported["blocks.0.attn.qkv.weight"])


def test_layer_decay_gives_each_vit_depth_its_lr_scale():
    depth, decay = 2, 0.5
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=depth, num_classes=10)
    optimizer = build_optimizer(model, OptimConfig(), 1.0, layer_decay=decay)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    expected = {"pos_embed": decay ** (depth + 1), "patch_embed.proj.weight": decay ** (depth + 1),
                "blocks.0.attn.qkv.weight": decay ** depth, "blocks.1.mlp.fc2.bias": decay ** (depth - 1),
                "norm.weight": decay, "head.weight": 1.0}
    assert {k: scale[id(named[k])] for k in expected} == pytest.approx(expected)  # timm: final norm below head
    build_scheduler(optimizer, OptimConfig(warmup_epochs=0, min_lr=0.0), 10, 10).step_update(0)
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr[id(named["blocks.0.attn.qkv.weight"])] == pytest.approx(decay ** depth)


def test_topk_and_evaluate_count_known_labels():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 4, 0, 0, 0], [0, 1, 2, 3, 4, 5], [9, 0, 0, 0, 0, 1]])
    labels = torch.tensor([0, 2, 0, 5])
    assert topk_correct(logits, labels).tolist() == [1.0, 3.0]
    dataset = torch.utils.data.TensorDataset(logits, labels)
    result = evaluate(torch.nn.Identity(), dataset, make_accelerator(TrainConfig(cpu=True)), 3, 0, step=None)
    assert result["top1"] == 25.0 and result["top5"] == 75.0 and result["count"] == 4


def brute_force_knn(train, train_labels, query, num_classes, k, temperature):
    scores = torch.zeros(len(query), num_classes, dtype=torch.float64)
    for q in range(len(query)):
        sims = [float(np.dot(query[q], x) / np.linalg.norm(query[q]) / np.linalg.norm(x)) for x in train.numpy()]
        for i in sorted(range(len(sims)), key=lambda i: -sims[i])[:k]:
            scores[q, train_labels[i]] += np.exp(sims[i] / temperature)
    return scores


def test_knn_matches_a_brute_force_reference():
    generator = torch.Generator().manual_seed(0)
    train, query = torch.randn(60, 8, generator=generator), torch.randn(9, 8, generator=generator)
    train_labels = torch.randint(0, 4, (60,), generator=generator)
    scores = knn_predict(train, train_labels, query, 4, k=7, temperature=0.1)
    reference = brute_force_knn(train, train_labels, query.numpy(), 4, 7, 0.1)
    torch.testing.assert_close(scores.double(), reference, rtol=1e-4, atol=1e-4)
    accuracy = knn_accuracy(train, train_labels, query, reference.argmax(1), 4, 7, 0.1)
    assert accuracy["top1"] == 100.0


def test_finetune_runs_from_an_export_and_logs_val_accuracy(pretrained, colours, tmp_path):
    out = tmp_path / "ft"
    results = finetune.main(["--config", "tiny_finetune_cpu", "--from", str(pretrained / "encoder.safetensors"),
                             f"data.path={colours}", f"train.output_dir={out}", "train.max_steps=3",
                             "ema_decay=0.9", *FAST])
    assert results["steps"] == 3
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if "val_top1" in r]
    assert len(evals) == 1 and evals[0]["val_count"] == 36 and 0 <= evals[0]["val_top1"] <= 100
    assert "val_ema_top1" in evals[0]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert json.loads((out / "best/state.json").read_text())["meta"]["timm_name"] == "vit_tiny_patch16_224"


def test_finetune_from_a_run_dir_starts_from_its_weights(pretrained, tmp_path):
    trainer, _ = finetune.build_finetune(*finetune.parse_eval_args(
        finetune.FinetuneConfig, "t", "t", ["--config", "tiny_finetune_cpu", "--from", str(pretrained),
                                            f"train.output_dir={tmp_path / 'ft'}", "model.global_pool=token",
                                            *FAST]))
    exported, _, _ = read_export(pretrained / "encoder.safetensors")
    encoder_keys_equal(trainer.accelerator.unwrap_model(trainer.model).state_dict(), exported)


def test_linprobe_trains_only_the_head_and_keeps_the_encoder_frozen(pretrained, colours, tmp_path):
    out = tmp_path / "lp"
    results = linprobe.main(["--config", "tiny_linprobe_cpu", "--from", str(pretrained), "mode=mae",
                             f"data.path={colours}",
                             f"train.output_dir={out}", "train.max_steps=3", "knn.k=0", *FAST])
    assert results["steps"] == 3 and "val_top1" in results["last"]
    checkpoint = next((out / "checkpoints").glob("step_*"))
    state = safetensors.torch.load_file(str(checkpoint / "model.safetensors"))
    exported, _, _ = read_export(pretrained / "encoder.safetensors")
    encoder_keys_equal(state, exported, prefix="encoder.")
    assert not any(k.startswith("head.0.") and k.endswith(("weight", "bias")) for k in state)
    assert state["head.1.weight"].abs().max() > 0
    probe = FrozenEncoderProbe(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1,
                                                 num_classes=0), 3)
    assert probe.head[0].weight is None and probe.head[0].bias is None
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    assert not probe.train().encoder.training


def test_cached_probe_and_knn_reach_high_accuracy_on_separable_classes(pretrained, colours, tmp_path):
    results = linprobe.main(["--config", "tiny_linprobe_cpu", "--from", str(pretrained / "encoder.safetensors"),
                             f"data.path={colours}", f"train.output_dir={tmp_path / 'lp'}", "train.epochs=6",
                             "mode=cached", "knn.k=5", *FAST])
    assert results["last"]["val_count"] == 36
    assert results["best"]["top1"] >= 90.0
    assert results["knn_top1"] >= 90.0


def test_knn_program_classifies_separable_classes(pretrained, colours, tmp_path):
    results = knn.main(["--config", "tiny_linprobe_cpu", "--from", str(pretrained), f"data.path={colours}",
                        "knn.k=5", f"train.output_dir={tmp_path / 'knn'}", *FAST])
    assert results["knn_top1"] >= 90.0
    assert read_metrics(tmp_path / "knn/metrics.jsonl")[0]["knn_top1"] == results["knn_top1"]


@pytest.fixture(scope="module")
def swin_export(tmp_path_factory):
    """An exported tiny 2-stage Swin (untrained): an encoder without a class token."""
    kwargs = {"img_size": 32, "patch_size": 2, "embed_dim": 32, "depths": [2, 2], "num_heads": [2, 4],
              "window_size": 4}
    path = tmp_path_factory.mktemp("swin") / "encoder.safetensors"
    name = "swin_tiny_patch4_window7_224"
    export_encoder(timm.create_model(name, num_classes=0, **kwargs), path, name, kwargs)
    return path


def test_a_larger_swin_image_and_window_resample_the_relative_position_tables(swin_export):
    weights = read_encoder_weights(swin_export)
    model, _, _, report = build_classifier(weights, ClassifierConfig(img_size=64, kwargs={"window_size": 8}), 3)
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    exported = weights.weights["layers.0.blocks.0.attn.relative_position_bias_table"]
    assert exported.shape[0] == (2 * 4 - 1) ** 2 and table.shape[0] == (2 * 8 - 1) ** 2
    assert sorted(report.missing) == ["head.fc.bias", "head.fc.weight"] and report.unexpected == []
    torch.testing.assert_close(model.layers[1].blocks[0].attn.qkv.weight,
                               weights.weights["layers.1.blocks.0.attn.qkv.weight"])


def test_probe_pools_a_vit_class_token_and_averages_a_swin_which_has_none(pretrained, swin_export, colours, tmp_path,
                                                                          capsys):
    def pool(path):
        return classifier_kwargs(read_encoder_weights(path), ClassifierConfig(global_pool=None), 3)["global_pool"]

    assert pool(pretrained / "encoder.safetensors") == "token" and pool(swin_export) == "avg"
    results = linprobe.main(["--config", "tiny_linprobe_cpu", "--from", str(swin_export), f"data.path={colours}",
                             f"train.output_dir={tmp_path / 'lp'}", "mode=cached", "train.max_steps=3", "knn.k=3",
                             *FAST])
    assert results["steps"] == 3 and results["last"]["val_count"] == 36 and "knn_top1" in results
    code = linprobe.cli(["--config", "tiny_linprobe_cpu", "--from", str(swin_export), "model.global_pool=token",
                         f"data.path={colours}", f"train.output_dir={tmp_path / 'lp2'}", *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'model.global_pool'" in err and "has none" in err and "\n" not in err, err


def test_attentive_probe_reads_vit_and_swin_tokens_and_reports_each_seed(pretrained, swin_export, colours, tmp_path):
    for name, source in (("vit", pretrained), ("swin", swin_export)):
        results = linprobe.main(["--config", "tiny_linprobe_cpu", "--from", str(source), f"data.path={colours}",
                                 f"train.output_dir={tmp_path / name}", "mode=attentive", "attentive.epochs=15",
                                 "attentive.seeds=[0,1]", "attentive.batch_size=16", "attentive.heads=4",
                                 "attentive.min_steps=0", *FAST])
        assert results["mode"] == "attentive" and len(results["seed_top1"]) == 2, results
        assert results["last"]["val_top1"] == pytest.approx(sum(results["seed_top1"]) / 2)
        assert results["last"]["val_top1"] >= 90.0 and "knn_top1" not in results
        assert read_metrics(tmp_path / name / "metrics.jsonl")[0]["val_top1"] == results["last"]["val_top1"]


def test_per_layer_readout_matches_the_probe_of_each_block_for_the_encoder_and_its_random_init(pretrained, colours,
                                                                                             tmp_path):
    common = ["--config", "tiny_linprobe_cpu", "--from", str(pretrained), f"data.path={colours}", "knn.k=5", *FAST]
    results = linprobe.main([*common, "mode=layers", f"train.output_dir={tmp_path / 'layers'}"])
    layers = results["layers"]
    assert list(layers) == ["pretrained", "random init"] and [r["block"] for r in layers["pretrained"]] == [1, 2]
    assert (tmp_path / "layers/layers.png").stat().st_size > 0 and results["curve"].endswith("layers.png")
    assert len(read_metrics(tmp_path / "layers/metrics.jsonl")) == 2
    for label, extra in (("pretrained", []), ("random init", ["random_init=true"])):
        last = linprobe.main([*common, "features.blocks=1", *extra, f"train.output_dir={tmp_path / label}"])
        assert layers[label][-1]["probe"] == last["last"]["val_top1"], label
        assert layers[label][-1]["knn"] == last["knn_top1"], label


@pytest.fixture(scope="module")
def colour_shards(colours, tmp_path_factory):
    """The colour folder written as labeled shards: train-*.tar (4 shards) and val-*.tar, with classes.json."""
    out = tmp_path_factory.mktemp("colour_shards")
    write_shards(str(colours / "train"), out, maxcount=20, prefix="train", progress=False)
    write_shards(str(colours / "val"), out, maxcount=20, prefix="val", progress=False)
    return out


def shard_splits(folder, train="train-{000000..000003}.tar", val="val-{000000..000001}.tar"):
    return [f"data.shards={folder / train}", f"data.val_shards={folder / val}"]


def test_cached_probe_and_knn_on_labeled_shards_reach_high_accuracy(pretrained, colour_shards, tmp_path):
    results = linprobe.main(["--config", "tiny_linprobe_cpu", "--from", str(pretrained / "encoder.safetensors"),
                             *shard_splits(colour_shards), f"train.output_dir={tmp_path / 'lp'}", "train.epochs=6",
                             "mode=cached", "knn.k=5",
                             *FAST])
    assert results["last"]["val_count"] == 36
    assert results["best"]["top1"] >= 90.0 and results["knn_top1"] >= 90.0


def test_finetune_streams_labeled_shards_and_evaluates_every_val_sample(pretrained, colour_shards, tmp_path):
    results = finetune.main(["--config", "tiny_finetune_cpu", "--from", str(pretrained), *shard_splits(colour_shards),
                             f"train.output_dir={tmp_path / 'ft'}", "train.max_steps=3", *FAST])
    assert results["steps"] == 3 and results["last"]["val_count"] == 36


def test_labeled_shards_need_both_splits_and_their_classes(pretrained, colour_shards, tmp_path, capsys):
    bare = tmp_path / "bare"  # shards without the classes.json of the writer
    bare.mkdir()
    shutil.copy(colour_shards / "train-000000.tar", bare)
    cases = [(shard_splits(colour_shards)[:1], "data.val_shards"),
             (shard_splits(bare, "train-000000.tar", "train-000000.tar"), "classes.json")]
    for extra, message in cases:
        code = finetune.cli(["--config", "tiny_finetune_cpu", "--from", str(pretrained), *extra,
                             f"train.output_dir={tmp_path / 'out'}", *FAST])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and "\n" not in err, err


@pytest.mark.parametrize("program", [finetune, linprobe])
def test_bad_from_gives_one_line_errors(program, pretrained, tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, other)
    cases = [(tmp_path / "missing", "does not exist"),
             (other, "not a mimswin encoder export"),
             (tmp_path, "neither an exported encoder"),
             (pretrained, "another architecture")]
    for source, message in cases:
        extra = ["model.name=vit_small_patch16_224"] if source == pretrained else []
        code = program.cli(["--config", f"tiny_{program.__name__.split('.')[-1]}_cpu", "--from", str(source),
                            f"train.output_dir={tmp_path / 'out'}", *extra, *FAST])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and err.count("\n") == 0, err
    resnet = program.cli(["--config", f"tiny_{program.__name__.split('.')[-1]}_cpu", "--from", str(pretrained),
                          "model.name=resnet18", f"train.output_dir={tmp_path / 'out2'}", *FAST])
    err = capsys.readouterr().err
    assert resnet == 2 and "resnet18" in err and err.count("\n") == 1


def test_embedded_split_is_fixed_disjoint_and_holds_every_class():
    from mimswin.config import DataConfig
    from mimswin.data.labeled import labeled_pair
    train, val, classes = labeled_pair(DataConfig(), None, None)
    again, _, _ = labeled_pair(DataConfig(), None, None)
    assert (len(train), len(val), classes) == (4000, 1000, 10)
    assert torch.equal(train.images, again.images)
    assert not {im.numpy().tobytes() for im in val.images[:200]} & {im.numpy().tobytes() for im in train.images}
    assert np.bincount(val.labels, minlength=10).min() > 50


def final_checkpoint_files(run):
    """Every tensor of the last checkpoint (model and extra state such as EMA weights), by file and key."""
    last = run / "checkpoints" / (run / "checkpoints/latest").read_text()
    return {f"{file.name}:{key}": tensor for file in sorted(last.glob("*.safetensors"))
            for key, tensor in safetensors.torch.load_file(str(file)).items()}


def preempt_then_resume(program, args, step, tmp_path, monkeypatch, capsys):
    """Run `program` uninterrupted, then again with SIGUSR1 at `step` (exit 75) and --resume; both run dirs."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert program.cli(args + [f"train.output_dir={full}"]) == 0
    original = EvaluateEachEpoch.on_step

    def on_step(self, trainer):
        original(self, trainer)
        if trainer.state.step == step:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(EvaluateEachEpoch, "on_step", on_step)
    assert program.cli(args + [f"train.output_dir={cut}"]) == EXIT_PREEMPTED
    monkeypatch.undo()
    assert (cut / "checkpoints/latest").read_text() == f"step_{step:08d}"
    capsys.readouterr()
    assert program.cli(args + [f"train.output_dir={cut}"]) == 2
    assert "already holds checkpoints: pass --resume" in capsys.readouterr().err
    assert program.cli(args + [f"train.output_dir={cut}", "--resume"]) == 0
    assert f"at step {step}" in capsys.readouterr().out
    return full, cut


def assert_resumed_equals_uninterrupted(full, cut, step):
    a, b = final_checkpoint_files(full), final_checkpoint_files(cut)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    results = [json.loads((run / "results.json").read_text()) for run in (full, cut)]
    assert results[0]["best"] == results[1]["best"] and results[0]["last"] == results[1]["last"]
    after = [[r for r in read_metrics(run / "metrics.jsonl") if r["step"] > step] for run in (full, cut)]
    for records in after:
        for record in records:
            record.pop("images_per_s", None)
    assert after[0] == after[1]
    return a


def test_preempted_finetune_exits_75_and_resumes_to_the_uninterrupted_weights_and_ema(pretrained, colours, tmp_path,
                                                                                       monkeypatch, capsys):
    args = ["--config", "tiny_finetune_cpu", "--from", str(pretrained / "encoder.safetensors"),
            f"data.path={colours}", "train.epochs=2", "ema_decay=0.9", *FAST]  # 4 steps per epoch
    full, cut = preempt_then_resume(finetune, args, 5, tmp_path, monkeypatch, capsys)
    tensors = assert_resumed_equals_uninterrupted(full, cut, 5)
    assert any(key.startswith("extra_EvaluateEachEpoch.safetensors:ema.") for key in tensors)
    best = json.loads((full / "results.json").read_text())["best"]
    evaluated = [r["epoch"] for r in read_metrics(full / "metrics.jsonl") if "val_top1" in r]
    assert evaluated == [1, 2]  # one evaluation per epoch, each labeled with the epochs completed, the last too
    saved = json.loads((cut / "checkpoints/step_00000005/state.json").read_text())
    assert saved["extra"]["EvaluateEachEpoch"]["best"]["step"] == 4  # the epoch-1 record survived the preemption
    assert "extra_EvaluateEachEpoch.safetensors" in saved["files"]
    best_a, best_b = (safetensors.torch.load_file(str(run / "best/model.safetensors")) for run in (full, cut))
    assert best["step"] in (4, 8) and all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_preempted_cached_linprobe_resumes_to_the_uninterrupted_head(pretrained, colours, tmp_path, monkeypatch,
                                                                    capsys):
    args = ["--config", "tiny_linprobe_cpu", "--from", str(pretrained / "encoder.safetensors"),
            f"data.path={colours}", "mode=cached", "train.epochs=2", "knn.k=0", *FAST]
    full, cut = preempt_then_resume(linprobe, args, 3, tmp_path, monkeypatch, capsys)
    assert set(assert_resumed_equals_uninterrupted(full, cut, 3)) == {"model.safetensors:1.weight",
                                                                     "model.safetensors:1.bias",
                                                                     "model.safetensors:0.running_mean",
                                                                     "model.safetensors:0.running_var",
                                                                     "model.safetensors:0.num_batches_tracked"}


def test_finetune_colour_jitter_is_off_unless_asked_and_checked():
    def jitters(overrides):
        cfg = load_config(FinetuneConfig, ["tiny_finetune_cpu"], ["checkpoint=x", *overrides])
        return [s.operation for s in sample_transform(cfg, (28, 28)).transforms
                if isinstance(s, Rgb8Only) and isinstance(s.operation, ColorJitter)]

    assert jitters([]) == []
    (jitter,) = jitters(["aug.color_jitter=0.3"])
    assert jitter.brightness == pytest.approx((0.7, 1.3)) and jitter.contrast == pytest.approx((0.7, 1.3))
    with pytest.raises(ConfigError, match="aug.color_jitter"):
        jitters(["aug.color_jitter=-1"])
