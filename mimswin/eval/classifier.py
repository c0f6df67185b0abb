"""The plain timm classifier of a pretrained encoder: kwargs from the checkpoint, weights through timm's own filter."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List

import timm
import torch
from torch import nn

from mimswin.config.evaluation import ClassifierConfig, FinetuneConfig, LinprobeConfig
from mimswin.config.sections import Size, resolve_pixels, size_pair
from mimswin.errors import CheckpointError, ConfigError
from mimswin.models.create import create_timm
from mimswin.runs.export import pretrained_cfg, with_pretrained_cfg
from mimswin.runs.open import EncoderWeights, read_encoder_weights

HEAD_PREFIXES = ("head.", "fc_norm.")


@dataclass
class LoadReport:
    """What loading left out: classifier parts initialised fresh, and checkpoint keys this model does not use."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    def describe(self) -> str:
        def short(keys: List[str]) -> str:
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6})" if len(keys) > 6 else "") if keys else "none"
        return f"initialised fresh: {short(self.missing)}; unused from the checkpoint: {short(self.unexpected)}"


def classifier_kwargs(source: EncoderWeights, cfg: ClassifierConfig, num_classes: int) -> Dict[str, Any]:
    """timm kwargs of the classifier: the encoder's own, then the eval config's size, pooling and drop path."""
    has_token = "cls_token" in source.weights
    pool = cfg.global_pool or ("token" if has_token else "avg")
    if pool == "token" and not has_token:
        raise ConfigError(f"config key 'model.global_pool': token pooling needs a class token and {source.timm_name} "
                          "has none; use avg, or leave it unset (null) to pool the class token where there is one")
    kwargs = {**source.timm_kwargs, "num_classes": num_classes, "global_pool": pool,
              "drop_path_rate": cfg.drop_path_rate, **cfg.kwargs}
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    return kwargs


def create_classifier(name: str, kwargs: Dict[str, Any]) -> nn.Module:
    """`timm.create_model` without downloads, its failures turned into one-line config errors."""
    return create_timm(name, kwargs, (TypeError, AssertionError, ValueError))


def filter_for(model: nn.Module, source: EncoderWeights) -> Dict[str, torch.Tensor]:
    """Run the model family's `checkpoint_filter_fn` (resamples pos-embeds, patch-embeds, rel-pos tables)."""
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None:
        return dict(source.weights)
    try:
        return filter_fn(dict(source.weights), model)
    except Exception as err:
        raise CheckpointError(f"'{source.source}' holds a {source.timm_name} encoder of another architecture than "
                              f"the requested {type(model).__name__} ({str(err).splitlines()[0][:200]})") from None


def load_encoder(model: nn.Module, source: EncoderWeights) -> LoadReport:
    """Load the encoder weights; only classifier parts may be missing, only unused norms/heads may be left over."""
    own = model.state_dict()
    weights = filter_for(model, source)
    heads = [k for k in weights if k.startswith(HEAD_PREFIXES) and k in own and weights[k].shape != own[k].shape]
    for key in heads:
        weights.pop(key)
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    body_missing = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    body_unexpected = [k for k in unexpected if not k.startswith(("norm.", *HEAD_PREFIXES))]
    if wrong or body_missing or body_unexpected:
        details = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                            for label, keys in (("shape mismatch", wrong), ("missing", body_missing),
                                                ("unexpected", body_unexpected)) if keys)
        raise CheckpointError(f"'{source.source}' holds a {source.timm_name} encoder of another architecture than "
                              f"the requested {type(model).__name__} ({details})")
    model.load_state_dict(weights, strict=False)
    return LoadReport(missing, sorted(unexpected + heads))


def is_vit(name: str) -> bool:
    """Whether a timm name builds a `VisionTransformer` (which accepts fc_norm / class_token options)."""
    try:
        return timm.models.model_entrypoint(name).__module__ == "timm.models.vision_transformer"
    except RuntimeError:
        return False


def build_classifier(source: EncoderWeights, cfg: ClassifierConfig, num_classes: int, pretrained: bool = True,
                     extra: Dict[str, Any] | None = None) -> tuple[nn.Module, Dict[str, Any], str, LoadReport]:
    """The plain timm classifier of the checkpoint's architecture, with the encoder weights loaded when asked.

    Returns (model, its timm kwargs, its timm name, load report). Its pretrained_cfg is the encoder's run's (input
    size, channels, mean and std), so timm's `resolve_model_data_config` reads them.
    """
    name = cfg.name or source.timm_name
    kwargs = {**classifier_kwargs(source, cfg, num_classes), **(extra or {})}
    model = create_classifier(name, kwargs)
    if source.mean is not None and source.std is not None:
        with_pretrained_cfg(model, pretrained_cfg(kwargs, source.mean, source.std, "mimswin"))
    report = load_encoder(model, source) if pretrained else LoadReport(sorted(model.state_dict()), [])
    return model, kwargs, name, report


def input_size(cfg: ClassifierConfig, source: EncoderWeights) -> Size:
    """The (height, width) the evaluation runs at: the eval config's, else the encoder's own, else timm's 224."""
    return size_pair(cfg.img_size or source.timm_kwargs.get("img_size", 224))


def encoder_source(cfg: "FinetuneConfig | LinprobeConfig") -> EncoderWeights:
    """The `--from` encoder; the config's unset `data.channels` / `data.mean` / `data.std` are filled from what it
    recorded (channels it reads, the statistics it was pretrained with), and a config that contradicts it stops here."""
    source = read_encoder_weights(cfg.checkpoint)
    resolve_pixels(cfg.data, source.in_chans, source.mean, source.std, f"the encoder '{source.source}'")
    return source


def describe_load(name: str, source: EncoderWeights, random_init: bool, report: LoadReport) -> str:
    """The line a program prints about the weights it starts from."""
    return f"{name} from {'random init' if random_init else source.source}: {report.describe()}"
