"""SimMIM (Xie et al. 2022): a learnable mask token replaces hidden patch embeddings, the whole encoder runs on all
tokens, and a 1x1 conv + PixelShuffle head predicts the pixels from the last feature map; loss on hidden pixels only."""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimswin.errors import ConfigError
from mimswin.models.encoder import timm_in_chans
from mimswin.models.loss import MIMOutput, masked_loss
from mimswin.models.masking import MaskSample, random_mask
from mimswin.models.online_probe import with_online_probe
from mimswin.models.patches import patchify, pixel_targets
from mimswin.models.swin import check_swin, output_stride, swin_forward_with_mask_token
from mimswin.models.vit import check_patch_grid


class MaskTokenEncoder(nn.Module):
    """A timm ViT or Swin (`model`, exported as is) plus the mask token that stands in for hidden patches. A
    `MaskedEncoder` whose mask is a hidden map over the patches (`patch_grid`, `patch_px` each) and whose output cells
    (`grid`, `cell_px`) are the last feature map's tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, SwinTransformer):
            check_swin(model)
            dim = model.embed_dim
        elif isinstance(model, VisionTransformer):
            if getattr(model, "dynamic_img_size", False) or model.patch_drop.__class__ is not nn.Identity:
                raise ConfigError("config key 'model.kwargs': dynamic_img_size and patch_drop_rate are not supported "
                                  "by SimMIM")
            check_patch_grid(model)
            dim = model.embed_dim
        else:
            raise ConfigError(f"config key 'model.name': SimMIM needs a timm VisionTransformer or SwinTransformer, "
                              f"got {type(model).__name__}")
        self.model = model
        self.mask_token = nn.Parameter(torch.zeros(dim))
        trunc_normal_(self.mask_token, std=0.02)

    @property
    def patch_px(self) -> int:
        return self.model.patch_embed.patch_size[0]

    @property
    def patch_grid(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    @property
    def cell_px(self) -> int:
        """Pixels per token side of the last feature map (the head's PixelShuffle factor)."""
        return output_stride(self.model) if isinstance(self.model, SwinTransformer) else self.patch_px

    @property
    def grid(self) -> tuple[int, int]:
        img = self.model.patch_embed.img_size
        return img[0] // self.cell_px, img[1] // self.cell_px

    @property
    def in_chans(self) -> int:
        return timm_in_chans(self.model)

    @property
    def embed_dim(self) -> int:
        return self.model.num_features

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"model.{n}" for n in self.model.no_weight_decay()}

    def forward_masked(self, images: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H, W] over the patch grid -> last feature map [B, C, rows, cols] (the `grid` of cells)."""
        if isinstance(self.model, SwinTransformer):
            return swin_forward_with_mask_token(self.model, images, hidden, self.mask_token).permute(0, 3, 1, 2)
        vit = self.model
        x = vit.patch_embed(images)
        x = torch.where(hidden.flatten(1).unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = vit.norm(vit.blocks(vit.norm_pre(vit._pos_embed(x))))
        rows, cols = self.patch_grid
        return rearrange(x[:, vit.num_prefix_tokens:], "b (h w) c -> b c h w", h=rows, w=cols)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked features, exactly timm's `forward_features`."""
        return self.model.forward_features(images)


class SimMIM(nn.Module):
    """Mask units of `unit_px` px hidden at `mask_ratio`; L1 (or MSE) between predicted and true pixels of hidden
    units.

    Pictures and losses see the image as a grid of mask units: `target_px` is the unit, `pred` is [B, units, u*u*C].
    """

    def __init__(self, encoder: MaskTokenEncoder, unit_px: int, mask_ratio: float = 0.6, norm_pix: bool = False,
                 loss_kind: str = "l1") -> None:
        super().__init__()
        img = encoder.model.patch_embed.img_size
        if unit_px % encoder.patch_px or img[0] % unit_px or img[1] % unit_px:
            raise ConfigError(f"config key 'mask.unit': {unit_px} px must be a multiple of the patch size "
                              f"{encoder.patch_px} and divide the {img[0]}x{img[1]} image")
        self.encoder, self.unit_px, self.mask_ratio = encoder, unit_px, mask_ratio
        self.norm_pix, self.loss_kind = norm_pix, loss_kind
        self.grid = (img[0] // unit_px, img[1] // unit_px)
        stride = encoder.cell_px
        self.head = nn.Sequential(nn.Conv2d(encoder.embed_dim, stride * stride * encoder.in_chans, 1),
                                  nn.PixelShuffle(stride))

    @property
    def target_px(self) -> int:
        return self.unit_px

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def draw_mask(self, batch: int, device: torch.device, generator: Optional[torch.Generator] = None,
                  ratio: Optional[float] = None) -> MaskSample:
        """A mask of the run's `mask_ratio`, or of `ratio` (0: every unit visible)."""
        ratio = self.mask_ratio if ratio is None else ratio
        return random_mask(batch, self.grid[0] * self.grid[1], ratio, device, generator)

    def hidden_patches(self, hidden_units: torch.Tensor) -> torch.Tensor:
        """[B, units] mask -> [B, H, W] mask over the encoder's patch grid."""
        per_unit = self.unit_px // self.encoder.patch_px
        hidden = hidden_units.view(-1, *self.grid)
        return hidden.repeat_interleave(per_unit, 1).repeat_interleave(per_unit, 2)

    def forward(self, images: torch.Tensor, mask: Optional[MaskSample] = None,
                labels: Optional[torch.Tensor] = None) -> MIMOutput:
        mask = mask if mask is not None else self.draw_mask(images.shape[0], images.device)
        features = self.encoder.forward_masked(images, self.hidden_patches(mask.hidden))
        pred = patchify(self.head(features), self.unit_px)
        target = pixel_targets(images, self.unit_px, self.norm_pix)
        loss = masked_loss(pred, target, mask.hidden, self.loss_kind)
        loss, logits = with_online_probe(self, loss, lambda: features.mean(dim=(2, 3)), labels)  # all cells
        return MIMOutput(loss, pred, target, mask, logits)
