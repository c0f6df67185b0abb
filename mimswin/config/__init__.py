"""The configuration: schemas per program, loading (presets, overrides, clear errors), the reference page."""

from mimswin.config.evaluation import FinetuneConfig, LabeledDataConfig, LinprobeConfig
from mimswin.config.loading import (
                                    PRESET_DIR,
                                    flat_config,
                                    list_presets,
                                    load_config,
                                    parse_overrides,
                                    resolve_preset,
                                    save_config,
                                    to_dict,
)
from mimswin.config.pretrain import DecoderConfig, LossConfig, MaskConfig, ModelConfig, PretrainConfig
from mimswin.config.sections import IMAGENET_MEAN, IMAGENET_STD, DataConfig, OptimConfig, TrainConfig

__all__ = ["PRESET_DIR", "IMAGENET_MEAN", "IMAGENET_STD", "DataConfig", "DecoderConfig", "FinetuneConfig",
           "LabeledDataConfig", "LinprobeConfig", "LossConfig", "MaskConfig", "ModelConfig", "OptimConfig",
           "PretrainConfig", "TrainConfig", "flat_config", "list_presets", "load_config", "parse_overrides",
           "resolve_preset", "save_config", "to_dict"]
