"""Step-time cost of the online probe on the README path (tiny_mae_vit_cpu on the embedded digits), measured in one
invocation: trials alternate between pretraining without and with the probe, each a real `mimswin pretrain` process,
and the steady-state images/s of each is compared. The probe's readings (a val pass every `online_probe.every` steps)
are kept out of the measured windows (one reading, at the end) and timed apart: `--every` prints what a reading costs.

    python benchmarks/online_probe.py                   # 3 trials of 150 steps each way, ~5 min on 2 cores
    python benchmarks/online_probe.py --trials 1 --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from channels import trial  # noqa: E402  (one pretraining process, its steady-state images/s)

VARIANTS = {"without the probe": [], "with the online probe": ["online_probe.every=100000"]}


def reading_seconds(steps: int, every: int, out: Path) -> float:
    """Wall seconds a run with readings every `every` steps spends beyond the same run reading once, per reading."""
    walls = []
    for overrides in (["online_probe.every=100000"], [f"online_probe.every={every}"]):
        start = time.perf_counter()
        trial(overrides, steps, out / str(len(walls)))
        walls.append(time.perf_counter() - start)
    return (walls[1] - walls[0]) / max(1, steps // every - 1)


def main(argv: List[str] | None = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=0, help="also time readings every N steps (0: skip)")
    args = parser.parse_args(argv)
    rates: Dict[str, List[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.trials):
            for position, (name, overrides) in enumerate(VARIANTS.items()):
                rates[name].append(trial(overrides, args.steps, Path(scratch) / f"{index}-{position}"))
                print(f"trial {index + 1} {name}: {rates[name][-1]:.1f} images/s", flush=True)
        reading = reading_seconds(args.steps, args.every, Path(scratch) / "readings") if args.every else None
    medians = {name: statistics.median(values) for name, values in rates.items()}
    without, with_probe = medians.values()
    print("\n| pretraining | images/s (median of trials) |\n| --- | ---: |")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} |")
    print(f"\nstep-time cost of the probe: {100 * (without / with_probe - 1):.1f} % (images/s ratio "
          f"{with_probe / without:.3f})")
    if reading is not None:
        print(f"one reading (val pass of online_probe.val_samples images): {reading:.1f} s")
    return {**medians, "ratio": with_probe / without, **({"reading_s": reading} if reading is not None else {})}


if __name__ == "__main__":
    main()
