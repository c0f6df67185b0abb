"""What every program shares around its `main`: arguments (`--config`, `--from`, `--resume`, overrides), the
console wrapper (errors to exit codes), the results file and the timings it reports."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

from accelerate import Accelerator

from mimswin.config.loading import list_presets, load_config
from mimswin.data.hf import HFSource
from mimswin.errors import ConfigError, MimswinError
from mimswin.runs.files import atomic_write_bytes
from mimswin.runs.layout import RunDir
from mimswin.signals import EXIT_PREEMPTED, Preempted

C = TypeVar("C")


def program_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A program's parser with the repeatable `--config` (preset names listed in the help)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog="presets: " + ", ".join(list_presets()))
    parser.add_argument("--config", action="append", default=[],
                        help="YAML preset path or name under configs/ (repeatable; later ones win)")
    return parser


def parse_with_resume(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]
                      ) -> Tuple[argparse.Namespace, List[str]]:
    """`parser` plus `--resume [auto|PATH]`; unknown arguments come back as config overrides."""
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="'auto' (the default when the flag has no value): continue from the latest complete "
                             "checkpoint of train.output_dir, or start fresh if it has none; or a run/checkpoint dir")
    args, overrides = parser.parse_known_args(argv)
    if args.resume not in (None, "auto") and "=" in args.resume and not Path(args.resume).exists():
        overrides.insert(0, args.resume)  # `--resume key=value`: the bare flag followed by an override
        args.resume = "auto"
    return args, overrides


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point around `main`: user errors become one line on stderr and exit code 2; a preempted run
    (SIGTERM/SIGUSR1, checkpoint saved) exits with code 75 so a scheduler requeues it."""
    try:
        main(argv)
    except MimswinError as err:
        print(f"mimswin: error: {err}", file=sys.stderr)
        return 2
    except Preempted:
        return EXIT_PREEMPTED
    return 0


def console_entry(main: Callable[[Optional[Sequence[str]]], Any]) -> Callable[[Optional[Sequence[str]]], int]:
    """A program's console entry point `cli(argv=None) -> exit code`: `run_cli` around its `main`."""
    return functools.partial(run_cli, main)


def parse_eval_args(schema: Type[C], prog: str, description: str, argv: Optional[Sequence[str]],
                    resumable: bool = False) -> Tuple[C, Optional[str]]:
    """`--config` presets, `--from CKPT`, key=value overrides (and `--resume` for a program that trains) -> a
    validated config of `schema` and the `--resume` value (None when not given)."""
    parser = program_parser(prog, description + " Any config key can be overridden as key=value, --key=value or "
                            "--key value.")
    parser.add_argument("--from", dest="checkpoint", default=None,
                        help="pretrained encoder: exported .safetensors, run dir, or checkpoint dir")
    if resumable:
        args, overrides = parse_with_resume(parser, argv)
    else:
        args, overrides = parser.parse_known_args(argv)
        args.resume = None
    if args.checkpoint is not None:
        overrides = [*overrides, f"checkpoint={json.dumps(args.checkpoint)}"]
    cfg = load_config(schema, args.config, overrides)
    if cfg.checkpoint is None:
        raise ConfigError("no pretrained encoder given: pass --from RUN_DIR, CHECKPOINT_DIR or ENCODER.safetensors")
    return cfg, args.resume


def add_hf_arguments(parser: argparse.ArgumentParser) -> None:
    """Options naming the split and columns of a Hugging Face datasets PATH (as data.hf_split, data.hf_image_key,
    data.hf_label_key)."""
    parser.add_argument("--hf-split", default="train", help="split of a datasets PATH (default train)")
    parser.add_argument("--hf-image-key", default="image", help="image column of a datasets PATH (default image)")
    parser.add_argument("--hf-label-key", default="label", help="label column of a datasets PATH (default label; "
                        "optional)")


def hf_source(args: argparse.Namespace) -> HFSource:
    """What `add_hf_arguments` parsed."""
    return HFSource(args.hf_split, args.hf_image_key, args.hf_label_key)


def write_results(accelerator: Accelerator, run_dir: RunDir, results: Dict[str, Any]) -> None:
    """The program's results.json (rank 0), atomically."""
    if accelerator.is_main_process:
        atomic_write_bytes(run_dir.results, json.dumps(results, indent=1).encode())


class Stopwatch:
    """Named wall-clock intervals, for the timings a results file reports."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    def time(self, name: str) -> "_Interval":
        return _Interval(self, name)


class _Interval:
    def __init__(self, watch: Stopwatch, name: str) -> None:
        self.watch, self.name = watch, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.watch.seconds[self.name] = self.watch.seconds.get(self.name, 0.0) + time.perf_counter() - self.start
