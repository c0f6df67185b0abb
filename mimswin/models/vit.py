"""A timm VisionTransformer that encodes only the visible patches (MAE), with fixed 2-D sin-cos position embeddings."""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimswin.errors import ConfigError
from mimswin.models.pos_embed import sincos_2d
from mimswin.models.tokens import gather_tokens


class EncoderOutput(NamedTuple):
    """Encoded visible tokens, the grid position of each, and the prefix (cls) tokens, all after the final norm."""

    tokens: torch.Tensor
    positions: torch.Tensor
    prefix: torch.Tensor


def create_timm_encoder(
    name: str, img_size: int, patch_size: Optional[int] = None, drop_path_rate: float = 0.0,
    kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """A headless timm model, never downloading weights; the kwargs are the ones exported with the weights."""
    options = timm_kwargs(img_size, patch_size, drop_path_rate, kwargs)
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **options)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"config key 'model.name': unknown timm model '{name}'") from None
        raise
    except TypeError as err:
        raise ConfigError(f"config key 'model.kwargs': timm model '{name}' rejects {options}: {err}") from None


def timm_kwargs(img_size: int, patch_size: Optional[int], drop_path_rate: float,
                kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The keyword arguments that rebuild the same architecture with `timm.create_model(name, **kwargs)`."""
    options: Dict[str, Any] = dict(img_size=img_size, **(kwargs or {}))
    if patch_size:
        options["patch_size"] = patch_size
    options.setdefault("drop_path_rate", drop_path_rate)  # always explicit: timm's Swin defaults to 0.1
    return options


class MaskedViT(nn.Module):
    """Wraps `timm.create_model(name)`: `model` holds exactly the timm weights, `forward_masked` runs visible tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, VisionTransformer):
            raise ConfigError(f"config key 'model.name': MAE's ViT path needs a timm VisionTransformer, "
                              f"got {type(model).__name__}")
        if model.reg_token is not None or model.no_embed_class or model.pos_embed is None:
            raise ConfigError("config key 'model.name': register tokens, no_embed_class and models without "
                              "absolute position embeddings are not supported by the MAE ViT path")
        if model.patch_drop.__class__ is not nn.Identity or getattr(model, "dynamic_img_size", False):
            raise ConfigError("config key 'model.kwargs': patch_drop_rate and dynamic_img_size are not supported")
        self.model = model
        table = sincos_2d(model.embed_dim, self.grid, model.num_prefix_tokens)
        model.pos_embed.data.copy_(table.unsqueeze(0))
        model.pos_embed.requires_grad_(False)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    @property
    def patch_size(self) -> int:
        return self.model.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    def forward_masked(self, images: torch.Tensor, keep: torch.Tensor) -> EncoderOutput:
        """Encode only the patches at `keep` [B, L] (plus cls); tokens stay in the order of `keep`."""
        vit = self.model
        prefix_count = vit.num_prefix_tokens
        x = vit.patch_embed(images) + vit.pos_embed[:, prefix_count:]
        x = gather_tokens(x, keep)
        if vit.cls_token is not None:
            cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        x = vit.norm_pre(vit.pos_drop(x))
        x = vit.norm(vit.blocks(x))
        return EncoderOutput(tokens=x[:, prefix_count:], positions=keep, prefix=x[:, :prefix_count])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked features, exactly timm's `forward_features`."""
        return self.model.forward_features(images)
