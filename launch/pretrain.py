"""Pretraining entry point: `python launch/pretrain.py ...` or `accelerate launch launch/pretrain.py ...`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mimswin.programs.pretrain import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
