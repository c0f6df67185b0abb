"""MIM methods: (images, mask) -> loss and predictions. The loop core sees only the loss; pictures use the rest."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from mimswin.config import PretrainConfig
from mimswin.masking import MaskSample, random_mask
from mimswin.models.decoders import MAEDecoder
from mimswin.models.vit import MaskedViT, create_timm_encoder
from mimswin.patches import pixel_targets


class MIMOutput(NamedTuple):
    loss: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    mask: MaskSample


def masked_mse(pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Mean over hidden patches of the per-patch mean squared error."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    weights = hidden.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum()


class MAE(nn.Module):
    """Masked autoencoder: a visible-token encoder, a light decoder and MSE on normalized pixels of hidden patches."""

    def __init__(self, encoder: MaskedViT, decoder: MAEDecoder, mask_ratio: float = 0.75,
                 norm_pix: bool = True) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.mask_ratio, self.norm_pix = mask_ratio, norm_pix

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.grid

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {
            f"decoder.{n}" for n in self.decoder.no_weight_decay()}

    def draw_mask(self, batch: int, device: torch.device, generator: Optional[torch.Generator] = None) -> MaskSample:
        return random_mask(batch, self.encoder.num_patches, self.mask_ratio, device, generator)

    def forward(self, images: torch.Tensor, mask: Optional[MaskSample] = None) -> MIMOutput:
        mask = mask if mask is not None else self.draw_mask(images.shape[0], images.device)
        encoded = self.encoder.forward_masked(images, mask.keep)
        pred = self.decoder(encoded.tokens, encoded.positions, encoded.prefix)
        target = pixel_targets(images, self.patch_size, self.norm_pix)
        return MIMOutput(masked_mse(pred, target, mask.hidden), pred, target, mask)


def build_method(cfg: PretrainConfig) -> MAE:
    """The pretraining model a config describes, with freshly initialised weights (never downloaded)."""
    m = cfg.model
    encoder = MaskedViT(create_timm_encoder(m.name, m.img_size, m.patch_size, m.drop_path_rate, m.kwargs))
    in_chans = encoder.model.patch_embed.proj.in_channels
    decoder = MAEDecoder(encoder.embed_dim, encoder.grid, encoder.patch_size ** 2 * in_chans, cfg.decoder.dim,
                         cfg.decoder.depth, cfg.decoder.heads, cfg.decoder.mlp_ratio, encoder.num_prefix_tokens)
    return MAE(encoder, decoder, cfg.mask.ratio, cfg.loss.norm_pix)
