"""Real multi-rank runs on CPU (gloo): one torchrun agent with 2 ranks, and two agents of 1 rank each meeting at a c10d
rendezvous on this machine, as two nodes would, under each strategy (conftest's shared `multi_rank_jobs`)."""

from pathlib import Path
from typing import Dict, List

import pytest
import safetensors.torch
import torch
from conftest import STRATEGIES, Job

from mimswin.runs.layout import read_metrics

STEPS = 6
RANK_FILES = {"rng_1.pt", "__1_0.distcp"}  # what rank 1 writes into a checkpoint: its RNG (and, sharded, its shard)


def logged_steps(run: Path) -> List[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.fixture(params=list(STRATEGIES))
def jobs(request, multi_rank_jobs) -> Dict[str, Job]:
    """The one-agent and two-agent jobs of one strategy."""
    return multi_rank_jobs[request.param]


@pytest.mark.parametrize("jobs", ["ddp"], indirect=True)
def test_two_cpu_ranks_agree_and_only_rank_zero_writes(jobs):
    run, ranks, _ = jobs["one agent"]
    assert all(r["world"] == 2 and r["steps"] == STEPS for r in ranks)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    assert ranks[0]["writes"], "rank 0 should have written the run dir"
    # rank 1 writes nothing but its own RNG state into each checkpoint being saved
    assert [Path(w).name for w in ranks[1]["writes"]] == ["rng_1.pt", "rng_1.pt"], ranks[1]["writes"]
    assert all("/checkpoints/.tmp-step_" in w for w in ranks[1]["writes"]), ranks[1]["writes"]

    assert logged_steps(run) == list(range(1, STEPS + 1))
    final = run / "checkpoints" / f"step_{STEPS:08d}"
    assert {p.name for p in final.iterdir()} == {"model.safetensors", "optimizer.pt", "rng_0.pt", "rng_1.pt",
                                                 "state.json"}
    masks = [torch.load(final / f"rng_{r}.pt", weights_only=True)["torch"] for r in (0, 1)]
    assert not torch.equal(masks[0], masks[1]), "ranks must draw masks from different random streams"


def test_two_agents_of_one_rank_train_as_one_agent_of_two_ranks(jobs):
    one, two = jobs["one agent"], jobs["two agents"]
    assert [r["local_rank"] for r in one.ranks] == [0, 1] and [r["local_rank"] for r in two.ranks] == [0, 0]
    assert all(r["world"] == 2 and r["steps"] == STEPS for r in one.ranks + two.ranks)
    assert all(torch.equal(r["params"], one.ranks[0]["params"]) for r in one.ranks[1:] + two.ranks)
    logged = [[(r.get("loss"), r.get("online_probe_top1")) for r in read_metrics(job.run / "metrics.jsonl")]
              for job in (one, two)]
    assert logged[0] == logged[1]
    encoders = [safetensors.torch.load_file(job.run / "encoder.safetensors") for job in (one, two)]
    assert encoders[0].keys() == encoders[1].keys() and all(torch.equal(encoders[0][k], encoders[1][k])
                                                            for k in encoders[0])


def test_two_nodes_write_each_file_once_and_every_rank_file_exists_once(jobs):
    """With two agents every rank is local rank 0: what runs once per job must still run once, by global rank 0, and
    each rank's own files carry its global rank; the console lines come once per node, each node's log has them."""
    one, two = jobs["one agent"], jobs["two agents"]
    assert [c.count("run dir ") for c in one.consoles] == [1] and [c.count("run dir ") for c in two.consoles] == [1, 1]
    # files each rank opened for writing (DCP's writer on every rank also asks for the checkpoint dir rank 0 made)
    written = [{w.split(" ", 1)[1] for w in r["writes"] if w.startswith("open ")} for r in two.ranks]
    assert written[0] and not written[0] & written[1], "no file is written by both ranks"
    assert all(Path(w).name in RANK_FILES for w in written[1]), written[1]

    def files(run: Path) -> List[str]:
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())

    assert files(two.run) == files(one.run)
    assert logged_steps(two.run) == list(range(1, STEPS + 1))
    checkpoints = sorted((two.run / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == ["step_00000003", f"step_{STEPS:08d}"]
    for checkpoint in checkpoints:
        assert sorted(p.name for p in checkpoint.glob("rng_*")) == ["rng_0.pt", "rng_1.pt"]
