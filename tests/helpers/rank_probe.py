"""Run pretraining on one rank of a torchrun job, recording Python-level writes under the run dir per rank and
dumping this rank's final parameters and its local rank, so a test can check that ranks agree and only rank 0
writes."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from mimswin.programs.pretrain import main  # noqa: E402
from mimswin.runs.discovery import latest_checkpoint  # noqa: E402
from mimswin.runs.sharded import read_sharded_tensors  # noqa: E402
from mimswin.train.parallel import is_sharded, unwrap  # noqa: E402

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def install_write_recorder(run_dir: str, record: list) -> None:
    root = os.path.realpath(run_dir)

    def inside(path) -> bool:
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(root)
        except (TypeError, ValueError):
            return False

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if writes and inside(args[0]):
                record.append(f"open {args[0]}")
        elif event in ("os.mkdir", "os.rename", "os.remove", "shutil.rmtree") and inside(args[0]):
            record.append(f"{event} {args[0]}")

    sys.addaudithook(hook)


if __name__ == "__main__":
    out_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    run_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("train.output_dir="))
    rank = int(os.environ["RANK"])
    writes: list = []
    install_write_recorder(run_dir, writes)
    trainer = main(argv)
    model = unwrap(trainer.accelerator, trainer.model)
    if is_sharded(model):  # each rank holds a shard (and the process group is gone): the whole model as saved
        whole = read_sharded_tensors(latest_checkpoint(trainer.run_dir.checkpoints))
        params = torch.cat([whole[name].flatten() for name, _ in model.named_parameters()])
    else:
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save({"params": params, "writes": writes, "steps": trainer.state.step,
                "world": trainer.accelerator.num_processes, "local_rank": int(os.environ["LOCAL_RANK"])},
               out_dir / f"rank{rank}.pt")
