"""Weighted k-NN classification (DINO's protocol) on frozen features: cosine similarity, votes exp(sim / T)."""

from __future__ import annotations

from typing import Dict

import torch

from mimswin.eval.metrics import topk_accuracy

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

