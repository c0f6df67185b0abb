"""Pretrained encoder weights from any mimswin artifact, loaded into a plain timm model through timm's own filter.

Accepted sources: an exported `encoder.safetensors`, a run dir (its export, else its latest checkpoint), or a
checkpoint dir `checkpoints/step_*` (pretraining: the `encoder.model.` weights; fine-tune/probe runs: their meta).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import safetensors.torch
import timm
import torch
import yaml
from torch import nn

from mimswin.errors import CheckpointError, ConfigError
from mimswin.eval.config import ClassifierConfig
from mimswin.export import read_export
from mimswin.models.vit import timm_kwargs
from mimswin.train.checkpoint import latest_checkpoint

PRETRAIN_PREFIX = "encoder.model."
HEAD_PREFIXES = ("head.", "fc_norm.")


@dataclass
class EncoderWeights:
    """Encoder weights keyed like `timm.create_model(timm_name, **timm_kwargs)`, and where they came from."""

    weights: Dict[str, torch.Tensor]
    timm_name: str
    timm_kwargs: Dict[str, Any]
    source: Path


@dataclass
class LoadReport:
    """What loading left out: classifier parts initialised fresh, and checkpoint keys this model does not use."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    def describe(self) -> str:
        def short(keys: List[str]) -> str:
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6})" if len(keys) > 6 else "") if keys else "none"
        return f"initialised fresh: {short(self.missing)}; unused from the checkpoint: {short(self.unexpected)}"


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file '{path}' is missing") from None
    except Exception as err:
        raise CheckpointError(f"'{path}' is not a readable safetensors file: {err}") from None


def _from_checkpoint_dir(path: Path) -> EncoderWeights:
    try:
        meta = json.loads((path / "state.json").read_text()).get("meta", {})
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{path}': unreadable state.json ({err})") from None
    weights = _load_safetensors(path / "model.safetensors")
    if "timm_name" in meta:
        prefix = meta.get("encoder_prefix", "")
        name, kwargs = meta["timm_name"], meta.get("timm_kwargs", {})
    else:
        config = path.parent.parent / "config.yaml"
        try:
            model = yaml.safe_load(config.read_text())["model"]
            name = model["name"]
            kwargs = timm_kwargs(model["img_size"], model.get("patch_size"), model.get("drop_path_rate", 0.0),
                                 model.get("kwargs"))
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            raise CheckpointError(f"checkpoint '{path}': cannot tell its architecture (no timm_name in state.json "
                                  f"and no readable model section in {config})") from None
        prefix = PRETRAIN_PREFIX
    encoder = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not encoder:
        raise CheckpointError(f"checkpoint '{path}' holds no encoder weights (no keys under '{prefix}')")
    return EncoderWeights(encoder, name, kwargs, path)


def read_encoder_weights(path: str | Path) -> EncoderWeights:
    """Encoder weights and architecture of an exported file, a run dir or a checkpoint dir."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"--from '{path}' does not exist")
    if path.is_file():
        weights, name, kwargs = read_export(path)
        return EncoderWeights(weights, name, kwargs, path)
    if (path / "state.json").is_file():
        return _from_checkpoint_dir(path)
    if (path / "encoder.safetensors").is_file():
        return read_encoder_weights(path / "encoder.safetensors")
    checkpoint = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if checkpoint is None:
        raise CheckpointError(f"--from '{path}' is neither an exported encoder, a run dir (encoder.safetensors or "
                              "checkpoints/step_*) nor a checkpoint dir (state.json)")
    return _from_checkpoint_dir(checkpoint)


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
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"config key 'model.name': unknown timm model '{name}'") from None
        raise
    except (TypeError, AssertionError, ValueError) as err:
        raise ConfigError(f"timm model '{name}' rejects {kwargs}: {err}") from None


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

    Returns (model, its timm kwargs, its timm name, load report).
    """
    name = cfg.name or source.timm_name
    kwargs = {**classifier_kwargs(source, cfg, num_classes), **(extra or {})}
    model = create_classifier(name, kwargs)
    report = load_encoder(model, source) if pretrained else LoadReport(sorted(model.state_dict()), [])
    return model, kwargs, name, report
