import torch

from mimswin.models.patches import denormalize_prediction, patch_stats, patchify, pixel_targets, unpatchify


def test_patchify_unpatchify_round_trip():
    images = torch.randn(2, 3, 32, 48)
    patches = patchify(images, 8)
    assert patches.shape == (2, 4 * 6, 8 * 8 * 3)
    assert torch.equal(unpatchify(patches, 8, (4, 6)), images)


def test_patchify_orders_patches_row_major_and_pixels_channel_last():
    images = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    patches = patchify(images, 2)
    # patch 1 is the top row, second column: pixels (0,2),(0,3),(1,2),(1,3), channels interleaved
    expected = torch.stack([images[0, :, r, c] for r, c in ((0, 2), (0, 3), (1, 2), (1, 3))]).flatten()
    assert torch.equal(patches[0, 1], expected)


def test_norm_pix_targets_use_per_patch_mean_and_unbiased_var():
    images = torch.randn(3, 3, 16, 16) * 4 + 2
    target = pixel_targets(images, 8, norm_pix=True)
    raw = patchify(images, 8)
    expected = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(target, expected)
    assert torch.equal(pixel_targets(images, 8, norm_pix=False), raw)


def test_denormalize_prediction_inverts_norm_pix():
    images = torch.rand(2, 3, 16, 16)
    restored = denormalize_prediction(pixel_targets(images, 4), images, 4)
    torch.testing.assert_close(restored, patchify(images, 4), atol=1e-5, rtol=1e-5)
    mean, std = patch_stats(patchify(images, 4))
    assert mean.shape == std.shape == (2, 16, 1)
