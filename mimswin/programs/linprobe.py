"""Probes of a frozen pretrained encoder, in five modes (`mode`):

- `logistic`: the encoder runs once over un-augmented images; a logistic regression on the standardized features is
  solved to convergence (L-BFGS), its L2 strength picked on a held-out tenth of train: the result measures the
  features, not the optimizer's lr.
- `mae`: MAE's recipe. Images go through the frozen encoder every step (train augmentation: random resized crop +
  flip); the head is BatchNorm1d without affine parameters + Linear, trained with LARS and weight decay 0.
- `cached`: the encoder runs once over un-augmented train/val images; the same head is trained on the cached features.
- `attentive`: the encoder's tokens are cached once; an attentive pooler (learned queries, cross-attention, LayerNorm +
  Linear) is trained on them with AdamW per seed, the mean reported (eval/attentive.py).
- `layers`: the logistic probe and k-NN on every block (ViT) or stage, for the encoder and its random init: a table, a
  curve (layers.png) and results.json (eval/layers.py).

k-NN top-1/top-5 (`knn.k` > 0) comes from cached features too; everything lands in metrics.jsonl and results.json.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.optim import Lars
from torch import nn

from mimswin.config.evaluation import LinprobeConfig
from mimswin.data.labeled import feature_dataset, labeled_pair, train_loader
from mimswin.eval.attentive import attentive_probe
from mimswin.eval.callbacks import EvaluateEachEpoch, log_record
from mimswin.eval.classifier import encoder_source
from mimswin.eval.features import FrozenRun, encode_splits, open_frozen_run, probe_encoder
from mimswin.eval.knn import knn_accuracy
from mimswin.eval.layers import KINDS, layers_table, plot_layers, read_layers
from mimswin.eval.logistic import logistic_probe
from mimswin.eval.pooling import ProbeFeatures, pooled_features
from mimswin.programs.common import Stopwatch, console_entry, parse_eval_args, write_results
from mimswin.train.loop import Trainer
from mimswin.train.optim import build_scheduler
from mimswin.train.setup import plan_steps

BN_EPS = 1e-6
HEAD_INIT_STD = 0.01


def probe_head(num_features: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d without affine parameters (a fixed per-feature standardisation) + a Linear classifier."""
    linear = nn.Linear(num_features, num_classes)
    nn.init.trunc_normal_(linear.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(num_features, affine=False, eps=BN_EPS), linear)


class FrozenEncoderProbe(nn.Module):
    """A timm encoder frozen in eval mode, with a trainable head. Features: as a `ProbeFeatures` reads them (its timm
    model is kept as `encoder`, so checkpoints hold `encoder.*` keys), or a timm model's own pooled output
    (`num_classes=0`)."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.spec = (encoder.features, encoder.blocks) if isinstance(encoder, ProbeFeatures) else None
        model = encoder.model if isinstance(encoder, ProbeFeatures) else encoder
        self.encoder = model.requires_grad_(False).eval()
        self.num_features = encoder.num_features
        self.head = probe_head(encoder.num_features, num_classes)

    def train(self, mode: bool = True) -> "FrozenEncoderProbe":
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.spec is None:
                features = self.encoder(images)
            else:
                features = torch.cat(pooled_features(self.encoder, images, *self.spec), dim=1)
        return self.head(features.float())


def build_lars(head: nn.Sequential, lr: float, momentum: float, weight_decay: float) -> Lars:
    """timm's LARS as MAE uses it: the trust ratio on weight matrices (even at weight decay 0), plain SGD on biases."""
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    return Lars([{"params": matrices, "always_adapt": True},
                 {"params": vectors, "always_adapt": False, "weight_decay": 0.0}],
                lr=lr, momentum=momentum, weight_decay=weight_decay)


def cross_entropy_loss(model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The loop core's loss function for both modes: inputs are images (mae) or cached features (cached)."""
    inputs, labels = batch
    return nn.functional.cross_entropy(model(inputs).float(), labels)


class KnnAtEnd:
    """k-NN top-1/top-5 of the cached val features against the cached train features, logged after training."""

    def __init__(self, cfg: LinprobeConfig, features: Dict[str, torch.Tensor], num_classes: int,
                 watch: Stopwatch) -> None:
        self.cfg, self.features, self.num_classes, self.watch = cfg, features, num_classes, watch
        self.result: Dict[str, float] = {}

    def on_train_end(self, trainer: Trainer) -> None:
        f = self.features
        with self.watch.time("knn_s"):
            accuracy = knn_accuracy(f["train"], f["train_labels"], f["val"], f["val_labels"], self.num_classes,
                                    self.cfg.knn.k, self.cfg.knn.temperature)
        self.result = {f"knn_{key}": value for key, value in accuracy.items()}
        record = {"step": trainer.state.step, "epoch": trainer.state.epoch, **self.result}
        trainer.history.append(record)
        log_record(trainer.accelerator, trainer.run_dir, record)


def build_linprobe(cfg: LinprobeConfig, resume: Optional[str] = None
                   ) -> Tuple[Trainer, EvaluateEachEpoch, Optional[KnnAtEnd], Stopwatch]:
    """Everything a trained-head probe run (`mae` or `cached`) needs, wired and (with `resume`) restored, ready for
    `fit()`; in cached mode the features are computed here (again on resume: the frozen encoder gives the same ones)."""
    run = open_frozen_run(cfg, resume, augment=cfg.mode == "mae")
    accelerator = run.accelerator
    probe = FrozenEncoderProbe(run.encoder, run.num_classes).to(accelerator.device)
    watch = Stopwatch()
    features: Dict[str, torch.Tensor] = {}
    if cfg.mode == "cached" or cfg.knn.k > 0:
        with watch.time("features_s"):
            plain_train = run.train_set if cfg.mode == "cached" else labeled_pair(cfg.data, run.plain, run.plain)[0]
            features = encode_splits(run, cfg, plain_train)
    set_seed(cfg.train.seed + accelerator.process_index)
    cached = cfg.mode == "cached"
    if cached:
        model: nn.Module = probe.head
        train_set = feature_dataset(features["train"], features["train_labels"])
        val_set = feature_dataset(features["val"], features["val_labels"])
        workers = 0
    else:
        model, train_set, val_set, workers = probe, run.train_set, run.val_set, cfg.data.num_workers
    data = train_loader(train_set, cfg.data, accelerator.num_processes, accelerator.process_index, cfg.train.seed,
                        accelerator.device, cfg.train.grad_accum_steps, num_workers=workers, features=cached)
    plan = plan_steps(cfg.train, cfg.optim, cfg.data.batch_size, data.batches_per_epoch, accelerator.num_processes)
    optimizer = build_lars(probe.head, plan.lr, cfg.momentum, cfg.optim.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.optim, plan.total_steps, plan.steps_per_epoch)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    meta = probe_meta(cfg, run)
    evaluator = EvaluateEachEpoch(val_set, None if cached else run.step, cfg.data.batch_size, workers,
                                  cfg.train.progress, meta)
    knn = KnnAtEnd(cfg, features, run.num_classes, watch) if cfg.knn.k > 0 else None
    callbacks = [evaluator] + ([knn] if knn is not None else [])
    trainer = Trainer(cfg.train, accelerator, prepared, optimizer, scheduler, data, cross_entropy_loss, run.run_dir,
                      plan.total_steps, cfg.optim.clip_grad, callbacks, meta)
    if run.checkpoint is not None:
        trainer.resume(run.checkpoint)
    accelerator.print(f"linear probe ({cfg.mode}) of {run.timm_name}, {probe.num_features} features, "
                      f"{run.num_classes} classes, {len(train_set)} train samples: {plan.total_steps} steps, "
                      f"{plan.steps_per_epoch} per epoch, effective batch {plan.effective_batch}, lr {plan.lr:.3g}, "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}, run dir {run.run_dir.root}")
    return trainer, evaluator, knn, watch


def probe_meta(cfg: LinprobeConfig, run: FrozenRun) -> Dict[str, Any]:
    """What the run's records say about the probe: program, mode, architecture and the features read."""
    meta = {"program": "linprobe", "mode": cfg.mode, "timm_name": run.timm_name, "timm_kwargs": run.timm_kwargs,
            "num_classes": run.num_classes, "encoder_prefix": "encoder.", "mean": cfg.data.mean, "std": cfg.data.std,
            "features": run.encoder.features, "blocks": run.encoder.blocks}
    return {**meta, "attentive": asdict(cfg.attentive)} if cfg.mode == "attentive" else meta


def run_cached(cfg: LinprobeConfig) -> Tuple[Dict[str, Any], Accelerator]:
    """`mode: logistic` or `attentive`: encode both splits once, fit the probe on the cached features or tokens
    (logistic: the L2-regularised logistic regression, strength picked on a held-out part of train; attentive: one
    pooler per seed), k-NN on the same pooled features (logistic); one record and results.json."""
    run = open_frozen_run(cfg)
    watch = Stopwatch()
    with watch.time("features_s"):
        f = encode_splits(run, cfg)
    with watch.time("train_s"):
        if cfg.mode == "attentive":
            a = cfg.attentive
            probe = attentive_probe(f["train"], f["train_labels"], f["val"], f["val_labels"], run.num_classes,
                                    a.seeds, run.accelerator.device, queries=a.queries, heads=a.heads, lr=a.lr,
                                    weight_decay=a.weight_decay, epochs=a.epochs, batch_size=a.batch_size,
                                    token_drop=a.token_drop, min_steps=a.min_steps)
            logged, best = {"top1_std": probe["top1_std"]}, {}
            fitted = {"seed_top1": probe["seed_top1"], "steps": probe["steps"]}
        else:
            probe = logistic_probe(f["train"], f["train_labels"], f["val"], f["val_labels"], run.num_classes,
                                   cfg.logistic.penalties, cfg.logistic.holdout, cfg.train.seed,
                                   cfg.logistic.max_iter)
            logged = best = {"l2": probe["l2"]}
            fitted = {"holdout_top1": probe["holdout_top1"]}
    metrics = {"val_top1": probe["top1"], "val_top5": probe["top5"], **logged}
    if cfg.knn.k > 0 and cfg.mode == "logistic":
        with watch.time("knn_s"):
            accuracy = knn_accuracy(f["train"], f["train_labels"], f["val"], f["val_labels"], run.num_classes,
                                    cfg.knn.k, cfg.knn.temperature)
        metrics.update({f"knn_{key}": value for key, value in accuracy.items()})
    record = {"step": 0, "epoch": 0, **metrics}
    log_record(run.accelerator, run.run_dir, record)
    knn_part = {k: v for k, v in metrics.items() if k.startswith("knn_")}
    results = {"program": "linprobe", "checkpoint": str(cfg.checkpoint), "random_init": cfg.random_init,
               **probe_meta(cfg, run), "train_samples": len(f["train_labels"]),
               "last": {"val_top1": probe["top1"], "val_top5": probe["top5"]},
               "best": {"top1": probe["top1"], **best}, **logged, **fitted, **knn_part, "seconds": watch.seconds,
               "history": [record]}
    write_results(run.accelerator, run.run_dir, results)
    run.accelerator.end_training()
    return results, run.accelerator


def run_layers(cfg: LinprobeConfig) -> Tuple[Dict[str, Any], Accelerator]:
    """`mode: layers`: pooled features of every block, of the encoder and (unless it is random init already) of the
    same network at random init; per block the logistic probe and k-NN; table printed, curve and results written."""
    run = open_frozen_run(cfg)
    encoders = {"random init" if cfg.random_init else "pretrained": run.encoder}
    if not cfg.random_init:
        set_seed(cfg.train.seed)  # the same random network `random_init=true` reads
        baseline = probe_encoder(encoder_source(cfg), replace(cfg, random_init=True))[0]
        encoders["random init"] = baseline.to(run.accelerator.device)
    watch = Stopwatch()
    rows = {}
    for label, encoder in encoders.items():
        with watch.time("features_s"):
            features = encode_splits(replace(run, encoder=encoder), cfg)
        with watch.time("train_s"):
            rows[label] = read_layers(features, encoder.widths, run.num_classes, penalties=cfg.logistic.penalties,
                                      holdout=cfg.logistic.holdout, seed=cfg.train.seed,
                                      max_iter=cfg.logistic.max_iter, k=cfg.knn.k, temperature=cfg.knn.temperature)
    for index in range(len(rows[next(iter(rows))])):
        record = {"step": index + 1, **{f"{label.replace(' ', '_')}_{kind}_top1": series[index][kind]
                                        for label, series in rows.items() for kind in KINDS}}
        log_record(run.accelerator, run.run_dir, record)
    table = layers_table(rows)
    curve = None
    if run.accelerator.is_main_process:
        curve = plot_layers(rows, run.run_dir.root / "layers.png", f"{run.timm_name}: {run.encoder.features} "
                                                                     f"features per block")
    run.accelerator.print(table)
    pretrained = rows[next(iter(rows))]
    best = {kind: max(pretrained, key=lambda row: row[kind]) for kind in KINDS}
    results = {"program": "linprobe", "checkpoint": str(cfg.checkpoint), "random_init": cfg.random_init,
               **probe_meta(cfg, run), "train_samples": len(features["train_labels"]), "layers": rows,
               "best_block": {kind: best[kind]["block"] for kind in KINDS},
               "last": {"val_top1": pretrained[-1]["probe"]}, "best": {"top1": best["probe"]["probe"]},
               "knn_top1": best["knn"]["knn"], "curve": str(curve) if curve else None, "seconds": watch.seconds}
    write_results(run.accelerator, run.run_dir, results)
    run.accelerator.end_training()
    return results, run.accelerator


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse, build, train the head, evaluate. Returns the results (also written to results.json)."""
    cfg, resume = parse_eval_args(LinprobeConfig, "mimswin-linprobe",
                                  "Linear probe (and k-NN) of a pretrained encoder.", argv, resumable=True)
    if cfg.mode in ("logistic", "attentive"):
        results, accelerator = run_cached(cfg)
    elif cfg.mode == "layers":
        results, accelerator = run_layers(cfg)
        best = results["best_block"]
        missing = "" if results["curve"] else " (no curve: matplotlib is not installed)"
        accelerator.print(f"done: best logistic probe {results['best']['top1']:.2f} at block {best['probe']}, "
                          f"best k-NN {results['knn_top1']:.2f} at block {best['knn']}; {cfg.train.output_dir}"
                          f"{missing}")
        return results
    else:
        trainer, evaluator, knn, watch = build_linprobe(cfg, resume)
        with watch.time("train_s"):
            trainer.fit()
        results = {"program": "linprobe", "mode": cfg.mode, "checkpoint": str(cfg.checkpoint),
                   "random_init": cfg.random_init, "steps": trainer.state.step, "epochs": cfg.train.epochs,
                   "last": evaluator.last, "best": evaluator.best, **(knn.result if knn is not None else {}),
                   "seconds": watch.seconds, "history": trainer.history}
        write_results(trainer.accelerator, trainer.run_dir, results)
        accelerator = trainer.accelerator
    knn_text = f", k-NN top-1 {results['knn_top1']:.2f}" if "knn_top1" in results else ""
    accelerator.print(f"done: probe ({cfg.mode}) val top-1 {results['last'].get('val_top1', float('nan')):.2f} "
                      f"(best {results['best']['top1']:.2f}){knn_text}; {cfg.train.output_dir}")
    return results


cli = console_entry(main)
