"""MAE on timm's Hiera: equivalence with timm's forwards, unit positions, the loss, short runs, export, evaluation."""

import pytest
import timm
import torch
from conftest import export_of_run, loss_at_both_ends, norm_pix_mse_by_hand, preset_channels, pretrain_briefly
from einops import rearrange
from torch.nn import functional as F

from mimswin.config import PretrainConfig, load_config
from mimswin.config.evaluation import LinprobeConfig
from mimswin.errors import ConfigError
from mimswin.eval.features import probe_encoder
from mimswin.eval.pooling import ProbeFeatures, ProbeTokens
from mimswin.models import build_method
from mimswin.models.create import timm_kwargs
from mimswin.models.hiera_mae import HieraMAEDecoder, unit_cells
from mimswin.models.masking import random_mask
from mimswin.models.tokens import scatter_tokens
from mimswin.programs import finetune, linprobe
from mimswin.runs.export import read_export
from mimswin.runs.open import read_encoder_weights

PRESET = "tiny_mae_hiera_cpu"
C = preset_channels(PRESET)  # channels the tiny Hiera preset reads
SMALL = ["decoder.dim=32", "decoder.depth=1", "decoder.heads=2"]
# The tiny preset pools once (MAE's q_pool one short of the stages, 4 px predictions, 2x2 tokens per unit at the end);
# FULL_POOL pools at every stage step (one final token per unit, 8 px predictions).
FULL_POOL = [*SMALL, "model.kwargs.q_pool=2"]
QUICK = ["data.batch_size=16", "data.num_workers=0", "train.progress=false", "decoder.depth=1"]
EVAL = ["data.batch_size=32", "data.num_workers=0", "train.progress=false", "data.labels_per_class=10"]


def build(overrides=SMALL):
    torch.manual_seed(0)
    return build_method(load_config(PretrainConfig, [PRESET], overrides)).eval()


def spatial(stage, unit_grid):
    """[B, L=all units, side, side, C] -> the [B, H, W, C] map it tiles."""
    return rearrange(stage, "b (r c) h w d -> b (r h) (c w) d", r=unit_grid[0], c=unit_grid[1])


def cell_pixels(hidden, grid, cell_px):
    """[B, cells] bool over a (rows, cols) grid -> [B, 1, H, W] float, 1 on the pixels of those cells."""
    cells = hidden.view(-1, 1, *grid).float()
    return cells.repeat_interleave(cell_px, 2).repeat_interleave(cell_px, 3)


@pytest.mark.parametrize("overrides", [SMALL, FULL_POOL], ids=["mae_q_pool", "full_q_pool"])
def test_nothing_hidden_gives_timm_forward_features_at_every_stage(overrides):
    encoder = build(overrides).encoder
    images = torch.randn(2, C, 32, 32)
    with torch.no_grad():
        stages = encoder.forward_masked(images, torch.arange(encoder.num_units).expand(2, -1)).stages
        maps = encoder.model.forward_intermediates(images, output_fmt="NHWC", intermediates_only=True)
        final = encoder.model.forward_features(images)
    assert len(stages) == len(maps) == 3
    for stage, reference in zip(stages, maps):
        torch.testing.assert_close(spatial(stage, encoder.unit_grid), reference)
    if encoder.stage_sides[-1] == 1:  # every unroll consumed: timm's final tokens are in raster order
        torch.testing.assert_close(stages[-1].flatten(1, 3), final)


@pytest.mark.parametrize("overrides", [SMALL, FULL_POOL], ids=["mae_q_pool", "full_q_pool"])
def test_each_visible_token_equals_timm_masked_forward_token_for_token(overrides):
    encoder = build(overrides).encoder
    images = torch.randn(3, C, 32, 32)
    mask = random_mask(3, encoder.num_units, 0.6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        final = encoder.forward_masked(images, mask.keep).stages[-1]
        reference = encoder.model.forward_features(images, mask=~mask.hidden)
    # timm's last tokens are ordered (row, col inside the unit of the one unroll step left, unit); a full pool: unit.
    side, (batch, units, _, _, dim) = encoder.stage_sides[-1], final.shape
    torch.testing.assert_close(final, reference.view(batch, side, side, units, dim).permute(0, 3, 1, 2, 4))


def key_masked_attention(attn, visible_units):
    """timm's global MaskUnitAttention over all tokens, with the keys of hidden units' tokens ignored (the unrolled
    order keeps the unit innermost: token n belongs to unit n % units)."""
    def forward(x):
        batch, count, _ = x.shape
        q, k, v = attn.qkv(x).reshape(batch, count, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if attn.q_stride > 1:
            q = q.view(batch, attn.heads, attn.q_stride, -1, attn.head_dim).amax(dim=2)
        keys = visible_units.repeat(1, count // visible_units.shape[1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
        return attn.proj(out.transpose(1, 2).reshape(batch, -1, attn.dim_out))
    return forward


@pytest.mark.parametrize("overrides", [SMALL, FULL_POOL], ids=["mae_q_pool", "full_q_pool"])
def test_each_visible_token_equals_timm_full_forward_at_its_own_place_with_hidden_units_blanked(overrides):
    """Independent of timm's token dropping: the full-image forward with hidden pixels zeroed and hidden keys ignored
    in global attention (mask-unit attention and q-pooling never leave a unit) holds the same visible tokens."""
    encoder = build(overrides).encoder
    images = torch.randn(2, C, 32, 32)
    mask = random_mask(2, encoder.num_units, 0.6, generator=torch.Generator().manual_seed(2))
    visible = ~mask.hidden
    with torch.no_grad():
        stages = encoder.forward_masked(images, mask.keep).stages
        hiera = encoder.model
        for block in hiera.blocks:
            if not block.attn.use_mask_unit_attn:
                block.attn.forward = key_masked_attention(block.attn, visible)
        blanked = images * cell_pixels(visible, encoder.unit_grid, encoder.unit_px)
        maps = hiera.forward_intermediates(blanked, output_fmt="NHWC", intermediates_only=True)
    assert any(not block.attn.use_mask_unit_attn for block in hiera.blocks)
    for stage, side, reference in zip(stages, encoder.stage_sides, maps):
        per_unit = rearrange(reference, "b (r h) (c w) d -> b (r c) h w d", h=side, w=side)
        for b in range(2):
            torch.testing.assert_close(stage[b], per_unit[b, mask.keep[b]])


def test_keep_order_does_not_matter_and_units_come_back_ascending():
    encoder = build().encoder
    images = torch.randn(2, C, 32, 32)
    keep = torch.stack([torch.randperm(encoder.num_units)[:6] for _ in range(2)])
    with torch.no_grad():
        shuffled = encoder.forward_masked(images, keep)
        ordered = encoder.forward_masked(images, keep.sort(1).values)
    assert torch.equal(shuffled.positions, keep.sort(1).values)
    for a, b in zip(shuffled.stages, ordered.stages):
        assert torch.equal(a, b)


def test_decoder_puts_position_tagged_units_at_their_own_places_whatever_their_order():
    unit_grid, side = (4, 4), 2
    decoder = HieraMAEDecoder([8], [side], [0], unit_grid, out_dim=4, dim=8, depth=0, heads=2)
    decoder.mask_token.data.fill_(-1.0)
    keep = torch.stack([torch.randperm(16)[:6] for _ in range(3)])
    local = torch.arange(side * side, dtype=torch.float32).view(1, 1, side, side, 1)
    tags = (keep.float().view(3, 6, 1, 1, 1) * 10 + local).expand(-1, -1, -1, -1, 8)

    def place(units, positions):  # what the decoder's input holds: the units' cells among mask tokens
        return scatter_tokens(*unit_cells(units, positions, unit_grid), decoder.mask_token, decoder.num_cells)

    placed = place(tags, keep)[..., 0].view(3, 8, 8)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    expected = ((rows // side) * 4 + cols // side) * 10.0 + (rows % side) * side + cols % side
    hidden = torch.ones(3, 16, dtype=torch.bool).scatter_(1, keep, False)
    hidden_cells = hidden.view(3, 4, 1, 4, 1).expand(-1, -1, side, -1, side).reshape(3, 8, 8)
    assert torch.equal(placed[~hidden_cells], expected.expand(3, -1, -1)[~hidden_cells])
    assert torch.all(placed[hidden_cells] == -1)
    order = torch.argsort(keep, dim=1)
    resorted = place(torch.gather(tags, 1, order.view(3, 6, 1, 1, 1).expand_as(tags)), keep.sort(1).values)
    assert torch.equal(resorted[..., 0].view(3, 8, 8), placed)


def test_hidden_pixels_cannot_change_the_prediction_but_visible_ones_do():
    mae = build()
    images = torch.randn(2, C, 32, 32)
    mask = mae.draw_mask(2, images.device, torch.Generator().manual_seed(4))
    hidden_px = cell_pixels(mask.hidden, mae.grid, mae.target_px)
    noise = torch.randn_like(images)
    with torch.no_grad():
        pred = mae(images, mask).pred
        assert torch.equal(mae(images + noise * hidden_px, mask).pred, pred)
        assert not torch.allclose(mae(images + noise * (1 - hidden_px), mask).pred, pred)


def test_masks_hide_whole_units_and_predictions_cover_each_final_token_footprint():
    mae = build()
    assert mae.target_px == 4 and mae.grid == (8, 8) and mae.unit_cells == 2 and mae.mask_ratio == 0.6
    out = mae(torch.rand(2, C, 32, 32))
    assert out.pred.shape == out.target.shape == (2, 64, 4 * 4 * C)
    units = out.mask.hidden.view(2, 4, 2, 4, 2)
    assert torch.all(units == units[:, :, :1, :, :1])
    assert torch.all((~out.mask.hidden).sum(1) == 6 * 4)  # int(16 * 0.4) = 6 visible units of 2x2 cells


def test_loss_equals_hand_computation_on_hidden_units_only():
    mae = build([*SMALL, "loss.norm_pix=true"])
    images = torch.randn(2, C, 32, 32)
    mask = mae.draw_mask(2, images.device, torch.Generator().manual_seed(0))
    out = mae(images, mask)
    expected, count = norm_pix_mse_by_hand(out.pred, images, mask.hidden, 4)
    assert count == 2 * 40
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_the_tiny_preset_regresses_raw_pixels_of_the_hidden_cells():
    mae = build()  # the preset: norm_pix off (per-cell normalized 4 px targets left its decoder blind to the image)
    images = torch.randn(2, C, 32, 32)
    mask = mae.draw_mask(2, images.device, torch.Generator().manual_seed(0))
    out = mae(images, mask)
    cells = rearrange(images, "b c (r p) (s q) -> b (r s) (p q c)", p=4, q=4)
    torch.testing.assert_close(out.target, cells)
    hidden = mask.hidden.bool()
    expected = ((out.pred - cells) ** 2).mean(-1)[hidden].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_compute_falls_with_the_mask_ratio():
    from torch.utils.flop_counter import FlopCounterMode

    encoder = build().encoder
    images = torch.randn(2, C, 32, 32)
    flops = {}
    for ratio in (0.0, 0.6):
        keep = random_mask(2, encoder.num_units, ratio).keep
        with FlopCounterMode(display=False) as counter:
            encoder.forward_masked(images, keep)
        flops[ratio] = counter.get_total_flops()
    assert flops[0.6] < 0.5 * flops[0.0], flops


@pytest.mark.parametrize("overrides, message", [
    (["model.kwargs.mask_unit_size=[8,8]"], "q_stride"),
    (["model.img_size=36"], "does not tile"),
    (["model.img_size=33"], "does not tile into the 8 px"),
    (["model.kwargs.patch_kernel=[5,5]", "model.kwargs.patch_padding=[0,0]"], "one token per stride"),
    (["model.kwargs.patch_drop_rate=0.5"], "patch_drop_rate"),
    (["mask.unit=16"], "mask.unit"),
    (["method=simmim"], "SimMIM needs"),
])
def test_bad_sizes_and_options_are_one_clear_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build([*SMALL, *overrides])


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    return pretrain_briefly(tmp_path_factory, "mae_hiera", ["--config", PRESET, *QUICK], 30, 30)


def test_short_run_lowers_the_loss_and_draws_a_reconstruction(mae_run):
    first, last = loss_at_both_ends(mae_run[1], steps=30, window=10)
    assert last < 0.9 * first, (first, last)
    assert (mae_run[1] / "reconstruction.png").is_file()


def test_exported_hiera_loads_into_timm_with_the_same_features(mae_run):
    loaded, encoder = export_of_run(*mae_run, {"head.fc.weight", "head.fc.bias"})
    images = torch.randn(2, C, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(images), encoder(images))
        torch.testing.assert_close(loaded.forward_head(loaded.forward_features(images), pre_logits=True),
                                   encoder.norm(encoder(images).mean(1)))


def test_full_size_preset_builds_and_its_encoder_is_the_plain_timm_hiera_base():
    cfg = load_config(PretrainConfig, ["mae_hiera_base_224"], [])
    m = cfg.model
    with torch.device("meta"):
        built = build_method(cfg)
        plain = timm.create_model(m.name, pretrained=False,
                                  **timm_kwargs(m.img_size, m.patch_size, m.drop_path_rate, m.kwargs))
    assert type(built).__name__ == "HieraMAE" and built.grid == (14, 14) and built.target_px == 16
    assert built.encoder.unit_grid == (7, 7) and built.decoder.fusion.fused == [0, 1, 3] and built.mask_ratio == 0.6
    assert built.encoder.model.state_dict().keys() == {k for k in plain.state_dict() if not k.startswith("head.fc.")}


def test_probe_features_are_stage_averages_and_tokens_the_last_stage_with_the_head_norm():
    model = timm.create_model("hiera_tiny_224", num_classes=0,
                              **load_config(PretrainConfig, [PRESET], []).model.kwargs, img_size=32).eval()
    features = ProbeFeatures(model, "avg", blocks=4)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.forward_intermediates(images, intermediates_only=True)
        expected = [model.head.norm(maps[-1].mean((2, 3))), maps[1].mean((2, 3)), maps[0].mean((2, 3))]
        torch.testing.assert_close(features(images), torch.cat(expected, 1))
        torch.testing.assert_close(expected[0], model.forward_head(model.forward_features(images), pre_logits=True))
    assert features.blocks == 3 and features.num_features == 32 + 64 + 128
    with torch.no_grad():  # the attentive probe's tokens: the last stage's cells through the head's norm
        tokens = ProbeTokens(model, 1)(images)
        torch.testing.assert_close(tokens, model.head.norm(maps[-1].flatten(2).transpose(1, 2)))


def test_finetune_and_linprobe_run_on_the_exported_hiera_from_its_pretrained_weights(mae_run, tmp_path):
    run = mae_run[1]
    exported, _, _ = read_export(run / "encoder.safetensors")
    trainer, _ = finetune.build_finetune(*finetune.parse_eval_args(
        finetune.FinetuneConfig, "t", "t", ["--config", "tiny_finetune_hiera_cpu", "--from", str(run),
                                            f"train.output_dir={tmp_path / 'ft0'}", *EVAL]))
    state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    for key, tensor in exported.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0, msg=key)
    assert trainer.accelerator.unwrap_model(trainer.model).q_pool == 2

    results = finetune.main(["--config", "tiny_finetune_hiera_cpu", "--from", str(run),
                             f"train.output_dir={tmp_path / 'ft'}", "train.max_steps=3", *EVAL])
    assert results["steps"] == 3 and 0 <= results["last"]["val_top1"] <= 100

    def probe(random_init):
        cfg = load_config(LinprobeConfig, ["tiny_linprobe_cpu"], [f"checkpoint={run}", f"random_init={random_init}"])
        torch.manual_seed(0)
        return probe_encoder(read_encoder_weights(run), cfg)[0]

    images = torch.randn(4, C, 32, 32)
    with torch.no_grad():
        pretrained, random = probe(False), probe(True)
        assert pretrained(images).shape == (4, 32 + 64 + 128)
        assert not torch.allclose(pretrained(images), random(images))
    torch.testing.assert_close(pretrained.model.blocks[0].attn.qkv.weight, exported["blocks.0.attn.qkv.weight"])
    results = linprobe.main(["--config", "tiny_linprobe_cpu", "--from", str(run), "knn.k=5",
                             f"train.output_dir={tmp_path / 'lp'}", *EVAL])
    assert results["train_samples"] == 100 and 0 <= results["last"]["val_top1"] <= 100 and "knn_top1" in results


def test_bench_rows_do_equal_work_to_transformers_hiera_and_masking_saves_compute():
    pytest.importorskip("transformers")
    from mimswin.bench.contenders import HIERA_BUILDERS, PRESETS
    from mimswin.bench.measure import count_step_flops

    cpu, images = torch.device("cpu"), torch.randn(2, 3, 32, 32)
    runs = {name: build(PRESETS["tiny"], cpu) for name, build in HIERA_BUILDERS.items()}
    sizes = {name: sum(p.numel() for p in run.model.parameters()) for name, run in runs.items()}
    assert sizes["mimswin-mae-hiera"] == sizes["hf-hiera-mae"] == sizes["mimswin-hiera-all-units"]
    flops = {name: count_step_flops(run.loss_fn, images, cpu, "fp32") for name, run in runs.items()}
    assert flops["mimswin-mae-hiera"] == pytest.approx(flops["hf-hiera-mae"], rel=0.1)
    assert flops["mimswin-hiera-all-units"] > 1.5 * flops["mimswin-mae-hiera"]
    assert runs["hf-hiera-mae"].model.config.mask_ratio == runs["mimswin-mae-hiera"].model.mask_ratio == 0.6
