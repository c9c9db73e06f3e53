"""The GEMM view and the one group projection every structure uses."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from admmcompress.structures import groups
from admmcompress.structures.groups import as_matrix, kept_count, project_groups, top_groups

# --- as_matrix ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((20, 1, 5, 5), (20, 25)),
        ((50, 20, 5, 5), (50, 500)),
        ((500, 800), (500, 800)),
        ((7, 3, 4), (7, 12)),
        ((4, 2, 3, 3, 3), (4, 54)),
        ((6,), (6, 1)),
    ],
)
def test_as_matrix_shapes(shape, expected):
    assert as_matrix(torch.zeros(shape)).shape == torch.Size(expected)


def test_as_matrix_is_a_view_with_filter_rows_and_channel_major_columns():
    w = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    m = as_matrix(w)
    # Row r is filter r; columns run over (channel, ky, kx) with the channel slowest.
    assert torch.equal(m[1], w[1].reshape(-1))
    assert torch.equal(m[:, 4:8], w[:, 1].reshape(2, 4))
    m[0, 5] = -1.0
    assert w[0, 1, 0, 1].item() == -1.0


def test_as_matrix_rejects_scalars():
    with pytest.raises(ValueError, match="scalar parameter has no GEMM view"):
        as_matrix(torch.tensor(1.0))


# --- kept_count ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "sparsity", "k"),
    [
        (500, 0.8, 100),
        (10, 0.999, 1),  # never cut a layer off entirely
        (1, 0.5, 1),
        (4, 0.5, 2),
        (5, 0.5, 2),  # 2.5 rounds half to even
        (7, 0.5, 4),  # 3.5 rounds half to even
        (10, 0.0, 10),
        (431080, 0.9, 43108),
        (3, 0.01, 3),
    ],
)
def test_kept_count_examples(n, sparsity, k):
    assert kept_count(n, sparsity) == k


@given(n=st.integers(1, 10_000), sparsity=st.floats(0.0, 1.0, exclude_max=True))
def test_kept_count_is_rounded_and_clamped(n, sparsity):
    k = kept_count(n, sparsity)
    assert k == max(1, min(n, round(n * (1.0 - sparsity))))
    assert 1 <= k <= n


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_kept_count_rejects_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        kept_count(10, sparsity)


# --- top_groups / project_groups ----------------------------------------------------------


def test_top_groups_breaks_ties_by_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    assert top_groups(scores, 2).tolist() == [False, True, True, False, False, False]
    assert top_groups(scores, 4).tolist() == [True, True, True, False, True, False]
    assert top_groups(torch.zeros(5, dtype=torch.float64), 3).tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("k", [0, 4, -1])
def test_top_groups_rejects_impossible_k(k):
    with pytest.raises(ValueError, match=f"cannot keep {k} of 3 groups"):
        top_groups(torch.ones(3, dtype=torch.float64), k)


def test_group_scores_are_float64_sums_of_squares():
    m = torch.tensor([[1.0, 2.0], [3.0, 1e-30]])
    ids = torch.tensor([[0, 1], [1, 2]])
    scores = groups.group_scores(m, ids, 4)
    assert scores.dtype == torch.float64
    tiny = float(m[1, 1]) ** 2  # ~1e-60: underflows to 0 in float32, still ranks above 0 in float64
    assert tiny > 0
    expected = torch.tensor([1.0, 13.0, tiny, 0.0], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)


@given(
    values=st.lists(st.integers(-3, 3), min_size=12, max_size=12),
    n_groups=st.integers(1, 6),
    data=st.data(),
)
def test_project_groups_is_nearest_point_with_exactly_k_groups(values, n_groups, data):
    # An arbitrary (non-contiguous) partition of a 3x4 matrix into n_groups labels.
    labels = data.draw(st.lists(st.integers(0, n_groups - 1), min_size=12, max_size=12))
    k = data.draw(st.integers(1, n_groups))
    m = torch.tensor(values, dtype=torch.float32).reshape(3, 4)
    ids = torch.tensor(labels).reshape(3, 4)
    mask = project_groups(m, ids, n_groups, k)
    assert mask.dtype == torch.bool and mask.shape == m.shape
    kept = {g for g in range(n_groups) if bool(mask[ids == g].any())}
    for g in range(n_groups):  # a group is kept or dropped whole
        members = mask[ids == g]
        assert bool(members.all()) or not bool(members.any())
    # Empty labels still count as groups (they may be kept with score 0), so count from top_groups.
    keep = top_groups(groups.group_scores(m, ids, n_groups), k)
    assert int(keep.sum()) == k
    assert kept == {g for g in range(n_groups) if keep[g] and bool((ids == g).any())}
    # Brute force over all k-subsets: same distance as the best, and the lowest-index best on ties.
    best = None
    for subset in itertools.combinations(range(n_groups), k):
        keep_elems = torch.isin(ids, torch.tensor(subset))
        dist = float(((m - m * keep_elems).double() ** 2).sum())
        if best is None or dist < best[0]:
            best = (dist, subset)
    assert float(((m - m * mask).double() ** 2).sum()) == best[0]
    assert tuple(torch.nonzero(keep).flatten().tolist()) == best[1]


def test_channel_ids_group_adjacent_kernel_positions():
    ids = groups.channel_ids(2, 6, 3)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="5 columns do not split into input channels of 2"):
        groups.channel_ids(2, 5, 2)


@pytest.mark.parametrize(
    ("shape", "positions"), [((3, 4), 1), ((3, 4, 5), 5), ((3, 4, 5, 5), 25), ((2, 2, 3, 3, 3), 27)]
)
def test_kernel_positions(shape, positions):
    assert groups.kernel_positions(torch.zeros(shape)) == positions
