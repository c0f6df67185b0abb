"""Linear probe entry point: `python launch/linprobe.py --from RUN ...` or under `accelerate launch`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mimswin.programs.linprobe import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
