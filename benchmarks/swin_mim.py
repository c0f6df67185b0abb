"""Swin masked image modeling: mimswin SimMIM vs visible-only Swin MAE vs HuggingFace SwinForMaskedImageModeling.

`python benchmarks/swin_mim.py --preset tiny|cpu|gpu [--device cuda] [--json out.json]` is
`mimswin bench --rows swin ...` (a later `--rows` replaces the Swin rows)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mimswin.programs.bench import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(["--rows", "swin", *sys.argv[1:]]))
