"""Fixed-size batch samplers: exact uniform batches without replacement, crop tokens."""

import itertools
import math
from collections import Counter

import pytest
import torch
from scipy import stats

from patchdp_opacus.plugin.sampler import (
    WORD,
    CropToken,
    DistributedFixedSizeBatchSampler,
    FixedSizeBatchSampler,
    steps_per_epoch_for,
    uniform_below,
)

ALPHA = 1e-4  # chi-square acceptance level (seeded, so each test is deterministic)


def seeded(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def batches(sampler, epochs=1):
    return [list(map(tuple, b)) for _ in range(epochs) for b in sampler]


def test_batches_have_exactly_b_distinct_valid_indices():
    s = FixedSizeBatchSampler(50, 7, steps_per_epoch=300, generator=seeded(0))
    for batch in s:
        idx = [t.index for t in batch]
        assert len(batch) == 7
        assert len(set(idx)) == 7
        assert all(0 <= i < 50 for i in idx)
        assert all(isinstance(t, CropToken) for t in batch)


def test_index_marginals_uniform():
    n, b, steps = 20, 5, 4000
    s = FixedSizeBatchSampler(n, b, steps_per_epoch=steps, generator=seeded(1))
    counts = Counter(t.index for batch in s for t in batch)
    observed = [counts[i] for i in range(n)]
    assert sum(observed) == b * steps
    assert stats.chisquare(observed).pvalue > ALPHA


def test_batches_uniform_over_subsets():
    """Every B-subset equally likely (sampling without replacement, not just uniform marginals)."""
    n, b, steps = 6, 3, 6000
    s = FixedSizeBatchSampler(n, b, steps_per_epoch=steps, generator=seeded(2))
    counts = Counter(frozenset(t.index for t in batch) for batch in s)
    subsets = [frozenset(c) for c in itertools.combinations(range(n), b)]
    assert set(counts) <= set(subsets)
    assert stats.chisquare([counts[c] for c in subsets]).pvalue > ALPHA


def test_steps_are_independent_not_an_epoch_partition():
    """Consecutive batches overlap by B^2/N on average (hypergeometric), a partition by 0."""
    n, b = 20, 5
    s = FixedSizeBatchSampler(n, b, steps_per_epoch=2000, generator=seeded(3))
    sets = [{t.index for t in batch} for batch in s]
    overlaps = [len(a & c) for a, c in zip(sets, sets[1:])]
    mean = sum(overlaps) / len(overlaps)
    sd = math.sqrt(stats.hypergeom(n, b, b).var() / len(overlaps))
    assert abs(mean - b * b / n) < 5 * sd


@pytest.mark.parametrize("n,b,expected", [(2975, 200, 15), (10, 4, 3), (10, 3, 3), (3, 3, 1),
                                          (5, 4, 1), (60000, 256, 234), (7, 2, 4)])
def test_steps_per_epoch_default_round(n, b, expected):
    assert steps_per_epoch_for(n, b) == expected
    s = FixedSizeBatchSampler(n, b, generator=seeded(0))
    assert len(s) == expected == len(list(s))


def test_explicit_steps_and_invalid_sizes():
    assert len(FixedSizeBatchSampler(10, 2, steps_per_epoch=7)) == 7
    with pytest.raises(ValueError, match="without replacement"):
        FixedSizeBatchSampler(3, 4)
    with pytest.raises(ValueError):
        FixedSizeBatchSampler(10, 2, steps_per_epoch=0)


def test_same_seed_identical_and_epochs_differ():
    a = FixedSizeBatchSampler(30, 4, origin_moduli=(7, 9), generator=seeded(5))
    b = FixedSizeBatchSampler(30, 4, origin_moduli=(7, 9), generator=seeded(5))
    ea1, ea2 = batches(a), batches(a)
    assert ea1 == batches(b) and ea2 == batches(b)
    assert ea1 != ea2
    assert [t[0] for x in ea1 for t in x] != [t[0] for x in ea2 for t in x]  # indices differ
    assert [t[1:] for x in ea1 for t in x] != [t[1:] for x in ea2 for t in x]  # tokens differ
    c = FixedSizeBatchSampler(30, 4, origin_moduli=(7, 9), generator=seeded(6))
    assert batches(c) != ea1


def test_default_generator_ignores_torch_manual_seed():
    """The default generator is seeded from the OS: a public torch.manual_seed does not
    reproduce (or reveal) batches and crop origins."""
    torch.manual_seed(11)
    a = batches(FixedSizeBatchSampler(30, 4))
    torch.manual_seed(11)
    assert batches(FixedSizeBatchSampler(30, 4)) != a


def test_tokens_in_range_and_uniform():
    s = FixedSizeBatchSampler(10, 10, steps_per_epoch=300, origin_moduli=(6, 35),
                              generator=seeded(7))
    ys, xs = Counter(), Counter()
    for batch in s:
        for t in batch:
            assert 0 <= t.u_y < 6 and 0 <= t.u_x < 35
            ys[t.u_y] += 1
            xs[t.u_x] += 1
    assert stats.chisquare([ys[i] for i in range(6)]).pvalue > ALPHA
    assert stats.chisquare([xs[i] for i in range(35)]).pvalue > ALPHA
    default = FixedSizeBatchSampler(10, 3, generator=seeded(7))
    assert default.origin_moduli == (WORD, WORD)
    assert all(0 <= t.u_y < WORD for b in default for t in b)


def test_uniform_below_exact_with_rejection():
    # b = 3 * 2**60: 2**62 mod b = 2**60, so a quarter of the words are rejected and redrawn.
    big = 3 * 2 ** 60
    vals = uniform_below([big] * 4000, seeded(8))
    assert all(0 <= v < big for v in vals)
    thirds = Counter(v * 3 // big for v in vals)  # plain "w mod b" would give thirds 2:1:1
    assert stats.chisquare([thirds[i] for i in range(3)]).pvalue > ALPHA
    assert uniform_below([1, 1], seeded(0)) == [0, 0]
    with pytest.raises(ValueError):
        uniform_below([0], seeded(0))


def test_secure_mode():
    s = FixedSizeBatchSampler(40, 6, steps_per_epoch=50, secure=True, origin_moduli=(5, 8))
    assert s.generator is None
    for batch in s:
        assert len({t.index for t in batch}) == 6
        assert all(0 <= t.u_y < 5 and 0 <= t.u_x < 8 for t in batch)
    with pytest.raises(ValueError, match="secrets"):
        FixedSizeBatchSampler(40, 6, secure=True, generator=seeded(0))


def test_distributed_slices_are_disjoint_and_union_is_global_batch():
    n, b, seed = 37, 6, 123
    single = batches(FixedSizeBatchSampler(n, b, generator=seeded(seed),
                                           origin_moduli=(11, 13)), epochs=2)
    ranks = [DistributedFixedSizeBatchSampler(n, b, num_replicas=2, rank=r, seed=seed,
                                              origin_moduli=(11, 13)) for r in range(2)]
    per_rank = [batches(s, epochs=2) for s in ranks]
    assert all(len(s) == len(single) // 2 for s in ranks)  # len = global steps per epoch
    assert all(s.batch_size == 3 and s.global_batch_size == 6 for s in ranks)
    for step, global_batch in enumerate(single):
        a, c = per_rank[0][step], per_rank[1][step]
        assert len(a) == len(c) == 3
        assert not {t[0] for t in a} & {t[0] for t in c}
        assert a + c == global_batch  # same tokens (crops) too, in order


def test_distributed_requires_divisible_batch():
    with pytest.raises(ValueError, match="divisible by the world size 4"):
        DistributedFixedSizeBatchSampler(20, 6, num_replicas=4, rank=0, seed=0)
    with pytest.raises(ValueError):
        DistributedFixedSizeBatchSampler(20, 6, num_replicas=2, rank=2, seed=0)
    with pytest.raises(ValueError, match="secure"):
        DistributedFixedSizeBatchSampler(20, 6, num_replicas=2, rank=0, seed=0, secure=True)


def test_opacus_switch_generator_replaces_the_generator():
    from opacus.data_loader import switch_generator
    from torch.utils.data import DataLoader, TensorDataset

    ds = TensorDataset(torch.arange(30))
    loader = DataLoader(ds, batch_sampler=FixedSizeBatchSampler(30, 5, generator=seeded(0)),
                        collate_fn=lambda tokens: tokens)
    switched = switch_generator(data_loader=loader, generator=seeded(99))
    assert batches(switched.batch_sampler) == batches(
        FixedSizeBatchSampler(30, 5, generator=seeded(99)))
