"""Trackers through accelerate: tensorboard and offline wandb receive the loop's scalars and the reconstruction grid."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mimswin.config import PretrainConfig, load_config
from mimswin.errors import ConfigError
from mimswin.programs.pretrain import main
from mimswin.runs.layout import read_metrics
from mimswin.train.trackers import log_picture

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from wandb_records import history_rows  # noqa: E402

PICTURE_SIZE = (4 * 98 + 2, 8 * 98 + 2)  # 8 preview rows x 4 columns of 32 px tiles upscaled 3x, 2 px padding


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("trackers") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        main(TINY + [f"train.output_dir={run}", "train.max_steps=4", "train.log_every=1", "train.vis_every=2",
                     "--log_with", "tensorboard,wandb", "train.project=trackertest"])
    return run, read_metrics(run / "metrics.jsonl")


def test_tensorboard_holds_loss_lr_throughput_and_reconstruction_image(tracked_run):
    run, metrics = tracked_run
    events = EventAccumulator(str(run / "trackertest"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    for key in ("loss", "lr", "images_per_s"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in metrics], key
    images = events.Images("reconstruction")
    assert [e.step for e in images] == [2, 4, 4]  # every vis_every steps, then the final picture
    assert {(e.width, e.height) for e in images} == {PICTURE_SIZE}


def test_offline_wandb_run_holds_loss_lr_throughput_and_reconstruction_image(tracked_run):
    run, metrics = tracked_run
    run_files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, "wandb must write into the run dir"
    rows = history_rows(run_files[0])
    by_step = {int(row["_step"]): row for row in rows}
    for record in metrics:
        row = by_step[record["step"]]
        for key in ("loss", "lr", "images_per_s"):
            assert json.loads(row[key]) == pytest.approx(record[key], rel=1e-6), (record["step"], key)
    pictures = [json.loads(row["reconstruction/filenames"])[0] for row in rows if "reconstruction/filenames" in row]
    assert len(pictures) >= 2
    media = run_files[0].parent / "files" / pictures[0]
    with Image.open(media) as picture:
        assert picture.size == PICTURE_SIZE


def test_pictures_are_sent_by_rank_zero_only():
    class Refusing:
        name = "wandb"

        def log_images(self, *args, **kwargs):
            raise AssertionError("a non-main rank must not log images")

    logged = []

    class Recording:
        name = "tensorboard"

        def log_images(self, values, step, **kwargs):
            logged.append((list(values), values["grid"].shape, step, kwargs))

    picture = torch.rand(3, 10, 12)
    log_picture(SimpleNamespace(is_main_process=False, trackers=[Refusing()]), "grid", picture, 3)
    log_picture(SimpleNamespace(is_main_process=True, trackers=[Recording()]), "grid", picture, 3)
    assert logged == [(["grid"], (1, 10, 12, 3), 3, {"dataformats": "NHWC"})]


@pytest.mark.parametrize("flag, trackers", [(["--log_with", "wandb"], ["wandb"]), (["--log_with=none"], []),
                                            (["--log_with", "tensorboard,wandb"], ["tensorboard", "wandb"]),
                                            (["train.log_with=[tensorboard]"], ["tensorboard"])])
def test_log_with_flag_selects_trackers(flag, trackers):
    assert load_config(PretrainConfig, [], flag).train.log_with == trackers


def test_unknown_tracker_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"^config key 'train.log_with': unknown tracker\(s\) \['mlflow'\]"):
        load_config(PretrainConfig, [], ["--log_with", "mlflow"])
