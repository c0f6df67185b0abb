"""MAE pretraining throughput vs HuggingFace ViTMAE, the data loader and the GEMM ceiling.

`python benchmarks/mae_throughput.py --preset tiny|cpu|gpu [--device cuda] [--json out.json]`, the same as
`mimswin bench` and `mimswin-bench`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mimswin.programs.bench import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
