"""MAE: a visible-token encoder (ViT or visible-only Swin), a light decoder, MSE on hidden patches' pixels."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mimswin.models.encoder import MaskedEncoder
from mimswin.models.loss import MIMOutput, masked_loss
from mimswin.models.masking import MaskSample, unit_mask
from mimswin.models.online_probe import with_online_probe
from mimswin.models.patches import pixel_targets


class MAE(nn.Module):
    """Masked autoencoder: a visible-token encoder, a light decoder and a loss on normalized pixels of hidden patches.

    The encoder is a ViT (grid = patches) or a visible-only Swin (grid = final-stage cells); each prediction is one
    cell (`target_px` = the encoder's `cell_px`); masks hide squares of `unit_cells` x `unit_cells` cells.
    """

    def __init__(self, encoder: MaskedEncoder, decoder: nn.Module, mask_ratio: float = 0.75,
                 norm_pix: bool = True, unit_cells: int = 1, loss_kind: str = "mse") -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.mask_ratio, self.norm_pix, self.unit_cells, self.loss_kind = mask_ratio, norm_pix, unit_cells, loss_kind

    @property
    def target_px(self) -> int:
        return self.encoder.cell_px

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.grid

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {
            f"decoder.{n}" for n in self.decoder.no_weight_decay()}

    def draw_mask(self, batch: int, device: torch.device, generator: Optional[torch.Generator] = None,
                  ratio: Optional[float] = None) -> MaskSample:
        """A mask of the run's `mask_ratio`, or of `ratio` (0: every unit visible)."""
        ratio = self.mask_ratio if ratio is None else ratio
        return unit_mask(batch, self.grid, self.unit_cells, ratio, device, generator)

    def forward(self, images: torch.Tensor, mask: Optional[MaskSample] = None,
                labels: Optional[torch.Tensor] = None) -> MIMOutput:
        mask = mask if mask is not None else self.draw_mask(images.shape[0], images.device)
        encoded = self.encoder.forward_masked(images, mask.keep)
        pred = self.decoder(encoded.tokens, encoded.positions, encoded.prefix)
        target = pixel_targets(images, self.target_px, self.norm_pix)
        loss = masked_loss(pred, target, mask.hidden, self.loss_kind)
        loss, logits = with_online_probe(self, loss, lambda: encoded.tokens.mean(dim=1), labels)  # visible tokens
        return MIMOutput(loss, pred, target, mask, logits)
