"""The pretraining model a config describes: a timm encoder (ViT, Swin, Hiera) wrapped by its MIM method."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

from timm.models.hiera import Hiera
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimswin.config.pretrain import PretrainConfig
from mimswin.errors import ConfigError
from mimswin.models.create import create_timm_encoder
from mimswin.models.cross_decoder import CrossDecoder
from mimswin.models.decoders import MAEDecoder
from mimswin.models.encoder import MaskedEncoder
from mimswin.models.hiera_mae import HieraMAE, build_hiera_mae
from mimswin.models.mae import MAE
from mimswin.models.simmim import MaskTokenEncoder, SimMIM
from mimswin.models.swin import VisibleSwin
from mimswin.models.vit import MaskedViT

SIMMIM_MASK_UNIT = 32
# timm model class -> the wrapper that makes it a visible-tokens MAE encoder with the plain MAE decoder
MAE_ENCODERS: Sequence[Tuple[type, Callable[[nn.Module], MaskedEncoder]]] = (
    (SwinTransformer, VisibleSwin),
    (VisionTransformer, MaskedViT),
)


def mask_unit_cells(unit_px: Optional[int], cell_px: int, grid: tuple[int, int]) -> int:
    """`mask.unit` in px -> grid cells per unit side (unset: one cell), or one clear ConfigError."""
    if unit_px is None:
        return 1
    cells = unit_px // cell_px
    if unit_px % cell_px or grid[0] % cells or grid[1] % cells:
        raise ConfigError(f"config key 'mask.unit': {unit_px} px must be a multiple of the {cell_px} px grid cell "
                          f"and tile the {grid[0]}x{grid[1]} grid")
    return cells


def build_method(cfg: PretrainConfig) -> Union[MAE, HieraMAE, SimMIM]:
    """The pretraining model a config describes, with freshly initialised weights (never downloaded)."""
    m = cfg.model
    model = create_timm_encoder(m.name, m.img_size, m.patch_size, m.drop_path_rate, m.kwargs, cfg.data.channels)
    if cfg.method == "simmim":
        unit_px = cfg.mask.unit or SIMMIM_MASK_UNIT
        return SimMIM(MaskTokenEncoder(model), unit_px, cfg.mask.ratio, cfg.loss.norm_pix, cfg.loss.kind or "l1")
    if isinstance(model, Hiera):
        return build_hiera_mae(model, cfg)
    wrapper = next((wrap for family, wrap in MAE_ENCODERS if isinstance(model, family)), None)
    if wrapper is None:
        raise ConfigError(f"config key 'model.name': MAE needs a timm VisionTransformer, SwinTransformer or Hiera, "
                          f"got {type(model).__name__}")
    encoder = wrapper(model)
    unit_cells = mask_unit_cells(cfg.mask.unit, encoder.cell_px, encoder.grid)
    return MAE(encoder, build_decoder(cfg, encoder), cfg.mask.ratio, cfg.loss.norm_pix, unit_cells,
               cfg.loss.kind or "mse", cfg.decoder.predict_ratio)


def feature_blocks(blocks: Optional[Sequence[int]], encoder: MaskedEncoder) -> Tuple[int, ...]:
    """`decoder.feature_blocks` as ascending block indices of the encoder (negative: from the end), or one clear
    ConfigError; () when unset (the decoder reads the encoder's output). The last block must be among them: blocks
    after the last one read would get no gradient (and stall a DDP run)."""
    if blocks is None:
        return ()
    if not isinstance(encoder, MaskedViT):
        raise ConfigError("config key 'decoder.feature_blocks': only a ViT's blocks share the output grid and width "
                          "(a Swin's earlier stages work on finer grids); leave it unset to read the encoder's output")
    depth = len(encoder.model.blocks)
    wrong = [b for b in blocks if not -depth <= b < depth]
    if wrong:
        raise ConfigError(f"config key 'decoder.feature_blocks': {wrong} outside the encoder's {depth} blocks "
                          f"(0 .. {depth - 1}, or -{depth} .. -1 from the end)")
    chosen = sorted({b % depth for b in blocks})
    if len(chosen) != len(blocks):
        raise ConfigError(f"config key 'decoder.feature_blocks': {list(blocks)} names a block twice")
    if chosen[-1] != depth - 1:
        raise ConfigError(f"config key 'decoder.feature_blocks': {list(blocks)} must include the last block (-1 or "
                          f"{depth - 1}): the blocks after the last one read would never learn")
    return tuple(chosen)


def build_decoder(cfg: PretrainConfig, encoder: MaskedEncoder) -> nn.Module:
    """The MAE decoder `decoder.kind` names, over a ViT or Swin encoder's grid; a ViT is told which block outputs
    to return when the cross decoder reads several (`decoder.feature_blocks`)."""
    d, out_dim = cfg.decoder, encoder.cell_px ** 2 * encoder.in_chans
    args = (encoder.embed_dim, encoder.grid, out_dim, d.dim, d.depth, d.heads, d.mlp_ratio, encoder.num_prefix_tokens)
    if d.kind == "self":
        return MAEDecoder(*args)
    blocks = feature_blocks(d.feature_blocks, encoder)
    if blocks:
        encoder.feature_blocks = blocks
    return CrossDecoder(*args, feature_count=len(blocks))
