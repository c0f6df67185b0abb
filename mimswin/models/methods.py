"""MIM methods: (images, mask) -> loss and predictions. The loop core sees only the loss; pictures use the rest."""

from __future__ import annotations

from typing import Optional, Union

import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimswin.config import PretrainConfig
from mimswin.errors import ConfigError
from mimswin.masking import MaskSample, unit_mask
from mimswin.models.decoders import MAEDecoder
from mimswin.models.loss import MIMOutput, masked_loss
from mimswin.models.simmim import MaskTokenEncoder, SimMIM
from mimswin.models.swin import VisibleSwin
from mimswin.models.vit import MaskedViT, create_timm_encoder
from mimswin.patches import pixel_targets

__all__ = ["MAE", "MIMOutput", "SimMIM", "build_method", "masked_loss"]

SIMMIM_MASK_UNIT = 32


class MAE(nn.Module):
    """Masked autoencoder: a visible-token encoder, a light decoder and a loss on normalized pixels of hidden patches.

    The encoder is a ViT (grid = patches) or a visible-only Swin (grid = final-stage cells); masks hide squares of
    `mask_unit` x `mask_unit` grid cells.
    """

    def __init__(self, encoder: Union[MaskedViT, VisibleSwin], decoder: MAEDecoder, mask_ratio: float = 0.75,
                 norm_pix: bool = True, mask_unit: int = 1, loss_kind: str = "mse") -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.mask_ratio, self.norm_pix, self.mask_unit, self.loss_kind = mask_ratio, norm_pix, mask_unit, loss_kind

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
        return unit_mask(batch, self.grid, self.mask_unit, self.mask_ratio, device, generator)

    def forward(self, images: torch.Tensor, mask: Optional[MaskSample] = None) -> MIMOutput:
        mask = mask if mask is not None else self.draw_mask(images.shape[0], images.device)
        encoded = self.encoder.forward_masked(images, mask.keep)
        pred = self.decoder(encoded.tokens, encoded.positions, encoded.prefix)
        target = pixel_targets(images, self.patch_size, self.norm_pix)
        return MIMOutput(masked_loss(pred, target, mask.hidden, self.loss_kind), pred, target, mask)


def mask_unit_cells(unit_px: Optional[int], cell_px: int, grid: tuple[int, int]) -> int:
    """`mask.unit` in px -> grid cells per unit side (unset: one cell), or one clear ConfigError."""
    if unit_px is None:
        return 1
    cells = unit_px // cell_px
    if unit_px % cell_px or grid[0] % cells or grid[1] % cells:
        raise ConfigError(f"config key 'mask.unit': {unit_px} px must be a multiple of the {cell_px} px grid cell "
                          f"and tile the {grid[0]}x{grid[1]} grid")
    return cells


def build_method(cfg: PretrainConfig) -> Union[MAE, SimMIM]:
    """The pretraining model a config describes, with freshly initialised weights (never downloaded)."""
    m = cfg.model
    model = create_timm_encoder(m.name, m.img_size, m.patch_size, m.drop_path_rate, m.kwargs)
    in_chans = model.patch_embed.proj.in_channels
    if cfg.method == "simmim":
        unit = cfg.mask.unit or SIMMIM_MASK_UNIT
        return SimMIM(MaskTokenEncoder(model), unit, cfg.mask.ratio, cfg.loss.norm_pix, cfg.loss.kind or "l1",
                      in_chans)
    if isinstance(model, SwinTransformer):
        encoder: Union[MaskedViT, VisibleSwin] = VisibleSwin(model)
    elif isinstance(model, VisionTransformer):
        encoder = MaskedViT(model)
    else:
        raise ConfigError(f"config key 'model.name': MAE needs a timm VisionTransformer or SwinTransformer, "
                          f"got {type(model).__name__}")
    decoder = MAEDecoder(encoder.embed_dim, encoder.grid, encoder.patch_size ** 2 * in_chans, cfg.decoder.dim,
                         cfg.decoder.depth, cfg.decoder.heads, cfg.decoder.mlp_ratio, encoder.num_prefix_tokens)
    unit = mask_unit_cells(cfg.mask.unit, encoder.patch_size, encoder.grid)
    return MAE(encoder, decoder, cfg.mask.ratio, cfg.loss.norm_pix, unit, cfg.loss.kind or "mse")
