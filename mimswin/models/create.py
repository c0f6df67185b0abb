"""`timm.create_model` as every program calls it: never downloading, its failures one-line config errors."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Type, Union

import timm
from torch import nn

from mimswin.config.pretrain import PretrainConfig
from mimswin.errors import ConfigError

ImgSize = Union[int, List[int]]


def create_timm(name: str, kwargs: Dict[str, Any], rejected: Sequence[Type[Exception]] = (TypeError,),
                context: str = "", shown: Optional[Dict[str, Any]] = None) -> nn.Module:
    """`timm.create_model(name, pretrained=False, **kwargs)`; an unknown name or rejected kwargs (`shown` in the
    message, default all) become a ConfigError prefixed by `context`."""
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"config key 'model.name': unknown timm model '{name}'") from None
        raise
    except tuple(rejected) as err:
        raise ConfigError(f"{context}timm model '{name}' rejects {kwargs if shown is None else shown}: {err}") from None


def create_timm_encoder(
    name: str, img_size: ImgSize, patch_size: Optional[int] = None, drop_path_rate: float = 0.0,
    kwargs: Optional[Dict[str, Any]] = None, in_chans: int = 3,
) -> nn.Module:
    """A headless timm model, never downloading weights; the kwargs are the ones exported with the weights."""
    options = timm_kwargs(img_size, patch_size, drop_path_rate, kwargs, in_chans)
    return create_timm(name, dict(num_classes=0, **options), (TypeError,), "config key 'model.kwargs': ", options)


def timm_kwargs(img_size: ImgSize, patch_size: Optional[int], drop_path_rate: float,
                kwargs: Optional[Dict[str, Any]] = None, in_chans: int = 3) -> Dict[str, Any]:
    """The keyword arguments that rebuild the same architecture with `timm.create_model(name, **kwargs)`."""
    options: Dict[str, Any] = dict(img_size=img_size, **(kwargs or {}))
    options["in_chans"] = in_chans
    if patch_size:
        options["patch_size"] = patch_size
    options.setdefault("drop_path_rate", drop_path_rate)  # always explicit: timm's Swin defaults to 0.1
    return options


def encoder_kwargs(cfg: PretrainConfig) -> Dict[str, Any]:
    """`timm_kwargs` of a pretraining config's encoder (its size, channels and constructor arguments)."""
    m = cfg.model
    return timm_kwargs(m.img_size, m.patch_size, m.drop_path_rate, m.kwargs, cfg.data.channels)

