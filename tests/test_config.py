import pytest

from mimswin.config import PretrainConfig, load_config, parse_overrides
from mimswin.errors import ConfigError


def test_preset_and_overrides_in_all_three_forms():
    cfg = load_config(PretrainConfig, ["tiny_mae_vit_cpu"],
                      ["optim.blr=1e-4", "--mask.ratio=0.6", "--data.path", "/images", "model.kwargs={depth: 3}"])
    assert cfg.optim.blr == 1e-4 and cfg.mask.ratio == 0.6 and cfg.data.path == "/images"
    assert cfg.model.kwargs == {"depth": 3} and cfg.model.img_size == 28


def test_later_presets_and_overrides_win(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("train: {epochs: 3}\nmask: {ratio: 0.5}\n")
    cfg = load_config(PretrainConfig, ["tiny_mae_vit_cpu", extra], ["mask.ratio=0.9"])
    assert cfg.train.epochs == 3 and cfg.mask.ratio == 0.9


@pytest.mark.parametrize("override, words", [
    (["optim.bllr=1e-4"], ["unknown config key", "optim.bllr"]),
    (["optim.blr=fast"], ["wrong type", "optim.blr"]),
    (["train.epochs=2.5"], ["wrong type", "train.epochs"]),
    (["mask.ratio=1.0"], ["mask.ratio", "[0, 1)"]),
    (["train.mixed_precision=fp8"], ["train.mixed_precision"]),
    (["train.log_with=[mlflow]"], ["train.log_with", "mlflow"]),
    (["decoder.dim=100", "decoder.heads=16"], ["decoder.dim", "divisible"]),
    (["oops"], ["key=value"]),
    (["data.mean=[0.1, 0.2]", "data.std=[0.3, 0.3]"], ["data.mean", "2 value(s) for data.channels=1"]),
    (["data.channels=3"], ["data.mean", "1 value(s) for data.channels=3"]),
    (["data.channels=13", "data.mean=null", "data.std=null"], ["data.mean", "13 channel(s)", "mimswin stats"]),
    (["data.std=[0.1, 0.2]"], ["data.std", "2 value(s) for 1 in data.mean"]),
    (["data.mean=null"], ["data.mean", "together"]),
    (["data.layout=whc"], ["data.layout", "auto, hwc, chw", "whc"]),
    (["data.channels=0"], ["data.channels", ">= 1"]),
    (["model.kwargs={in_chans: 3}"], ["model.kwargs.in_chans", "data.channels=1", "data.channels=3"]),
    (["model.img_size=[28, 0]"], ["model.img_size", "[height, width]"]),
    (["model.img_size=[28, 28, 3]"], ["model.img_size"]),
    (["vis.bands=[0, 1]"], ["vis.bands", "one or three"]),
    (["vis.bands=[2]"], ["vis.bands", "[0, 1)"]),
])
def test_bad_overrides_fail_with_one_line_naming_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, ["tiny_mae_vit_cpu"], override)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'data.batch_sise'"):
        load_config(PretrainConfig, [bad])


def test_invalid_yaml_and_missing_file_are_clear(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {epochs: 3\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(PretrainConfig, [broken])
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, [tmp_path / "nope.yaml"])


def test_parse_overrides_normalises_tokens():
    assert parse_overrides(["a=1", "--b=2", "--c", "3"]) == ["a=1", "b=2", "c=3"]


def test_rectangular_sizes_and_any_channel_count_are_accepted_and_kept_as_written():
    cfg = load_config(PretrainConfig, ["tiny_mae_vit_cpu"],
                      ["model.img_size=[28, 56]", "data.channels=13", f"data.mean={[0.1] * 13}",
                       f"data.std={[0.2] * 13}", "vis.bands=[3, 2, 1]"])
    assert cfg.model.img_size == [28, 56] and cfg.data.channels == 13 and cfg.vis.bands == [3, 2, 1]
    rgb = load_config(PretrainConfig, [], [])
    assert rgb.data.channels == 3 and rgb.data.mean == [0.485, 0.456, 0.406] and rgb.model.img_size == 224


def test_colour_augmentation_needs_rgb_and_evaluation_takes_the_encoders_pixels():
    from mimswin.config import FinetuneConfig
    from mimswin.config.sections import resolve_pixels

    with pytest.raises(ConfigError, match="aug.auto_augment.*4 channel"):
        load_config(FinetuneConfig, [], ["checkpoint=x", "data.channels=4", f"data.mean={[0.5] * 4}",
                                         f"data.std={[0.2] * 4}"])
    cfg = load_config(FinetuneConfig, ["tiny_finetune_cpu"], ["checkpoint=x"])
    assert cfg.data.channels is None and cfg.data.mean is None
    resolve_pixels(cfg.data, 13, [0.1] * 13, [0.2] * 13)
    assert cfg.data.channels == 13 and cfg.data.mean == [0.1] * 13 and cfg.data.std == [0.2] * 13
    pinned = load_config(FinetuneConfig, ["tiny_finetune_cpu"], ["checkpoint=x", "data.channels=3"])
    with pytest.raises(ConfigError, match="'data.channels': 3, but the encoder reads 1 channel"):
        resolve_pixels(pinned.data, 1, [0.1], [0.2])


def test_the_old_name_of_activation_checkpointing_still_loads_from_files_and_overrides(tmp_path):
    old = tmp_path / "old_run_config.yaml"
    old.write_text("train: {grad_checkpointing: true, epochs: 2}\n")
    assert load_config(PretrainConfig, ["tiny_mae_vit_cpu", old]).train.activation_checkpointing is True
    cfg = load_config(PretrainConfig, ["tiny_mae_vit_cpu"], ["train.grad_checkpointing=true"])
    assert cfg.train.activation_checkpointing is True


@pytest.mark.parametrize("override, words", [
    ("train.strategy=zero3", "must be one of ddp, fsdp"),
    ("train.mixed_precision=fp16", "fp16 is not supported with train.strategy=fsdp"),
    ("train.compile=true", "not supported with train.strategy=fsdp"),
])
def test_fsdp_settings_it_cannot_serve_are_refused_in_one_line(override, words):
    extra = [] if override.startswith("train.strategy") else ["train.strategy=fsdp"]
    with pytest.raises(ConfigError, match=words) as err:
        load_config(PretrainConfig, ["tiny_mae_vit_cpu"], [*extra, override])
    assert "\n" not in str(err.value)


def test_fine_tuning_ema_under_fsdp_is_refused_in_one_line():
    from mimswin.config.evaluation import FinetuneConfig

    with pytest.raises(ConfigError, match="ema_decay.*not kept under train.strategy=fsdp"):
        load_config(FinetuneConfig, ["tiny_finetune_cpu"], ["ema_decay=0.9", "train.strategy=fsdp"])


def test_yes_no_on_off_in_an_override_are_words_for_text_keys_and_booleans_for_switches():
    cfg = load_config(PretrainConfig, ["tiny_mae_vit_cpu"], ["train.mixed_precision=no", "train.progress=off",
                                                             "train.cpu=yes"])
    assert cfg.train.mixed_precision == "no" and cfg.train.progress is False and cfg.train.cpu is True
