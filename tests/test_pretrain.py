import json

import pytest
import torch
from conftest import RGB, TINY, export_of_run, loss_at_both_ends, pretrain_briefly, run_and_resume

from mimswin.programs.pretrain import cli, main
from mimswin.runs.layout import read_metrics


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    return pretrain_briefly(tmp_path_factory, "short", TINY, 120, 60)


def test_short_run_lowers_the_loss_clearly(short_run):
    first, last = loss_at_both_ends(short_run[1], steps=120, window=50)
    assert last < 0.8 * first, (first, last)


def test_run_dir_holds_config_metrics_checkpoint_encoder_and_picture(short_run):
    _, run = short_run
    assert "vit_tiny_patch16_224" in (run / "config.yaml").read_text()
    record = read_metrics(run / "metrics.jsonl")[-1]
    assert record["step"] == 120 and record["lr"] > 0 and record["images_per_s"] > 0
    assert (run / "checkpoints" / "latest").read_text() == "step_00000120"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000060", "step_00000120"]
    assert json.loads((run / "checkpoints/step_00000120/state.json").read_text())["step"] == 120
    assert {p.name for p in (run / "recon").iterdir()} == {"step_00000060.png", "step_00000120.png", "final.png"}
    from PIL import Image
    with Image.open(run / "reconstruction.png") as picture:
        assert picture.size == (4 * 98 + 2, 8 * 98 + 2)  # 32-px tiles upscaled 3x
    assert (run / "encoder.safetensors").is_file()


def test_exported_encoder_is_a_plain_timm_model_with_the_same_features(short_run):
    loaded, encoder = export_of_run(*short_run, {"head.weight", "head.bias"})
    images = torch.randn(3, encoder.in_chans, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(images), encoder(images))
        keep = torch.arange(64).expand(3, -1)
        out = encoder.forward_masked(images, keep)
        torch.testing.assert_close(loaded.forward_features(images), torch.cat([out.prefix, out.tokens], 1))


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tmp_path, accum):
    common = TINY + ["train.max_steps=8", "train.save_every=4", "train.keep_last=5", "data.num_workers=2",
                     "train.log_every=1", f"train.grad_accum_steps={accum}"]
    full, resumed, _, trainer, a, b = run_and_resume(tmp_path, common, resume_at=4, steps=8)
    assert trainer.state.step == 8
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses_full = [r["loss"] for r in read_metrics(full / "metrics.jsonl") if r["step"] > 4]
    losses_resumed = [r["loss"] for r in read_metrics(resumed / "metrics.jsonl")]
    assert losses_full == losses_resumed


def run_cli(args, capsys):
    code = cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_missing_data_path_is_one_clear_error(tiny_args, capsys):
    code, line = run_cli(tiny_args + ["--data.path", "/no/such/images"], capsys)
    assert code == 2 and line == "mimswin: error: data.path: '/no/such/images' does not exist"


def test_missing_checkpoint_is_one_clear_error(tiny_args, capsys):
    code, line = run_cli(tiny_args + ["--resume", "/no/such/run"], capsys)
    assert code == 2 and line == "mimswin: error: checkpoint '/no/such/run' does not exist"


def test_unknown_key_and_wrong_type_are_one_clear_error(tiny_args, capsys):
    assert run_cli(tiny_args + ["train.epoch=3"], capsys) == (
        2, "mimswin: error: override 'train.epoch=3': unknown config key 'train.epoch'")
    code, line = run_cli(tiny_args + ["data.batch_size=big"], capsys)
    assert code == 2 and "data.batch_size" in line and "wrong type" in line


def test_refuses_to_start_over_a_run_with_checkpoints(tiny_args, capsys):
    assert cli(tiny_args + ["train.max_steps=2"]) == 0
    code, line = run_cli(tiny_args + ["train.max_steps=2"], capsys)
    assert code == 2 and "already holds checkpoints" in line and "--resume" in line


def test_image_folder_with_odd_images_trains(tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "images"
    (folder / "cats").mkdir(parents=True)
    (folder / "dogs").mkdir()
    for i in range(12):
        Image.new("RGB", (40, 30), (i * 20, 10, 200)).save(folder / "cats" / f"{i}.jpg")
    Image.new("L", (20, 20), 128).save(folder / "dogs" / "gray.png")
    Image.new("CMYK", (50, 50), (0, 50, 100, 0)).save(folder / "dogs" / "cmyk.jpg")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(folder / "dogs" / "tiny_rgba.png")
    (folder / "dogs" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    trainer = main(["--config", "tiny_mae_vit_cpu", *TINY[2:], *RGB, f"train.output_dir={tmp_path / 'run'}",
                    f"data.path={folder}", "data.batch_size=4", "train.max_steps=4"])
    assert trainer.state.step == 4
    assert len(trainer.data.dataset) == 16
