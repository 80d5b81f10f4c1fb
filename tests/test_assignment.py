"""linear_sum_assignment_torch against scipy.optimize.linear_sum_assignment on seeded random costs.

Optimality is checked through the TOTAL cost (ties may pick different pairs of equal total): equal
to scipy's exactly for integer costs, and up to float64 rounding (1e-12 of n * max |cost|) for
real costs.
"""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from mask_former.modeling.assignment import linear_sum_assignment_torch

# (queries, targets): more queries than targets (the matcher's case), fewer, square, empty.
SHAPES = [(1, 1), (3, 1), (1, 3), (5, 5), (7, 4), (4, 7), (10, 3), (3, 10), (12, 12), (20, 6),
          (6, 20), (30, 30), (5, 0), (0, 5), (100, 10), (50, 50)]


def random_costs(kind, shape, generator):
    """Costs of one kind: positive, negative, integer with many ties, 1e6, 1e-6, 1e-6..1e6, float32."""
    if kind == "uniform":
        return torch.rand(shape, generator=generator, dtype=torch.float64)
    if kind == "negative":
        return torch.randn(shape, generator=generator, dtype=torch.float64) * 10 - 5
    if kind == "ties":
        return torch.randint(-1, 2, shape, generator=generator).double()
    if kind == "large":
        return torch.rand(shape, generator=generator, dtype=torch.float64) * 1e6
    if kind == "small":
        return torch.rand(shape, generator=generator, dtype=torch.float64) * 1e-6
    if kind == "mixed":
        exponents = torch.rand(shape, generator=generator, dtype=torch.float64) * 12 - 6
        signs = torch.randint(0, 2, shape, generator=generator).double() * 2 - 1
        return signs * 10**exponents
    if kind == "float32":
        return torch.rand(shape, generator=generator) * 3 - 1
    raise ValueError(kind)


KINDS = ["uniform", "negative", "ties", "large", "small", "mixed", "float32"]


def assert_optimal_matching(cost, query_idx, target_idx):
    """A valid matching of min(Q, T) pairs whose total equals scipy's optimum."""
    num_queries, num_targets = cost.shape
    size = min(num_queries, num_targets)
    assert query_idx.dtype == torch.int64 and target_idx.dtype == torch.int64
    assert query_idx.device == cost.device and target_idx.device == cost.device
    assert query_idx.shape == target_idx.shape == (size,)
    queries, targets = query_idx.tolist(), target_idx.tolist()
    assert queries == sorted(set(queries)), "queries must be distinct and in increasing order"
    assert len(set(targets)) == size, "a target is used twice"
    assert all(0 <= q < num_queries for q in queries) and all(0 <= t < num_targets for t in targets)

    matrix = cost.detach().cpu().double().numpy()
    ref_rows, ref_cols = linear_sum_assignment(matrix)
    expected = matrix[ref_rows, ref_cols].sum()
    total = matrix[queries, targets].sum()
    if np.all(matrix == np.round(matrix)):  # integers: float64 sums are exact
        assert total == expected
    else:
        tolerance = 1e-12 * max(size, 1) * max(np.abs(matrix).max(initial=0.0), 1e-300)
        assert abs(total - expected) <= tolerance, (total, expected, total - expected)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_scipy_on_random_batches(kind):
    """16 shapes x 10 matrices per kind, solved as batches; 7 kinds = 1120 matrices."""
    generator = torch.Generator().manual_seed(KINDS.index(kind))
    for num_queries, num_targets in SHAPES:
        costs = random_costs(kind, (10, num_queries, num_targets), generator)
        results = linear_sum_assignment_torch(costs)
        assert len(results) == 10
        for cost, (query_idx, target_idx) in zip(costs, results):
            assert_optimal_matching(cost, query_idx, target_idx)


@pytest.mark.parametrize("kind", ["uniform", "ties", "mixed"])
def test_matches_scipy_one_matrix_at_a_time(kind):
    generator = torch.Generator().manual_seed(100 + KINDS.index(kind))
    for _ in range(40):
        num_queries = int(torch.randint(1, 16, (1,), generator=generator))
        num_targets = int(torch.randint(0, 16, (1,), generator=generator))
        cost = random_costs(kind, (num_queries, num_targets), generator)
        query_idx, target_idx = linear_sum_assignment_torch(cost)
        assert_optimal_matching(cost, query_idx, target_idx)


def test_matcher_sizes_100_queries():
    generator = torch.Generator().manual_seed(7)
    for num_targets in (1, 10, 50, 100):
        cost = random_costs("uniform", (100, num_targets), generator)
        assert_optimal_matching(cost, *linear_sum_assignment_torch(cost))


def test_padded_batch_with_per_image_target_counts():
    # Padding holds NaN and inf: it must be ignored. Counts below and above Q in one batch.
    generator = torch.Generator().manual_seed(11)
    num_queries, max_targets = 8, 14
    counts = [0, 1, 3, 8, 9, 14, 5, 14, 2, 11]
    costs = torch.randn(len(counts), num_queries, max_targets, generator=generator, dtype=torch.float64)
    for b, count in enumerate(counts):
        costs[b, :, count:] = math.nan if b % 2 else math.inf
    results = linear_sum_assignment_torch(costs, num_targets=torch.tensor(counts))
    for b, count in enumerate(counts):
        query_idx, target_idx = results[b]
        assert_optimal_matching(costs[b, :, :count], query_idx, target_idx)


def test_all_costs_equal_gives_any_full_matching():
    query_idx, target_idx = linear_sum_assignment_torch(torch.full((6, 4), 2.5))
    assert len(query_idx) == 4 and len(set(target_idx.tolist())) == 4


def test_empty_inputs():
    query_idx, target_idx = linear_sum_assignment_torch(torch.zeros(5, 0))
    assert query_idx.shape == target_idx.shape == (0,)
    query_idx, target_idx = linear_sum_assignment_torch(torch.zeros(0, 3))
    assert query_idx.shape == target_idx.shape == (0,)
    assert linear_sum_assignment_torch(torch.zeros(0, 4, 3)) == []
    results = linear_sum_assignment_torch(torch.zeros(2, 4, 3), num_targets=[0, 0])
    assert [len(q) for q, _ in results] == [0, 0]


def test_integer_cost_tensor():
    cost = torch.tensor([[4, 1, 3], [2, 0, 5], [3, 2, 2]])
    query_idx, target_idx = linear_sum_assignment_torch(cost)
    assert query_idx.tolist() == [0, 1, 2]
    assert int(cost[query_idx, target_idx].sum()) == 5  # scipy's documented example


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_cost_raises(bad):
    cost = torch.rand(4, 3)
    cost[2, 1] = bad
    with pytest.raises(ValueError, match=r"finite.*\[2, 1\]"):
        linear_sum_assignment_torch(cost)
    batch = torch.rand(2, 4, 3)
    batch[1, 0, 2] = bad
    with pytest.raises(ValueError, match=r"\[1, 0, 2\]"):
        linear_sum_assignment_torch(batch)


@pytest.mark.parametrize(
    "cost, num_targets, message",
    [
        (torch.zeros(3), None, "Q x T or B x Q x T"),
        (torch.zeros(3, 2), [2], "num_targets is for a padded batch"),
        (torch.zeros(2, 3, 2), [1], "one integer per image"),
        (torch.zeros(2, 3, 2), [1, 3], r"\[0, 2\]"),
        (torch.zeros(2, 3, 2), [1.0, 2.0], "one integer per image"),
        (torch.zeros(3, 2, dtype=torch.complex64), None, "real-valued"),
    ],
)
def test_bad_arguments_raise(cost, num_targets, message):
    with pytest.raises(ValueError, match=message):
        linear_sum_assignment_torch(cost, num_targets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_cost_device():
    generator = torch.Generator().manual_seed(3)
    costs = torch.rand(4, 20, 7, generator=generator, dtype=torch.float64)
    results = linear_sum_assignment_torch(costs.cuda(), num_targets=[7, 3, 0, 5])
    for cost, count, (query_idx, target_idx) in zip(costs.cuda(), [7, 3, 0, 5], results):
        assert_optimal_matching(cost[:, :count], query_idx, target_idx)
