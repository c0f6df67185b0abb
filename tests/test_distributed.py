"""Real multi-rank runs on CPU (gloo): one torchrun agent with 2 ranks, and two agents of 1 rank each meeting at a c10d
rendezvous on this machine, as two nodes would. One pair of jobs per strategy serves every test here."""

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest
import safetensors.torch
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    """The same tiny pretraining run as one agent with 2 ranks and as two agents ("nodes") with 1 rank each."""
    overrides = STRATEGIES[request.param]
    one = launch(tmp_path_factory.mktemp("one_agent"), [["--standalone", "--nproc_per_node", "2"]], overrides)
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                  f"127.0.0.1:{free_port()}", "--rdzv-id", uuid.uuid4().hex]
    two = launch(tmp_path_factory.mktemp("two_agents"), [rendezvous, rendezvous], overrides)
    return {"one agent": one, "two agents": two}


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


def test_two_agents_of_one_rank_train_as_one_agent_of_two_ranks(jobs):
    one, two = jobs["one agent"], jobs["two agents"]
    assert [r["local_rank"] for r in one.ranks] == [0, 1] and [r["local_rank"] for r in two.ranks] == [0, 0]
    assert all(r["world"] == 2 and r["steps"] == 3 for r in one.ranks + two.ranks)
    assert all(torch.equal(r["params"], one.ranks[0]["params"]) for r in one.ranks[1:] + two.ranks)
    assert [r["loss"] for r in read_metrics(one.run / "metrics.jsonl")] == \
        [r["loss"] for r in read_metrics(two.run / "metrics.jsonl")]
    encoders = [safetensors.torch.load_file(job.run / "encoder.safetensors") for job in (one, two)]
    assert encoders[0].keys() == encoders[1].keys() and all(torch.equal(encoders[0][k], encoders[1][k])
                                                            for k in encoders[0])


def test_two_nodes_write_each_file_once_and_every_rank_file_exists_once(jobs):
    """With two agents every rank is local rank 0: what runs once per job must still run once, by global rank 0, and
    each rank's own files carry its global rank; the console lines come once per node, each node's log has them."""
    one, two = jobs["one agent"], jobs["two agents"]
    assert [c.count("run dir ") for c in one.consoles] == [1] and [c.count("run dir ") for c in two.consoles] == [1, 1]
    written = [{w.split(" ", 1)[1] for w in r["writes"]} for r in two.ranks]
    assert written[0] and not written[0] & written[1], "no path is written by both ranks"
    assert all(Path(w).name == "rng_1.pt" for w in written[1]), written[1]

    def files(run: Path) -> List[str]:
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())

    assert files(two.run) == files(one.run)
    assert [r["step"] for r in read_metrics(two.run / "metrics.jsonl")] == [1, 2, 3]
    checkpoints = sorted((two.run / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == ["step_00000002", "step_00000003"]
    for checkpoint in checkpoints:
        assert sorted(p.name for p in checkpoint.glob("rng_*")) == ["rng_0.pt", "rng_1.pt"]
