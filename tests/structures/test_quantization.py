"""Quantization structures: projections are nearest points (brute force), zeros are skipped (SPEC P10)."""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from admmcompress.plan import Plan, PlanError
from admmcompress.structures.quantization import (
    Binary,
    Clustering,
    FixedPoint,
    PowerOfTwo,
    Ternary,
    _searched_interval,
    best_interval,
    kmeans_1d,
)

ALL = [
    FixedPoint(bits=1),
    FixedPoint(bits=3),
    PowerOfTwo(bits=3),
    Binary(),
    Ternary(),
    Clustering(clusters=3),
]

vectors = st.lists(
    st.floats(min_value=-4, max_value=4, allow_nan=False, width=32).filter(lambda v: v == 0 or abs(v) > 1e-3),
    min_size=1,
    max_size=9,
).map(lambda xs: torch.tensor(xs, dtype=torch.float32))


def sq_error(v: torch.Tensor, z: torch.Tensor) -> float:
    return float(((v.double() - z.double()) ** 2).sum())


def fixed_point_error(a: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
    """Error of the best codes in 1..n for each candidate q (brute force over codes)."""
    codes = torch.arange(1, n + 1, dtype=torch.float64)
    levels = q[:, None, None] * codes[None, None, :]
    return ((a[None, :, None] - levels) ** 2).min(dim=2).values.sum(dim=1)


# --- every structure ----------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ALL, ids=lambda s: repr(s))
@given(v=vectors)
def test_no_level_is_closer_than_the_chosen_one_and_zeros_stay_zero(structure, v):
    q = structure.quantize(v)
    z = q.decode()
    assert torch.equal(z[v == 0], torch.zeros_like(z[v == 0]))  # pruned zeros skipped, stay zero
    assert torch.all(q.levels != 0) and torch.all(q.levels[1:] > q.levels[:-1])
    if structure.kind == "ternary":
        return  # ternary may zero a weight by design; optimality is checked by brute force below
    nz = v != 0
    if not nz.any():
        return
    assert torch.all(q.codes[nz] >= 0)
    distance = (v[nz, None].double() - q.levels[None, :].double()).abs()
    chosen = (v[nz].double() - z[nz].double()).abs()
    assert torch.all(chosen <= distance.min(dim=1).values + 1e-6)


@pytest.mark.parametrize("structure", ALL, ids=lambda s: repr(s))
def test_zeros_do_not_change_the_levels_and_projection_is_idempotent(structure):
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(40, generator=gen)
    with_zeros = torch.cat([v, torch.zeros(25)])[torch.randperm(65, generator=gen)]
    assert torch.allclose(
        structure.project(with_zeros)[with_zeros != 0], structure.project(with_zeros[with_zeros != 0])
    )
    z = structure.project(v)
    assert torch.allclose(structure.project(z), z, atol=1e-6)
    assert structure.project(torch.zeros(3, 4)).abs().sum() == 0
    assert structure.project(v.view(5, 8)).shape == (5, 8)


@pytest.mark.parametrize("structure", ALL, ids=lambda s: repr(s))
def test_level_count_matches_bits(structure):
    v = torch.randn(500, generator=torch.Generator().manual_seed(1))
    levels = torch.unique(structure.project(v))
    limit = {"clustering": 3, "ternary": 3}.get(structure.kind, 2**structure.code_bits)
    assert levels.numel() <= limit


# --- fixed point --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@given(v=vectors)
def test_fixed_point_interval_beats_every_candidate_on_a_fine_grid(bits, v):
    a = v[v != 0].abs().double()
    if a.numel() == 0:
        return
    n = 2 ** (bits - 1)
    q = best_interval(a, n)
    grid = torch.linspace(1e-4, float(a.max()) * 1.5, 4000, dtype=torch.float64)
    best_grid = float(fixed_point_error(a, grid, n).min())
    assert float(fixed_point_error(a, torch.tensor([q], dtype=torch.float64), n)[0]) <= best_grid + 1e-12


def test_fixed_point_levels_are_a_symmetric_grid_without_zero():
    v = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    q = FixedPoint(bits=3).quantize(v)
    step = q.levels.abs().min()
    codes = q.levels / step
    assert torch.allclose(codes, torch.round(codes), atol=1e-5)
    assert set(torch.round(codes).int().tolist()) <= {-4, -3, -2, -1, 1, 2, 3, 4}


def test_exact_interval_is_never_worse_than_the_candidate_search():
    a = torch.randn(3000, generator=torch.Generator().manual_seed(3), dtype=torch.float64).abs()
    for n in (2, 4, 8):
        exact, searched = best_interval(a, n), _searched_interval(a, n)
        err = fixed_point_error(a, torch.tensor([exact, searched], dtype=torch.float64), n)
        assert err[0] <= err[1] + 1e-9
        assert err[1] <= err[0] * 1.01  # and the fallback is close


def test_one_bit_fixed_point_is_binary():
    v = torch.randn(64, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(FixedPoint(bits=1).project(v), Binary().project(v))


# --- power of two, binary, ternary -----------------------------------------------------------------


@given(v=vectors)
def test_power_of_two_matches_brute_force_over_exponents(v):
    structure = PowerOfTwo(bits=2)
    z = structure.project(v)
    nz = v != 0
    if not nz.any():
        return
    mags = z[nz].abs()
    assert torch.all(torch.log2(mags) == torch.round(torch.log2(mags)))  # every level is a power of two
    best = math.inf
    for e in range(-40, 8):
        levels = torch.tensor([2.0 ** (e - 1), 2.0**e], dtype=torch.float64)
        a = v[nz].abs().double()
        best = min(best, float(((a[:, None] - levels[None]) ** 2).min(dim=1).values.sum()))
    assert sq_error(v, z) <= best + 1e-9


@given(v=vectors)
def test_binary_scale_is_the_mean_magnitude_and_optimal(v):
    nz = v != 0
    if not nz.any():
        return
    z = Binary().project(v)
    alpha = v[nz].abs().double().mean()
    assert torch.allclose(z[nz].abs().double(), alpha.expand(int(nz.sum())), rtol=1e-6)
    for scale in torch.linspace(0.01, 5, 200, dtype=torch.float64):
        assert (
            sq_error(v, z) <= float(((v[nz].double() - scale * torch.sign(v[nz].double())) ** 2).sum()) + 1e-9
        )


@given(v=vectors)
def test_ternary_is_the_exact_projection_over_every_support(v):
    z = Ternary().project(v)
    nz = torch.nonzero(v).reshape(-1).tolist()
    best = math.inf
    for r in range(1, len(nz) + 1):
        for subset in itertools.combinations(nz, r):
            idx = torch.tensor(subset)
            alpha = v[idx].abs().double().mean()
            cand = torch.zeros_like(v, dtype=torch.float64)
            cand[idx] = alpha * torch.sign(v[idx].double())
            best = min(best, sq_error(v, cand))
    if nz:
        assert sq_error(v, z) <= best + 1e-6
        assert len(torch.unique(z[z != 0].abs())) == 1


# --- clustering --------------------------------------------------------------------------------------


def test_kmeans_uses_every_cluster_of_a_pruned_layer():
    """A pruned layer's kept weights sit in two clumps away from zero: the even start put centroids in the gap,
    which found no members and were dropped (8 clusters asked, 5 used, twice the error; a user review's finding).
    Empty clusters are now moved onto the worst-fit values, so all k are used, each the mean of its members."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2000, generator=gen)
    kept = w[w.abs() >= 1.0]
    for k in (8, 32):
        centroids, codes = kmeans_1d(kept, k)
        assert centroids.numel() == k and torch.equal(torch.unique(codes), torch.arange(k))
        assert all(torch.isclose(kept[codes == j].mean(), centroids[j]) for j in range(k))
        assert torch.equal(codes, torch.argmin((kept[:, None] - centroids[None]).abs(), dim=1))
    w[w.abs() < 1.0] = 0
    assert torch.unique(Clustering(clusters=8).project(w)).numel() == 8 + 1  # and the pruned zeros
    assert kmeans_1d(torch.tensor([1.0, 1.0, 2.0]), 3)[0].tolist() == [1.0, 2.0]  # two distinct values: two levels


@pytest.mark.parametrize("n", [10, 100, 255])
def test_kmeans_with_more_clusters_than_distinct_values_is_exact(n):
    """A small layer after heavy pruning can hold fewer weights than the clusters asked for: each weight its own
    level, no error (Lloyd from an even start merged them: 100 weights into 81 levels, a review's finding)."""
    values = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    centroids, codes = kmeans_1d(values, 256)
    assert centroids.numel() == n and torch.equal(centroids[codes], values)
    assert bool((centroids[1:] > centroids[:-1]).all())


def test_kmeans_is_a_lloyd_fixed_point_and_beats_its_initialisation():
    gen = torch.Generator().manual_seed(5)
    v = torch.cat(
        [torch.randn(300, generator=gen) * 0.1 - 1, torch.randn(300, generator=gen) * 0.3 + 0.5]
    ).double()
    centroids, codes = kmeans_1d(v, 4)
    assert centroids.numel() <= 4
    for k in range(centroids.numel()):
        assert torch.isclose(v[codes == k].mean(), centroids[k])  # every centroid is its members' mean
    assert torch.equal(codes, torch.argmin((v[:, None] - centroids[None]).abs(), dim=1))  # nearest
    init = torch.linspace(float(v.min()), float(v.max()), 4, dtype=torch.float64)
    init_error = float(((v[:, None] - init[None]) ** 2).min(dim=1).values.sum())
    assert float(((v - centroids[codes]) ** 2).sum()) < init_error


def test_clustering_bits_means_two_to_the_bits_clusters():
    assert Clustering(bits=3).k == 8 and Clustering(clusters=5).code_bits == 3


# --- plans and validation ---------------------------------------------------------------------------


def test_plan_rules_with_bits_build_quantizers_and_round_trip():
    import torch.nn as nn

    spec = {
        "rules": [
            {"match": "0", "structure": "unstructured", "sparsity": 0.5},
            {"match": "0", "structure": "fixed_point", "bits": 4},
            {"match": "2", "structure": "clustering", "clusters": 8},
            {"match": "4", "structure": "binary"},
        ]
    }
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    plan = Plan.from_dict(spec)
    targets = plan.resolve(model)
    assert [t.key for t in targets] == [
        "0.weight:unstructured",
        "0.weight:fixed_point",
        "2.weight:clustering",
        "4.weight:binary",
    ]
    assert targets[1].structure == FixedPoint(bits=4)
    assert plan.to_dict() == spec
    assert Plan.from_dict(plan.to_dict()).to_dict() == spec


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"structure": "fixed_point"}, "give bits"),
        ({"structure": "fixed_point", "bits": 0}, r"bits=0 must be an integer in \[1, 16\]"),
        ({"structure": "fixed_point", "bits": True}, "bits=True"),
        ({"structure": "power_of_two", "bits": 9}, "use bits <= 8"),
        ({"structure": "fixed_point", "bits": 4, "sparsity": 0.5}, "add a separate rule for pruning"),
        ({"structure": "clustering", "bits": 3, "clusters": 8}, "exactly one of clusters"),
        ({"structure": "clustering", "clusters": 1}, r"clusters=1 must be an integer in \[2"),
        ({"structure": "binary", "bits": 2}, "unknown key"),
    ],
)
def test_bad_quantization_rules_name_the_value_and_the_fix(rule, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_dict([{"match": "0", **rule}])


def test_one_level_set_per_layer():
    import torch.nn as nn

    plan = Plan.from_dict(
        [
            {"match": "0", "structure": "fixed_point", "bits": 4},
            {"match": "*", "structure": "ternary"},
        ]
    )
    with pytest.raises(PlanError, match="'quantization' target; keep one"):
        plan.resolve(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize(("k", "v", "levels"), [
    (3, [3.0, 1 / 3, -1 / 3], [-1 / 3, 1 / 3, 3.0]),  # Lloyd put +-1/3 in one cluster: centroid exactly 0
    (2, [-1.0, 1.0, 4.0], [-1.0, 2.5]),  # no free level: the cheapest nonzero merge
])
def test_clustering_never_gives_a_kept_weight_the_pruned_zero(k, v, levels):
    """Found by the property test above in CI (hypothesis): a cluster whose members sum to 0 had level 0, the code
    of a pruned weight, so kept weights were silently pruned."""
    q = Clustering(clusters=k).quantize(torch.tensor(v))
    torch.testing.assert_close(q.levels.double(), torch.tensor(levels, dtype=torch.float64))
    assert bool((q.decode() != 0).all())
