import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, run_and_resume, write_digit_shards

from mimswin.programs.pretrain import cli
from mimswin.runs.layout import read_metrics

PROBE = Path(__file__).parent / "helpers" / "rank_probe.py"


@pytest.fixture(scope="module")
def mnist_shards(tmp_path_factory):
    return write_digit_shards(tmp_path_factory.mktemp("shards"))


def test_two_process_pretraining_on_shards_completes(tmp_path, mnist_shards):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(PROBE),
               str(tmp_path), *TINY, f"train.output_dir={run}", f"data.shards={mnist_shards}", "data.num_workers=2",
               "data.shuffle_buffer=50", "train.max_steps=4", "train.log_every=2", "train.save_every=100",
               "train.vis_every=100"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world"] == 2 and r["steps"] == 4 for r in ranks)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4] and 0 < records[0]["skipped"] <= records[1]["skipped"]


def test_pretraining_on_shards_resumes_exactly_and_counts_corrupt_images(tmp_path, mnist_shards):
    common = TINY + [f"data.shards={mnist_shards}", "data.num_workers=2", "data.shuffle_buffer=40",
                     "train.max_steps=6", "train.save_every=3", "train.keep_last=5", "train.log_every=1",
                     "train.vis_every=100"]
    _, _, trainer, _, a, b = run_and_resume(tmp_path, common, resume_at=3, steps=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert trainer.history[-1]["skipped"] == trainer.data.skipped > 0


def test_shard_list_matching_nothing_stops_pretraining_with_one_line(tmp_path, capsys):
    code = cli(TINY + [f"train.output_dir={tmp_path / 'run'}", f"data.shards={tmp_path}/none-{{0..3}}.tar"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"mimswin: error: data.shards: '{tmp_path}/none-{{0..3}}.tar' matches " \
                                              "no shard file"
