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
