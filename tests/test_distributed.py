"""Real multi-rank runs on CPU (gloo): one torchrun agent with 2 ranks. One job per strategy serves every test here."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest
import torch
from conftest import REPO, TINY

from mimswin.runs.layout import read_metrics

PROBE = Path(__file__).parent / "helpers" / "rank_probe.py"
STRATEGIES: Dict[str, List[str]] = {"ddp": []}  # strategy -> the overrides that select it
RUN = TINY + ["train.max_steps=3", "train.log_every=1", "train.save_every=2", "train.vis_every=2"]


class Job(NamedTuple):
    """A finished torchrun job: its run dir, per global rank what the rank probe dumped, per agent its console."""

    run: Path
    ranks: List[dict]
    consoles: List[str]


def launch(out: Path, agents: List[List[str]], overrides: List[str]) -> Job:
    """Start one torchrun agent per entry of `agents` (its launcher arguments) at once, each running the rank probe
    on the same run dir; wait for all of them."""
    run = out / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *agent, str(PROBE), str(out), *RUN,
                               *overrides, f"train.output_dir={run}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for agent in agents]
    consoles = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, console in zip(procs, consoles):
        assert proc.returncode == 0, console[-3000:]
    return Job(run, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)], consoles)


@pytest.fixture(scope="module", params=list(STRATEGIES))
def jobs(request, tmp_path_factory) -> Dict[str, Job]:
    """A tiny pretraining run as one agent with 2 ranks."""
    overrides = STRATEGIES[request.param]
    return {"one agent": launch(tmp_path_factory.mktemp("one_agent"), [["--standalone", "--nproc_per_node", "2"]],
                                overrides)}


@pytest.mark.parametrize("jobs", ["ddp"], indirect=True)
def test_two_cpu_ranks_agree_and_only_rank_zero_writes(jobs):
    run, ranks, _ = jobs["one agent"]
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
