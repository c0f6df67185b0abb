"""Memory and speed of MAE ViT-B/16 and ViT-L/16 at 224 under DDP and FSDP on 2 CPU ranks, measured in one invocation:
per-rank parameter, gradient and AdamW-state bytes, process peak RSS and step time (fp32, forward + backward + AdamW,
the presets' models through mimswin's own `parallelize` and optimizer); then, computed from the measured bytes per
parameter, the model state per GPU of ViT-B/L/H/g MAE under DDP and under FSDP at 8 ranks.

    python benchmarks/scale.py                                   # ~5 min on 2 cores
    python benchmarks/scale.py --models mae_vit_base_patch16 --steps 2
    python benchmarks/scale.py --losses 200    # the README preset's losses under DDP and FSDP, 2 ranks, same seed
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODELS = ["mae_vit_base_patch16", "mae_vit_large_patch16"]
# MAE encoders (with the paper's 512 x 8 decoder) whose memory per GPU is computed from the measured bytes per parameter
COMPUTED = {"ViT-B/16": "mae_vit_base_patch16", "ViT-L/16": "mae_vit_large_patch16", "ViT-H/14": "mae_vit_huge_patch14",
            "ViT-g/14": "mae_vit_giant_patch14"}
GPUS_GB = (24, 40, 80)
RANKS = 8


def local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (a DTensor's local shard only)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def worker(preset: str, strategy: str, steps: int, batch: int) -> Dict[str, float]:
    """One rank of a torchrun job: the preset's method, parallelized, stepped on random images."""
    from mimswin.config import PretrainConfig, load_config
    from mimswin.models import build_method
    from mimswin.train.optim import build_optimizer
    from mimswin.train.parallel import parallelize, unwrap
    from mimswin.train.setup import make_accelerator

    cfg = load_config(PretrainConfig, [preset], [f"train.strategy={strategy}", "train.mixed_precision=no",
                                                 "train.output_dir=/tmp/mimswin-scale"])
    accelerator = make_accelerator(cfg.train)
    torch.manual_seed(0)
    method = build_method(cfg)
    params = sum(p.numel() for p in method.parameters())
    model = parallelize(method, cfg.train, accelerator)
    optimizer = build_optimizer(unwrap(accelerator, model), cfg.optim, 1e-4, fused=True)
    images = torch.randn(batch, cfg.data.channels, cfg.model.img_size, cfg.model.img_size)
    times, grads = [], 0
    for step in range(steps + 1):
        start = time.perf_counter()
        model(images).loss.backward()
        grads = local_bytes(p.grad for p in unwrap(accelerator, model).parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step allocates the optimizer state: not timed
            times.append(time.perf_counter() - start)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"params": params, "param_bytes": local_bytes(unwrap(accelerator, model).parameters()),
            "grad_bytes": grads, "optim_bytes": local_bytes(state),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s": statistics.mean(times), "rank": accelerator.process_index}


def measure(preset: str, strategy: str, steps: int, batch: int) -> Dict[str, float]:
    """Rank 0's figures of a 2-rank torchrun job (peak RSS: the larger of the two ranks)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--worker", preset, strategy, str(steps), str(batch)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise SystemExit(f"{preset} {strategy} failed:\n{result.stderr[-3000:]}")
    ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    first = next(r for r in ranks if r["rank"] == 0)
    return {**first, "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks)}


def parameter_count(preset: str) -> int:
    """Parameters of a preset's pretraining model (encoder + decoder), built on the meta device."""
    from mimswin.config import PretrainConfig, load_config
    from mimswin.models import build_method

    with torch.device("meta"):
        return sum(p.numel() for p in build_method(load_config(PretrainConfig, [preset])).parameters())


def compare_losses(steps: int) -> Dict[str, float]:
    """The README preset (tiny_mae_vit_cpu) for `steps` steps on 2 ranks under each strategy, same seed: the largest
    relative difference of the logged losses over the first 20 steps and over all."""
    losses = {}
    for strategy in ("ddp", "fsdp"):
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       str(REPO / "launch" / "pretrain.py"), "--config", "tiny_mae_vit_cpu", f"train.max_steps={steps}",
                       "train.log_every=1", "train.progress=false", f"train.strategy={strategy}",
                       "train.save_every=100000", "train.vis_every=100000", f"train.output_dir={out}"]
            subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            losses[strategy] = [r["loss"] for r in records if "loss" in r]
    gaps = [abs(f - d) / abs(d) for d, f in zip(losses["ddp"], losses["fsdp"])]
    first = next((i + 1 for i, gap in enumerate(gaps) if gap > 0), None)
    result = {"first_20": max(gaps[:20]), "all": max(gaps), "last": gaps[-1], "first_differing_step": first,
              "final_ddp": losses["ddp"][-1], "final_fsdp": losses["fsdp"][-1]}
    print(f"tiny_mae_vit_cpu, {steps} steps on 2 ranks, DDP vs FSDP losses: largest relative difference "
          f"{result['first_20']:.2e} over the first 20 steps, {result['all']:.2e} over all, {result['last']:.2e} at "
          f"the last (first differing step: {first}); final loss {result['final_ddp']:.4f} / "
          f"{result['final_fsdp']:.4f}")
    return result


def main(argv: List[str] | None = None) -> Dict[str, Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one untimed")
    parser.add_argument("--batch", type=int, default=2, help="images per rank")
    parser.add_argument("--losses", type=int, default=0, metavar="STEPS",
                        help="instead: compare DDP's and FSDP's losses on the README preset for STEPS steps")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.losses:
        return {"losses": compare_losses(args.losses)}
    if args.worker:
        preset, strategy, steps, batch = args.worker
        print(json.dumps(worker(preset, strategy, int(steps), int(batch))), flush=True)
        return {}
    measured: Dict[str, Dict] = {}
    print("| model | strategy | params (M) | per-rank params / grads / AdamW state (MB) | model state per rank (MB) | "
          "vs DDP | peak RSS per rank (MB) | step (s) |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for preset in args.models.split(","):
        for strategy in ("ddp", "fsdp"):
            figures = measure(preset, strategy, args.steps, args.batch)
            state = figures["param_bytes"] + figures["grad_bytes"] + figures["optim_bytes"]
            measured[f"{preset}/{strategy}"] = {**figures, "state_bytes": state}
            ratio = state / measured[f"{preset}/ddp"]["state_bytes"]
            print(f"| {preset} | {strategy} | {figures['params'] / 1e6:.0f} | "
                  f"{figures['param_bytes'] / 2**20:.0f} / {figures['grad_bytes'] / 2**20:.0f} / "
                  f"{figures['optim_bytes'] / 2**20:.0f} | {state / 2**20:.0f} | {ratio:.2f}x | "
                  f"{figures['peak_rss_mb']:.0f} | {figures['step_s']:.2f} |", flush=True)
    first = args.models.split(",")[0]
    ddp, fsdp = (measured[f"{first}/{s}"] for s in ("ddp", "fsdp"))
    per_param = {"ddp": ddp["state_bytes"] / ddp["params"], "fsdp": fsdp["state_bytes"] * 2 / fsdp["params"]}
    print(f"\nComputed from {first}'s measured bytes per parameter (DDP {per_param['ddp']:.1f} B on every rank; FSDP "
          f"{per_param['fsdp']:.1f} B over all ranks, so {per_param['fsdp'] / RANKS:.1f} B per rank at {RANKS} "
          "ranks): fp32 parameters, gradients and AdamW state per GPU; activations, the gathered block and buffers "
          "come on top.\n")
    print(f"| MAE model | params (M) | DDP per GPU (GB) | FSDP x{RANKS} per GPU (GB) | FSDP / DDP | "
          + " | ".join(f"fits {gb} GB: DDP / FSDP x{RANKS}" for gb in GPUS_GB) + " |")
    print("| --- | ---: | ---: | ---: | ---: |" + " --- |" * len(GPUS_GB))
    for label, preset in COMPUTED.items():
        count = parameter_count(preset)
        ddp_gb, fsdp_gb = count * per_param["ddp"] / 1e9, count * per_param["fsdp"] / RANKS / 1e9
        fits = " | ".join(f"{'yes' if ddp_gb < gb / 2 else 'no'} / {'yes' if fsdp_gb < gb / 2 else 'no'}"
                          for gb in GPUS_GB)
        print(f"| {label} | {count / 1e6:.0f} | {ddp_gb:.1f} | {fsdp_gb:.2f} | {fsdp_gb / ddp_gb:.3f} | {fits} |")
        measured[label] = {"params": count, "ddp_gb": ddp_gb, "fsdp_gb": fsdp_gb}
    print("\n('fits': the model state takes under half the GPU's memory, leaving the other half for activations.)")
    return measured


if __name__ == "__main__":
    main()
