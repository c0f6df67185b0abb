import pytest
import timm
import torch
from conftest import TINY_OVERRIDES, TINY_PRESET, norm_pix_mse_by_hand, preset_channels
from torch import nn

from mimswin.config import PretrainConfig, load_config
from mimswin.models import build_method
from mimswin.models.masking import random_mask
from mimswin.models.patches import patchify
from mimswin.models.pos_embed import sincos_2d
from mimswin.models.tokens import gather_tokens, scatter_tokens

C = preset_channels()  # channels the tiny presets read


@pytest.fixture
def mae():
    torch.manual_seed(0)
    return build_method(load_config(PretrainConfig, [TINY_PRESET], TINY_OVERRIDES))


class TagPatches(nn.Module):
    """Stands in for patch embedding: token i of every image is the vector filled with the value i."""

    def __init__(self, grid, dim):
        super().__init__()
        self.grid_size, self.patch_size, self.dim = grid, (4, 4), dim
        self.proj = nn.Conv2d(3, dim, 4, 4)

    def forward(self, images):
        count = self.grid_size[0] * self.grid_size[1]
        return torch.arange(count, dtype=torch.float32).view(1, count, 1).expand(images.shape[0], count, self.dim)


def test_visible_tokens_keep_their_order_and_land_at_their_own_decoder_positions(mae):
    vit = mae.encoder.model
    vit.patch_embed = TagPatches(mae.grid, vit.embed_dim)
    vit.pos_embed.data.zero_()
    vit.blocks, vit.norm = nn.Identity(), nn.Identity()
    mask = random_mask(4, 64, 0.75, generator=torch.Generator().manual_seed(3))
    encoded = mae.encoder.forward_masked(torch.zeros(4, C, 32, 32), mask.keep)
    assert torch.equal(encoded.tokens[..., 0], mask.keep.float())
    assert torch.equal(encoded.positions, mask.keep)

    fill = torch.full((vit.embed_dim,), -1.0)
    grid = scatter_tokens(encoded.tokens, encoded.positions, fill, 64)[..., 0]
    positions = torch.arange(64, dtype=torch.float32).expand(4, -1)
    assert torch.equal(grid[~mask.hidden], positions[~mask.hidden])
    assert torch.all(grid[mask.hidden] == -1)


def test_scatter_is_the_inverse_of_gather_on_shuffled_positions():
    tokens = torch.randn(2, 10, 5)
    positions = torch.stack([torch.randperm(10)[:4] for _ in range(2)])
    picked = gather_tokens(tokens, positions)
    placed = scatter_tokens(picked, positions, torch.zeros(5), 10)
    for b in range(2):
        for i, p in enumerate(positions[b]):
            assert torch.equal(placed[b, p], tokens[b, p])
            assert torch.equal(picked[b, i], tokens[b, p])


def test_encoder_with_nothing_masked_equals_timm_forward_features(mae):
    mae.eval()
    images = torch.randn(2, C, 32, 32)
    keep = torch.arange(64).expand(2, -1)
    encoded = mae.encoder.forward_masked(images, keep)
    reference = mae.encoder.model.forward_features(images)
    torch.testing.assert_close(torch.cat([encoded.prefix, encoded.tokens], 1), reference)


def test_position_embedding_is_fixed_sincos():
    table = sincos_2d(8, (2, 3), prefix_tokens=1)
    assert torch.all(table[0] == 0)
    # token (row 1, col 2): first half encodes the column, second half the row
    col, row = 2.0, 1.0
    freqs = torch.tensor([1.0, 1.0 / 100.0])
    expected = torch.cat([torch.sin(col * freqs), torch.cos(col * freqs),
                          torch.sin(row * freqs), torch.cos(row * freqs)])
    torch.testing.assert_close(table[1 + 1 * 3 + 2], expected)


def test_loss_equals_hand_computation_on_hidden_patches_only(mae):
    images = torch.randn(2, C, 32, 32)
    mask = random_mask(2, 64, 0.75, generator=torch.Generator().manual_seed(0))
    out = mae(images, mask)
    expected, count = norm_pix_mse_by_hand(out.pred, images, mask.hidden, 4)
    assert count == 2 * 48
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_gradients_reach_encoder_and_decoder_but_not_hidden_pixels(mae):
    images = torch.randn(2, C, 32, 32, requires_grad=True)
    mask = random_mask(2, 64, 0.75)
    out = mae(images, mask)
    out.loss.backward()
    trainable = {n: p for n, p in mae.named_parameters() if p.requires_grad}
    assert trainable["encoder.model.blocks.0.attn.qkv.weight"].grad.abs().sum() > 0
    assert trainable["encoder.model.patch_embed.proj.weight"].grad.abs().sum() > 0
    assert trainable["decoder.blocks.0.mlp.fc1.weight"].grad.abs().sum() > 0
    assert trainable["decoder.mask_token"].grad.abs().sum() > 0
    assert "encoder.model.pos_embed" not in trainable

    (pixel_grad,) = torch.autograd.grad(mae(images, mask).pred.sum(), images)
    per_patch = patchify(pixel_grad.abs(), 4).sum(-1)
    assert torch.all(per_patch[mask.hidden] == 0)
    assert torch.all(per_patch[~mask.hidden] > 0)


@pytest.mark.parametrize("preset", ["mae_vit_huge_patch14", "mae_vit_giant_patch14"])
def test_huge_and_giant_presets_build_the_plain_timm_encoder_with_the_mae_decoder(preset):
    cfg = load_config(PretrainConfig, [preset])
    with torch.device("meta"):
        built = build_method(cfg)
        plain = timm.create_model(cfg.model.name, pretrained=False)
    assert built.encoder.model.state_dict().keys() == {k for k in plain.state_dict() if not k.startswith("head.")}
    assert built.grid == (16, 16) and built.target_px == 14 and built.mask_ratio == 0.75
    assert built.decoder.embed.out_features == 512 and len(built.decoder.blocks) == 8
