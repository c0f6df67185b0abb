"""MAE on timm's Hiera (Ryali et al. 2023): hide random mask units, encode the visible ones, fuse the stages at the
final-stage resolution, decode the full final-stage grid, and regress the normalized pixels of the hidden units.

The prediction grid is the final-stage token grid: each token predicts its own footprint of patch stride x
q_stride^q_pool px (16 px for Hiera-B at 224 with MAE's q_pool 2, 4 px for the tiny CPU preset), so `target_px`,
`grid` and the mask of `MIMOutput` all refer to that grid and a mask unit covers `unit_cells` x `unit_cells` of it.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from einops import rearrange
from timm.models import checkpoint_seq
from torch import nn

from mimswin.config.pretrain import PretrainConfig
from mimswin.config.sections import size_pair
from mimswin.errors import ConfigError
from mimswin.models.cross_decoder import CrossDecoder
from mimswin.models.decoders import answers_for, decoder_trunk, mae_init
from mimswin.models.encoder import EncoderOutput
from mimswin.models.hiera import MaskedHiera
from mimswin.models.loss import MIMOutput
from mimswin.models.mae import MAE
from mimswin.models.masking import MaskSample
from mimswin.models.online_probe import with_online_probe
from mimswin.models.tokens import scatter_tokens


def fused_stages(num_stages: int, q_pool: int) -> List[int]:
    """The stages the decoder sums (Hiera's choice): those followed by a q-pool, and the last one."""
    return [*range(min(q_pool, num_stages - 1)), num_stages - 1]


class StageFusion(nn.ModuleList):
    """Hiera's multi-scale fusion: each fused stage pooled to the final resolution by a strided conv inside its mask
    unit (the last stage as it is) and projected to the last stage's width; the stages summed."""

    def __init__(self, stage_dims: Sequence[int], stage_sides: Sequence[int], fused: Sequence[int]) -> None:
        side, last = stage_sides[-1], len(stage_dims) - 1
        super().__init__([nn.Conv2d(stage_dims[s], stage_dims[-1], stage_sides[s] // side, stage_sides[s] // side)
                          if s != last else nn.Identity() for s in fused])
        self.fused = list(fused)

    def forward(self, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stage outputs [B, L, side_s, side_s, C_s] -> their sum at the final resolution [B, L, side, side, C]."""
        total = 0
        for head, stage in zip(self, (stages[s] for s in self.fused)):
            if not isinstance(head, nn.Identity):
                batch, units = stage.shape[:2]
                stage = head(rearrange(stage, "b l h w c -> (b l) c h w"))
                stage = rearrange(stage, "(b l) c h w -> b l h w c", b=batch, l=units)
            total = total + stage
        return total


def unit_cells(units: torch.Tensor, positions: torch.Tensor, unit_grid: tuple[int, int]) -> tuple:
    """Units [B, L, side, side, C] at unit `positions` [B, L] -> their cells as tokens [B, L * side^2, C] and each
    cell's raster index on the final-stage grid [B, L * side^2] (unit by unit, cells in raster order within a unit)."""
    side, cols = units.shape[2], unit_grid[1]
    offsets = torch.arange(side, device=positions.device)
    rows = (positions // cols)[:, :, None, None] * side + offsets[:, None]  # [B, L, side, 1]
    columns = (positions % cols)[:, :, None, None] * side + offsets  # [B, L, 1, side]
    cells = rows * (cols * side) + columns
    return rearrange(units, "b l h w c -> b (l h w) c"), cells.flatten(1)


class HieraMAEDecoder(nn.Module):
    """Multi-scale fusion (`fusion`, applied and normed by the caller), then a light transformer over the final-stage
    grid: the fused cells embedded, placed at their own cells among mask tokens, given a learned position embedding,
    decoded."""

    answers_whole_grid = True  # it computes every cell whatever it is asked for

    def __init__(self, stage_dims: Sequence[int], stage_sides: Sequence[int], fused: Sequence[int],
                 unit_grid: tuple[int, int], out_dim: int, dim: int = 512, depth: int = 8, heads: int = 16,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.unit_grid, self.side = unit_grid, stage_sides[-1]
        self.fusion = StageFusion(stage_dims, stage_sides, fused)
        self.embed = nn.Linear(stage_dims[-1], dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_cells, dim))
        self.blocks, self.norm, self.pred = decoder_trunk(dim, depth, heads, mlp_ratio, out_dim)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE init (`mae_init`, fusion convs as matrices) and N(0, .02) mask token and position embedding."""
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        mae_init(self)

    @property
    def grid(self) -> tuple[int, int]:
        return self.unit_grid[0] * self.side, self.unit_grid[1] * self.side

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1]

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (timm's switch name)."""
        self.grad_checkpointing = enable

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, prefix: torch.Tensor,
                queries: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normed fused cells [B, L, C] at final-grid `positions` [B, L] (Hiera has no prefix: [B, 0, C]) ->
        predictions [B, Q, out_dim] for the cells at `queries` [B, Q] (None: every cell, [B, N, out_dim])."""
        x = scatter_tokens(self.embed(tokens), positions, self.mask_token, self.num_cells) + self.pos_embed
        x = checkpoint_seq(self.blocks, x) if self.grad_checkpointing else self.blocks(x)
        return answers_for(self.pred(self.norm(x)), queries)


class HieraCrossDecoder(CrossDecoder):
    """Hiera's multi-scale fusion (`fusion`, applied and normed by the caller), then the cross decoder: queries for
    the predicted cells read the fused visible cells."""

    def __init__(self, stage_dims: Sequence[int], stage_sides: Sequence[int], fused: Sequence[int],
                 grid: tuple[int, int], out_dim: int, dim: int = 512, depth: int = 8, heads: int = 16,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__(stage_dims[-1], grid, out_dim, dim, depth, heads, mlp_ratio, prefix_tokens=0)
        self.fusion = StageFusion(stage_dims, stage_sides, fused)
        mae_init(self.fusion)


class HieraMAE(MAE):
    """Hiera's MAE: a visible-units encoder, the fusion decoder (self or cross) and a loss on normalized pixels of
    hidden units. Masks hide whole units: side x side cells of the final-stage prediction grid (side: the last
    stage's tokens per unit side)."""

    def __init__(self, encoder: MaskedHiera, decoder: nn.Module, mask_ratio: float = 0.6, norm_pix: bool = True,
                 loss_kind: str = "mse", predict_ratio: float = 1.0) -> None:
        super().__init__(encoder, decoder, mask_ratio, norm_pix, encoder.stage_sides[-1], loss_kind, predict_ratio)

    def visible_units(self, mask: MaskSample) -> torch.Tensor:
        """[B, L] indices of the mask units a prediction-grid mask leaves visible (it must hide whole units)."""
        cells = self.unit_cells
        hidden = mask.hidden.view(-1, self.grid[0] // cells, cells, self.grid[1] // cells, cells)[:, :, 0, :, 0]
        count = mask.keep.shape[1] // cells ** 2
        return torch.argsort(hidden.flatten(1).to(torch.int8), dim=1, stable=True)[:, :count]

    def forward(self, images: torch.Tensor, mask: Optional[MaskSample] = None,
                labels: Optional[torch.Tensor] = None) -> MIMOutput:
        mask = mask if mask is not None else self.draw_mask(images.shape[0], images.device)
        encoded = self.encoder.forward_masked(images, self.visible_units(mask))
        fused = self.encoder.norm(self.decoder.fusion(encoded.stages))
        tokens, cells = unit_cells(fused, encoded.positions, self.encoder.unit_grid)
        out = self.reconstruct(images, mask, EncoderOutput(tokens, cells, tokens[:, :0]))
        last = encoded.stages[-1]  # the visible units' last-stage cells, averaged, then the final norm
        loss, logits = with_online_probe(self, out.loss, lambda: self.encoder.norm(last.mean(dim=(1, 2, 3))), labels)
        return MIMOutput(loss, out.pred, out.target, mask, logits, out.answered)


def build_hiera_mae(model: nn.Module, cfg: PretrainConfig) -> HieraMAE:
    """The Hiera MAE of a config around a freshly built timm Hiera, or one clear ConfigError."""
    encoder = MaskedHiera(model)
    (height, width), unit = size_pair(cfg.model.img_size), encoder.unit_px
    if height % unit or width % unit:
        raise ConfigError(f"config key 'model.img_size': {height}x{width} px does not tile into the {unit} px Hiera "
                          f"mask units (patch stride x mask_unit_size)")
    if cfg.mask.unit is not None and cfg.mask.unit != unit:
        raise ConfigError(f"config key 'mask.unit': Hiera masks its own {unit} px units; leave mask.unit unset and "
                          f"change model.kwargs.mask_unit_size / patch_stride instead")
    if cfg.decoder.feature_blocks is not None:
        raise ConfigError("config key 'decoder.feature_blocks': a Hiera's decoder reads its fused stages (its own "
                          "multi-scale readout); leave feature_blocks unset")
    m, d = encoder.model, cfg.decoder
    stages = (encoder.stage_dims, encoder.stage_sides, fused_stages(len(m.stage_ends), m.q_pool))
    out_dim = encoder.cell_px ** 2 * encoder.in_chans
    if d.kind == "cross":
        decoder = HieraCrossDecoder(*stages, encoder.grid, out_dim, d.dim, d.depth, d.heads, d.mlp_ratio)
    else:
        decoder = HieraMAEDecoder(*stages, encoder.unit_grid, out_dim, d.dim, d.depth, d.heads, d.mlp_ratio)
    return HieraMAE(encoder, decoder, cfg.mask.ratio, cfg.loss.norm_pix, cfg.loss.kind or "mse", d.predict_ratio)
