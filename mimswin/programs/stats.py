"""`mimswin stats PATH`: per-channel mean, std and 1st / 99th percentiles of a data source in the units the loader
produces, printed with the config overrides to paste (`data.channels=... data.mean=[...] data.std=[...]`)."""

from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

from mimswin.config.sections import LAYOUTS
from mimswin.data.stats import ChannelStats, stats_of
from mimswin.programs.common import add_hf_arguments, console_entry, hf_source


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mimswin stats", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="image folder, webdataset shards (a .tar pattern), 'embedded[:train|val|all]', or "
                        "a Hugging Face dataset: parquet / arrow file or folder, save_to_disk folder")
    add_hf_arguments(parser)
    parser.add_argument("--channels", type=int, default=None,
                        help="read images as this many channels, as data.channels (default: as the first image has)")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="layout of 3-D .npy arrays (data.layout)")
    parser.add_argument("--samples", type=int, default=1000,
                        help="images to read: a seeded random subset of a folder, the first ones of shards "
                             "(0: all; default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of the percentile pixels")
    args = parser.parse_args(argv)
    if args.samples < 0 or (args.channels is not None and args.channels < 1):
        parser.error("--samples must be >= 0 and --channels >= 1")
    return args


def report_lines(path: str, stats: ChannelStats) -> List[str]:
    """The printed report: what was read, one row per channel, the overrides to paste."""
    def counted(counter) -> str:
        return ", ".join(f"{key}: {n}" for key, n in counter.most_common(4)) + (" ..." if len(counter) > 4 else "")

    skipped = sum(stats.skipped.values())
    lines = [f"{stats.images} image(s) of {path}: {stats.channels} channel(s); pixel types {counted(stats.dtypes)}; "
             f"sizes {counted(stats.sizes)}; skipped {skipped}" + (f" ({counted(stats.skipped)})" if skipped else ""),
             "units: what the model's loader produces (8-bit / 255, 16-bit / 65535, int16 / 32767, floats as they "
             "are)" + ("" if stats.exact_percentiles else "; percentiles from a random sample of pixels"),
             f"{'channel':>7} {'mean':>12} {'std':>12} {'p1':>12} {'p99':>12}"]
    lines += [f"{c:>7} {m:>12.6g} {s:>12.6g} {lo:>12.6g} {hi:>12.6g}"
              for c, (m, s, lo, hi) in enumerate(zip(stats.mean, stats.std, stats.low, stats.high))]
    return lines + ["config:", f"  {stats.config_line()}"]


def main(argv: Optional[Sequence[str]] = None) -> ChannelStats:
    """Parse, read, print the report; returns the statistics."""
    args = parse_args(argv)
    stats = stats_of(args.path, args.channels, args.layout, args.samples, args.seed, hf_source(args))
    print("\n".join(report_lines(args.path, stats)))
    return stats


cli = console_entry(main)
