"""Pretraining on shards served over HTTP from a thread of the test process: read by http:// URLs and by `pipe:curl`,
resumed mid-epoch, and with the server cutting connections mid-shard (once: read again; for good: skipped, counted)."""

import logging
import re
import shutil
import sys

import pytest
import torch
from conftest import TINY, TINY_PRESET, pretrain_briefly, run_and_resume, write_digit_shards
from helpers.shard_server import ShardServer

from mimswin.config import PretrainConfig, load_config
from mimswin.data import shard_stream
from mimswin.data.shard_stream import ShardPlan
from mimswin.runs.layout import read_metrics

pytestmark = pytest.mark.skipif(shutil.which("curl") is None,
                                reason="webdataset reads http:// shards with curl, which is not installed")
STEPS = 6
SHARDS = "digits-{000000..000011}.tar"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The 12 digit shards (20 samples each, one corrupt JPEG in each) served on 127.0.0.1, an ephemeral port."""
    root = tmp_path_factory.mktemp("served")
    write_digit_shards(root)
    with ShardServer(root) as served:
        served.sizes = str(root / "sizes.json")
        yield served


@pytest.fixture
def cuts(server, monkeypatch):
    """The server, its request counts from zero, the connections it cuts cleared after the test; no wait before a new
    try (the loader workers are forked from this process)."""
    monkeypatch.setattr(shard_stream, "RETRY_DELAY_S", 0.0)
    server.requests.clear()
    yield server
    server.drops.clear()


def shard_args(server, spec: str) -> list:
    """A 6-step run over `spec` (2 workers, 15 batches an epoch), checkpointed at step 3 (mid-epoch)."""
    return TINY + [f"data.shards={spec}", f"data.shard_sizes={server.sizes}", "data.num_workers=2",
                   "data.shuffle_buffer=40", f"train.max_steps={STEPS}", "train.save_every=3", "train.keep_last=5",
                   "train.log_every=1", "train.vis_every=100"]


@pytest.fixture(scope="module")
def http_pair(server, tmp_path_factory):
    """A run over http:// URLs and the same run resumed from its step-3 checkpoint."""
    return run_and_resume(tmp_path_factory.mktemp("http"), shard_args(server, server.url(SHARDS)), resume_at=3,
                          steps=STEPS)


def weights_of(run) -> dict:
    import safetensors.torch

    return safetensors.torch.load_file(run / f"checkpoints/step_{STEPS:08d}/model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_http_shards_resume_mid_epoch_exactly(http_pair):
    assert same(http_pair.full_weights, http_pair.resumed_weights)
    assert http_pair.full_trainer.history[-1]["skipped"] > 0, "the corrupt JPEGs are counted as over local files"


def test_pipe_curl_shards_train_as_http_urls(server, http_pair, tmp_path_factory):
    _, run = pretrain_briefly(tmp_path_factory, "pipe", shard_args(server, f"pipe:curl -s {server.url(SHARDS)}"),
                              STEPS, 3)
    assert same(weights_of(run), http_pair.full_weights)


def test_connection_cut_once_per_shard_is_read_again_and_changes_nothing(cuts, http_pair, tmp_path_factory):
    cut = [f"digits-{s:06d}.tar" for s in range(1, 12)]  # the first shard gives the pictures, read without new tries
    for name in cut:
        cuts.drop(name, after=10000)
    trainer, run = pretrain_briefly(tmp_path_factory, "cut", shard_args(cuts, cuts.url(SHARDS)), STEPS, 3)
    assert same(weights_of(run), http_pair.full_weights)
    assert trainer.history[-1]["skipped"] == http_pair.full_trainer.history[-1]["skipped"]
    read = [name for name in cut if cuts.requests[name]]
    assert len(read) >= 3 and all(cuts.requests[name] == 2 for name in read), cuts.requests


@pytest.fixture
def worker_warnings(capfd):
    """The loader's warnings on the console (fd 2), as Python prints them when logging is not configured; under pytest
    its own handler would take them, in the worker processes, out of the test's reach."""
    console, logger = logging.StreamHandler(sys.__stderr__), logging.getLogger(shard_stream.__name__)
    logger.addHandler(console)
    yield capfd
    logger.removeHandler(console)


def test_shard_cut_for_good_is_skipped_counted_logged_and_the_run_goes_on(cuts, tmp_path_factory, worker_warnings):
    seed = load_config(PretrainConfig, [TINY_PRESET]).train.seed
    cut = ShardPlan([SHARDS] * 12, [20] * 12, 16, 1, 0, 2, seed).slot_shards(0, 0)[0]
    name = f"digits-{cut:06d}.tar"
    cuts.drop(name, after=10000, times=-1)
    trainer, run = pretrain_briefly(tmp_path_factory, "lost", shard_args(cuts, cuts.url(SHARDS)) +
                                    ["data.shard_retries=1"], STEPS, 3)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, STEPS + 1))
    lost = trainer.data.skip_reasons["unreadable shard"]
    assert 0 < lost <= 20, "at most the cut shard's samples"
    assert trainer.history[-1]["skipped"] == trainer.data.skipped >= lost
    err = worker_warnings.readouterr().err
    logged = re.findall(rf"shard {re.escape(cuts.url(name))} is unreadable after \d+ sample\(s\) .*; skipping its "
                        r"(\d+) remaining sample\(s\)", err)
    assert sum(int(n) for n in logged) == lost, err[-3000:]
    assert f"shard {cuts.url(name)} broke after" in err, "it was tried again before being given up"
