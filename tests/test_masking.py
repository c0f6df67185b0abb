import pytest
import torch

from mimswin.models.masking import mask_from_hidden, num_visible, random_mask


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_random_mask_hides_exact_count_per_sample(ratio):
    sample = random_mask(16, 196, ratio)
    keep = num_visible(196, ratio)
    assert keep == int(196 * (1 - ratio))
    assert torch.all((~sample.hidden).sum(1) == keep)
    assert sample.keep.shape == (16, keep)


def test_keep_lists_exactly_the_visible_patches_ascending():
    sample = random_mask(8, 64, 0.75)
    assert torch.all(sample.keep[:, 1:] > sample.keep[:, :-1])
    visible = torch.zeros_like(sample.hidden)
    visible.scatter_(1, sample.keep, True)
    assert torch.equal(visible, ~sample.hidden)


def test_masks_differ_between_samples_and_follow_the_generator():
    a = random_mask(4, 64, 0.75, generator=torch.Generator().manual_seed(1))
    b = random_mask(4, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.hidden, b.hidden)
    assert not torch.equal(a.hidden[0], a.hidden[1])


def test_mask_from_hidden_rebuilds_keep_and_rejects_ragged_masks():
    sample = random_mask(3, 16, 0.5)
    rebuilt = mask_from_hidden(sample.hidden)
    assert torch.equal(rebuilt.keep, sample.keep)
    ragged = sample.hidden.clone()
    ragged[0, rebuilt.keep[0, 0]] = True
    with pytest.raises(ValueError):
        mask_from_hidden(ragged)
