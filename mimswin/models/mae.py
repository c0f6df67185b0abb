"""MAE: a visible-token encoder (ViT or visible-only Swin), a light decoder, MSE on hidden patches' pixels."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from mimswin.models.encoder import EncoderOutput, MaskedEncoder
from mimswin.models.loss import MIMOutput, masked_loss
from mimswin.models.masking import MaskSample, unit_mask, with_predicted_subset
from mimswin.models.online_probe import with_online_probe
from mimswin.models.patches import pixel_targets
from mimswin.models.tokens import scatter_tokens


class Reconstruction(NamedTuple):
    """The decoder's predictions placed on the grid [B, N, D] (zero where it did not answer), the targets, the loss over
    the scored cells, and the cells answered [B, N] (None: all)."""

    pred: torch.Tensor
    target: torch.Tensor
    loss: torch.Tensor
    answered: Optional[torch.Tensor]


class MAE(nn.Module):
    """Masked autoencoder: a visible-token encoder, a light decoder and a loss on normalized pixels of hidden patches.

    The encoder is a ViT (grid = patches) or a visible-only Swin (grid = final-stage cells); each prediction is one
    cell (`target_px` = the encoder's `cell_px`); masks hide squares of `unit_cells` x `unit_cells` cells. The decoder
    (self or cross, `decoder(tokens, positions, prefix, queries)`) answers for the cells the method asks: the
    `predict_ratio` share of the hidden ones, drawn with the mask.
    """

    def __init__(self, encoder: MaskedEncoder, decoder: nn.Module, mask_ratio: float = 0.75, norm_pix: bool = True,
                 unit_cells: int = 1, loss_kind: str = "mse", predict_ratio: float = 1.0) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.mask_ratio, self.norm_pix, self.unit_cells, self.loss_kind = mask_ratio, norm_pix, unit_cells, loss_kind
        self.predict_ratio = predict_ratio

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
        """A mask of the run's `mask_ratio`, or of `ratio` (0: every unit visible), with the `predict_ratio` share of
        its hidden cells to predict, both from `generator` (None: the global RNG, which checkpoints restore)."""
        ratio = self.mask_ratio if ratio is None else ratio
        mask = unit_mask(batch, self.grid, self.unit_cells, ratio, device, generator)
        return with_predicted_subset(mask, self.predict_ratio, generator)

    def queries(self, mask: MaskSample) -> Optional[torch.Tensor]:
        """[B, Q] cells the decoder is asked for: the mask's predicted subset, else every hidden cell; None (the whole
        grid) for a decoder that computes every cell anyway."""
        if mask.predict is not None:
            return mask.predict
        return None if self.decoder.answers_whole_grid else mask.hidden_positions()

    def reconstruct(self, images: torch.Tensor, mask: MaskSample, encoded: EncoderOutput) -> Reconstruction:
        """Decode the encoded visible tokens for the queried cells; the loss covers the mask's scored cells."""
        queries = self.queries(mask)
        extra = {"features": encoded.features} if encoded.features else {}
        pred = self.decoder(encoded.tokens, encoded.positions, encoded.prefix, queries, **extra)
        target = pixel_targets(images, self.target_px, self.norm_pix)
        answered = None
        if queries is not None:  # answers for some cells only: placed on the grid, zero elsewhere
            pred = scatter_tokens(pred, queries, pred.new_zeros(pred.shape[-1]), target.shape[1])
            answered = torch.zeros_like(mask.hidden).scatter_(1, queries, True)
        return Reconstruction(pred, target, masked_loss(pred, target, mask.scored, self.loss_kind), answered)

    def forward(self, images: torch.Tensor, mask: Optional[MaskSample] = None,
                labels: Optional[torch.Tensor] = None) -> MIMOutput:
        mask = mask if mask is not None else self.draw_mask(images.shape[0], images.device)
        encoded = self.encoder.forward_masked(images, mask.keep)
        out = self.reconstruct(images, mask, encoded)
        loss, logits = with_online_probe(self, out.loss, lambda: encoded.tokens.mean(dim=1), labels)  # visible tokens
        return MIMOutput(loss, out.pred, out.target, mask, logits, out.answered)
