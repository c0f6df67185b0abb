"""Run pretraining that kills itself with SIGKILL at a chosen point, so a test can check what a hard kill leaves behind.

Usage: killable_pretrain.py WHERE STEP [pretrain args...]; WHERE is one of
  step     during the forward pass of optimizer step STEP (mid-step, nothing of it saved)
  save     while writing optimizer.pt of the checkpoint of step STEP (half a file in `.tmp-step_*`)
  publish  after the checkpoint dir of step STEP is renamed into place, before `latest` names it
  none     never (exits with the program's own code)
Under torchrun every rank runs it; with KILL_RANK=r in the environment only rank r dies, and only on the job's first
start (a worker restarted by `torchrun --max-restarts` runs to the end).
"""

import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import mimswin.programs.pretrain  # noqa: E402
import mimswin.runs.checkpoint as checkpoint  # noqa: E402


def die() -> None:
    chosen = os.environ.get("KILL_RANK")
    if chosen is not None and (os.environ.get("RANK") != chosen or os.environ.get("TORCHELASTIC_RESTART_COUNT") != "0"):
        return
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_during_step(step: int) -> None:
    calls = [0]

    def counting(loss):
        def counting_loss(model, batch):
            calls[0] += 1
            if calls[0] == step:  # one micro-batch per step (grad_accum_steps=1)
                die()
            return loss(model, batch)
        return counting_loss

    for name in ("pretrain_loss", "probed_pretrain_loss"):  # without and with the online probe
        setattr(mimswin.programs.pretrain, name, counting(getattr(mimswin.programs.pretrain, name)))


def kill_during_save(step: int) -> None:
    write_torch = checkpoint.write_torch

    def half_write(path: Path, obj) -> None:
        if path.name == "optimizer.pt" and path.parent.name.endswith(f"{step:08d}"):
            write_torch(path, obj)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            die()
        write_torch(path, obj)

    checkpoint.write_torch = half_write


def kill_before_latest(step: int) -> None:
    write = checkpoint.atomic_write_bytes

    def write_or_die(path: Path, data: bytes) -> None:
        if path.name == checkpoint.LATEST and data.decode().endswith(f"{step:08d}"):
            die()
        write(path, data)

    checkpoint.atomic_write_bytes = write_or_die


if __name__ == "__main__":
    where, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    {"step": kill_during_step, "save": kill_during_save, "publish": kill_before_latest,
     "none": lambda _: None}[where](step)
    sys.exit(mimswin.programs.pretrain.cli(argv))
