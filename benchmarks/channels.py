"""Pretraining speed of the README path (tiny_mae_vit_cpu on the embedded digits) with the digits read as one channel
(the preset) against the same run reading them as three replicated channels (what mimswin did before), measured in
one invocation: trials alternate between the two, each a real `mimswin pretrain` process (loader, workers, model,
optimizer, logging), and the steady-state images/s of each (log windows after the first) is compared.

    python benchmarks/channels.py                    # 3 trials of 150 steps each way, ~5 min on 2 cores
    python benchmarks/channels.py --trials 1 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
THREE = ["data.channels=3", "data.mean=[0.1313,0.1313,0.1313]", "data.std=[0.3086,0.3086,0.3086]"]
VARIANTS = {"1 channel (preset)": [], "3 channels (replicated)": THREE}


def trial(overrides: List[str], steps: int, out: Path) -> float:
    """Steady-state images/s of one pretraining process: the mean of its log windows after the first."""
    command = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", "tiny_mae_vit_cpu", *overrides,
               f"train.max_steps={steps}", "train.log_every=10", "train.save_every=100000", "train.vis_every=100000",
               "train.progress=false", f"train.output_dir={out}"]
    subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(r["images_per_s"] for r in records[1:] if r["step"] % 10 == 0 and "images_per_s" in r)


def main(argv: List[str] | None = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    rates: Dict[str, List[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.trials):
            for name, overrides in VARIANTS.items():
                out = Path(scratch) / f"{index}-{len(overrides)}"
                rates[name].append(trial(overrides, args.steps, out))
                print(f"trial {index + 1} {name}: {rates[name][-1]:.1f} images/s", flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    one, three = medians.values()
    print("\n| digits read as | images/s (median of trials) |\n| --- | ---: |")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} |")
    print(f"\n1-channel / 3-channel throughput: {one / three:.3f}")
    return {**medians, "ratio": one / three}


if __name__ == "__main__":
    main()
