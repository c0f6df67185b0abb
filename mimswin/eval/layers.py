"""Per-layer readout: the logistic probe and k-NN on the pooled features of every block (ViT) or stage (Swin, Hiera),
for an encoder and for the same network at random init: which depth holds the most linearly readable and the most
neighbour-readable information."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from mimswin.eval.knn import knn_accuracy
from mimswin.eval.logistic import logistic_probe

KINDS = ("probe", "knn")


def split_blocks(features: torch.Tensor, widths: Sequence[int]) -> List[torch.Tensor]:
    """[N, sum(widths)] features concatenated last block first -> one [N, width] tensor per block, first block first."""
    return list(reversed(torch.split(features, list(widths), dim=1)))


def read_layers(features: Dict[str, torch.Tensor], widths: Sequence[int], num_classes: int, *,
                penalties: Sequence[float], holdout: float, seed: int, max_iter: int, k: int,
                temperature: float) -> List[Dict[str, float]]:
    """Per block, first first: {"block", "probe" (logistic val top-1 %), "knn" (k-NN top-1 %; 0 with k 0), "l2"}."""
    train, val = split_blocks(features["train"], widths), split_blocks(features["val"], widths)
    rows = []
    for index, (train_x, val_x) in enumerate(zip(train, val)):
        probe = logistic_probe(train_x, features["train_labels"], val_x, features["val_labels"], num_classes,
                               penalties, holdout, seed, max_iter)
        knn = knn_accuracy(train_x, features["train_labels"], val_x, features["val_labels"], num_classes, k,
                           temperature)["top1"] if k > 0 else 0.0
        rows.append({"block": index + 1, "probe": probe["top1"], "knn": knn, "l2": probe["l2"]})
    return rows


def layers_table(rows: Dict[str, List[Dict[str, float]]]) -> str:
    """The per-block table, one column pair (probe, k-NN) per encoder ({label: rows})."""
    labels = list(rows)
    head = "block" + "".join(f"  {label + ' probe':>18}  {label + ' k-NN':>18}" for label in labels)
    lines = [head]
    for index in range(len(rows[labels[0]])):
        cells = "".join(f"  {rows[label][index]['probe']:18.2f}  {rows[label][index]['knn']:18.2f}"
                        for label in labels)
        lines.append(f"{index + 1:5d}{cells}")
    return "\n".join(lines)


def plot_layers(rows: Dict[str, List[Dict[str, float]]], path: Path, title: str) -> Optional[Path]:
    """The curves (probe solid, k-NN dashed, one colour per encoder) as a PNG; None where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for colour, (label, series) in zip(("tab:blue", "tab:grey", "tab:orange"), rows.items()):
        blocks = [row["block"] for row in series]
        for kind, style in zip(KINDS, ("-", "--")):
            axis.plot(blocks, [row[kind] for row in series], style, marker="o", color=colour,
                      label=f"{label} {'logistic probe' if kind == 'probe' else 'k-NN'}")
    axis.set(xlabel="block (ViT) / stage", ylabel="val top-1 (%)", title=title)
    axis.set_xticks(blocks)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
