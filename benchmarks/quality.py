"""Quality benchmark: pretrain, then probe, k-NN, attentive probe and fine-tune at 100 / 10 / 1 % labels, against
random init and raw pixels, on the embedded data; one Markdown table, a JSON file and a PNG of accuracy against
pretraining epochs.

    python benchmarks/quality.py --budget quick      # the README path (tiny MAE ViT) and its baselines
    python benchmarks/quality.py --budget full       # + MAE Swin, SimMIM Swin, MAE Hiera; all label fractions
    python benchmarks/quality.py --budget long       # MAE ViT pretrained 4x longer (40 epochs), curve every 5
    python benchmarks/quality.py --budget smoke      # seconds: every stage on a toy model (what the tests run)
    python benchmarks/quality.py --budget full --seeds 3   # reduced-label columns: mean ± std over 3 label subsets
    python benchmarks/quality.py --budget full --seeds 3 --skip finetune,curve   # the frozen readouts only
    python benchmarks/quality.py --budget quick --pretrain-seeds 3   # every readout: mean ± std over 3 pretrainings
    python benchmarks/quality.py --budget readme --pretrain-seeds 3 --override decoder.kind=cross   # a recipe, 3 seeds

Every number comes from the library's own programs (pretrain, finetune, linprobe) run in this process with the
presets and the overrides printed beside it in the JSON, so each one can be reproduced from the command line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
import yaml

from mimswin.config import PretrainConfig, load_config
from mimswin.config.evaluation import AttentiveConfig
from mimswin.data.sources import EmbeddedMNIST
from mimswin.data.subsets import labeled_subset
from mimswin.eval.attentive import attentive_probe
from mimswin.eval.knn import knn_accuracy
from mimswin.eval.logistic import logistic_probe
from mimswin.models.patches import patchify
from mimswin.models.pos_embed import sincos_2d
from mimswin.programs import finetune, linprobe, pretrain

CLASSES = 10
TRAIN_PER_CLASS = 400  # the embedded train split: 4000 images, 400 of each digit
KNN_K, KNN_T = 20, 0.07
PIXEL_PATCH = 4  # the tiny ViT's patch
PIXEL_HEADS = 8  # the attentive probe's heads over 32-wide pixel tokens (its default 12 does not divide 32)
TIME_KEYS = ("seconds", "attentive_s", "finetune_s")  # a cell's wall times (probe + k-NN, attentive, fine-tune)
SKIPPABLE = ("finetune", "curve")  # the stages --skip can leave out: the fine-tunes, the probe-vs-epochs curve


@dataclass
class Method:
    """A pretraining row: its preset and the architecture its random-init baseline shares."""

    name: str
    preset: str
    arch: str
    finetune_preset: str = "tiny_finetune_cpu"


METHODS = {
    "mae_vit": Method("MAE ViT", "tiny_mae_vit_cpu", "ViT"),
    "mae_swin": Method("MAE Swin (visible-only)", "tiny_mae_swin_cpu", "Swin", "tiny_finetune_swin_cpu"),
    "simmim_swin": Method("SimMIM Swin", "tiny_simmim_swin_cpu", "Swin", "tiny_finetune_swin_cpu"),
    "mae_hiera": Method("MAE Hiera (visible units)", "tiny_mae_hiera_cpu", "Hiera", "tiny_finetune_hiera_cpu"),
}
TOY = {"ViT": ["model.kwargs={depth: 2, embed_dim: 32, num_heads: 2}", "decoder.dim=32", "decoder.heads=2",
               "decoder.depth=1"],
       "Swin": ["model.patch_size=4", "model.kwargs={embed_dim: 16, depths: [1, 1], num_heads: [1, 2], window_size: 4}",
                "decoder.dim=32", "decoder.heads=2"],
       "Hiera": []}


@dataclass
class Budget:
    """How much each stage runs: pretraining overrides, curve points (fractions of the pretraining), fine-tune
    overrides (at reduced labels the fine-tune program's own few-label budget, `few_labels.min_steps`)."""

    methods: Sequence[str]
    fractions: Sequence[float]
    finetune_fractions: Sequence[float]
    curve_points: int = 0
    pretrain: List[str] = field(default_factory=list)
    finetune: List[str] = field(default_factory=list)
    linprobe: List[str] = field(default_factory=list)
    attentive: List[str] = field(default_factory=list)
    toy: bool = False
    seeds: int = 1
    pretrain_seeds: int = 1


IN_PROCESS = ["data.num_workers=0"]  # the smoke's loaders: no worker processes to start for a few batches
BUDGETS = {
    "smoke": Budget(("mae_vit", "mae_swin"), (0.1, 0.01), (0.1,), 1,
                    ["train.max_steps=4", "train.epochs=1", *IN_PROCESS], ["train.max_steps=2", *IN_PROCESS],
                    ["logistic.penalties=[0.01]", "logistic.max_iter=20", *IN_PROCESS],
                    ["attentive.epochs=1", "attentive.min_steps=0", "attentive.seeds=[0]", "attentive.heads=4"],
                    toy=True),
    "quick": Budget(("mae_vit",), (1.0, 0.1, 0.01), (1.0,), 4),
    # the README path's own commands: every readout at full labels, no curve (what a recipe is compared on over seeds)
    "readme": Budget(("mae_vit",), (1.0,), (1.0,)),
    "full": Budget(tuple(METHODS), (1.0, 0.1, 0.01), (1.0, 0.1, 0.01), 4),
    "long": Budget(("mae_vit",), (1.0, 0.1, 0.01), (1.0,), 8, ["train.epochs=40"]),
}


def without_stages(budget: Budget, skip: set) -> Budget:
    """The budget less the stages named in `skip` (SKIPPABLE): no fine-tunes, no curve checkpoints."""
    if "finetune" in skip:
        budget = replace(budget, finetune_fractions=())
    if "curve" in skip:
        budget = replace(budget, curve_points=0)
    return budget


def fraction_label(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def subset_overrides(fraction: float) -> List[str]:
    return [] if fraction >= 1 else [f"data.label_fraction={fraction}"]


def seed_overrides(seed: int) -> List[str]:
    """Seed `seed` of a reduced-label evaluation: its labeled subset and its run (head init, crops, order); seed 0 is
    the presets' own."""
    return [f"data.label_seed={seed}", f"train.seed={seed}"] if seed else []


def seed_tag(seed: int) -> str:
    return f"_seed{seed}" if seed else ""


def pretrain_key(key: str, seed: int) -> str:
    """Where pretraining seed `seed` of row `key` runs and is evaluated; seed 0 keeps the row's own key."""
    return f"{key}_pretrain{seed}" if seed else key


def mean_over_pretrainings(draws: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One row from its evaluations after each pretraining seed: per label fraction, the mean, per-seed values and
    standard deviation of each readout over the pretraining seeds (each value itself a mean over label seeds)."""
    if len(draws) == 1:
        return draws[0]
    return {label: mean_over_seeds([{k: v for k, v in draw[label].items() if not k.endswith(("_seeds", "_std"))}
                                    for draw in draws]) for label in draws[0]}


def mean_over_seeds(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One cell from the runs over label seeds: each accuracy's mean, with its per-seed values and (for more than one
    seed) its sample standard deviation; times summed."""
    cell: Dict[str, Any] = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        if None in values:
            cell[key] = None
        elif key in TIME_KEYS:
            cell[key] = sum(values)
        else:
            cell[key] = statistics.mean(values)
            if len(values) > 1:
                cell[f"{key}_seeds"] = values
                cell[f"{key}_std"] = statistics.stdev(values)
    return cell


class Bench:
    """Runs the programs, keeps every result with the command line that made it."""

    def __init__(self, budget: Budget, out: Path) -> None:
        self.budget, self.out = budget, out
        self.results: Dict[str, Any] = {"budget": {}, "rows": {}, "curves": {}, "commands": {}}

    def call(self, key: str, program: Any, script: str, argv: List[str]) -> Dict[str, Any]:
        self.results["commands"][key] = f"python launch/{script}.py " + " ".join(argv)
        start = time.perf_counter()
        result = program.main(argv + ["train.progress=false"])
        (self.out / "quality.json").write_text(json.dumps(self.results, indent=1))
        return {"result": result, "seconds": time.perf_counter() - start}

    def pretrain(self, key: str, method: Method, seed: int = 0) -> tuple[Path, float]:
        """Pretraining seed `seed` of a row (`train.seed`; 0 is the preset's own, the only one with curve
        checkpoints). Returns its run folder and wall seconds."""
        run = self.out / key / "pretrain"
        extra = [*(TOY[method.arch] if self.budget.toy else []), *self.budget.pretrain,
                 *([f"train.seed={seed}"] if seed else [])]
        curve = self.curve_overrides(method.preset, extra) if seed == 0 else []
        argv = ["--config", method.preset, f"train.output_dir={run}", *extra, *curve]
        return run, self.call(f"{key}/pretrain", pretrain, "pretrain", argv)["seconds"]

    def probe(self, key: str, source: Path, fraction: float, random: bool = False, seed: int = 0,
              attentive: bool = True) -> Dict[str, Any]:
        """The logistic probe and k-NN, and (with `attentive`) the attentive probe, of one encoder."""
        tag = f"{key}/probe_{fraction_label(fraction)}{'_random' if random else ''}{seed_tag(seed)}"
        argv = ["--config", "tiny_linprobe_cpu", "--from", str(source), f"train.output_dir={self.out / tag}",
                *subset_overrides(fraction), *seed_overrides(seed), *(["random_init=true"] if random else []),
                *self.budget.linprobe]
        run = self.call(tag, linprobe, "linprobe", argv)
        cell = {"probe": run["result"]["last"]["val_top1"], "knn": run["result"].get("knn_top1"),
                "seconds": run["seconds"]}
        if not attentive:
            return cell
        attentive_run = self.call(f"{tag}_attentive", linprobe, "linprobe",
                              [*argv, f"train.output_dir={self.out / tag}_attentive", "mode=attentive",
                               *self.budget.attentive])
        return {**cell, "attentive": attentive_run["result"]["last"]["val_top1"],
                "attentive_s": attentive_run["seconds"]}

    def finetune(self, key: str, source: Path, fraction: float, random: bool = False,
                 preset: str = "tiny_finetune_cpu", seed: int = 0) -> Dict[str, Any]:
        tag = f"{key}/finetune_{fraction_label(fraction)}{'_random' if random else ''}{seed_tag(seed)}"
        argv = ["--config", preset, "--from", str(source), f"train.output_dir={self.out / tag}",
                *subset_overrides(fraction), *seed_overrides(seed),
                *(["random_init=true"] if random else []), *self.budget.finetune]
        run = self.call(tag, finetune, "finetune", argv)
        return {"finetune": run["result"]["last"]["val_top1"], "finetune_s": run["seconds"]}

    def evaluate(self, key: str, source: Path, random: bool, method: Method) -> Dict[str, Any]:
        row: Dict[str, Any] = {}
        for fraction in self.budget.fractions:
            runs = []
            for seed in self.seeds(fraction):
                run = self.probe(key, source, fraction, random, seed)
                if fraction in self.budget.finetune_fractions:
                    run.update(self.finetune(key, source, fraction, random, method.finetune_preset, seed))
                runs.append(run)
            row[fraction_label(fraction)] = mean_over_seeds(runs)
        return row

    def seeds(self, fraction: float) -> range:
        """Full labels are one fixed set; a reduced fraction is measured on `budget.seeds` seeded subsets."""
        return range(1 if fraction >= 1 else self.budget.seeds)

    def curve(self, key: str, run: Path) -> List[Dict[str, Any]]:
        """Probe and k-NN (at the budget's first label fraction) of the checkpoints along the pretraining, epoch 0
        being random init."""
        points = []
        checkpoints = sorted((run / "checkpoints").glob("step_*"))
        config = yaml.safe_load((run / "config.yaml").read_text())
        steps = max(int(c.name.split("_")[1]) for c in checkpoints)
        for checkpoint in checkpoints:
            step = int(checkpoint.name.split("_")[1])
            evaluation = self.probe(f"{key}/curve_{step}", checkpoint, self.budget.fractions[0], attentive=False)
            points.append({"epoch": config["train"]["epochs"] * step / steps, "step": step, **evaluation})
        return points

    def raw_pixels(self) -> Dict[str, Any]:
        row: Dict[str, Any] = {}
        train_x, train_y, val_x, val_y = raw_pixel_features()
        for fraction in self.budget.fractions:
            runs = []
            for seed in self.seeds(fraction):
                keep = labeled_subset(train_y, fraction if fraction < 1 else None, None, seed)
                start = time.perf_counter()
                probe = logistic_probe(train_x[keep], train_y[keep], val_x, val_y, CLASSES)
                knn = knn_accuracy(train_x[keep], train_y[keep], val_x, val_y, CLASSES, KNN_K, KNN_T)
                attentive = raw_pixel_attentive(train_x[keep], train_y[keep], val_x, val_y, self.budget.toy)
                runs.append({"probe": probe["top1"], "knn": knn["top1"], "attentive": attentive,
                             "seconds": time.perf_counter() - start})
            row[fraction_label(fraction)] = mean_over_seeds(runs)
        return row

    def run(self, methods: Sequence[str]) -> Dict[str, Any]:
        start = time.perf_counter()
        self.results["rows"]["raw_pixels"] = {"name": "raw pixels (logistic, k-NN, attentive)", **self.raw_pixels()}
        random_done = set()
        for key in methods:
            method = METHODS[key]
            runs = [self.pretrain(pretrain_key(key, seed), method, seed) for seed in range(self.budget.pretrain_seeds)]
            draws = [self.evaluate(pretrain_key(key, seed), seeded_run, random=False, method=method)
                     for seed, (seeded_run, _) in enumerate(runs)]
            run = runs[0][0]  # the preset's own seed: its curve, and the architecture random init shares
            row = {"name": method.name, "pretrain_s": sum(seconds for _, seconds in runs),
                   **mean_over_pretrainings(draws)}
            self.results["rows"][key] = {**row, "pretrain_seeds": draws} if len(draws) > 1 else row
            if self.budget.curve_points:
                self.results["curves"][key] = self.curve(key, run)
            if method.arch not in random_done:
                random_done.add(method.arch)
                random_key = f"random_{method.arch.lower()}"
                self.results["rows"][random_key] = {"name": f"random init {method.arch}",
                                                    **self.evaluate(random_key, run, random=True, method=method)}
        self.results["wall_s"] = time.perf_counter() - start
        return self.results

    def curve_overrides(self, preset: str, extra: List[str]) -> List[str]:
        """Checkpoints kept at `curve_points` even steps of the pretraining, for the accuracy-vs-epochs curve."""
        if not self.budget.curve_points:
            return []
        cfg = load_config(PretrainConfig, [preset], extra)
        steps = cfg.train.epochs * (TRAIN_PER_CLASS * CLASSES // cfg.data.batch_size)
        if cfg.train.max_steps is not None:
            steps = min(steps, cfg.train.max_steps)
        every = max(1, steps // self.budget.curve_points)
        return [f"train.save_every={every}", f"train.keep_every={every}"]


def pixel_tokens(flat: torch.Tensor, patch: int = PIXEL_PATCH) -> torch.Tensor:
    """Raw-pixel tokens for the attentive probe: each 4x4 patch of the 28x28 digits (16 values), its 2-D sin-cos
    position beside it (16 more: a patch's place is in its token, as an encoder writes it): [N, 49, 32]."""
    images = flat.reshape(len(flat), 1, 28, 28)
    patches = patchify(images, patch)
    grid = (28 // patch, 28 // patch)
    return torch.cat([patches, sincos_2d(patches.shape[-1], grid).expand(len(patches), -1, -1)], dim=-1)


def raw_pixel_attentive(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                        toy: bool = False) -> float:
    """Val top-1 of the attentive probe (the linprobe default hyperparameters, heads PIXEL_HEADS) on pixel tokens."""
    toy_length = {"epochs": 1, "seeds": [0], "min_steps": 0} if toy else {}
    hyper = {**asdict(AttentiveConfig()), "heads": PIXEL_HEADS, **toy_length}
    seeds = hyper.pop("seeds")
    hyper.pop("blocks")
    return attentive_probe(pixel_tokens(train_x), train_y, pixel_tokens(val_x), val_y, CLASSES, seeds,
                           **hyper)["top1"]


def raw_pixel_features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The embedded train and val images as flat vectors in [0, 1] (one gray channel), with their labels."""
    train, val = EmbeddedMNIST("train"), EmbeddedMNIST("val")

    def flat(data: EmbeddedMNIST) -> torch.Tensor:
        return data.images.reshape(len(data.images), -1).float() / 255.0

    return flat(train), torch.as_tensor(train.labels), flat(val), torch.as_tensor(val.labels)


COLUMNS = ("probe", "knn", "attentive", "finetune")
COLUMN_NAMES = {"probe": "linear probe", "knn": "k-NN", "attentive": "attentive probe", "finetune": "fine-tune"}


def markdown_table(results: Dict[str, Any], fractions: Sequence[float]) -> str:
    """One row per method / baseline; columns probe, k-NN, attentive probe, fine-tune (those measured) at each label
    fraction (mean ± std over the label seeds where there are several), and wall time."""
    labels = [fraction_label(f) for f in fractions]
    columns = [c for c in COLUMNS if any(row.get(label, {}).get(c) is not None for row in results["rows"].values()
                                         for label in labels)]  # a skipped stage leaves no column
    header = ["row"] + [f"{COLUMN_NAMES[c]} {label}" for c in columns for label in labels] + ["wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["rows"].values():
        cells = [row["name"]]
        for column in columns:
            for label in labels:
                value, std = row.get(label, {}).get(column), row.get(label, {}).get(f"{column}_std")
                cells.append("–" if value is None else f"{value:.1f}" + ("" if std is None else f" ± {std:.1f}"))
        seconds = row.get("pretrain_s", 0.0) + sum(row.get(label, {}).get(key, 0.0) for label in labels
                                                   for key in TIME_KEYS)
        cells.append(f"{seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(results: Dict[str, Any], path: Path) -> None:
    """Probe and k-NN top-1 (100 % labels) against pretraining epochs, one colour per method; raw pixels and the
    random-init probe as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    label = fraction_label(results["budget"]["fractions"][0])
    raw = results["rows"]["raw_pixels"][label]
    for axis, column in zip(axes, ("probe", "knn")):
        for key, points in results["curves"].items():
            epochs = [0.0] + [p["epoch"] for p in points]
            random_key = f"random_{METHODS[key].arch.lower()}"
            start = results["rows"][random_key][label][column]
            axis.plot(epochs, [start] + [p[column] for p in points], marker="o", label=METHODS[key].name)
        axis.axhline(raw[column], color="gray", linestyle="--", label="raw pixels")
        axis.set_title(f"{COLUMN_NAMES[column]} top-1, {label} labels")
        axis.set_xlabel("pretraining epochs (0 = random init)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("val top-1 (%)")
    axes[1].legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="quick")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=int, default=None,
                        help="label subsets (and run seeds) each reduced-label column is averaged over; default 1")
    parser.add_argument("--pretrain-seeds", type=int, default=1,
                        help="pretrainings of each method (train.seed 0 .. N-1): each of its readouts is their mean ± "
                             "std; random init and raw pixels are read once. Default 1")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every method's pretraining (repeatable), e.g. mask.ratio=0.6")
    parser.add_argument("--skip", default="", help=f"comma-separated stages to leave out: {', '.join(SKIPPABLE)} "
                                                    "(the frozen readouts of every row in a fraction of the time)")
    args = parser.parse_args(argv)
    budget = BUDGETS[args.budget]
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds must be >= 1, got {args.seeds}")
        budget = replace(budget, seeds=args.seeds)
    if args.pretrain_seeds < 1:
        parser.error(f"--pretrain-seeds must be >= 1, got {args.pretrain_seeds}")
    budget = replace(budget, pretrain_seeds=args.pretrain_seeds, pretrain=[*budget.pretrain, *args.override])
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(SKIPPABLE):
        parser.error(f"--skip takes {', '.join(SKIPPABLE)}; got {', '.join(sorted(skip - set(SKIPPABLE)))}")
    budget = without_stages(budget, skip)
    methods = budget.methods if args.methods is None else tuple(args.methods.split(","))
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; known: {', '.join(METHODS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(budget, args.out)
    bench.results["budget"] = {"name": args.budget, "methods": list(methods), "fractions": list(budget.fractions),
                               "seeds": budget.seeds, "pretrain_seeds": budget.pretrain_seeds,
                               "overrides": args.override, "skip": sorted(skip),
                               "torch": torch.__version__, "threads": torch.get_num_threads()}
    results = bench.run(methods)
    table = markdown_table(results, budget.fractions)
    if budget.pretrain_seeds > 1:
        table += (f"\n\nPretrained rows: mean ± std over {budget.pretrain_seeds} pretraining seeds (train.seed 0 .. "
                  f"{budget.pretrain_seeds - 1}; each reduced-label value a mean over {budget.seeds} label seed(s)); "
                  "random init and raw pixels: one network, ± over label seeds.")
    (args.out / "quality.json").write_text(json.dumps(results, indent=1))
    (args.out / "quality.md").write_text(table + "\n")
    if results["curves"]:
        plot_curves(results, args.out / "quality_curve.png")
    print(table)
    print(f"wall {results['wall_s']:.0f} s; table, JSON and plot in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
