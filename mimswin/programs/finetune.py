"""Fine-tuning program: the plain timm classifier of a pretrained encoder, trained end to end with timm's recipe parts.

Optionally a probe-initialised head (`head_init: probe`, LP-FT), layer-wise lr decay, drop path, RandAugment or colour
jitter (8-bit RGB), Mixup/CutMix, label smoothing, random erasing, optional EMA, warmup + cosine per step; top-1/top-5
on the val split each epoch; last checkpoint (resumable) and best weights (`best/`). Samples are cropped, flipped and
colour-augmented in the workers; random erasing and Mixup/CutMix work on the normalized batch on the device, so they
serve any channel count.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from mimswin.config.evaluation import FinetuneConfig, check_colour_augment
from mimswin.config.sections import Size
from mimswin.data.build import device_step
from mimswin.data.labeled import labeled_pair, train_loader
from mimswin.data.transforms import eval_transform, finetune_transform
from mimswin.eval.callbacks import EvaluateEachEpoch
from mimswin.eval.classifier import build_classifier, describe_load, encoder_source, input_size
from mimswin.eval.head_init import probe_initialised_head
from mimswin.programs.common import console_entry, parse_eval_args, write_results
from mimswin.train.loop import Trainer
from mimswin.train.optim import build_optimizer, build_scheduler
from mimswin.train.parallel import parallelize
from mimswin.train.perf import optimizer_kwargs
from mimswin.train.setup import plan_steps, record_run, start_run


def sample_transform(cfg: FinetuneConfig, img_size: Size) -> Callable:
    """The workers' part of timm's training transform: random resized crop, flip, RandAugment or colour jitter
    (`aug.color_jitter`; off unless set)."""
    return finetune_transform(img_size, cfg.data.crop_scale, cfg.data.hflip, cfg.aug.auto_augment,
                              cfg.aug.color_jitter, cfg.data.mean)


def build_erasing(cfg: FinetuneConfig, device: torch.device) -> Optional[RandomErasing]:
    """timm's random erasing (one box per image, filled with per-pixel normal noise) on normalized batches."""
    if cfg.aug.reprob <= 0:
        return None
    return RandomErasing(cfg.aug.reprob, mode="pixel", max_count=1, device=str(device))


def build_mixup(cfg: FinetuneConfig, num_classes: int) -> Optional[Mixup]:
    if cfg.aug.mixup <= 0 and cfg.aug.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, label_smoothing=cfg.aug.smoothing,
                 num_classes=num_classes)


def build_criterion(cfg: FinetuneConfig, mixup: Optional[Mixup]) -> nn.Module:
    """Soft-target CE under Mixup (which smooths the targets itself), else label-smoothing CE, else plain CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.aug.smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.aug.smoothing)
    return nn.CrossEntropyLoss()


def classification_loss(criterion: nn.Module, mixup: Optional[Mixup],
                        erasing: Optional[RandomErasing] = None) -> Callable:
    """The loop core's loss function: (model, (images, labels)) -> loss, erasing boxes and mixing the batch first when
    asked."""
    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, targets = batch
        if erasing is not None:
            images = erasing(images.clone())
        if mixup is not None:
            images, targets = mixup(images, targets)
        return criterion(model(images).float(), targets)
    return loss_fn


def few_label_recipe(cfg: FinetuneConfig, subset_size: int, num_processes: int = 1
                     ) -> Tuple[FinetuneConfig, Optional[str]]:
    """The config a labeled-subset fine-tune runs (`few_labels`), and the line that says so (None: the run's own).

    A subset whose epochs would take fewer than `few_labels.min_steps` steps runs about that many in batches of up to
    `few_labels.batch_size` that it fills, so the step budget does not shrink with the label fraction (at 1 % labels
    the tiny preset's own 8 epochs of batch 32 are 8 steps). The lr warms up over the first fifth: at full lr from step
    0, a 3e-3 Swin fine-tune at 10 % labels fell from its probe-initialised head to 17.6 % in 36 steps and ended at
    22.9; warmed up: 42.9."""
    few, data, train = cfg.few_labels, cfg.data, cfg.train
    if (data.label_fraction is None and data.labels_per_class is None) or few.min_steps == 0:
        return cfg, None
    per_step = num_processes * train.grad_accum_steps  # batches one optimizer step takes
    planned = train.epochs * (subset_size // (data.batch_size * per_step))
    if planned >= few.min_steps:
        return cfg, None
    share = subset_size // per_step
    batch = max(1, min(few.batch_size, share - share % 2))
    steps_per_epoch = max(1, subset_size // (batch * per_step))
    epochs = math.ceil(few.min_steps / steps_per_epoch)
    warmup, every = max(1, epochs // 5), max(1, epochs // 4)
    recipe = replace(cfg, data=replace(data, batch_size=batch), train=replace(train, epochs=epochs),
                     optim=replace(cfg.optim, warmup_epochs=warmup), eval_every=every)
    return recipe, (f"few labels: {subset_size} images, {planned} steps at batch {data.batch_size} x {train.epochs} "
                    f"epochs -> about {few.min_steps} (few_labels.min_steps): batch {batch}, {epochs} epochs of "
                    f"{steps_per_epoch} steps, warm-up {warmup} epoch(s), evaluated every {every}")


def build_finetune(cfg: FinetuneConfig, resume: Optional[str] = None) -> tuple[Trainer, EvaluateEachEpoch]:
    """Everything a fine-tuning run needs, wired and (with `resume`, see `mimswin.train.setup.resume_point`) restored,
    EMA weights and best-so-far record included, ready for `fit()`."""
    source = encoder_source(cfg)
    check_colour_augment(cfg)
    accelerator, run_dir, checkpoint = start_run(cfg.train, resume)
    img_size = input_size(cfg.model, source)
    plain, step = eval_transform(img_size, cfg.eval_crop_pct), device_step(cfg.data)
    train_set, val_set, num_classes = labeled_pair(cfg.data, sample_transform(cfg, img_size), plain)
    cfg, recipe = few_label_recipe(cfg, len(train_set), accelerator.num_processes)
    if recipe is not None:
        accelerator.print(recipe)
    record_run(accelerator, run_dir, cfg)
    set_seed(cfg.train.seed)
    model, kwargs, name, report = build_classifier(source, cfg.model, num_classes, pretrained=not cfg.random_init)
    accelerator.print(describe_load(name, source, cfg.random_init, report))
    if cfg.head_init == "probe" and checkpoint is None:
        l2 = probe_initialised_head(model, labeled_pair(cfg.data, plain, plain)[0], num_classes, accelerator,
                                    cfg.data.batch_size, cfg.data.num_workers, step, cfg.train.seed)
        accelerator.print(f"head initialised to the logistic probe of the frozen features (L2 {l2:g})")
    set_seed(cfg.train.seed + accelerator.process_index)
    data = train_loader(train_set, cfg.data, accelerator.num_processes, accelerator.process_index, cfg.train.seed,
                        accelerator.device, cfg.train.grad_accum_steps)
    plan = plan_steps(cfg.train, cfg.optim, cfg.data.batch_size, data.batches_per_epoch, accelerator.num_processes)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay is not None else None
    if ema is not None:
        ema.module.to(accelerator.device)
    prepared = parallelize(model, cfg.train, accelerator)
    optimizer = build_optimizer(model, cfg.optim, plan.lr,
                                layer_decay=cfg.layer_decay if cfg.layer_decay < 1 else None,
                                **optimizer_kwargs(cfg.optim, accelerator.device))
    scheduler = build_scheduler(optimizer, cfg.optim, plan.total_steps, plan.steps_per_epoch)
    optimizer = accelerator.prepare_optimizer(optimizer)
    mixup = build_mixup(cfg, num_classes)
    meta = {"program": "finetune", "timm_name": name, "timm_kwargs": kwargs, "num_classes": num_classes,
            "mean": cfg.data.mean, "std": cfg.data.std}
    evaluator = EvaluateEachEpoch(val_set, step, cfg.data.batch_size, cfg.data.num_workers, cfg.train.progress, meta,
                                  ema, cfg.eval_every)
    loss_fn = classification_loss(build_criterion(cfg, mixup), mixup, build_erasing(cfg, accelerator.device))
    trainer = Trainer(cfg.train, accelerator, prepared, optimizer, scheduler, data, loss_fn, run_dir,
                      plan.total_steps, cfg.optim.clip_grad, [evaluator], meta)
    if checkpoint is not None:
        trainer.resume(checkpoint)
    accelerator.print(f"fine-tuning {name} on {len(train_set)} images, {num_classes} classes: {plan.total_steps} "
                      f"steps, {plan.steps_per_epoch} per epoch, effective batch {plan.effective_batch}, lr "
                      f"{plan.lr:.3g}, layer decay "
                      f"{cfg.layer_decay}, {accelerator.num_processes} process(es) on {accelerator.device} "
                      f"({cfg.train.strategy}), "
                      f"run dir {run_dir.root}")
    return trainer, evaluator


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse, build, fine-tune, evaluate. Returns the results (also written to results.json)."""
    cfg, resume = parse_eval_args(FinetuneConfig, "mimswin-finetune",
                                  "Fine-tune a pretrained encoder as a timm classifier.", argv, resumable=True)
    trainer, evaluator = build_finetune(cfg, resume)
    trainer.fit()
    best = {k: v for k, v in evaluator.best.items()}
    results = {"program": "finetune", "checkpoint": str(cfg.checkpoint), "random_init": cfg.random_init,
               "steps": trainer.state.step, "epochs": trainer.cfg.epochs, "last": evaluator.last, "best": best,
               "history": trainer.history}
    write_results(trainer.accelerator, trainer.run_dir, results)
    trainer.accelerator.print(f"done: val top-1 {evaluator.last.get('val_top1', float('nan')):.2f} (best "
                              f"{best['top1']:.2f} at step {best.get('step')}); {trainer.run_dir.root}")
    return results


cli = console_entry(main)
