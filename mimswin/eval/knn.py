"""Weighted k-NN classification (DINO's protocol) on frozen features: cosine similarity, votes exp(sim / T).

As a program (`python -m mimswin.eval.knn --config tiny_linprobe_cpu --from RUN`) it reads the linear-probe config
(model, data, `knn.k`, `knn.temperature`), encodes train and val once and reports top-1/top-5.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence

import torch

from mimswin.errors import ConfigError
from mimswin.eval.common import Stopwatch, log_record, parse_eval_args, write_results
from mimswin.eval.config import LinprobeConfig
from mimswin.eval.features import encode_splits, open_frozen_run
from mimswin.eval.metrics import topk_accuracy
from mimswin.program import run_cli

CHUNK = 1024


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, num_classes: int,
                k: int, temperature: float) -> torch.Tensor:
    """Class scores [Q, C]: each of the k most cosine-similar train samples votes exp(sim / T) for its label."""
    bank = torch.nn.functional.normalize(train_features.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(query), CHUNK):
        q = torch.nn.functional.normalize(query[start:start + CHUNK].float(), dim=1)
        sims, index = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, dtype=torch.float32)
        scores.append(votes.scatter_add_(1, train_labels[index], (sims / temperature).exp()))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, num_classes: int, k: int, temperature: float) -> Dict[str, float]:
    """k-NN top-1 and top-5 (%) of the val features against the train features."""
    return topk_accuracy(knn_predict(train_features, train_labels, val_features, num_classes, k, temperature),
                         val_labels)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse, encode train and val once, classify val by k-NN. Returns the results (also in results.json)."""
    cfg, _ = parse_eval_args(LinprobeConfig, "mimswin-knn", "k-NN evaluation of a pretrained encoder's features.",
                             argv)
    if cfg.knn.k < 1:
        raise ConfigError("config key 'knn.k': must be >= 1 for the k-NN program")
    run = open_frozen_run(cfg)
    accelerator, run_dir = run.accelerator, run.run_dir
    watch = Stopwatch()
    with watch.time("features_s"):
        f = encode_splits(run, cfg)
    with watch.time("knn_s"):
        accuracy = knn_accuracy(f["train"], f["train_labels"], f["val"], f["val_labels"], run.num_classes, cfg.knn.k,
                                cfg.knn.temperature)
    metrics = {f"knn_{key}": value for key, value in accuracy.items()}
    log_record(accelerator, run_dir, {"step": 0, "epoch": 0, **metrics})
    results = {"program": "knn", "checkpoint": str(cfg.checkpoint), "random_init": cfg.random_init,
               "k": cfg.knn.k, "temperature": cfg.knn.temperature, "features": run.encoder.features,
               "blocks": run.encoder.blocks, **metrics, "seconds": watch.seconds}
    write_results(accelerator, run_dir, results)
    accelerator.print(f"done: k-NN (k={cfg.knn.k}, T={cfg.knn.temperature}) top-1 {metrics['knn_top1']:.2f}, "
                      f"top-5 {metrics['knn_top5']:.2f}; {run_dir.root}")
    accelerator.end_training()
    return results


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (see `mimswin.program.run_cli`)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
