"""Kills, preemption, non-finite steps, hostile and damaged checkpoints, full disks: nothing lost, nothing run."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import REPO, TINY

import mimswin.runs.checkpoint as checkpoint
import mimswin.runs.discovery as discovery
from mimswin.config import PretrainConfig, load_config
from mimswin.errors import CheckpointError, TrainingError
from mimswin.programs.pretrain import build_trainer, cli, main
from mimswin.runs.layout import read_metrics
from mimswin.signals import EXIT_PREEMPTED, Preempted

KILLABLE = Path(__file__).parent / "helpers" / "killable_pretrain.py"
COMMON = TINY + ["train.max_steps=9", "train.save_every=3", "train.keep_last=10", "train.log_every=1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of 9 steps with checkpoints at 3, 6 and 9."""
    run = tmp_path_factory.mktemp("reference") / "run"
    main(COMMON + [f"train.output_dir={run}"])
    return run


def weights(run: Path, step: int = 9) -> dict:
    return safetensors.torch.load_file(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def run_killable(where: str, step: int, run: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(KILLABLE), where, str(step), *COMMON, f"train.output_dir={run}", *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def step_dirs(run: Path) -> list:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


def test_sigkill_mid_step_mid_save_and_before_latest_then_resume_equals_uninterrupted(tmp_path, reference):
    run = tmp_path / "run"
    killed = run_killable("step", 2, run)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert step_dirs(run) == []

    killed = run_killable("save", 3, run, "--resume")  # nothing to resume yet: starts fresh
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "starting fresh" in killed.stdout
    assert step_dirs(run) == [] and (run / "checkpoints" / ".tmp-step_00000003").is_dir()
    assert discovery.resumable_checkpoint(run / "checkpoints") is None

    killed = run_killable("publish", 6, run, "--resume")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert step_dirs(run) == ["step_00000003", "step_00000006"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"

    finished = run_killable("none", 0, run, "--resume")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resumed from" in finished.stdout and "at step 3" in finished.stdout
    assert_same_weights(weights(reference), weights(run))
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_sigterm_to_the_process_group_saves_at_the_step_boundary_exits_75_and_resume_continues(tmp_path):
    """Like SLURM, the signal goes to every process of the group, DataLoader workers included."""
    run = tmp_path / "run"
    args = TINY + [f"train.output_dir={run}", "train.max_steps=100000", "train.log_every=1",
                   "train.save_every=100000"]
    process = subprocess.Popen([sys.executable, str(KILLABLE), "none", "0", *args, "data.num_workers=2"], cwd=REPO,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() or len(read_metrics(run / "metrics.jsonl")) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "stopped by SIGTERM" in out and "--resume" in out
    saved = json.loads((discovery.latest_checkpoint(run / "checkpoints") / "state.json").read_text())
    assert saved["step"] == read_metrics(run / "metrics.jsonl")[-1]["step"] >= 2

    trainer = main(args[:-3] + [f"train.max_steps={saved['step'] + 2}", "train.log_every=1", "--resume"])
    assert trainer.state.step == saved["step"] + 2
    assert [r["step"] for r in trainer.history] == [saved["step"] + 1, saved["step"] + 2]


class SignalAt:
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_step(self, trainer) -> None:
        if trainer.state.step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigusr1_mid_interval_saves_that_step_and_resume_equals_uninterrupted(tmp_path, reference):
    args = COMMON + [f"train.output_dir={tmp_path / 'run'}"]
    trainer = build_trainer(load_config(PretrainConfig, [TINY[1]], args[2:]))
    trainer.callbacks.append(SignalAt(4, signal.SIGUSR1))
    with pytest.raises(Preempted) as stop:
        trainer.fit()
    assert stop.value.code == EXIT_PREEMPTED and stop.value.step == 4
    assert step_dirs(tmp_path / "run") == ["step_00000003", "step_00000004"]
    assert main(args + ["--resume"]).state.step == 9
    assert_same_weights(weights(reference), weights(tmp_path / "run"))


class PoisonedLoss:
    """The real loss, except at chosen optimizer steps: a NaN loss, or a finite loss whose gradient is infinite."""

    def __init__(self, loss_fn, nan_steps, inf_grad_steps) -> None:
        self.loss_fn, self.nan_steps, self.inf_grad_steps, self.calls = loss_fn, nan_steps, inf_grad_steps, 0

    def __call__(self, model, batch):
        self.calls += 1
        loss = self.loss_fn(model, batch)
        if self.calls in self.nan_steps:
            return loss * float("nan")
        if self.calls in self.inf_grad_steps:
            weight = next(model.parameters()).flatten()[0]
            return loss + (weight - weight.detach()).sqrt()  # value + 0, gradient 1 / (2 * sqrt(0)) = inf
        return loss


class Snapshots:
    def __init__(self) -> None:
        self.params: dict = {}

    def on_step(self, trainer) -> None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        self.params[trainer.state.step] = torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "fused-device-skip"])
def test_nonfinite_steps_are_skipped_and_counted_and_k_in_a_row_stop_the_run(tmp_path, fused):
    args = TINY[2:] + [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=10", "train.log_every=1",
                       "train.max_nonfinite_steps=3", f"optim.fused={str(fused).lower()}"]
    trainer = build_trainer(load_config(PretrainConfig, [TINY[1]], args))
    trainer.loss_fn = PoisonedLoss(trainer.loss_fn, nan_steps={2, 5, 6, 7}, inf_grad_steps={3})
    snapshots = Snapshots()
    trainer.callbacks.append(snapshots)
    ended = []
    trainer.accelerator.end_training = lambda: ended.append(True)
    with pytest.raises(TrainingError) as stop:
        trainer.fit()
    assert ended == [True], "trackers were not ended when the run stopped"
    message = str(stop.value)
    assert "\n" not in message and "stopping at step 7" in message
    assert "3 steps in a row" in message and "train.max_nonfinite_steps=3" in message
    params = snapshots.params
    assert torch.equal(params[1], params[2]) and torch.equal(params[2], params[3]), "a skipped step changed weights"
    assert not torch.equal(params[3], params[4]) and torch.isfinite(params[4]).all()
    assert torch.equal(params[4], params[6])
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 2, 3, 4, 5]
    assert [r["loss"] is None for r in records] == [False, True, False, False, True, True, True]



def test_fused_optimizer_skips_on_the_device_and_a_recovered_run_of_k_still_stops_at_the_next_log(tmp_path):
    args = TINY[2:] + [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=20", "train.log_every=5",
                       "train.max_nonfinite_steps=3", "optim.fused=true"]
    trainer = build_trainer(load_config(PretrainConfig, [TINY[1]], args))
    trainer.loss_fn = PoisonedLoss(trainer.loss_fn, nan_steps={2, 6, 7}, inf_grad_steps={8})
    snapshots = Snapshots()
    trainer.callbacks.append(snapshots)
    with pytest.raises(TrainingError, match="stopping at step 10: 3 steps in a row"):
        trainer.fit()
    params = snapshots.params
    assert torch.equal(params[1], params[2]) and torch.equal(params[5], params[8]), "a skipped step changed weights"
    assert not torch.equal(params[8], params[9]) and torch.isfinite(params[9]).all()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(5, 1), (10, 4)]
    assert trainer.state.nonfinite_in_row == 0  # the run of 3 ended at step 8; steps 9 and 10 were good

def test_retention_keeps_the_last_k_every_mth_and_latest_and_clears_leftovers(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 11):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "state.json").write_text("{}")
    (root / ".tmp-step_00000011").mkdir()
    (root / ".latest.abc").write_text("step_0")
    (root / "latest").write_text("step_00000005")
    discovery.remove_stale(root)
    discovery.prune_checkpoints(root, keep_last=2, keep_every=4)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000005", "step_00000008",
                                                      "step_00000009", "step_00000010"]


def test_damaged_latest_falls_back_to_the_previous_good_one_with_a_warning(tmp_path, reference, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    newest = run / "checkpoints" / "step_00000009" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])
    middle = run / "checkpoints" / "step_00000006" / "optimizer.pt"
    data = bytearray(middle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    middle.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match=r"step_00000009' is damaged: model.safetensors has \d+ bytes"):
        discovery.resolve_checkpoint(newest.parent)
    assert discovery.resumable_checkpoint(run / "checkpoints").name == "step_00000003"
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and "step_00000009' is damaged (model.safetensors has" in warnings[0]
    assert "step_00000006' is damaged (optimizer.pt does not match the SHA-256" in warnings[1]
    assert all(w.startswith("mimswin: warning: ") and "falling back" in w for w in warnings)

    trainer = main(COMMON + [f"train.output_dir={run}", "--resume"])
    assert [r["step"] for r in trainer.history] == [4, 5, 6, 7, 8, 9]
    assert_same_weights(weights(reference), weights(run))


def test_only_damaged_checkpoints_are_an_error_not_a_silent_fresh_start(tmp_path, reference, capsys):
    root = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints" / "step_00000003", root / "step_00000003")
    (root / "step_00000003" / "rng_0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"every checkpoint under '.*checkpoints' is damaged"):
        discovery.resumable_checkpoint(root)
    assert "rng_0.pt is missing" in capsys.readouterr().err


class HostilePickle:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def last_error_line(code: int, capsys) -> tuple:
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else ""


def test_a_pickle_that_would_run_code_is_refused_with_a_clear_error(tmp_path, reference, capsys):
    crafted = tmp_path / "crafted" / "step_00000003"
    shutil.copytree(reference / "checkpoints" / "step_00000003", crafted)
    marker = tmp_path / "ran"
    torch.save({"state": HostilePickle(marker), "param_groups": []}, crafted / "optimizer.pt")
    state = json.loads((crafted / "state.json").read_text())
    (crafted / "state.json").write_text(json.dumps(dict(state, files=discovery.file_manifest(crafted))))

    code, line = last_error_line(cli(TINY + [f"train.output_dir={tmp_path / 'run'}", "--resume", str(crafted)]),
                                 capsys)
    assert code == 2 and line.startswith(f"mimswin: error: refusing to load '{crafted / 'optimizer.pt'}'")
    assert "would call 'exec', which could run code" in line
    assert not marker.exists()
    torch.load(crafted / "optimizer.pt", weights_only=False)  # the control: unrestricted unpickling runs it
    assert marker.read_text() == "ran"


@pytest.fixture
def small_disk(tmp_path, reference, monkeypatch):
    """A tmpfs with room for the run and one checkpoint but not two (needs root); elsewhere a simulated full disk:
    the write of the step-4 weights fails with ENOSPC after writing part of the file."""
    checkpoint_bytes = sum(p.stat().st_size for p in (reference / "checkpoints" / "step_00000003").iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={int(checkpoint_bytes * 1.5) + 64 * 1024}", "tmpfs", str(disk)]
    if os.geteuid() == 0 and subprocess.run(mount, capture_output=True).returncode == 0:
        yield disk
        subprocess.run(["umount", str(disk)], check=True)
        return
    write_tensors = checkpoint.write_tensors

    def disk_fills_at_step_4(path: Path, tensors: dict) -> None:
        if path.parent.name.endswith("00000004"):
            path.write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write_tensors(path, tensors)

    monkeypatch.setattr(checkpoint, "write_tensors", disk_fills_at_step_4)
    yield disk


def test_full_disk_during_save_keeps_the_previous_checkpoint_and_says_so(small_disk, capsys):
    run = small_disk / "run"
    code, line = last_error_line(cli(TINY + [f"train.output_dir={run}", "train.max_steps=4", "train.save_every=2"]),
                                 capsys)
    root = run / "checkpoints"
    assert code == 2 and line == (f"mimswin: error: cannot save checkpoint '{root / 'step_00000004'}': No space left "
                                  f"on device; the previous checkpoint '{root / 'step_00000002'}' is intact")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert discovery.checkpoint_damage(root / "step_00000002") is None


@pytest.mark.parametrize("override, words", [
    ("model.img_size=64", ["does not match this model's architecture", "shape mismatch", "pos_embed"]),
    ("model.kwargs={depth: 3}", ["does not match this model's architecture", "missing: encoder.model.blocks.2"]),
])
def test_a_checkpoint_of_another_architecture_is_one_clear_error(tmp_path, reference, capsys, override, words):
    source = reference / "checkpoints" / "step_00000003"
    code, line = last_error_line(cli(TINY + [f"train.output_dir={tmp_path}", "--resume", str(source), override]),
                                 capsys)
    assert code == 2 and line.startswith(f"mimswin: error: checkpoint '{source / 'model.safetensors'}'")
    for word in words:
        assert word in line


def test_an_output_dir_that_cannot_be_written_is_one_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, line = last_error_line(cli(TINY + [f"train.output_dir={blocker / 'run'}"]), capsys)
    assert (code, line) == (2, f"mimswin: error: train.output_dir: cannot write to '{blocker / 'run'}': "
                               "Not a directory")


def test_bare_resume_flag_followed_by_an_override_means_auto():
    from mimswin.programs.pretrain import parse_args
    args, overrides = parse_args(["--resume", "train.max_steps=3", "--config", "tiny_mae_vit_cpu"])
    assert args.resume == "auto" and overrides == ["train.max_steps=3"]
