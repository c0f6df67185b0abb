"""`mimswin knn`: weighted k-NN (DINO's protocol) of a pretrained encoder's frozen features.

`mimswin knn --config tiny_linprobe_cpu --from RUN` reads the linear-probe config (model, data, features, `knn.k`,
`knn.temperature`), encodes train and val once and reports top-1/top-5.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from mimswin.config.evaluation import LinprobeConfig
from mimswin.errors import ConfigError
from mimswin.eval.callbacks import log_record
from mimswin.eval.features import encode_splits, open_frozen_run
from mimswin.eval.knn import knn_accuracy
from mimswin.programs.common import Stopwatch, console_entry, parse_eval_args, write_results


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


cli = console_entry(main)
