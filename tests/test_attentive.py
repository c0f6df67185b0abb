"""The attentive probe's pooler: a hand computation, order invariance, learning, and its one-line errors."""

import math

import pytest
import torch

from mimswin.errors import ConfigError
from mimswin.eval.attentive import AttentivePooler, attentive_probe, cosine_lr, drop_tokens, train_pooler
from mimswin.eval.logistic import logistic_probe


def scores_by_hand(pooler, tokens):
    """Class scores computed loop by loop in float64, as textbook cross-attention: per query and head, softmax over the
    tokens of q . k / sqrt(d) with the key projection folded into the query; the head's value projection of the
    weighted tokens; heads side by side, queries concatenated, LayerNorm, Linear."""
    batch, count, dim = tokens.shape
    heads, d = pooler.heads, dim // pooler.heads
    x = ((tokens - pooler.mean) / pooler.std).double()
    value_w, value_b = pooler.value.weight.double(), pooler.value.bias.double()
    rows = []
    for b in range(batch):
        parts = []
        for query in pooler.queries.double():
            for h in range(heads):
                logits = [float(query[h] @ x[b, n]) / math.sqrt(d) for n in range(count)]
                top = max(logits)
                weights = [math.exp(v - top) for v in logits]
                mean = sum(w / sum(weights) * x[b, n] for n, w in enumerate(weights))
                rows_h = slice(h * d, (h + 1) * d)
                parts.append(value_w[rows_h] @ mean + value_b[rows_h])
        rows.append(torch.cat(parts))
    joined = torch.stack(rows)
    normed = torch.nn.functional.layer_norm(joined, joined.shape[1:], pooler.norm.weight.double(),
                                            pooler.norm.bias.double())
    return normed @ pooler.head.weight.double().T + pooler.head.bias.double()


def test_pooler_output_equals_a_hand_computation():
    torch.manual_seed(0)
    pooler = AttentivePooler(dim=4, num_classes=3, queries=2, heads=2)
    torch.nn.init.normal_(pooler.queries)
    tokens = torch.randn(2, 5, 4) * 3 + 1
    pooler.standardize_with(tokens)
    torch.testing.assert_close(pooler.mean, tokens.reshape(-1, 4).mean(0))
    torch.testing.assert_close(pooler.std, tokens.reshape(-1, 4).std(0, unbiased=False))
    with torch.no_grad():
        torch.testing.assert_close(pooler(tokens).double(), scores_by_hand(pooler, tokens), atol=1e-5, rtol=1e-5)


def test_token_order_does_not_change_the_output():
    torch.manual_seed(1)
    pooler = AttentivePooler(dim=8, num_classes=4, queries=3, heads=4)
    tokens = torch.randn(3, 7, 8)
    with torch.no_grad():
        torch.testing.assert_close(pooler(tokens[:, torch.randperm(7)]), pooler(tokens), atol=1e-5, rtol=1e-5)


def needle_tokens(count, seed):
    """Tokens of noise where one token, at a random place, carries its class's direction: the mean of the tokens
    dilutes it 16 times, attention can find it."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (count,), generator=generator)
    tokens = torch.randn(count, 16, 8, generator=generator) * 0.5
    directions = torch.eye(8)[:4] * 3
    tokens[:, :, 4] = -1.0  # a marker the needle lacks, so a key can tell it from the noise
    where = torch.randint(0, 16, (count,), generator=generator)
    tokens[torch.arange(count), where] = directions[labels] + torch.randn(count, 8, generator=generator) * 0.1
    return tokens, labels


def test_pooler_learns_a_problem_only_attention_solves_well():
    train_x, train_y = needle_tokens(512, 0)
    val_x, val_y = needle_tokens(256, 1)
    hyper = dict(queries=2, heads=2, lr=3e-3, weight_decay=0.0, epochs=40, batch_size=64, token_drop=0.0)
    result = attentive_probe(train_x, train_y, val_x, val_y, 4, seeds=[0, 1], **hyper)
    assert len(result["seed_top1"]) == 2 and result["top1"] >= 95.0, result
    mean_pooled = logistic_probe(train_x.mean(1), train_y, val_x.mean(1), val_y, 4)["top1"]
    assert mean_pooled < 85.0  # the logistic probe of the averaged tokens: 73.8


def test_training_is_seeded():
    x, y = needle_tokens(64, 2)
    hyper = dict(queries=1, heads=1, lr=1e-3, weight_decay=0.05, epochs=2, batch_size=16, token_drop=0.25)
    first, again, other = (train_pooler(x, y, 4, seed=s, **hyper) for s in (0, 0, 1))
    torch.testing.assert_close(first.head.weight, again.head.weight, rtol=0, atol=0)
    assert not torch.equal(first.head.weight, other.head.weight)


def test_token_drop_keeps_a_random_subset_of_each_samples_own_tokens():
    tokens = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    kept = drop_tokens(tokens, 0.25, torch.Generator().manual_seed(0))
    assert kept.shape == (2, 6, 3)
    for sample in range(2):
        rows = {tuple(row.tolist()) for row in tokens[sample]}
        assert len({tuple(row.tolist()) for row in kept[sample]} & rows) == 6
    assert drop_tokens(tokens, 0.0, torch.Generator()) is tokens


def test_small_labeled_sets_train_for_at_least_min_steps():
    x, y = needle_tokens(10, 3)
    hyper = dict(queries=1, heads=1, lr=1e-3, weight_decay=0.0, batch_size=4, token_drop=0.0, seed=0)
    assert train_pooler(x, y, 4, epochs=2, min_steps=0, **hyper).steps == 6  # 3 batches per epoch
    assert train_pooler(x, y, 4, epochs=2, min_steps=10, **hyper).steps == 12  # 4 epochs: the first >= 10 steps


def test_schedule_warms_up_then_decays_to_zero():
    lrs = [cosine_lr(step, 100, 1.0) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-3


def test_heads_that_do_not_divide_the_width_are_a_config_error():
    with pytest.raises(ConfigError, match="attentive.heads"):
        AttentivePooler(dim=10, num_classes=2, heads=4)
    with pytest.raises(ConfigError, match="attentive.heads"):
        AttentivePooler(dim=10, num_classes=2, heads=0)


def test_zero_heads_are_refused_not_read_as_unset():
    from mimswin.config import load_config
    from mimswin.config.evaluation import LinprobeConfig

    assert load_config(LinprobeConfig, ["tiny_linprobe_cpu"], ["checkpoint=x"]).attentive.heads is None
    with pytest.raises(ConfigError, match="attentive.heads.*must be >= 1, got 0"):
        load_config(LinprobeConfig, ["tiny_linprobe_cpu"], ["checkpoint=x", "attentive.heads=0"])


def test_probe_tokens_are_the_encoders_own_final_tokens():
    import timm

    from mimswin.eval.pooling import ProbeTokens

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, num_classes=0,
                            global_pool="token").eval()
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, embed_dim=32, depths=[2, 2],
                             num_heads=[2, 4], window_size=4, num_classes=0).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ProbeTokens(vit, 1)(x), vit.forward_features(x))  # class + 16 patch tokens
        both = ProbeTokens(vit, 2)(x)
        assert both.shape == (2, 17, 2 * 192)
        torch.testing.assert_close(both[..., :192], vit.forward_features(x))
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(ProbeTokens(swin, 1)(x), swin.forward_features(x).flatten(1, 2))
    with pytest.raises(ConfigError, match="attentive.blocks.*different grids"), torch.no_grad():
        ProbeTokens(swin, 2)(x)  # its two stages have different grids


def test_probe_tokens_read_side_by_side_the_stages_that_share_a_grid_whatever_feature_info_says():
    import timm

    from mimswin.eval.pooling import ProbeTokens

    hiera = timm.create_model("hiera_tiny_224", img_size=32, embed_dim=32, num_heads=1, stages=[1, 2, 3], q_pool=1,
                              mask_unit_size=[4, 4], mask_unit_attn=[True, False, False], patch_stride=[2, 2],
                              patch_kernel=[3, 3], patch_padding=[1, 1], num_classes=0).eval()
    assert len({info["reduction"] for info in hiera.feature_info[-2:]}) == 2, "timm reports two grids"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        both = ProbeTokens(hiera, 2)(x)  # one pooling (q_pool 1): stages 2 and 3 are both 8 x 8
        last = ProbeTokens(hiera, 1)(x)
        assert both.shape == (2, 64, 128 + 64)
        torch.testing.assert_close(both[..., :128], last)
        with pytest.raises(ConfigError, match="64 / 64 / 256 tokens"):
            ProbeTokens(hiera, 3)(x)


@pytest.mark.parametrize("width,heads", [(192, 12), (64, 8), (96, 12), (100, 10), (7, 7), (768, 12)])
def test_unset_heads_are_the_most_up_to_twelve_that_divide_the_width(width, heads):
    assert AttentivePooler(dim=width, num_classes=2).heads == heads
