"""Visible-tokens-only Swin (MAE): equivalence with timm's Swin, token positions, short runs, export, clear errors."""

import re

import pytest
import timm
import torch
from conftest import export_of_run, loss_at_both_ends, preset_channels, pretrain_briefly
from timm.models.swin_transformer import window_partition
from torch import nn

from mimswin.config import PretrainConfig, load_config
from mimswin.errors import ConfigError
from mimswin.models import build_method
from mimswin.models.create import timm_kwargs
from mimswin.models.decoders import MAEDecoder
from mimswin.models.masking import random_mask
from mimswin.models.swin import HIDDEN_KEY_BIAS, VisibleSwin

# 3 stages (patch 2, 56 px: token grids 28, 14, 7) with window 7, shift 3: windows straddle the 8 px cells.
STRADDLE = ["model.img_size=56", "model.patch_size=2",
            "model.kwargs={embed_dim: 16, depths: [2, 2, 2], num_heads: [1, 2, 4], window_size: 7}",
            "decoder.dim=32", "decoder.depth=1", "decoder.heads=2"]
QUICK = ["data.batch_size=16", "data.num_workers=0", "train.progress=false", "decoder.depth=1"]


def build(overrides, preset="tiny_mae_swin_cpu"):
    torch.manual_seed(0)
    return build_method(load_config(PretrainConfig, [preset], overrides))


def masked_key_reference(swin, image, hidden_cells):
    """timm's own forward of one image in which every window attention ignores the keys of hidden cells."""
    saved = [(block, block.attn_mask) for stage in swin.layers for block in stage.blocks]
    tile = 2 ** sum(not isinstance(stage.downsample, nn.Identity) for stage in swin.layers)
    try:
        for stage in swin.layers:
            if not isinstance(stage.downsample, nn.Identity):
                tile //= 2
            hidden = hidden_cells.repeat_interleave(tile, 0).repeat_interleave(tile, 1).float()
            for block in stage.blocks:
                shifted = torch.roll(hidden, (-block.shift_size[0], -block.shift_size[1]), (0, 1))
                keys = window_partition(shifted[None, :, :, None], block.window_size).flatten(1)
                bias = (keys * HIDDEN_KEY_BIAS)[:, None, :].expand(-1, block.window_area, -1)
                block.attn_mask = bias if block.attn_mask is None else block.attn_mask + bias
        return swin.forward_features(image[None])[0]
    finally:
        for block, mask in saved:
            block.attn_mask = mask


@pytest.mark.parametrize("overrides", [[], STRADDLE], ids=["aligned_windows", "straddling_windows"])
def test_nothing_masked_equals_timm_swin_forward_features(overrides):
    encoder = build(overrides).encoder.eval()
    images = torch.randn(2, C, *encoder.model.patch_embed.img_size)
    keep = torch.arange(encoder.num_cells).expand(2, -1)
    with torch.no_grad():
        tokens = encoder.forward_masked(images, keep).tokens
        reference = encoder.model.forward_features(images).flatten(1, 2)
    torch.testing.assert_close(tokens, reference)


@pytest.mark.parametrize("overrides", [[], STRADDLE], ids=["aligned_windows", "straddling_windows"])
def test_each_visible_token_equals_timm_swin_at_its_own_position_with_hidden_keys_ignored(overrides):
    encoder = build(overrides).encoder.eval()
    images = torch.randn(3, C, *encoder.model.patch_embed.img_size)
    mask = random_mask(3, encoder.num_cells, 0.6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = encoder.forward_masked(images, mask.keep).tokens
        for b in range(3):
            reference = masked_key_reference(encoder.model, images[b], mask.hidden[b].view(encoder.grid))
            torch.testing.assert_close(tokens[b], reference.flatten(0, 1)[mask.keep[b]])


def test_tokens_given_in_any_order_come_back_in_that_order():
    encoder = build(STRADDLE).encoder.eval()
    images = torch.randn(2, C, 56, 56)
    keep = torch.stack([torch.randperm(encoder.num_cells)[:12] for _ in range(2)])
    with torch.no_grad():
        shuffled = encoder.forward_masked(images, keep)
        ordered = encoder.forward_masked(images, keep.sort(1).values)
    rank = keep.argsort(1).argsort(1)
    torch.testing.assert_close(shuffled.tokens, torch.gather(ordered.tokens, 1, rank[..., None].expand_as(
        shuffled.tokens)))
    assert torch.equal(shuffled.positions, keep)

C = preset_channels()  # channels the tiny presets read


class TagCells(nn.Module):
    """Stands in for patch embedding (NHWC): every token of an image carries the value of its grid index."""

    def __init__(self, original, dim):
        super().__init__()
        self.img_size, self.patch_size, self.grid_size = original.img_size, original.patch_size, original.grid_size
        self.dim = dim

    def forward(self, images):
        rows, cols = self.grid_size
        tags = torch.arange(rows * cols, dtype=torch.float32).view(1, rows, cols, 1)
        return tags.expand(images.shape[0], -1, -1, self.dim)


def test_visible_tokens_land_at_their_own_positions_in_the_decoder_input():
    swin = build([]).encoder.model
    swin.patch_embed = TagCells(swin.patch_embed, 16)
    swin.layers, swin.norm = nn.Sequential(), nn.Identity()
    encoder = VisibleSwin(swin)
    mask = random_mask(4, encoder.num_cells, 0.75, generator=torch.Generator().manual_seed(3))
    encoded = encoder.forward_masked(torch.zeros(4, C, 32, 32), mask.keep)
    assert torch.equal(encoded.tokens[..., 0], mask.keep.float())

    decoder = MAEDecoder(16, encoder.grid, 48, dim=16, depth=0, heads=2, prefix_tokens=0)
    decoder.mask_token.data.fill_(-1.0)
    placed = decoder.place(encoded.tokens, encoded.positions)[..., 0]
    positions = torch.arange(encoder.num_cells, dtype=torch.float32).expand(4, -1)
    assert torch.equal(placed[~mask.hidden], positions[~mask.hidden])
    assert torch.all(placed[mask.hidden] == -1)


def test_compute_falls_with_the_mask_ratio():
    from torch.utils.flop_counter import FlopCounterMode

    encoder = build(STRADDLE).encoder
    images = torch.randn(2, C, 56, 56)
    flops = {}
    for ratio in (0.0, 0.75):
        keep = random_mask(2, encoder.num_cells, ratio).keep
        with FlopCounterMode(display=False) as counter:
            encoder.forward_masked(images, keep)
        flops[ratio] = counter.get_total_flops()
    assert flops[0.75] < 0.45 * flops[0.0], flops


def test_masks_hide_whole_cells_and_targets_are_per_cell_normalized():
    mae = build([])
    assert mae.target_px == 4 and mae.grid == (8, 8)
    out = mae(torch.rand(2, C, 32, 32))
    assert out.pred.shape == out.target.shape == (2, 64, 4 * 4 * C)
    torch.testing.assert_close(out.target.mean(-1), torch.zeros(2, 64), atol=1e-5, rtol=0)
    assert torch.all((~out.mask.hidden).sum(1) == 16)


@pytest.mark.parametrize("overrides, message", [
    (["model.img_size=34"], "not divisible by the Swin output stride"),
    (["model.img_size=36"], "window 4x4 does not divide the 18x18 token grid"),
    (["model.kwargs={embed_dim: 32, depths: [2, 2], num_heads: [2, 4], window_size: 3}"], "window 3x3"),
    (["mask.unit=6"], "mask.unit"),
    (["model.name=resnet18"], "resnet18"),
])
def test_bad_sizes_and_models_are_one_clear_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(overrides)


def test_a_size_that_does_not_tile_names_the_nearest_sizes_that_do_and_they_build():
    with pytest.raises(ConfigError) as refused:
        build(["model.img_size=[40,64]"])
    suggested = re.findall(r"model\.img_size=\[\d+,\d+\]", str(refused.value))
    assert suggested == ["model.img_size=[32,64]", "model.img_size=[48,64]"]
    for size in suggested:
        build([size])


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    return pretrain_briefly(tmp_path_factory, "mae_swin", ["--config", "tiny_mae_swin_cpu", *QUICK], 30, 30)


def test_short_visible_only_run_lowers_the_loss(mae_run):
    first, last = loss_at_both_ends(mae_run[1], steps=30, window=10)
    assert last < 0.9 * first, (first, last)


def test_exported_swin_encoder_loads_into_timm_with_the_same_features(mae_run):
    loaded, encoder = export_of_run(*mae_run, {"head.fc.weight", "head.fc.bias"})
    images = torch.randn(2, C, 32, 32)
    with torch.no_grad():
        reference = loaded.forward_features(images)
        torch.testing.assert_close(reference, encoder(images))
        tokens = encoder.forward_masked(images, torch.arange(64).expand(2, -1)).tokens
        torch.testing.assert_close(reference.flatten(1, 2), tokens)


@pytest.mark.parametrize("preset, method, grid", [
    ("simmim_swin_base_w6_192", "SimMIM", (6, 6)), ("simmim_swin_tiny_w7_224", "SimMIM", (7, 7)),
    ("mae_swin_base_w7_224", "MAE", (7, 7)), ("mae_swin_tiny_w7_224", "MAE", (7, 7)),
])
def test_full_size_presets_build_and_their_encoder_is_the_plain_timm_swin(preset, method, grid):
    cfg = load_config(PretrainConfig, [preset], [])
    with torch.device("meta"):
        built = build_method(cfg)
        m = cfg.model
        plain = timm.create_model(m.name, pretrained=False, num_classes=0,
                                  **timm_kwargs(m.img_size, m.patch_size, m.drop_path_rate, m.kwargs))
    assert type(built).__name__ == method and built.grid == grid
    assert built.encoder.model.state_dict().keys() == plain.state_dict().keys()
