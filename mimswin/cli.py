"""`mimswin <subcommand>`: one command for every program, each imported only when it is asked for."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple

SUBCOMMANDS: Dict[str, Tuple[str, str]] = {
    "pretrain": ("mimswin.programs.pretrain", "masked image modeling pretraining (MAE, SimMIM)"),
    "finetune": ("mimswin.programs.finetune", "fine-tune a pretrained encoder on labelled images"),
    "linprobe": ("mimswin.programs.linprobe", "linear probe on frozen encoder features"),
    "knn": ("mimswin.programs.knn", "weighted k-NN on frozen encoder features"),
    "shards": ("mimswin.programs.shards", "write webdataset shards from an image folder or a Hugging Face dataset"),
    "stats": ("mimswin.programs.stats", "per-channel mean / std / percentiles of a data source (data.mean, data.std)"),
    "export": ("mimswin.programs.export", "write a run's encoder for plain timm (--format timm|safetensors), push it "
               "to the Hub"),
    "visualize": ("mimswin.programs.visualize", "reconstruction pictures of any images (--from RUN --images DIR)"),
    "bench": ("mimswin.programs.bench", "throughput and memory benchmarks"),
}


def usage() -> str:
    """The top-level help: subcommands and the shipped presets."""
    from mimswin.config import list_presets

    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: mimswin <subcommand> [options]   (mimswin <subcommand> --help for its options)", "",
             "subcommands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    lines += ["", "presets (--config NAME):"] + [f"  {name}" for name in list_presets()]
    return "\n".join(lines)


def load_entry(name: str) -> Callable[[Sequence[str]], int]:
    """`cli` of the subcommand's module; a clear ImportError-free message when that module is not installed."""
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise LookupError(f"subcommand '{name}' is not available in this version of mimswin "
                              f"(module {module_name} is missing)") from None
        raise
    return module.cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatch `argv[0]` to its program's `cli(argv[1:])`; exit codes as the program returns them."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"mimswin: error: unknown subcommand '{name}' (choose from {', '.join(SUBCOMMANDS)})", file=sys.stderr)
        return 2
    try:
        entry = load_entry(name)
    except LookupError as err:
        print(f"mimswin: error: {err}", file=sys.stderr)
        return 2
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
