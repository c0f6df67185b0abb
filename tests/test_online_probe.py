"""The online probe: it learns beside pretraining without touching the encoder's gradients or the logged loss, reads
every method, resumes exactly, and refuses data it cannot probe."""

import pytest
import torch
from conftest import TINY, run_and_resume

from mimswin.config import PretrainConfig, load_config
from mimswin.models.factory import build_method
from mimswin.models.online_probe import OnlineProbe, probe_loss
from mimswin.programs.pretrain import ProbeView, cli, main
from mimswin.runs.layout import read_metrics

PRESETS = {"mae_vit": ["tiny_mae_vit_cpu", "model.img_size=32", "model.kwargs={depth: 2}"],
           "mae_swin": ["tiny_mae_swin_cpu"], "simmim_swin": ["tiny_simmim_swin_cpu"],
           "mae_hiera": ["tiny_mae_hiera_cpu"],
           "mae_vit_cross": ["tiny_mae_vit_cpu", "model.img_size=32", "model.kwargs={depth: 2}", "decoder.kind=cross",
                             "decoder.predict_ratio=0.5"]}


def method_of(key):
    preset, *overrides = PRESETS[key]
    cfg = load_config(PretrainConfig, [preset], overrides)
    torch.manual_seed(0)
    return build_method(cfg), cfg


@pytest.mark.parametrize("key", list(PRESETS))
def test_probe_gradient_stays_in_the_head_and_the_loss_value_is_the_mim_loss(key):
    method, cfg = method_of(key)
    size = cfg.model.img_size
    images = torch.randn(4, cfg.data.channels, size, size)
    labels = torch.tensor([0, 3, -1, 9])  # an unlabeled sample among them
    mask = method.draw_mask(4, images.device, torch.Generator().manual_seed(1))

    def grads(**kwargs):
        method.zero_grad(set_to_none=True)
        out = method(images, mask, **kwargs)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}

    plain, plain_grads = grads()
    method.online_probe = OnlineProbe(method.encoder.embed_dim, 10, torch.Generator().manual_seed(0))
    probed, probed_grads = grads(labels=labels)
    assert probed.loss.item() == plain.loss.item() and plain.probe_logits is None
    assert probed.probe_logits.shape == (4, 10)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(probed_grads[name], grad, rtol=0, atol=0, msg=name)
    assert {n for n in probed_grads if n not in plain_grads} == {"online_probe.linear.weight",
                                                                 "online_probe.linear.bias"}
    head = probed.probe_logits.detach().requires_grad_(True)
    probe_loss(head, labels).backward()  # the head's gradient is the labeled samples' mean cross-entropy's
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(head[[0, 1, 3]], labels[[0, 1, 3]]), head)[0]
    torch.testing.assert_close(head.grad, expected)


@pytest.mark.parametrize("key", list(PRESETS))
def test_readings_see_whole_images_and_leave_the_mask_ratio_and_global_rng_alone(key):
    method, cfg = method_of(key)
    method.online_probe = OnlineProbe(method.encoder.embed_dim, 10, torch.Generator().manual_seed(0))
    method.eval()
    size = cfg.model.img_size
    images = torch.randn(3, cfg.data.channels, size, size)
    ratio, state = method.mask_ratio, torch.random.get_rng_state()
    with torch.no_grad():
        logits = ProbeView(method, seed=0)(images)
    assert logits.shape == (3, 10) and method.mask_ratio == ratio
    assert torch.equal(torch.random.get_rng_state(), state)
    if key.startswith("mae_vit"):  # every patch visible: the mean of all tokens of the plain encoder
        with torch.no_grad():
            tokens = method.encoder.model.forward_features(images)[:, method.encoder.num_prefix_tokens:]
            torch.testing.assert_close(logits, method.online_probe(tokens.mean(dim=1)), atol=1e-5, rtol=1e-5)


def test_unlabeled_batches_give_the_probe_nothing_to_learn_and_no_nan():
    logits = torch.randn(3, 10, requires_grad=True)
    loss = probe_loss(logits, torch.full((3,), -1))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(3, 10))


PROBED = TINY + ["online_probe.every=4", "online_probe.val_samples=64", "train.log_every=1"]


def test_online_probe_learns_and_is_logged_every_n_steps_without_changing_the_loss(tmp_path):
    steps = ["train.max_steps=30", "train.save_every=100", "train.vis_every=100", "optim.warmup_epochs=0.01"]
    main(PROBED[:-3] + ["train.log_every=1", *steps, "online_probe.every=10", "online_probe.val_samples=200",
                        f"train.output_dir={tmp_path / 'probed'}"])
    main(TINY + ["train.log_every=1", *steps, f"train.output_dir={tmp_path / 'plain'}"])
    probed = read_metrics(tmp_path / "probed/metrics.jsonl")
    readings = [r for r in probed if "online_probe_top1" in r]
    assert [r["step"] for r in readings] == [10, 20, 30]
    first, last = readings[0]["online_probe_top1"], readings[-1]["online_probe_top1"]
    assert last > first + 5 and last > 15, readings  # 10 classes: chance is 10
    plain_losses = [r["loss"] for r in read_metrics(tmp_path / "plain/metrics.jsonl")]
    assert [r["loss"] for r in probed if "loss" in r] == plain_losses  # the encoder trains exactly as without it


def test_resume_with_the_online_probe_reproduces_the_uninterrupted_run(tmp_path):
    common = PROBED + ["train.max_steps=8", "train.save_every=4", "train.keep_last=5", "data.num_workers=2"]
    full, resumed, _, _, a, b = run_and_resume(tmp_path, common, resume_at=4, steps=8)
    assert "online_probe.linear.weight" in a and "online_probe.norm.running_mean" in a and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    def untimed(records):
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]

    after = untimed(r for r in read_metrics(full / "metrics.jsonl") if r["step"] > 4)
    assert after == untimed(read_metrics(resumed / "metrics.jsonl"))
    assert [r["step"] for r in after if "online_probe_top1" in r] == [8]


def test_data_without_labels_or_a_validation_folder_is_one_line_error(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        (flat / f"{i}.npy").write_bytes(b"")
    code = cli(TINY + [f"data.path={flat}", "online_probe.every=5", f"train.output_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "online_probe.val_path" in err and "\n" not in err, err
    code = cli(TINY + ["data.shards=/x/{0..1}.tar", "online_probe.every=5", f"train.output_dir={tmp_path / 'r2'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not data.shards" in err and "\n" not in err, err
