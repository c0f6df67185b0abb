"""Attentive probe: a few learned queries attend to a frozen encoder's tokens (multi-head cross-attention), their
outputs are concatenated, then LayerNorm + Linear. It reads information a linear layer on pooled features cannot (MAE's
features are known to need it: V-JEPA, AIM and the efficient-probing work evaluate this way). Trained with AdamW and a
cosine schedule on cached tokens, once per seed; the result is the mean over seeds."""

from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional, Sequence

import torch
from einops import rearrange
from timm.layers import trunc_normal_
from torch import nn

from mimswin.errors import ConfigError
from mimswin.eval.metrics import topk_accuracy

QUERY_INIT_STD = 0.02
WARMUP_FRACTION = 0.1
STD_EPS = 1e-6
MOST_HEADS = 12


class AttentivePooler(nn.Module):
    """tokens [B, N, D] -> class scores [B, classes].

    Multi-head cross-attention from `queries` learned queries to the tokens, standardized per channel with the train
    tokens' statistics. A key projection in front of a learned query is a reparametrisation of the query
    (q . W x = (W^T q) . x), so each head's query lives in the token space directly; the value projection is applied
    to each head's attention-weighted token mean (the same as weighting projected tokens, cheaper). The queries'
    outputs are concatenated, then LayerNorm + Linear. No position enters here: a token's position is whatever the
    encoder wrote into it, so the result does not depend on the token order.
    """

    def __init__(self, dim: int, num_classes: int, queries: int = 8, heads: Optional[int] = None) -> None:
        super().__init__()
        heads = default_heads(dim) if heads is None else heads
        if heads < 1 or dim % heads:
            raise ConfigError(f"config key 'attentive.heads': {heads} heads must divide the token width {dim}")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.queries = nn.Parameter(trunc_normal_(torch.zeros(queries, heads, dim), std=QUERY_INIT_STD))
        self.value = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(queries * dim)
        self.head = nn.Linear(queries * dim, num_classes)

    @torch.no_grad()
    def standardize_with(self, tokens: torch.Tensor) -> "AttentivePooler":
        """Per-channel mean and std of train tokens [N, T, D] (each chunk read as float32), kept as buffers."""
        flat = tokens.reshape(-1, tokens.shape[-1])
        total = torch.zeros(2, flat.shape[1], dtype=torch.float64)
        for start in range(0, len(flat), 65536):
            chunk = flat[start:start + 65536].double()
            total += torch.stack([chunk.sum(0), chunk.pow(2).sum(0)])
        mean = total[0] / len(flat)
        std = (total[1] / len(flat) - mean.pow(2)).clamp_min(0).sqrt()
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(STD_EPS))
        return self

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, queries, D]: per query, each head's value of its attention-weighted token mean."""
        x = (tokens - self.mean) / self.std
        weights = (torch.einsum("bnc,qhc->bqhn", x, self.queries) * self.scale).softmax(dim=-1)
        means = torch.einsum("bqhn,bnc->bqhc", weights, x)  # [B, queries, heads, D]
        value = rearrange(self.value.weight, "(h e) c -> h e c", h=self.heads)
        heads = torch.einsum("bqhc,hec->bqhe", means, value)  # [B, queries, heads, D / heads]
        return rearrange(heads, "b q h e -> b q (h e)") + self.value.bias

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.pool(tokens).flatten(1)))


def cosine_lr(step: int, total: int, lr: float) -> float:
    """Linear warmup over the first tenth of the steps, then cosine decay to zero."""
    warmup = max(1, int(total * WARMUP_FRACTION))
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def drop_tokens(tokens: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A random `fraction` of each sample's tokens left out (at least one kept): the probe's augmentation."""
    keep = max(1, round(tokens.shape[1] * (1 - fraction)))
    if fraction <= 0 or keep == tokens.shape[1]:
        return tokens
    chosen = torch.rand(tokens.shape[:2], generator=generator).argsort(dim=1)[:, :keep]
    return tokens.gather(1, chosen[..., None].expand(-1, -1, tokens.shape[2]))


def default_heads(dim: int, most: int = MOST_HEADS) -> int:
    """The most heads, up to `most`, that divide a token width (measured best at 12 on ViT-Tiny's 192)."""
    return max(h for h in range(1, most + 1) if dim % h == 0)


def train_pooler(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, *, queries: int,
                 heads: Optional[int], lr: float, weight_decay: float, epochs: int, batch_size: int,
                 token_drop: float, seed: int, min_steps: int = 0,
                 device: torch.device | str = "cpu") -> AttentivePooler:
    """One pooler trained on cached tokens [N, T, D] (any float dtype; batches are read as float32) with AdamW, the
    cosine schedule, cross-entropy and `token_drop` of each sample's tokens left out, for `epochs` or as many more as
    `min_steps` optimizer steps take (a small labeled subset is a batch or two per epoch); seeded (init, batch order,
    dropped tokens). The pooler's `steps` says how many it took."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pooler = AttentivePooler(train_x.shape[-1], num_classes, queries, heads).standardize_with(train_x).to(device)
    decay = [p for name, p in pooler.named_parameters() if name in ("value.weight", "head.weight")]
    rest = [p for name, p in pooler.named_parameters() if name not in ("value.weight", "head.weight")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=lr)
    per_epoch = math.ceil(len(train_y) / batch_size)
    epochs = max(epochs, math.ceil(min_steps / per_epoch))
    total, step = epochs * per_epoch, 0
    for _ in range(epochs):
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, lr)
            logits = pooler(drop_tokens(train_x[index], token_drop, generator).to(device, torch.float32))
            loss = nn.functional.cross_entropy(logits, train_y[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    pooler.steps = step
    return pooler.eval().requires_grad_(False)


@torch.no_grad()
def pooler_scores(pooler: AttentivePooler, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Class scores [N, classes] of cached tokens, batch by batch on the pooler's device."""
    device = pooler.head.weight.device
    parts = [pooler(tokens[i:i + batch_size].to(device, torch.float32)).cpu()
             for i in range(0, len(tokens), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, pooler.head.out_features)


def attentive_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                    num_classes: int, seeds: Sequence[int], device: torch.device | str = "cpu",
                    **hyper: float) -> Dict[str, object]:
    """Val top-1/top-5 (%) of the attentive probe, mean over one pooler per seed, with each seed's top-1 and the
    optimizer steps each took."""
    per_seed: List[Dict[str, float]] = []
    for seed in seeds:
        pooler = train_pooler(train_x, train_y, num_classes, seed=seed, device=device, **hyper)
        per_seed.append(topk_accuracy(pooler_scores(pooler, val_x, int(hyper["batch_size"])), val_y))
        steps = pooler.steps
    top1 = [r["top1"] for r in per_seed]
    spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
    return {"top1": statistics.mean(top1), "top5": statistics.mean(r["top5"] for r in per_seed), "top1_std": spread,
            "seed_top1": top1, "steps": steps}
