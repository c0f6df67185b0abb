"""train.strategy=fsdp on 2 CPU ranks (gloo), the code a GPU job runs: every family sharded per block steps like the
whole model, a run logs DDP's losses and exports a plain timm encoder, checkpoints are sharded per rank and load without
unpickling code, kill -9 + resume and a torchrun elastic restart end like the uninterrupted run, and a checkpoint
resumes on another world size."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from conftest import MULTI_RANK_RUN, REPO, STRATEGIES

from mimswin.errors import CheckpointError
from mimswin.programs.export import export_run
from mimswin.runs.discovery import checkpoint_damage
from mimswin.runs.export import read_export
from mimswin.runs.layout import read_metrics
from mimswin.runs.sharded import read_sharded_tensors

HELPERS = REPO / "tests" / "helpers"
PRETRAIN = REPO / "launch" / "pretrain.py"
STEPS = 6  # MULTI_RANK_RUN's steps; it saves at 3 and 6
FSDP = [*MULTI_RANK_RUN, *STRATEGIES["fsdp"]]


def launch(args: list, processes: int = 2, script: Path = PRETRAIN, torchrun: tuple = ("--standalone",),
           env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun ... script args` (or plain python for one process), CPU threads kept to one per rank."""
    runner = ([sys.executable, "-m", "torch.distributed.run", *torchrun, "--nproc_per_node", str(processes)]
              if processes > 1 or torchrun != ("--standalone",) else [sys.executable])
    result = subprocess.run([*runner, str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})})
    return result


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def final_state(run: Path) -> dict:
    """Every tensor of the last checkpoint: model and optimizer state."""
    return read_sharded_tensors(step_dir(run, STEPS), prefix="")


@pytest.fixture(scope="module")
def runs(multi_rank_jobs) -> dict:
    """The run dirs of the shared 2-rank pretraining run under FSDP and under DDP (same seed)."""
    return {strategy: jobs["one agent"].run for strategy, jobs in multi_rank_jobs.items()}


def test_every_family_shards_per_block_and_steps_like_the_whole_model():
    result = ok(launch([], script=HELPERS / "fsdp_families.py"))
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    reports = {r["family"]: r for r in lines if "family" in r}
    paced = {r["rank"]: r["lockstep"] for r in lines if "lockstep" in r}
    assert paced == {0: [[0, True], [1, True], [2, True]], 1: [[10, True], [10, False], [10, False]]}
    assert set(reports) == {"mae_vit", "mae_vit_bf16", "mae_vit_cross", "mae_swin", "simmim_swin",
                            "mae_hiera"}
    assert reports["mae_vit"]["units"] == ["encoder.model.blocks.0", "encoder.model.blocks.1", "decoder.blocks.0"]
    assert reports["mae_vit_cross"]["units"] == ["encoder.model.blocks.0", "encoder.model.blocks.1", "decoder.blocks.0",
                                                 "decoder.blocks.1"]
    assert reports["mae_swin"]["units"] == [f"encoder.model.layers.{s}.blocks.{b}" for s in (0, 1) for b in (0, 1)] + [
        "decoder.blocks.0"]
    assert reports["simmim_swin"]["units"] == [f"encoder.model.layers.{s}.blocks.{b}" for s in (0, 1) for b in (0, 1)]
    assert reports["mae_hiera"]["units"][-2:] == ["decoder.blocks.0", "decoder.blocks.1"]
    for family, report in reports.items():
        assert report["world"] == 2
        losses = report["sharded"]["losses"]
        assert losses[-1] < losses[0], family  # the two steps learned
        tolerance = 2e-2 if family.endswith("bf16") else 1e-5  # bf16: FSDP's bf16 parameters vs autocast's casts
        assert losses == pytest.approx(report["whole"]["losses"], rel=tolerance), family
        assert report["sharded"]["norms"] == pytest.approx(report["whole"]["norms"], rel=tolerance), family


def test_fsdp_pretraining_logs_the_losses_of_ddp_and_exports_a_plain_timm_encoder(runs):
    fsdp, ddp = ([r["loss"] for r in read_metrics(runs[name] / "metrics.jsonl") if "loss" in r] for name in runs)
    assert len(fsdp) == STEPS and fsdp == pytest.approx(ddp, rel=1e-4)
    assert "strategy: fsdp" in (runs["fsdp"] / "config.yaml").read_text()
    probes = [[r["online_probe_top1"] for r in read_metrics(runs[name] / "metrics.jsonl") if "online_probe_top1" in r]
              for name in ("fsdp", "ddp")]
    assert len(probes[0]) == 2 and probes[0] == pytest.approx(probes[1], abs=1e-6)
    assert (runs["fsdp"] / "recon" / "step_00000003.png").is_file() and (runs["fsdp"] / "reconstruction.png").is_file()
    exported = {name: safetensors.torch.load_file(runs[name] / "encoder.safetensors") for name in runs}
    for key, value in exported["ddp"].items():
        assert torch.allclose(exported["fsdp"][key], value, rtol=1e-4, atol=1e-6), key
    weights, name, kwargs = read_export(runs["fsdp"] / "encoder.safetensors")
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert missing == [] and unexpected == []


def test_a_sharded_checkpoint_has_each_ranks_file_in_its_manifest_and_reads_whole_on_one_process(runs):
    checkpoint = step_dir(runs["fsdp"], 3)
    files = set(json.loads((checkpoint / "state.json").read_text())["files"])
    assert files == {"__0_0.distcp", "__1_0.distcp", ".metadata", "rng_0.pt", "rng_1.pt"}
    assert checkpoint_damage(checkpoint) is None
    whole = safetensors.torch.load_file(step_dir(runs["ddp"], 3) / "model.safetensors")
    read = read_sharded_tensors(checkpoint)
    assert read.keys() == whole.keys()
    for key in whole:
        assert torch.allclose(read[key], whole[key], rtol=1e-4, atol=1e-6), key


class RunsCode:
    """A pickled object that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_index_that_would_run_code_is_refused_unrun(runs, tmp_path):
    checkpoint = tmp_path / "step_00000003"
    shutil.copytree(step_dir(runs["fsdp"], 3), checkpoint)
    marker = tmp_path / "ran"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata.*posix\.system|\.metadata.*os\.system"):
        read_sharded_tensors(checkpoint)
    assert not marker.exists()


def test_kill_9_of_the_whole_fsdp_job_then_resume_equals_the_uninterrupted_run(runs, tmp_path):
    run = tmp_path / "run"
    killed = launch(["step", "5", *FSDP, f"train.output_dir={run}"], script=HELPERS / "killable_pretrain.py")
    assert killed.returncode != 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000003"]
    ok(launch([*FSDP, f"train.output_dir={run}", "--resume"]))
    assert_same(final_state(runs["fsdp"]), final_state(run))


def test_a_worker_killed_under_torchrun_max_restarts_restarts_and_ends_like_the_uninterrupted_run(runs, tmp_path):
    run = tmp_path / "run"
    restarted = ok(launch(["step", "5", *FSDP, f"train.output_dir={run}"], script=HELPERS / "killable_pretrain.py",
                          torchrun=("--standalone", "--max-restarts", "2"), env={"KILL_RANK": "1"}))
    assert "restart 1 by torchrun" in restarted.stdout and "at step 3" in restarted.stdout
    assert_same(final_state(runs["fsdp"]), final_state(run))


def test_an_fsdp_checkpoint_resumes_on_one_process_and_that_one_on_two(runs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    (one / "checkpoints").mkdir(parents=True)
    shutil.copytree(step_dir(runs["fsdp"], 3), step_dir(one, 3))
    single = ok(launch([*FSDP, f"train.output_dir={one}", "train.max_steps=4", "--resume"], processes=1))
    assert "a 2-process checkpoint on 1 process(es): batch 3 of epoch 0 on each of 2 is batch 6" in single.stdout
    assert len(json.loads((step_dir(one, 4) / "state.json").read_text())["files"]) == 3  # shard, index, rng_0
    (two / "checkpoints").mkdir(parents=True)
    shutil.copytree(step_dir(one, 4), step_dir(two, 4))
    ok(launch([*FSDP, f"train.output_dir={two}", "train.max_steps=4", "--resume"]))
    exported = [safetensors.torch.load_file(run / "encoder.safetensors") for run in (one, two)]
    assert_same(*exported)


def test_fine_tuning_under_fsdp_reads_a_sharded_checkpoint_and_keeps_its_best_weights(runs, tmp_path):
    run = tmp_path / "finetune"
    finetune = REPO / "launch" / "finetune.py"
    ok(launch(["--config", "tiny_finetune_cpu", "--from", str(step_dir(runs["fsdp"], STEPS)), "data.num_workers=0",
               "train.progress=false", "train.max_steps=4", "train.strategy=fsdp", f"train.output_dir={run}"],
              script=finetune))
    results = json.loads((run / "results.json").read_text())
    assert results["last"]["val_count"] == 1000 and results["best"]["step"] == 4
    best = safetensors.torch.load_file(run / "best" / "model.safetensors")
    encoder = read_sharded_tensors(step_dir(runs["fsdp"], STEPS), prefix="model.encoder.model.")
    shared = set(encoder) & set(best)  # the whole classifier, gathered: every tensor at its full shape
    assert len(shared) >= len(encoder) - 2 and all(best[k].shape == encoder[k].shape for k in shared)
    assert best["head.weight"].shape[0] == 10


def test_export_of_an_fsdp_run_reads_its_sharded_checkpoint_on_one_process(runs, tmp_path):
    out = export_run(step_dir(runs["fsdp"], STEPS), "safetensors", tmp_path / "encoder.safetensors")
    assert_same(safetensors.torch.load_file(out), safetensors.torch.load_file(runs["fsdp"] / "encoder.safetensors"))
