"""What the programs share around `main`: the `--resume` flag, where a run resumes from, and the console wrapper."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

from accelerate import Accelerator

from mimswin.errors import ConfigError, MimswinError
from mimswin.train.checkpoint import latest_checkpoint, resolve_checkpoint, resumable_checkpoint, warn_stderr
from mimswin.train.preemption import EXIT_PREEMPTED, Preempted


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


def resume_point(accelerator: Accelerator, output_dir: Path, checkpoints: Path,
                 resume: Optional[str]) -> Optional[Path]:
    """The checkpoint a run continues from: with `resume='auto'` the newest intact one under `checkpoints` (None:
    start fresh), with a path that checkpoint; without `resume`, an output dir holding checkpoints is refused."""
    if resume is None:
        if latest_checkpoint(checkpoints) is not None:
            raise ConfigError(f"train.output_dir '{output_dir}' already holds checkpoints: pass --resume to continue "
                              "that run, or choose another output_dir")
        return None
    warn = warn_stderr if accelerator.is_main_process else (lambda message: None)
    checkpoint = resumable_checkpoint(checkpoints, warn) if resume == "auto" else resolve_checkpoint(resume, warn)
    if checkpoint is None:
        accelerator.print(f"--resume: no checkpoint in {checkpoints}; starting fresh")
    return checkpoint


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
