"""Linear probe of a frozen pretrained encoder, on the loop core, in two modes (`mode`):

- `mae`: MAE's recipe. Images go through the frozen encoder every step (train augmentation: random resized crop +
  flip); the head is BatchNorm1d without affine parameters + Linear, trained with LARS and weight decay 0.
- `cached`: the encoder runs once over un-augmented train/val images; the same head is trained on the cached features.

k-NN top-1/top-5 (`knn.k` > 0) comes from cached features too; everything lands in metrics.jsonl and results.json.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.optim import Lars
from torch import nn
from torch.utils.data import Dataset

from mimswin.data.transforms import eval_transform, pretrain_transform
from mimswin.eval.common import EvaluateEachEpoch, Stopwatch, log_record, parse_eval_args, start_run, write_results
from mimswin.eval.config import LinprobeConfig
from mimswin.eval.data import feature_dataset, labeled_pair, train_loader
from mimswin.eval.features import extract_features
from mimswin.eval.knn import knn_accuracy
from mimswin.eval.weights import build_classifier, read_encoder_weights
from mimswin.program import run_cli
from mimswin.train.loop import Trainer
from mimswin.train.optim import build_scheduler, scaled_lr

BN_EPS = 1e-6
HEAD_INIT_STD = 0.01


def probe_head(num_features: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d without affine parameters (a fixed per-feature standardisation) + a Linear classifier."""
    linear = nn.Linear(num_features, num_classes)
    nn.init.trunc_normal_(linear.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(num_features, affine=False, eps=BN_EPS), linear)


class FrozenEncoderProbe(nn.Module):
    """A timm encoder (`num_classes=0`, so it returns pooled features) frozen in eval mode, with a trainable head."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.head = probe_head(encoder.num_features, num_classes)

    def train(self, mode: bool = True) -> "FrozenEncoderProbe":
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.encoder(images)
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


def encode_splits(encoder: nn.Module, train_set: Dataset, val_set: Dataset, accelerator: Accelerator,
                  cfg: LinprobeConfig) -> Dict[str, torch.Tensor]:
    """Cached features and labels of both splits (every rank holds all of them)."""
    args = dict(batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, progress=cfg.train.progress)
    train_f, train_y = extract_features(encoder, train_set, accelerator, desc="train features", **args)
    val_f, val_y = extract_features(encoder, val_set, accelerator, desc="val features", **args)
    return {"train": train_f, "train_labels": train_y, "val": val_f, "val_labels": val_y}


def build_linprobe(cfg: LinprobeConfig, resume: Optional[str] = None
                   ) -> Tuple[Trainer, EvaluateEachEpoch, Optional[KnnAtEnd], Stopwatch]:
    """Everything a probe run needs, wired and (with `resume`) restored, ready for `fit()`; in cached mode the
    features are computed here (again on resume: the frozen encoder gives the same ones)."""
    source = read_encoder_weights(cfg.checkpoint)
    accelerator, run_dir, checkpoint = start_run(cfg, resume)
    img_size = cfg.model.img_size or source.timm_kwargs.get("img_size", 224)
    plain = eval_transform(img_size, cfg.data.mean, cfg.data.std, cfg.eval_crop_pct)
    augmented = pretrain_transform(img_size, cfg.data.crop_scale, cfg.data.hflip, cfg.data.mean, cfg.data.std)
    train_images, val_images, num_classes = labeled_pair(cfg.data, augmented if cfg.mode == "mae" else plain, plain)
    set_seed(cfg.train.seed)
    encoder, kwargs, name, report = build_classifier(source, cfg.model, 0, pretrained=not cfg.random_init)
    accelerator.print(f"{name} from {'random init' if cfg.random_init else source.source}: {report.describe()}")
    probe = FrozenEncoderProbe(encoder, num_classes).to(accelerator.device)
    watch = Stopwatch()
    features: Dict[str, torch.Tensor] = {}
    if cfg.mode == "cached" or cfg.knn.k > 0:
        with watch.time("features_s"):
            plain_train = train_images if cfg.mode == "cached" else labeled_pair(cfg.data, plain, plain)[0]
            features = encode_splits(probe.encoder, plain_train, val_images, accelerator, cfg)
    set_seed(cfg.train.seed + accelerator.process_index)
    if cfg.mode == "cached":
        model: nn.Module = probe.head
        train_set = feature_dataset(features["train"], features["train_labels"])
        val_set = feature_dataset(features["val"], features["val_labels"])
        workers = 0
    else:
        model, train_set, val_set, workers = probe, train_images, val_images, cfg.data.num_workers
    data = train_loader(train_set, cfg.data, accelerator.num_processes, accelerator.process_index, cfg.train.seed,
                        accelerator.device, cfg.train.grad_accum_steps, num_workers=workers)
    steps_per_epoch = data.batches_per_epoch // cfg.train.grad_accum_steps
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    effective_batch = cfg.data.batch_size * cfg.train.grad_accum_steps * accelerator.num_processes
    lr = scaled_lr(cfg.optim, effective_batch)
    optimizer = build_lars(probe.head, lr, cfg.momentum, cfg.optim.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps, steps_per_epoch)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    meta = {"program": "linprobe", "mode": cfg.mode, "timm_name": name, "timm_kwargs": kwargs,
            "num_classes": num_classes, "encoder_prefix": "encoder."}
    evaluator = EvaluateEachEpoch(val_set, cfg.data.batch_size, workers, cfg.train.progress, meta)
    knn = KnnAtEnd(cfg, features, num_classes, watch) if cfg.knn.k > 0 else None
    callbacks = [evaluator] + ([knn] if knn is not None else [])
    trainer = Trainer(cfg.train, accelerator, prepared, optimizer, scheduler, data, cross_entropy_loss, run_dir,
                      total_steps, cfg.optim.clip_grad, callbacks, meta)
    if checkpoint is not None:
        trainer.resume(checkpoint)
    accelerator.print(f"linear probe ({cfg.mode}) of {name}, {probe.encoder.num_features} features, {num_classes} "
                      f"classes, {len(train_set)} train samples: {total_steps} steps, {steps_per_epoch} per epoch, "
                      f"effective batch {effective_batch}, lr {lr:.3g}, {accelerator.num_processes} process(es) on "
                      f"{accelerator.device}, run dir {run_dir.root}")
    return trainer, evaluator, knn, watch


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse, build, train the head, evaluate. Returns the results (also written to results.json)."""
    cfg, resume = parse_eval_args(LinprobeConfig, "mimswin-linprobe",
                                  "Linear probe (and k-NN) of a pretrained encoder.", argv, resumable=True)
    trainer, evaluator, knn, watch = build_linprobe(cfg, resume)
    with watch.time("train_s"):
        trainer.fit()
    results = {"program": "linprobe", "mode": cfg.mode, "checkpoint": str(cfg.checkpoint),
               "random_init": cfg.random_init, "steps": trainer.state.step, "epochs": cfg.train.epochs,
               "last": evaluator.last, "best": evaluator.best, **(knn.result if knn is not None else {}),
               "seconds": watch.seconds, "history": trainer.history}
    write_results(trainer.accelerator, trainer.run_dir, results)
    knn_text = f", k-NN top-1 {knn.result['knn_top1']:.2f}" if knn is not None else ""
    trainer.accelerator.print(f"done: probe val top-1 {evaluator.last.get('val_top1', float('nan')):.2f} (best "
                              f"{evaluator.best['top1']:.2f}){knn_text}; {trainer.run_dir.root}")
    return results


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (see `mimswin.program.run_cli`)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
