"""Fine-tuning entry point: `python launch/finetune.py --from RUN ...` or under `accelerate launch`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mimswin.programs.finetune import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
