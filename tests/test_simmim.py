"""SimMIM on timm Swin and ViT encoders: mask token at hidden patches, loss on hidden pixels only, short run, errors."""

import pytest
import torch
from conftest import loss_at_both_ends, preset_channels, pretrain_briefly

from mimswin.config import PretrainConfig, load_config
from mimswin.errors import ConfigError
from mimswin.models import SimMIM, build_method
from mimswin.models.masking import mask_from_hidden, unit_mask
from mimswin.runs.export import load_exported_timm

C = preset_channels()  # channels the tiny presets read

SWIN = ("tiny_simmim_swin_cpu", [])
VIT = ("tiny_mae_vit_cpu", ["method=simmim", "model.img_size=32", "mask.unit=8", "mask.ratio=0.6",
                           "model.kwargs={depth: 2}"])
QUICK = ["data.batch_size=16", "data.num_workers=0", "train.progress=false"]


def build(overrides=(), preset="tiny_simmim_swin_cpu"):
    torch.manual_seed(0)
    return build_method(load_config(PretrainConfig, [preset], list(overrides)))


def encoder_input(simmim, images, mask):
    """The tokens the encoder's blocks receive (Swin: input of the stages; ViT: before position embedding)."""
    model, seen = simmim.encoder.model, {}
    target = model.layers if hasattr(model, "layers") else model.norm_pre
    handle = target.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    try:
        simmim(images, mask)
    finally:
        handle.remove()
    x = seen["x"]
    if not hasattr(model, "layers"):
        x = x[:, model.num_prefix_tokens:] - model.pos_embed[:, model.num_prefix_tokens:]
    return x.reshape(x.shape[0], -1, x.shape[-1])


@pytest.mark.parametrize("preset, overrides", [SWIN, VIT], ids=["swin", "vit"])
def test_hidden_patches_carry_the_mask_token_and_visible_ones_their_embedding(preset, overrides):
    simmim = build(overrides, preset).eval()
    images = torch.randn(2, C, 32, 32)
    mask = simmim.draw_mask(2, "cpu", torch.Generator().manual_seed(0))
    tokens = encoder_input(simmim, images, mask)
    hidden = simmim.hidden_patches(mask.hidden).flatten(1)
    embedded = simmim.encoder.model.patch_embed(images).reshape(tokens.shape)
    token = simmim.encoder.mask_token.detach()
    torch.testing.assert_close(tokens[hidden], token.expand(int(hidden.sum()), -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(tokens[~hidden], embedded[~hidden], atol=1e-6, rtol=0)
    assert torch.all(mask.hidden.sum(1) == 10)  # 16 units of 8 px, int(16 * 0.4) = 6 visible


@pytest.mark.parametrize("preset, overrides", [SWIN, VIT], ids=["swin", "vit"])
def test_nothing_masked_equals_timm_forward_features(preset, overrides):
    simmim = build(overrides, preset).eval()
    images = torch.randn(2, C, 32, 32)
    nothing = torch.zeros(2, *simmim.encoder.patch_grid, dtype=torch.bool)
    with torch.no_grad():
        features = simmim.encoder.forward_masked(images, nothing)
        reference = simmim.encoder.model.forward_features(images)
    if reference.dim() == 4:  # Swin: NHWC
        reference = reference.permute(0, 3, 1, 2)
    else:
        reference = reference[:, simmim.encoder.model.num_prefix_tokens:].transpose(1, 2).reshape(features.shape)
    torch.testing.assert_close(features, reference)


def test_mask_units_hide_whole_32px_squares_of_patches():
    simmim = build(["model.img_size=64", "mask.unit=32"])
    mask = simmim.draw_mask(3, "cpu", torch.Generator().manual_seed(0))
    assert mask.hidden.shape == (3, 4)
    hidden = simmim.hidden_patches(mask.hidden)
    assert hidden.shape == (3, 32, 32)  # patch 2 -> 32x32 patches, 16x16 per unit
    blocks = hidden.view(3, 2, 16, 2, 16)
    assert torch.all(blocks == blocks[:, :, :1, :, :1])
    assert torch.equal(blocks[:, :, 0, :, 0].flatten(1), mask.hidden)


def test_unit_mask_hides_square_blocks_with_an_exact_count():
    sample = unit_mask(5, (8, 8), 2, 0.75, generator=torch.Generator().manual_seed(0))
    blocks = sample.hidden.view(5, 4, 2, 4, 2)
    assert torch.all(blocks == blocks[:, :, :1, :, :1])
    assert torch.all(sample.hidden.sum(1) == 48)
    assert torch.equal(mask_from_hidden(sample.hidden).keep, sample.keep)


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_loss_counts_only_hidden_pixels(kind):
    simmim = build([f"loss.kind={kind}"])
    images = torch.randn(2, C, 32, 32)
    mask = simmim.draw_mask(2, "cpu", torch.Generator().manual_seed(1))
    seen = {}

    def keep_grad(module, args, output):
        output.retain_grad()
        seen["out"] = output

    handle = simmim.head.register_forward_hook(keep_grad)
    out = simmim(images, mask)
    handle.remove()
    error = out.pred - out.target
    per_pixel = error.abs() if kind == "l1" else error.pow(2)
    torch.testing.assert_close(out.loss, per_pixel[mask.hidden].mean())

    out.loss.backward()
    pixels_hidden = simmim.hidden_patches(mask.hidden).repeat_interleave(2, 1).repeat_interleave(2, 2)
    grad = seen["out"].grad.abs().sum(1)
    assert torch.all(grad[~pixels_hidden] == 0)
    assert torch.all(grad[pixels_hidden] > 0)


@pytest.mark.parametrize("overrides, message", [
    (["mask.unit=12"], "mask.unit"),
    (["model.img_size=40", "mask.unit=16"], "window 4x4 does not divide"),
    (["model.img_size=34"], "output stride"),
])
def test_bad_sizes_are_one_clear_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(overrides)


def test_default_mask_unit_is_32px_with_l1_loss():
    simmim = build(["model.img_size=64", "mask.unit=null", "loss.kind=null"])
    assert isinstance(simmim, SimMIM) and simmim.unit_px == 32 and simmim.loss_kind == "l1"


@pytest.fixture(scope="module")
def simmim_run(tmp_path_factory):
    return pretrain_briefly(tmp_path_factory, "simmim_swin", ["--config", "tiny_simmim_swin_cpu", *QUICK], 30, 30)


def test_short_simmim_run_lowers_the_loss(simmim_run):
    first, last = loss_at_both_ends(simmim_run[1], steps=30, window=10)
    assert last < 0.9 * first, (first, last)


def test_simmim_export_is_the_plain_timm_swin(simmim_run):
    trainer, run = simmim_run
    loaded = load_exported_timm(run / "encoder.safetensors", num_classes=0).eval()
    encoder = trainer.accelerator.unwrap_model(trainer.model).encoder.eval()
    images = torch.randn(2, C, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(images), encoder(images))
    assert (run / "reconstruction.png").is_file()
