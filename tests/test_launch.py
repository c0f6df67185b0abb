"""launch/: every accelerate config parses, the FSDP config shards our model per block with the same step as without
sharding (CPU, gloo), and the SLURM script checkpoints and requeues on the time-limit signal and after preemption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from fsdp_step import plugin_from  # noqa: E402

from mimswin.errors import ConfigError  # noqa: E402
from mimswin.train.setup import check_distribution  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "launch" / "accelerate"
SBATCH = REPO / "launch" / "slurm" / "pretrain.sbatch"
EXPECTED = {"single_gpu": ("NO", 1, 1), "multi_gpu": ("MULTI_GPU", 1, 8), "multi_node": ("MULTI_GPU", 2, 16),
            "fsdp_vit": ("FSDP", 1, 8), "fsdp_swin": ("FSDP", 1, 8)}


def test_every_accelerate_config_parses_with_its_topology():
    found = {path.stem for path in CONFIGS.glob("*.yaml")}
    assert found == set(EXPECTED)
    for name, (kind, machines, processes) in EXPECTED.items():
        config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        assert (config.distributed_type.value, config.num_machines, config.num_processes) == (kind, machines, processes)
        assert config.use_cpu is False and config.mixed_precision == "bf16"


def test_fsdp_swin_config_wraps_each_swin_block():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4,
                              depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1), num_classes=0)
    policy = fsdp2_prepare_auto_wrap_policy(plugin_from(str(CONFIGS / "fsdp_swin.yaml")), model)
    assert [name for name, module in model.named_modules() if policy(module)] == [
        f"layers.{i}.blocks.0" for i in range(4)]


def test_fsdp_vit_config_shards_mae_per_block_and_steps_like_unsharded():
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests" / "helpers" / "fsdp_step.py"), str(CONFIGS / "fsdp_vit.yaml")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert report["world"] == 2
    assert report["wrapped"] == ["encoder.model.blocks.0", "encoder.model.blocks.1", "decoder.blocks.0"]
    assert report["sharded"] == pytest.approx(report["reference"], rel=1e-5)


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


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_training_under_fsdp_or_deepspeed_is_refused_with_one_line_before_any_step(kind):
    launched = SimpleNamespace(distributed_type=kind)
    with pytest.raises(ConfigError, match="use DDP .*multi_gpu.yaml") as err:
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
