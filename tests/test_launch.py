"""launch/: every accelerate config parses, an FSDP launch implies train.strategy=fsdp while DeepSpeed is refused,
and the SLURM script checkpoints and requeues on the time-limit signal and after preemption."""

import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from mimswin.config import TrainConfig
from mimswin.errors import ConfigError
from mimswin.train.setup import FSDP_LAUNCH, check_distribution, make_accelerator

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "launch" / "accelerate"
SBATCH = REPO / "launch" / "slurm" / "pretrain.sbatch"
EXPECTED = {"single_gpu": ("NO", 1, 1), "multi_gpu": ("MULTI_GPU", 1, 8), "multi_node": ("MULTI_GPU", 2, 16),
            "fsdp": ("FSDP", 1, 8)}


def test_every_accelerate_config_parses_with_its_topology():
    found = {path.stem for path in CONFIGS.glob("*.yaml")}
    assert found == set(EXPECTED)
    for name, (kind, machines, processes) in EXPECTED.items():
        config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        assert (config.distributed_type.value, config.num_machines, config.num_processes) == (kind, machines, processes)
        assert config.use_cpu is False and config.mixed_precision == "bf16"


def test_an_fsdp_launch_implies_the_fsdp_strategy_and_leaves_accelerate_a_plain_launch(monkeypatch, tmp_path):
    monkeypatch.setenv(FSDP_LAUNCH, "true")  # what `accelerate launch --config_file launch/accelerate/fsdp.yaml` sets
    train = TrainConfig(output_dir=str(tmp_path), cpu=True)
    accelerator = make_accelerator(train)
    assert train.strategy == "fsdp"
    assert accelerator.distributed_type != DistributedType.FSDP and FSDP_LAUNCH not in os.environ


FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == -* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [ "$1" = show ]; then echo node-a; echo node-b; else echo "scontrol $*" >> "$LOG"; fi
"""
FAKE_ACCELERATE = """#!/usr/bin/env bash
echo "accelerate $*" >> "$LOG"
trap 'echo "got TERM" >> "$LOG"; kill $!; exit 75' TERM
[ -n "${EXIT_WITH:-}" ] && exit "$EXIT_WITH"
sleep 30 & wait
"""


@pytest.fixture
def fake_cluster(tmp_path):
    """`srun`, `scontrol` and `accelerate` stand-ins that log what the SLURM script asks of them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("accelerate", FAKE_ACCELERATE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "SLURM_SUBMIT_DIR": str(REPO), "MIMSWIN_GPUS_PER_NODE": "4"}
    return env, log


def wait_for(log: Path, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"'{text}' never appeared in the log: {log.read_text() if log.exists() else ''}")


def test_a_deepspeed_launch_is_refused_with_one_line_before_any_step():
    launched = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(ConfigError, match="train.strategy=fsdp") as err:
        check_distribution(launched)
    assert "\n" not in str(err.value)
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)
    assert check_distribution(ddp) is ddp


def test_slurm_script_launches_one_accelerate_per_node_with_the_cluster_topology(fake_cluster):
    env, log = fake_cluster
    result = subprocess.run(["bash", str(SBATCH), "--config", "tiny_mae_vit_cpu", "train.output_dir=/shared/run"],
                            env={**env, "EXIT_WITH": "0"}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == [
        "accelerate launch --config_file launch/accelerate/multi_node.yaml --num_machines 2 --num_processes 8 "
        "--machine_rank 1 --main_process_ip node-a --main_process_port 29500 launch/pretrain.py --config "
        "tiny_mae_vit_cpu train.output_dir=/shared/run --resume auto"]


def test_slurm_script_stops_the_run_then_requeues_on_the_time_limit_signal(fake_cluster):
    env, log = fake_cluster
    job = subprocess.Popen(["bash", str(SBATCH), "--config", "x"], env=env, stdout=subprocess.PIPE, text=True)
    wait_for(log, "accelerate launch")
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=20) == 0
    assert log.read_text().splitlines()[1:] == ["got TERM", "scontrol requeue 4242"]
    assert "time limit near" in job.stdout.read()


@pytest.mark.parametrize("exit_code, requeued", [(75, True), (1, False)])
def test_slurm_script_requeues_only_a_run_that_stopped_for_preemption(fake_cluster, exit_code, requeued):
    env, log = fake_cluster
    result = subprocess.run(["bash", str(SBATCH)], env={**env, "EXIT_WITH": str(exit_code)}, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == (0 if requeued else exit_code)
    assert ("scontrol requeue 4242" in log.read_text()) == requeued
