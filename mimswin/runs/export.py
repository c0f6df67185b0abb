"""Export the pretrained encoder as weights keyed exactly like `timm.create_model(name)` (head aside), from its state
dict (the end of a run hands it over: under FSDP a gathered one, on rank 0).

Two formats: `safetensors` (one file with the timm name, constructor kwargs and pretrained_cfg as metadata) and timm's
own hub folder (`model.safetensors` + `config.json` written by timm's `save_for_hf`, and a `README.md` model card),
loadable as `timm.create_model("local-dir:FOLDER", pretrained=True)` and pushed by timm's `push_to_hf_hub`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import safetensors
import safetensors.torch
import timm
import torch

from mimswin.config.pretrain import PretrainConfig
from mimswin.errors import CheckpointError
from mimswin.models.create import encoder_kwargs
from mimswin.runs.card import RunFacts, card_text, model_card
from mimswin.runs.files import atomic_write_bytes, fsync_path, read_safetensors
from mimswin.runs.layout import CARD, ENCODER, ENCODER_DIR, FOLDER_CONFIG, TMP_PREFIX

FORMAT = "mimswin-encoder"
# the registry's pretrained_cfg keys that describe the architecture (kept); the rest (tag, license, url, input size,
# statistics of ImageNet weights) describe weights that are not these
ARCHITECTURE_KEYS = ("architecture", "first_conv", "classifier", "interpolation", "crop_mode", "fixed_input_size")
Weights = Union[torch.nn.Module, Mapping[str, torch.Tensor]]


def cpu_weights(weights: Weights) -> Dict[str, torch.Tensor]:
    """A state dict (of a module, or as given) as contiguous CPU tensors."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def export_encoder(weights: Weights, path: Path, timm_name: str, timm_kwargs: Dict[str, Any],
                   extra: Dict[str, Any] | None = None) -> Path:
    """Write the timm encoder's weights (a state dict, or the model) with metadata (timm name, constructor kwargs and
    `extra`: method, step, pretrained_cfg) for rebuilding it."""
    metadata = {"format": FORMAT, "timm_name": timm_name, "timm_kwargs": json.dumps(timm_kwargs),
                **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    atomic_write_bytes(Path(path), safetensors.torch.save(cpu_weights(weights), metadata=metadata))
    return Path(path)


def export_metadata(path: str | Path) -> Dict[str, Any]:
    """The metadata of an exported encoder, JSON values decoded (timm_kwargs, pretrained_cfg, method, step)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"exported encoder '{path}' does not exist")
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a mimswin encoder export (no '{FORMAT}' metadata)")
    return {k: v if k in ("format", "timm_name") else json.loads(v) for k, v in metadata.items()}


def read_export(path: str | Path) -> Tuple[Dict[str, torch.Tensor], str, Dict[str, Any]]:
    """(state dict, timm name, timm kwargs) of an exported encoder."""
    metadata = export_metadata(path)
    return read_safetensors(Path(path), "exported encoder"), metadata["timm_name"], metadata["timm_kwargs"]


def with_pretrained_cfg(model: torch.nn.Module, cfg: Dict[str, Any]) -> torch.nn.Module:
    """`model` whose pretrained_cfg is `cfg` over the registry's architecture keys only, so that
    `timm.data.resolve_model_data_config(model)` gives the run's channels, size, mean and std (a model built by
    `create_model(name)` keeps the registry's ImageNet cfg whatever weights are loaded into it)."""
    kept = {k: model.pretrained_cfg[k] for k in ARCHITECTURE_KEYS if k in model.pretrained_cfg}
    model.pretrained_cfg = model.default_cfg = {**kept, **cfg}
    return model


def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], what: str, name: str) -> None:
    """Load encoder weights; only a classifier head (head / fc_norm) may be missing, nothing unexpected."""
    missing, unexpected = model.load_state_dict(dict(weights), strict=False)
    head_keys = {k for k in missing if k.startswith(("head.", "fc_norm."))}
    if unexpected or set(missing) - head_keys:
        absent = sorted(set(missing) - head_keys)[:3]
        raise CheckpointError(f"{what} does not fit timm model '{name}': missing {absent}, "
                              f"unexpected {sorted(unexpected)[:3]}")


def load_exported_timm(path: str | Path, **overrides: Any) -> torch.nn.Module:
    """`timm.create_model` of an export (an `encoder.safetensors` file or a timm folder such as a run's `encoder/`)
    with its weights (head left at its init) and the run's pretrained_cfg."""
    path = Path(path)
    if path.is_dir():
        if not (path / FOLDER_CONFIG).is_file():
            raise CheckpointError(f"'{path}' is not a timm export folder (no {FOLDER_CONFIG})")
        return timm.create_model(f"local-dir:{path}", pretrained=True, **overrides)
    weights, name, kwargs = read_export(path)
    model = timm.create_model(name, pretrained=False, **{**kwargs, **overrides})
    load_weights(model, weights, f"'{path}'", name)
    cfg = export_metadata(path).get("pretrained_cfg")
    return with_pretrained_cfg(model, cfg) if cfg else model


def pretrained_cfg(timm_kwargs: Dict[str, Any], mean: Sequence[float], std: Sequence[float],
                   tag: str) -> Dict[str, Any]:
    """The pretrained_cfg fields that describe our weights: input size [C, H, W], normalisation (per channel, in the
    loader's units), no classifier. timm's data config and `mimswin` evaluation read them."""
    size = timm_kwargs.get("img_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return {"tag": tag, "input_size": [timm_kwargs.get("in_chans", 3), *size], "mean": list(mean), "std": list(std),
            "crop_pct": 1.0, "num_classes": 0}


def timm_encoder(weights: Weights, timm_name: str, timm_kwargs: Dict[str, Any],
                 cfg: Dict[str, Any]) -> torch.nn.Module:
    """The headless timm model of the weights, on the CPU, with `cfg` as its pretrained_cfg: what timm's
    `save_for_hf` and `push_to_hf_hub` write."""
    model = timm.create_model(timm_name, pretrained=False, **{**timm_kwargs, "num_classes": 0})
    load_weights(model, cpu_weights(weights), "the encoder's weights", timm_name)
    return with_pretrained_cfg(model, cfg).eval()


def hub_kwargs(timm_kwargs: Dict[str, Any], cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The arguments timm's `save_for_hf` / `push_to_hf_hub` take for our export: constructor arguments, pretrained_cfg
    and data config, safetensors only."""
    return {"model_config": {"pretrained_cfg": cfg}, "model_args": dict(timm_kwargs), "safe_serialization": True,
            "data_config": {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "crop_pct": cfg["crop_pct"]}}


def replace_folder(staged: Path, folder: Path) -> None:
    """Put the finished `staged` folder in place of `folder` (a previous export, or nothing): a kill leaves one of
    the two whole."""
    fsync_path(staged)
    if folder.exists():
        old = folder.parent / f"{TMP_PREFIX}old-{folder.name}"
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    staged.rename(folder)
    fsync_path(folder.parent)


def export_timm_folder(weights: Weights, folder: Path, timm_name: str, timm_kwargs: Dict[str, Any],
                       cfg: Dict[str, Any], card: Optional[str] = None) -> Path:
    """timm's hub layout (model.safetensors + config.json, via timm's own writer) and the model card `card`
    (README.md), written beside `folder` and moved into place when complete."""
    from timm.models._hub import save_for_hf

    folder = Path(folder)
    if folder.is_file() or (folder.is_dir() and not (folder / FOLDER_CONFIG).is_file() and any(folder.iterdir())):
        raise CheckpointError(f"'{folder}' exists and is not a timm export folder; choose another --out")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staged = folder.parent / f"{TMP_PREFIX}{folder.name}"
    shutil.rmtree(staged, ignore_errors=True)
    save_for_hf(timm_encoder(weights, timm_name, timm_kwargs, cfg), str(staged), **hub_kwargs(timm_kwargs, cfg))
    if card is not None:
        atomic_write_bytes(staged / CARD, card.encode())
    replace_folder(staged, folder)
    return folder


def encoder_spec(cfg: PretrainConfig) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """(timm name, constructor kwargs without the training-only drop path, pretrained_cfg) of a pretraining config's
    encoder."""
    kwargs = {k: v for k, v in encoder_kwargs(cfg).items() if k != "drop_path_rate"}
    return cfg.model.name, kwargs, pretrained_cfg(kwargs, cfg.data.mean, cfg.data.std, f"mimswin_{cfg.method}")


def write_encoder_file(weights: Weights, path: Path, facts: RunFacts) -> Path:
    """A run's encoder as one safetensors file (timm name, kwargs, method, step and pretrained_cfg as metadata)."""
    name, kwargs, cfg = encoder_spec(facts.cfg)
    return export_encoder(weights, path, name, kwargs, {"method": facts.cfg.method, "step": facts.step,
                                                        "pretrained_cfg": cfg})


def write_encoder_folder(weights: Weights, folder: Path, facts: RunFacts) -> Path:
    """A run's encoder as timm's hub folder with its model card."""
    name, kwargs, cfg = encoder_spec(facts.cfg)
    card = card_text(model_card(facts, f"local-dir:{folder}"), facts.root.name)
    return export_timm_folder(weights, folder, name, kwargs, cfg, card)


def write_run_export(weights: Weights, facts: RunFacts) -> None:
    """What the end of a pretraining run leaves in its run dir: `encoder/` (timm's hub folder, model card included)
    and `encoder.safetensors` beside it, from the encoder's state dict (rank 0's, gathered where sharded)."""
    write_encoder_file(weights, facts.root / ENCODER, facts)
    write_encoder_folder(weights, facts.root / ENCODER_DIR, facts)
