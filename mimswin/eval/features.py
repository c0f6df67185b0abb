"""Features of a frozen encoder over a whole dataset, computed once and shared by every process."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mimswin.data.batches import DeviceStep
from mimswin.data.build import device_step
from mimswin.data.labeled import LabeledData, labeled_pair, rank_loader
from mimswin.data.transforms import eval_transform, pretrain_transform
from mimswin.eval.classifier import LoadReport, build_classifier, describe_load, encoder_source, input_size
from mimswin.eval.pooling import ProbeFeatures, ProbeTokens, depth_of
from mimswin.runs.layout import RunDir
from mimswin.runs.open import EncoderWeights
from mimswin.train.setup import record_run, start_run

if TYPE_CHECKING:
    from mimswin.config.evaluation import LinprobeConfig


TOKEN_DTYPE = torch.float16  # cached tokens: half the memory of float32; a probe reads each batch as float32


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: Dataset, accelerator: Accelerator, batch_size: int,
                     num_workers: int, step: DeviceStep, progress: bool = False, desc: str = "features",
                     dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(features [N, ...] in `dtype`, labels [N]) of every sample on every rank, in dataset order (unreadable ones
    skipped): pooled features [N, D], or tokens [N, T, D] from `ProbeTokens`.

    Each rank encodes its share (indices rank, rank + world, ...); the shares are padded, gathered and interleaved back.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    loader = rank_loader(dataset, batch_size, num_workers, accelerator.process_index, accelerator.num_processes, step,
                         accelerator.device)
    show = progress and accelerator.is_main_process
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True):
        with accelerator.autocast():
            feats.append(encoder(images).to(dtype))
        labels.append(targets)
    encoder.train(was_training)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    local_f, local_y = torch.cat(feats), torch.cat(labels)
    if accelerator.num_processes == 1:
        return local_f.cpu(), local_y.cpu()
    count = torch.tensor([len(local_y)], device=accelerator.device)
    counts = accelerator.gather(count).tolist()
    padded_f = accelerator.pad_across_processes(local_f, dim=0)
    padded_y = accelerator.pad_across_processes(local_y, dim=0, pad_index=-1)
    width = padded_f.shape[0]
    all_f = accelerator.gather(padded_f).reshape(len(counts), width, *padded_f.shape[1:]).transpose(0, 1)
    all_y = accelerator.gather(padded_y).reshape(len(counts), width).transpose(0, 1)
    valid = torch.arange(width, device=all_y.device)[:, None] < torch.tensor(counts, device=all_y.device)[None, :]
    return all_f[valid].cpu(), all_y[valid].cpu()


def feature_pool(cfg: "LinprobeConfig", has_token: bool) -> str:
    """The configured `features.pool`, else the one `model.global_pool` names, else cls+avg / avg (no class token)."""
    if cfg.features.pool is not None:
        return cfg.features.pool
    if cfg.model.global_pool is not None:
        return {"token": "cls", "avg": "avg"}[cfg.model.global_pool]
    return "cls+avg" if has_token else "avg"


def probe_encoder(source: EncoderWeights, cfg: "LinprobeConfig"
                  ) -> Tuple[ProbeFeatures | ProbeTokens, Dict[str, Any], str, LoadReport]:
    """The frozen feature reader of a probe or k-NN run: the plain timm model of the checkpoint (class-token pooling
    where it has one, so the pretrained final norm is kept) wrapped to pool as `features` asks, or to give its tokens
    (`mode: attentive`); `mode: layers` pools every block.
    Returns (features module, timm kwargs, timm name, load report)."""
    has_token = "cls_token" in source.weights
    pool = cfg.model.global_pool or ("token" if has_token else "avg")
    model, kwargs, name, report = build_classifier(source, replace(cfg.model, global_pool=pool), 0,
                                                   pretrained=not cfg.random_init)
    if cfg.mode == "attentive":
        features: ProbeFeatures | ProbeTokens = ProbeTokens(model, cfg.attentive.blocks)
    else:  # `mode: layers` reads every block
        blocks = depth_of(model) if cfg.mode == "layers" else cfg.features.blocks
        features = ProbeFeatures(model, feature_pool(cfg, has_token), blocks)
    return features.requires_grad_(False).eval(), kwargs, name, report


@dataclass
class FrozenRun:
    """What every frozen-encoder evaluation (probe, k-NN) starts from: the run, both splits and the feature reader."""

    accelerator: Accelerator
    run_dir: RunDir
    checkpoint: Optional[Path]
    train_set: LabeledData
    val_set: LabeledData
    num_classes: int
    encoder: ProbeFeatures | ProbeTokens
    timm_name: str
    timm_kwargs: Dict[str, Any]
    plain: Callable
    step: DeviceStep


def open_frozen_run(cfg: "LinprobeConfig", resume: Optional[str] = None, augment: bool = False) -> FrozenRun:
    """Read the encoder, start the run, build both splits (train augmented as in pretraining with `augment`, else the
    plain eval view) and the frozen feature reader on the run's device."""
    source = encoder_source(cfg)
    accelerator, run_dir, checkpoint = start_run(cfg.train, resume)
    record_run(accelerator, run_dir, cfg)
    img_size = input_size(cfg.model, source)
    plain = eval_transform(img_size, cfg.eval_crop_pct)
    train_transform = pretrain_transform(img_size, cfg.data.crop_scale, cfg.data.hflip) if augment else plain
    train_set, val_set, num_classes = labeled_pair(cfg.data, train_transform, plain)
    set_seed(cfg.train.seed)
    encoder, kwargs, name, report = probe_encoder(source, cfg)
    accelerator.print(f"{describe_load(name, source, cfg.random_init, report)}; features {encoder.features} of the "
                      f"last {encoder.blocks} block(s), {encoder.num_features} wide")
    if cfg.train.strategy == "fsdp":
        accelerator.print("train.strategy=fsdp: the frozen encoder and the probe stay whole on every rank (features "
                          "are read without gradients; sharding serves pretraining and fine-tuning)")
    return FrozenRun(accelerator, run_dir, checkpoint, train_set, val_set, num_classes,
                     encoder.to(accelerator.device), name, kwargs, plain, device_step(cfg.data))


def encode_splits(run: FrozenRun, cfg: "LinprobeConfig", train_set: Optional[LabeledData] = None
                  ) -> Dict[str, torch.Tensor]:
    """Cached features (tokens in float16) and labels of both splits (every rank holds all of them)."""
    args = dict(batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, step=run.step,
                progress=cfg.train.progress,
                dtype=TOKEN_DTYPE if isinstance(run.encoder, ProbeTokens) else torch.float32)
    train_f, train_y = extract_features(run.encoder, train_set if train_set is not None else run.train_set,
                                        run.accelerator, desc="train features", **args)
    val_f, val_y = extract_features(run.encoder, run.val_set, run.accelerator, desc="val features", **args)
    return {"train": train_f, "train_labels": train_y, "val": val_f, "val_labels": val_y}
