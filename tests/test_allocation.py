"""Rank allocators: budget respected, alignment, and the allocation responds to the spectra / sensitivities."""

import itertools

import pytest
import torch

from lowrank_ops.algorithms.allocation import (
    allocate_by_loss,
    allocate_by_sensitivity,
    allocate_uniform,
    layer_cost,
    max_factored_rank,
)

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def _spectrum(k: int, alpha: float) -> torch.Tensor:
    return (torch.arange(1, k + 1, dtype=torch.float64) ** -alpha) ** 2


def _kept(shapes, ranks):
    return sum(layer_cost(m, n, r) for (m, n), r in zip(shapes, ranks)) / sum(m * n for m, n in shapes)


def _discarded(energies, ranks):
    return sum(0.0 if r is None else (e[r:].sum() / e.sum()).item() for e, r in zip(energies, ranks))


@pytest.mark.parametrize("ratio", [0.3, 0.8, 0.95])
def test_uniform_is_aligned_and_within_budget(ratio):
    ranks = allocate_uniform(SHAPES, ratio)
    assert all(r % 16 == 0 for r in ranks) and _kept(SHAPES, ranks) <= ratio


def test_uniform_ratio_one_keeps_everything_dense():
    assert allocate_uniform(SHAPES, 1.0) == [None] * len(SHAPES)


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.9])
def test_loss_allocation_beats_uniform_and_fits_budget(ratio):
    torch.manual_seed(ratio * 100)
    alphas = torch.rand(len(SHAPES)) * 1.5 + 0.1  # very different decay per layer
    energies = [_spectrum(min(s), a.item()) for s, a in zip(SHAPES, alphas)]
    ranks = allocate_by_loss(SHAPES, energies, ratio)
    assert _kept(SHAPES, ranks) <= ratio + 1e-12
    assert all(r is None or (r % 16 == 0 and r <= max_factored_rank(m, n, 16)) for (m, n), r in zip(SHAPES, ranks))
    assert _discarded(energies, ranks) <= _discarded(energies, allocate_uniform(SHAPES, ratio)) + 1e-12


def test_loss_allocation_matches_brute_force_on_a_small_grid():
    shapes = [(64, 48), (48, 64), (80, 32)]
    energies = [_spectrum(min(s), a) for s, a in zip(shapes, (0.2, 1.0, 2.0))]
    ratio = 0.5
    ranks = allocate_by_loss(shapes, energies, ratio, align=8)
    options = [[*range(8, max_factored_rank(m, n, 8) + 1, 8), None] for m, n in shapes]
    feasible = [c for c in itertools.product(*options) if _kept(shapes, c) <= ratio]
    best = min(_discarded(energies, c) for c in feasible)
    assert _discarded(energies, ranks) <= best * 1.05 + 1e-9  # greedy is optimal up to the leftover budget


def test_flat_spectrum_gets_more_rank_than_a_decaying_one():
    shapes = [(256, 256), (256, 256)]
    ranks = allocate_by_loss(shapes, [_spectrum(256, 0.05), _spectrum(256, 1.5)], 0.5)
    assert ranks[0] is None or ranks[0] > ranks[1]


def test_loss_allocation_rejects_impossible_budget():
    with pytest.raises(ValueError, match="below the minimum of one aligned block"):
        allocate_by_loss([(64, 64)], [_spectrum(64, 1.0)], 0.1)


def test_sensitivity_threshold_search():
    shapes = [(128, 128)] * 3
    # layer 0 is insensitive, layer 2 very sensitive (perplexity with that layer alone compressed)
    table = [
        {0.3: 10.1, 0.5: 10.05, 0.8: 10.0},
        {0.3: 12.0, 0.5: 10.5, 0.8: 10.1},
        {0.3: 50.0, 0.5: 20.0, 0.8: 11.0},
    ]
    ranks = allocate_by_sensitivity(shapes, table, 0.6)
    assert _kept(shapes, ranks) <= 0.6
    as_number = [float("inf") if r is None else r for r in ranks]
    assert as_number[0] <= as_number[1] <= as_number[2] and as_number[0] < as_number[2]
    with pytest.raises(ValueError, match="add smaller sensitivity_ratios"):
        allocate_by_sensitivity(shapes, table, 0.2)


@pytest.mark.parametrize("ratio", [0.0, 1.5, -1])
def test_bad_ratio(ratio):
    for call in (lambda: allocate_uniform(SHAPES, ratio), lambda: allocate_by_loss(SHAPES, [], ratio)):
        with pytest.raises(ValueError, match=f"ratio={ratio} must be in"):
            call()


def test_absolute_loss_gives_rank_to_the_layer_with_more_energy():
    shapes = [(128, 128), (128, 128)]
    same_shape_of_spectrum = _spectrum(128, 0.5)
    energies = [same_shape_of_spectrum, 100 * same_shape_of_spectrum]
    relative = allocate_by_loss(shapes, energies, 0.4)
    absolute = allocate_by_loss(shapes, energies, 0.4, relative=False)
    assert abs(relative[0] - relative[1]) <= 16  # equal fractions: scale does not matter (one block for ties)
    assert absolute[1] > absolute[0]  # absolute: the loud layer wins the budget
