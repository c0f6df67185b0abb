import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import REPO, TINY

from mimswin.runs.layout import read_metrics

PROBE = Path(__file__).parent / "helpers" / "rank_probe.py"


def test_two_cpu_ranks_agree_and_only_rank_zero_writes(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(PROBE),
               str(tmp_path), *TINY, f"train.output_dir={run}", "train.max_steps=3", "train.log_every=1",
               "train.save_every=2", "train.vis_every=2"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world"] == 2 and r["steps"] == 3 for r in ranks)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    assert ranks[0]["writes"], "rank 0 should have written the run dir"
    # rank 1 writes nothing but its own RNG state into each checkpoint being saved
    assert [Path(w).name for w in ranks[1]["writes"]] == ["rng_1.pt", "rng_1.pt"], ranks[1]["writes"]
    assert all("/checkpoints/.tmp-step_" in w for w in ranks[1]["writes"]), ranks[1]["writes"]

    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    final = run / "checkpoints" / "step_00000003"
    assert {p.name for p in final.iterdir()} == {"model.safetensors", "optimizer.pt", "rng_0.pt", "rng_1.pt",
                                                 "state.json"}
    masks = [torch.load(final / f"rng_{r}.pt", weights_only=True)["torch"] for r in (0, 1)]
    assert not torch.equal(masks[0], masks[1]), "ranks must draw masks from different random streams"
