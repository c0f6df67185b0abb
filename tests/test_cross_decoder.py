"""The cross-attention decoder (decoder.kind=cross): queries answer independently from the visible tokens only, the
predicted subset is a reproducible share of the hidden cells, block readout, pictures, exact resume, config errors.
The no-leak and hand-computed-loss contracts of every family with a cross decoder are in tests/test_encoders.py."""

import pytest
import torch
from conftest import TINY, TINY_OVERRIDES, TINY_PRESET, preset_channels, run_and_resume

from mimswin.config import PretrainConfig, load_config
from mimswin.errors import ConfigError
from mimswin.eval.pictures import LEGIBLE_SIDE, PICTURE_MASK_SEED, reconstruction_grid
from mimswin.models import build_method
from mimswin.models.cross_decoder import CrossBlock, CrossDecoder
from mimswin.models.masking import random_mask, with_predicted_subset

C = preset_channels()
CROSS = ["decoder.kind=cross"]


def build(*overrides, preset=TINY_PRESET):
    torch.manual_seed(0)
    return build_method(load_config(PretrainConfig, [preset], [*TINY_OVERRIDES, *CROSS, *overrides]))


def test_each_query_is_answered_from_the_visible_tokens_alone_whatever_else_is_asked():
    decoder = CrossDecoder(encoder_dim=12, grid=(4, 4), out_dim=5, dim=16, depth=2, heads=4, prefix_tokens=1).eval()
    tokens, prefix = torch.randn(2, 6, 12), torch.randn(2, 1, 12)
    positions = torch.stack([torch.randperm(16)[:6] for _ in range(2)])
    queries = torch.stack([torch.randperm(16)[:7] for _ in range(2)])
    with torch.no_grad():
        together = decoder(tokens, positions, prefix, queries)
        whole = decoder(tokens, positions, prefix)
        assert together.shape == (2, 7, 5) and whole.shape == (2, 16, 5)
        for q in range(7):  # no attention among queries: each answer is the same asked alone
            torch.testing.assert_close(decoder(tokens, positions, prefix, queries[:, q:q + 1])[:, 0], together[:, q])
        torch.testing.assert_close(whole.gather(1, queries[..., None].expand(-1, -1, 5)), together)
        order = torch.randperm(6)  # the visible tokens are a set: their order does not matter
        torch.testing.assert_close(decoder(tokens[:, order], positions[:, order], prefix, queries), together)
    assert all(isinstance(block, CrossBlock) for block in decoder.blocks)


def test_predicted_subset_is_a_reproducible_share_of_each_images_hidden_cells():
    mask = random_mask(4, 64, 0.75, generator=torch.Generator().manual_seed(0))
    first = with_predicted_subset(mask, 0.25, torch.Generator().manual_seed(1))
    again = with_predicted_subset(mask, 0.25, torch.Generator().manual_seed(1))
    other = with_predicted_subset(mask, 0.25, torch.Generator().manual_seed(2))
    assert first.predict.shape == (4, 12)  # int(48 * 0.25)
    assert torch.equal(first.predict, again.predict) and not torch.equal(first.predict, other.predict)
    assert torch.equal(first.predict, first.predict.sort(dim=1).values)
    assert torch.all(first.scored <= mask.hidden) and torch.all(first.scored.sum(1) == 12)
    assert len({tuple(row.tolist()) for row in first.predict}) == 4  # drawn per image
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    assert with_predicted_subset(mask, 1.0, generator) is mask  # all hidden cells: nothing drawn
    assert torch.equal(generator.get_state(), state) and torch.equal(mask.scored, mask.hidden)
    assert torch.equal(mask.hidden.gather(1, mask.hidden_positions()), torch.ones(4, 48, dtype=torch.bool))


def test_the_method_draws_the_subset_with_the_mask_and_scores_only_it():
    method = build("decoder.predict_ratio=0.5")
    images = torch.randn(2, C, 32, 32)
    mask = method.draw_mask(2, images.device, torch.Generator().manual_seed(0))
    assert mask.predict.shape == (2, 24)  # 48 hidden, half of them
    out = method(images, mask)
    assert torch.equal(out.answered, mask.scored)
    assert torch.all(out.pred[~out.answered] == 0) and torch.all(out.pred[out.answered] != 0)
    whole = build()(images, random_mask(2, 64, 0.75))  # a mask without a subset: every hidden cell
    assert torch.equal(whole.answered, whole.mask.hidden)


def test_self_decoder_with_a_subset_answers_the_same_cells_as_it_does_over_the_whole_grid():
    torch.manual_seed(0)
    method = build_method(load_config(PretrainConfig, [TINY_PRESET], [*TINY_OVERRIDES, "decoder.predict_ratio=0.5"]))
    images = torch.randn(2, C, 32, 32)
    mask = method.draw_mask(2, images.device, torch.Generator().manual_seed(0))
    with torch.no_grad():
        subset = method(images, mask)
        whole = method(images, mask._replace(predict=None))
    assert whole.answered is None and torch.equal(subset.answered, mask.scored)
    torch.testing.assert_close(subset.pred[subset.answered], whole.pred[subset.answered])


def test_feature_blocks_are_the_blocks_outputs_and_every_block_and_weight_learns():
    method = build("decoder.feature_blocks=[0, -1]")
    encoder = method.encoder
    assert encoder.feature_blocks == (0, 1)
    images = torch.randn(2, C, 32, 32)
    keep = torch.arange(64).expand(2, -1)
    with torch.no_grad():
        encoded = encoder.forward_masked(images, keep)
        reference = encoder.model.forward_intermediates(images, indices=[0], norm=False, output_fmt="NLC",
                                                        return_prefix_tokens=True, intermediates_only=True)[0]
    first = torch.cat([reference[1], reference[0]], dim=1)  # timm returns (tokens, prefix)
    torch.testing.assert_close(encoded.features[0], first)
    torch.testing.assert_close(encoded.features[1], torch.cat([encoded.prefix, encoded.tokens], dim=1))
    assert method.decoder.feature_weights.shape == (1, 2)  # TINY: a 1-block decoder, 2 encoder blocks read
    method(images).loss.backward()
    unused = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_pictures_show_the_predicted_cells_and_leave_the_others_gray():
    method = build("decoder.predict_ratio=0.5")
    images = torch.randn(2, C, 32, 32)
    picture = reconstruction_grid(method, images, [0.5], [0.25])
    side = 32 * -(-LEGIBLE_SIDE // 32)

    def column(row, col):  # one tile, back at the image's own 32 px
        top, left = 2 + row * (side + 2), 2 + col * (side + 2)
        return picture[:, top:top + side:side // 32, left:left + side:side // 32]

    mask = method.draw_mask(2, images.device, torch.Generator().manual_seed(PICTURE_MASK_SEED))  # the picture's
    for row in range(2):
        cells = lambda which: which[row].view(8, 8).repeat_interleave(4, 0).repeat_interleave(4, 1)  # noqa: E731
        predicted, hidden = cells(mask.scored), cells(mask.hidden)
        for col in (2, 3):
            tile = column(row, col)
            assert torch.all(tile[:, hidden & ~predicted] == 0.5)
            assert not torch.all(tile[:, predicted] == 0.5)
        assert torch.all(column(row, 2)[:, ~hidden] == 0.5)
        torch.testing.assert_close(column(row, 3)[:, ~hidden], column(row, 0)[:, ~hidden])


def test_resume_mid_epoch_draws_the_same_subsets_and_reproduces_the_uninterrupted_run(tmp_path):
    args = [*TINY, *CROSS, "decoder.predict_ratio=0.5", "train.max_steps=6", "train.save_every=3",
            "train.keep_last=5", "train.log_every=1"]
    pair = run_and_resume(tmp_path, args, resume_at=3, steps=6)
    assert pair.full_weights.keys() == pair.resumed_weights.keys()
    for key in pair.full_weights:
        assert torch.equal(pair.full_weights[key], pair.resumed_weights[key]), key


@pytest.mark.parametrize("overrides, message", [
    (["decoder.predict_ratio=0"], "decoder.predict_ratio': must be in \\(0, 1\\]"),
    (["decoder.predict_ratio=1.5"], "decoder.predict_ratio': must be in \\(0, 1\\]"),
    (["decoder.kind=both"], "decoder.kind': must be self or cross"),
    (["decoder.kind=self", "decoder.feature_blocks=[-1]"], "needs decoder.kind=cross"),
    (["decoder.feature_blocks=[]"], "at least one encoder block"),
    (["decoder.feature_blocks=[2]"], "\\[2\\] outside the encoder's 2 blocks"),
    (["decoder.feature_blocks=[-3, -1]"], "\\[-3\\] outside the encoder's 2 blocks"),
    (["decoder.feature_blocks=[1, -1]"], "names a block twice"),
    (["decoder.feature_blocks=[0]"], "must include the last block"),
])
def test_bad_decoder_options_are_one_clear_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(*overrides)


@pytest.mark.parametrize("preset, overrides, message", [
    ("tiny_simmim_swin_cpu", [], "decoder.kind': cross needs method=mae"),
    ("tiny_simmim_swin_cpu", ["decoder.kind=self", "decoder.predict_ratio=0.5"], "predict_ratio': needs method=mae"),
    ("tiny_mae_swin_cpu", ["decoder.feature_blocks=[-1]"], "only a ViT's blocks share the output grid"),
    ("tiny_mae_hiera_cpu", ["decoder.feature_blocks=[-1]"], "reads its fused stages"),
])
def test_methods_and_encoders_the_options_do_not_fit_refuse_them_in_one_line(preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_method(load_config(PretrainConfig, [preset], [*CROSS, *overrides]))
