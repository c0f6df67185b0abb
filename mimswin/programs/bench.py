"""`mimswin bench`, the pretraining throughput benchmark: mimswin MAE (self and cross decoders) and SimMIM vs
HuggingFace ViTMAE and Swin SimMIM vs the data loader vs the device's GEMM ceiling.

Every row is measured in one process at the same model size, image size, batch and mask ratio. A step is forward,
backward, AdamW step and zero_grad on a fixed batch on the device; step time is the median of `--steps` after
`--warmup`. FLOPs per step are counted by `torch.utils.flop_counter` (forward + backward), MFU is those FLOPs per
second over a matmul ceiling measured in the same run (fp32 on CPU, bf16 on GPU).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import List, Optional, Sequence

import torch

from mimswin.bench.contenders import PRESETS, ROW_GROUPS, ROW_NAMES, Setup
from mimswin.bench.report import Report, format_table
from mimswin.bench.run import run_benchmark
from mimswin.errors import ConfigError
from mimswin.programs.common import console_entry


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mimswin-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size, image size, batch")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--decoder-depth", type=int, default=None,
                        help="override the preset's MAE decoder blocks (ViT rows, HF ViTMAE and visible-only Swin)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per row first")
    parser.add_argument("--rows", default="all", help=f"comma list of rows ({', '.join(ROW_NAMES)}) or groups "
                        f"({', '.join(ROW_GROUPS)})")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model row")
    parser.add_argument("--grad-checkpointing", action="store_true", help="gradient checkpointing in every model row")
    parser.add_argument("--num-workers", type=int, default=2, help="loader row worker processes")
    parser.add_argument("--data-path", default=None, help="image folder the loader rows read (default: photographs "
                        "written offline from scikit-image's, the bench extra; else the embedded digits)")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this path ('-' = stdout)")
    return parser.parse_args(argv)


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: only cpu and cuda are supported, got '{name}'")
    return device


def select_rows(spec: str) -> List[str]:
    """Row names of a comma list of rows and groups, groups expanded, each row once in the order first named."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ROW_NAMES) - set(ROW_GROUPS))
    if unknown or not names:
        raise ConfigError(f"--rows: unknown row(s) {unknown} (known: {', '.join((*ROW_NAMES, *ROW_GROUPS))})")
    rows = [row for name in names for row in ROW_GROUPS.get(name, (name,))]
    return list(dict.fromkeys(rows))


def main(argv: Optional[Sequence[str]] = None) -> Report:
    """Parse, measure, print the table (and JSON when asked); returns the report."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    rows = select_rows(args.rows)
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("--steps must be >= 1 and --warmup >= 0")
    setup = PRESETS[args.preset]
    if args.batch is not None:
        if args.batch < 1:
            raise ConfigError(f"--batch must be positive, got {args.batch}")
        setup = Setup(**{**asdict(setup), "batch": args.batch})
    if args.decoder_depth is not None:
        if args.decoder_depth < 1:
            raise ConfigError(f"--decoder-depth must be positive, got {args.decoder_depth}")
        setup = Setup(**{**asdict(setup), "decoder_depth": args.decoder_depth,
                         "swin_decoder_depth": args.decoder_depth})
    report = run_benchmark(setup, device, precision, args.steps, args.warmup, rows, args.grad_checkpointing,
                           args.compile, args.num_workers, args.data_path)
    print(format_table(report))
    if args.json == "-":
        print(json.dumps(asdict(report), indent=2))
    elif args.json:
        with open(args.json, "w") as out:
            json.dump(asdict(report), out, indent=2)
    return report


cli = console_entry(main)
