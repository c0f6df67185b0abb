"""One contract for every masked encoder and method (ViT MAE, visible-only Swin MAE, SimMIM Swin, Hiera MAE; the MAEs
also with the cross decoder predicting a subset), for any channel count and for non-square images: hidden pixels cannot
change the prediction, each prediction covers its cell in every channel, the norm-pix loss over all channels (over
the predicted cells) equals a hand computation."""

import pytest
import torch
from conftest import norm_pix_mse_by_hand

from mimswin.config import PretrainConfig, load_config
from mimswin.errors import ConfigError
from mimswin.models import build_method
from mimswin.models.encoder import MaskedEncoder

FAMILIES = {
    "vit_mae": ("tiny_mae_vit_cpu", ["model.kwargs={depth: 2}", "decoder.dim=32", "decoder.depth=1",
                                     "decoder.heads=2"]),
    "swin_mae": ("tiny_mae_swin_cpu", ["decoder.dim=32", "decoder.heads=2"]),
    "swin_simmim": ("tiny_simmim_swin_cpu", []),
    "hiera_mae": ("tiny_mae_hiera_cpu", ["decoder.dim=32", "decoder.depth=1", "decoder.heads=2"]),
}
SUBSET = ["decoder.kind=cross", "decoder.predict_ratio=0.5"]
CROSS = {f"{family}_cross": (preset, [*overrides, *SUBSET]) for family, (preset, overrides) in FAMILIES.items()
         if family != "swin_simmim"}
CROSS["vit_mae_cross"][1].append("decoder.feature_blocks=[0, -1]")
FAMILIES.update(CROSS)
SELF = [family for family in FAMILIES if family not in CROSS]
SIZES = {"square": 32, "non_square": [32, 48]}
# every self-decoder family at every channel count and size; the cross ones at one of each (their encoders are the same)
LEAK_CASES = [(family, channels, size) for family in SELF for channels in (1, 4, 13) for size in SIZES.values()]
LEAK_CASES += [(family, 4, SIZES["non_square"]) for family in CROSS]


def build(family: str, channels: int, size, extra=()):
    preset, overrides = FAMILIES[family]
    size_text = size if isinstance(size, int) else f"[{size[0]},{size[1]}]"
    pixels = [f"data.channels={channels}", f"data.mean=[{','.join(['0.5'] * channels)}]",
              f"data.std=[{','.join(['0.25'] * channels)}]", f"model.img_size={size_text}"]
    torch.manual_seed(0)
    return build_method(load_config(PretrainConfig, [preset], [*overrides, *pixels, *extra])).eval()


def cell_pixels(hidden: torch.Tensor, grid, px: int) -> torch.Tensor:
    """[B, cells] bool over a (rows, cols) grid -> [B, 1, H, W] float, 1 on the pixels of the hidden cells."""
    cells = hidden.view(-1, 1, *grid).float()
    return cells.repeat_interleave(px, 2).repeat_interleave(px, 3)


@pytest.mark.parametrize("family, channels, size", LEAK_CASES, ids=lambda value: str(value).replace(" ", ""))
def test_hidden_pixels_cannot_change_the_prediction_in_any_channel(family, channels, size):
    method = build(family, channels, size)
    height, width = (size, size) if isinstance(size, int) else size
    assert method.encoder.in_chans == channels
    assert method.grid == (height // method.target_px, width // method.target_px)
    images = torch.randn(2, channels, height, width)
    mask = method.draw_mask(2, images.device, torch.Generator().manual_seed(4))
    hidden = cell_pixels(mask.hidden, method.grid, method.target_px)
    noise = torch.randn_like(images)
    with torch.no_grad():
        out = method(images, mask)
        assert out.pred.shape == out.target.shape == (2, method.grid[0] * method.grid[1],
                                                      method.target_px ** 2 * channels)
        assert torch.equal(method(images + noise * hidden, mask).pred, out.pred)
        assert not torch.allclose(method(images + noise * (1 - hidden), mask).pred, out.pred)
        for band in range(channels):  # each channel of a visible cell reaches the model
            one_band = torch.zeros_like(images)
            one_band[:, band] = noise[:, band] * (1 - hidden[:, 0])
            assert not torch.allclose(method(images + one_band, mask).pred, out.pred)


@pytest.mark.parametrize("channels", [1, 13])
@pytest.mark.parametrize("family", ["vit_mae", "swin_mae", "hiera_mae", *CROSS])
def test_norm_pix_loss_over_every_channel_equals_the_hand_computation(family, channels):
    method = build(family, channels, [32, 48], ["loss.norm_pix=true"])  # the tiny Hiera preset's own is off
    images = torch.randn(2, channels, 32, 48)
    mask = method.draw_mask(2, images.device, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = method(images, mask)
    expected, count = norm_pix_mse_by_hand(out.pred, images, mask.scored, method.target_px)
    hidden = int(mask.hidden[0].sum())
    assert count == 2 * (int(hidden * 0.5) if family in CROSS else hidden)  # cross: half the hidden cells predicted
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family", SELF)
def test_every_encoder_states_the_contract(family):
    encoder = build(family, 4, [32, 48]).encoder
    for name in ("grid", "cell_px", "in_chans", "embed_dim", "forward_masked", "no_weight_decay", "model"):
        assert hasattr(encoder, name), name
    assert encoder.in_chans == 4 and encoder.grid == (32 // encoder.cell_px, 48 // encoder.cell_px)
    assert isinstance(encoder.no_weight_decay(), set)
    assert MaskedEncoder.__doc__


@pytest.mark.parametrize("family, size, message", [
    ("swin_mae", "[32,40]", "window 4x4 does not divide the 8x10 token grid of stage 1"),
    ("swin_simmim", "[32,40]", "window 4x4 does not divide the 8x10 token grid of stage 1"),
    ("hiera_mae", "[32,44]", "the 16x22 token grid does not tile into mask units of 4x4 tokens"),
    ("hiera_mae", "[32,41]", "32x41 px does not tile into the 8 px Hiera mask units"),
    ("vit_mae", "[32,30]", "model.img_size"),
    ("vit_mae", "[32]", "model.img_size"),
])
def test_sizes_an_encoder_cannot_tile_are_one_clear_config_error(family, size, message):
    preset, overrides = FAMILIES[family]
    with pytest.raises(ConfigError, match=message):
        build_method(load_config(PretrainConfig, [preset], [*overrides, f"model.img_size={size}"]))


def test_pictures_show_any_channel_count_legibly_in_gray_or_false_colour():
    from mimswin.eval.pictures import legible, reconstruction_grid

    bands = build("vit_mae", 13, [32, 48])
    images = torch.randn(2, 13, 32, 48)
    mean, std = [0.5] * 13, [0.25] * 13
    default = reconstruction_grid(bands, images, mean, std)
    chosen = reconstruction_grid(bands, images, mean, std, [3, 2, 1])
    assert default.shape == chosen.shape and default.shape[0] == 3 and not torch.equal(default, chosen)
    assert 0 <= default.min() and default.max() <= 1
    swapped = images.clone()
    swapped[:, [1, 2, 3]] = images[:, [3, 2, 1]]  # bands [3, 2, 1] of `images` are bands [1, 2, 3] of `swapped`
    two_columns = 2 + 2 * (48 * 3 + 2)  # original and masked tiles: 48 px upscaled 3x, 2 px padding
    again = reconstruction_grid(bands, swapped, mean, std, [1, 2, 3])
    torch.testing.assert_close(again[..., :two_columns], chosen[..., :two_columns])
    gray = reconstruction_grid(build("hiera_mae", 1, 32), torch.randn(2, 1, 32, 32), [0.5], [0.25])
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    one_band = reconstruction_grid(bands, images, mean, std, [5])
    assert torch.equal(one_band[0], one_band[2])
    assert legible(torch.zeros(4, 3, 16, 600)).shape[-1] == 384 and legible(torch.zeros(4, 3, 28, 40)).shape[-2] == 112
