"""`mimswin shards`: write webdataset tar shards (image + cls + key) and sizes.json from an image folder, a Hugging
Face datasets split or the embedded set."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from mimswin.data.shard_write import EMBEDDED, Shrink, Summary, write_shards
from mimswin.programs.common import add_hf_arguments, console_entry, hf_source


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mimswin-shards", description="Write webdataset tar shards (image + cls + key) and sizes.json.")
    parser.add_argument("src", help=f"image folder (flat or one subfolder per class), '{EMBEDDED}[:train|val|all]', "
                        "or a Hugging Face dataset: parquet / arrow file or folder, save_to_disk folder")
    add_hf_arguments(parser)
    parser.add_argument("out", help="output directory")
    parser.add_argument("--maxcount", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most (default 1e9)")
    parser.add_argument("--prefix", default=None, help="shard name prefix (default: the split, or 'train')")
    parser.add_argument("--max-side", type=int, default=None,
                        help="resize images whose long side exceeds this many px (aspect kept; default: store as is)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of JPEGs resized by --max-side (90)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.maxcount < 1 or args.maxsize <= 0:
        parser.error("--maxcount and --maxsize must be positive")
    if args.max_side is not None and args.max_side < 1:
        parser.error(f"--max-side must be a positive number of px, got {args.max_side}")
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality must be in 1..100, got {args.quality}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Summary:
    """Parse, write the shards, print the summary."""
    args = parse_args(argv)
    shrink = Shrink(args.max_side, args.quality) if args.max_side else None
    summary = write_shards(args.src, Path(args.out), args.maxcount, args.maxsize, args.prefix, not args.no_progress,
                           shrink, hf_source(args))
    print("\n".join(summary.lines(Path(args.out))))
    return summary


cli = console_entry(main)
