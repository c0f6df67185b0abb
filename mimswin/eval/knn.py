"""Weighted k-NN classification (DINO's protocol) on frozen features: cosine similarity, votes exp(sim / T).

As a program (`python -m mimswin.eval.knn --config tiny_linprobe_cpu --from RUN`) it reads the linear-probe config
(model, data, `knn.k`, `knn.temperature`), encodes train and val once and reports top-1/top-5.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence

import torch
from accelerate.utils import set_seed

from mimswin.data.transforms import eval_transform
from mimswin.errors import ConfigError
from mimswin.eval.common import Stopwatch, log_record, parse_eval_args, start_run, write_results
from mimswin.eval.config import LinprobeConfig
from mimswin.eval.data import labeled_pair
from mimswin.eval.features import extract_features
from mimswin.eval.weights import build_classifier, read_encoder_weights
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
    scores = knn_predict(train_features, train_labels, val_features, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hits = top == val_labels[:, None]
    count = max(1, len(val_labels))
    return {"top1": 100.0 * hits[:, 0].sum().item() / count, "top5": 100.0 * hits.any(dim=1).sum().item() / count}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse, encode train and val once, classify val by k-NN. Returns the results (also in results.json)."""
    cfg, _ = parse_eval_args(LinprobeConfig, "mimswin-knn", "k-NN evaluation of a pretrained encoder's features.",
                             argv)
    if cfg.knn.k < 1:
        raise ConfigError("config key 'knn.k': must be >= 1 for the k-NN program")
    source = read_encoder_weights(cfg.checkpoint)
    accelerator, run_dir, _ = start_run(cfg)
    img_size = cfg.model.img_size or source.timm_kwargs.get("img_size", 224)
    transform = eval_transform(img_size, cfg.data.mean, cfg.data.std, cfg.eval_crop_pct)
    train_set, val_set, num_classes = labeled_pair(cfg.data, transform, transform)
    set_seed(cfg.train.seed)
    encoder, _, name, report = build_classifier(source, cfg.model, 0, pretrained=not cfg.random_init)
    accelerator.print(f"{name} from {'random init' if cfg.random_init else source.source}: {report.describe()}")
    encoder = encoder.to(accelerator.device)
    watch = Stopwatch()
    with watch.time("features_s"):
        args = dict(batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, progress=cfg.train.progress)
        train_f, train_y = extract_features(encoder, train_set, accelerator, **args)
        val_f, val_y = extract_features(encoder, val_set, accelerator, **args)
    with watch.time("knn_s"):
        accuracy = knn_accuracy(train_f, train_y, val_f, val_y, num_classes, cfg.knn.k, cfg.knn.temperature)
    metrics = {f"knn_{key}": value for key, value in accuracy.items()}
    log_record(accelerator, run_dir, {"step": 0, "epoch": 0, **metrics})
    results = {"program": "knn", "checkpoint": str(cfg.checkpoint), "random_init": cfg.random_init,
               "k": cfg.knn.k, "temperature": cfg.knn.temperature, **metrics, "seconds": watch.seconds}
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
