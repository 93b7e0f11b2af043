"""Class and dimension sampling (docs/design.md, sections 2.3-2.4)."""

import pytest
import torch

from unicom_kernels import DualPartialMarginLoss, dual_partial_margin_loss
from unicom_kernels.sampling import generator_keys, sample_classes, sample_dims, step_keys


@pytest.mark.parametrize("num_classes,rate,num_pos", [(1000, 0.1, 37), (1000, 0.01, 37), (97, 0.29, 5), (50, 1.0, 3)])
def test_sample_classes_properties(num_classes, rate, num_pos):
    gen = torch.Generator().manual_seed(3)
    positives = torch.randperm(num_classes, generator=gen)[:num_pos]
    index = sample_classes(positives, generator_keys(num_classes, torch.Generator().manual_seed(5), "cpu"), rate)
    assert index.dtype == torch.int64
    assert index.numel() == max(num_pos, int(rate * num_classes), 1)
    assert torch.isin(positives, index).all()
    assert torch.equal(index, index.unique())  # distinct and sorted
    assert int(index.min()) >= 0 and int(index.max()) < num_classes


def test_sample_classes_never_empty():
    index = sample_classes(torch.empty(0, dtype=torch.int64), step_keys(0, torch.tensor(0), 0, 50), 0.001)
    assert index.numel() == 1 and 0 <= int(index) < 50


def test_sample_classes_more_positives_than_rate():
    positives = torch.arange(0, 200, 2)
    labels = torch.cat([positives, positives, torch.full((5,), -1)])  # repeats and entries of no class
    index = sample_classes(labels, step_keys(0, torch.tensor(0), 0, 1000), 0.05)
    assert torch.equal(index, positives)


def test_sample_classes_ignores_minus_one_entries():
    labels = torch.tensor([-1, 4, -1, 4, 9])
    index = sample_classes(labels, step_keys(3, torch.tensor(1), 0, 20), 0.25)
    assert index.numel() == 5 and torch.isin(torch.tensor([4, 9]), index).all()


def test_negatives_are_uniform():
    """Each non-positive class is drawn with probability (n - P) / (C - P), from either key source."""
    num_classes, rate, trials = 40, 0.25, 4000
    positives = torch.tensor([3, 17])
    gen = torch.Generator().manual_seed(11)
    for keys in (lambda t: generator_keys(num_classes, gen, "cpu"), lambda t: step_keys(5, torch.tensor(t), 2, 40)):
        counts = torch.zeros(num_classes)
        for t in range(trials):
            counts[sample_classes(positives, keys(t), rate)] += 1
        _check_uniform(counts, positives, trials, num_classes)


def _check_uniform(counts, positives, trials, num_classes):
    assert torch.all(counts[positives] == trials)
    negatives = torch.ones(num_classes, dtype=torch.bool)
    negatives[positives] = False
    expected = trials * (10 - 2) / (num_classes - 2)
    # Binomial std ~ sqrt(trials * p * (1 - p)) ~ 15; allow 5 sigma.
    assert (counts[negatives] - expected).abs().max() < 5 * (trials * 0.21 * 0.79) ** 0.5


def test_sample_dims_properties():
    dims = sample_dims(256, step_keys(0, torch.tensor(0), 1, 512))
    assert dims.numel() == 256 and torch.equal(dims, dims.unique())
    assert int(dims.min()) >= 0 and int(dims.max()) < 512


def test_step_keys_reproducible_distinct_and_in_range():
    a = step_keys(7, torch.tensor(3), 0, 1000)
    assert a.dtype == torch.int64 and int(a.min()) >= 0 and int(a.max()) < 2**62
    assert torch.equal(a, step_keys(7, torch.tensor(3), 0, 1000))
    assert a.unique().numel() == 1000
    for other in [(7, 4, 0), (8, 3, 0), (7, 3, 1)]:
        b = step_keys(other[0], torch.tensor(other[1]), other[2], 1000)
        # Unrelated draws: the ranks of the keys are uncorrelated.
        rank_a, rank_b = a.argsort().argsort().double(), b.argsort().argsort().double()
        assert abs(torch.corrcoef(torch.stack([rank_a, rank_b]))[0, 1]) < 0.1
    # The high bits are uniform: each of 16 bins holds 1/16 of 100k keys (4 sigma).
    top = step_keys(1, torch.tensor(0), 0, 100_000) >> 58
    assert (torch.bincount(top, minlength=16) - 6250).abs().max() < 4 * 6250**0.5


def _batch(num_classes=200, batch=24, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=gen), torch.randint(0, num_classes, (batch,), generator=gen)


def test_module_samples_per_step_reproducibly():
    x, y = _batch()
    a = DualPartialMarginLoss(200, 32, class_sample_rate=0.2, dim_sample_rate=0.5, seed=1)
    b = DualPartialMarginLoss(200, 32, class_sample_rate=0.2, dim_sample_rate=0.5, seed=1)
    seen = []
    for _ in range(3):
        a(x, y)
        b(x, y)
        assert torch.equal(a.last_class_index, b.last_class_index)
        assert torch.equal(a.last_dim_index, b.last_dim_index)
        assert torch.isin(y, a.last_class_index).all()
        assert a.last_class_index.numel() == 40 and a.last_dim_index.numel() == 16
        seen.append((a.last_class_index, a.last_dim_index))
    assert not torch.equal(seen[0][0], seen[1][0]) and not torch.equal(seen[0][1], seen[1][1])
    assert a.step == 3


def test_module_seed_changes_sample():
    x, y = _batch()
    a = DualPartialMarginLoss(200, 32, seed=1)
    b = DualPartialMarginLoss(200, 32, seed=2)
    a(x, y)
    b(x, y)
    assert not torch.equal(a.last_dim_index, b.last_dim_index)


def test_state_dict_round_trip_reproduces_next_sample():
    x, y = _batch()
    torch.manual_seed(0)
    run = DualPartialMarginLoss(200, 32, class_sample_rate=0.1, dim_sample_rate=0.5, seed=9)
    for _ in range(2):
        run(x, y)
    state = run.state_dict()
    expected_loss = run(x, y)
    resumed = DualPartialMarginLoss(200, 32, class_sample_rate=0.1, dim_sample_rate=0.5, seed=0)
    resumed.load_state_dict(state)
    assert resumed.step == 2 and resumed.seed == 9
    loss = resumed(x, y)
    assert torch.equal(resumed.last_class_index, run.last_class_index)
    assert torch.equal(resumed.last_dim_index, run.last_dim_index)
    assert torch.equal(loss, expected_loss)


def test_eval_mode_does_not_advance():
    x, y = _batch()
    crit = DualPartialMarginLoss(200, 32).eval()
    crit(x, y)
    first = crit.last_class_index
    crit(x, y)
    assert crit.step == 0 and torch.equal(first, crit.last_class_index)


def test_rate_one_selects_everything():
    x, y = _batch()
    crit = DualPartialMarginLoss(200, 32, class_sample_rate=1.0, dim_sample_rate=1.0)
    crit(x, y)
    assert torch.equal(crit.last_class_index, torch.arange(200)) and crit.last_dim_index is None


def test_num_dims_overrides_rate():
    x, y = _batch()
    crit = DualPartialMarginLoss(200, 32, dim_sample_rate=0.5, num_dims=5)
    crit(x, y)
    assert crit.last_dim_index.numel() == 5


def test_functional_sampling_uses_generator():
    x, y = _batch()
    w = torch.randn(200, 32) * 0.01
    kw = dict(class_sample_rate=0.1, dim_sample_rate=0.5)
    a = dual_partial_margin_loss(x, w, y, generator=torch.Generator().manual_seed(4), **kw)
    b = dual_partial_margin_loss(x, w, y, generator=torch.Generator().manual_seed(4), **kw)
    c = dual_partial_margin_loss(x, w, y, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ignored_labels_are_not_positives():
    x, y = _batch()
    y[:12] = -1
    crit = DualPartialMarginLoss(200, 32, class_sample_rate=0.01)
    crit(x, y)
    assert torch.equal(crit.last_class_index, y[12:].unique())
