"""Sparsity structures: exact Euclidean projections, counts, ties and validation."""

import itertools
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from admmcompress.structures import (
    STRUCTURES,
    Channel,
    Column,
    Filter,
    SparsityStructure,
    Unstructured,
    list_structures,
    structure_from_dict,
)

# The oracle below knows the foundation's partitions; block structures are tested in test_block.py.
FOUNDATION = ("unstructured", "filter", "column", "channel")
ALL = sorted((STRUCTURES[k] for k in FOUNDATION), key=lambda cls: cls.kind)


# --- an oracle partition written from the tensor's own dims (not from as_matrix) ----------


def oracle_groups(kind: str, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Group label of every entry, from the layer's axes: (out, in, *kernel)."""
    shape = weight.shape
    if kind == "unstructured":
        return torch.arange(weight.numel()).reshape(shape), weight.numel()
    if kind == "filter":
        ids = torch.arange(shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
        return ids.expand(shape), shape[0]
    if kind == "channel":
        ids = torch.arange(shape[1]).reshape(1, -1, *([1] * (len(shape) - 2)))
        return ids.expand(shape), shape[1]
    if kind == "column":
        n = math.prod(shape[1:])
        return torch.arange(n).reshape(1, *shape[1:]).expand(shape), n
    raise AssertionError(kind)


def brute_force(weight: torch.Tensor, ids: torch.Tensor, n: int, k: int) -> tuple[float, tuple[int, ...]]:
    """Smallest squared distance to a point with only k groups nonzero, and the lowest-index such subset."""
    subsets = list(itertools.combinations(range(n), k))
    keep = torch.zeros(len(subsets), n, dtype=torch.bool)
    for row, subset in enumerate(subsets):
        keep[row, list(subset)] = True
    elem_keep = keep[:, ids.reshape(-1)]  # (subsets, numel)
    w = weight.reshape(1, -1).double()
    dist = ((w - w * elem_keep) ** 2).sum(dim=1)
    best = int(torch.argmin(dist))  # argmin returns the first minimum: lexicographically smallest subset
    return float(dist[best]), subsets[best]


@st.composite
def layer_weights(draw, max_numel=24, ties=None):
    """A small Linear / Conv1d / Conv2d weight; integer values (many ties) or arbitrary floats."""
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    if kind == "linear":
        shape = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    elif kind == "conv1d":
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    else:
        shape = (
            draw(st.integers(1, 2)),
            draw(st.integers(1, 3)),
            draw(st.integers(1, 2)),
            draw(st.integers(1, 2)),
        )
    numel = math.prod(shape)
    assume(numel <= max_numel)
    use_ties = draw(st.booleans()) if ties is None else ties
    if use_ties:
        elements = st.integers(-2, 2).map(float)
    else:
        elements = st.floats(-8.0, 8.0, allow_nan=False, allow_subnormal=False, width=32)
    values = draw(st.lists(elements, min_size=numel, max_size=numel))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def make(cls: type[SparsityStructure], sparsity: float) -> SparsityStructure:
    return cls(sparsity=sparsity)


sparsities = st.floats(0.01, 0.99)


def expected_k(n: int, sparsity: float) -> int:
    return max(1, min(n, round(n * (1.0 - sparsity))))


# --- projection properties ---------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.kind)
@given(weight=layer_weights(), sparsity=sparsities)
def test_projection_keeps_exactly_k_whole_groups(cls, weight, sparsity):
    s = make(cls, sparsity)
    ids, n = oracle_groups(s.kind, weight)
    k = expected_k(n, sparsity)
    assert s.n_groups(weight) == n
    assert s.kept_groups(weight) == k
    mask = s.support(weight)
    assert mask.dtype == torch.bool
    assert mask.shape == weight.shape
    kept = set()
    for g in range(n):
        members = mask[ids == g]
        assert bool(members.all()) or not bool(members.any()), f"group {g} split by the mask"
        if bool(members.all()):
            kept.add(g)
    assert len(kept) == k
    projected = s.project(weight)
    assert torch.equal(projected, weight * mask)
    assert projected.dtype == weight.dtype
    # At most k nonzero groups in the result (fewer when a kept group is all zero).
    nonzero = {g for g in range(n) if bool((projected[ids == g] != 0).any())}
    assert nonzero <= kept


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.kind)
@given(weight=layer_weights(), sparsity=sparsities)
def test_projection_is_the_brute_force_nearest_point(cls, weight, sparsity):
    s = make(cls, sparsity)
    ids, n = oracle_groups(s.kind, weight)
    k = expected_k(n, sparsity)
    assume(math.comb(n, k) <= 3000)
    best_dist, best_subset = brute_force(weight, ids, n, k)
    projected = s.project(weight)
    dist = float(((weight.double() - projected.double()) ** 2).sum())
    assert dist <= best_dist * (1 + 1e-12) + 1e-30
    # With integer values every score is exact, so the tie-break must pick the lowest-index best subset.
    if bool((weight == weight.round()).all()):
        mask = s.support(weight)
        kept = tuple(g for g in range(n) if bool(mask[ids == g].all()))
        assert kept == best_subset


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.kind)
@given(weight=layer_weights(), sparsity=sparsities)
def test_projection_is_idempotent_and_deterministic(cls, weight, sparsity):
    s = make(cls, sparsity)
    once = s.project(weight)
    assert torch.equal(s.project(once), once)
    assert torch.equal(s.support(weight), s.support(weight.clone()))
    # The input is not modified.
    before = weight.clone()
    s.project(weight)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.kind)
@given(weight=layer_weights(), compression=st.floats(1.01, 50.0))
def test_sparsity_and_compression_give_the_same_projection(cls, weight, compression):
    by_ratio = cls(compression=compression)
    by_sparsity = cls(sparsity=1.0 - 1.0 / compression)
    assert by_ratio.target_sparsity == by_sparsity.target_sparsity
    assert torch.equal(by_ratio.support(weight), by_sparsity.support(weight))


@given(weight=layer_weights(max_numel=60), sparsity=sparsities)
def test_unstructured_fast_path_equals_generic_group_path(weight, sparsity):
    s = Unstructured(sparsity=sparsity)
    assert torch.equal(s.support(weight), SparsityStructure.support(s, weight))


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (Unstructured, lambda: torch.tensor([True] * 6 + [False] * 6).reshape(3, 4)),
        (Filter, lambda: torch.tensor([True, True, False]).reshape(3, 1).expand(3, 4)),
        (Column, lambda: torch.tensor([True, True, False, False]).reshape(1, 4).expand(3, 4)),
        (Channel, lambda: torch.tensor([True, True, False, False]).reshape(1, 4).expand(3, 4)),
    ],
    ids=lambda x: getattr(x, "kind", ""),
)
def test_equal_magnitudes_keep_the_first_groups(cls, expected):
    # Mixed signs, equal magnitudes: the lowest indices win, whatever the sort does.
    w = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0], [1.0, 1.0, -1.0, -1.0]])
    sparsity = {Unstructured: 0.5, Filter: 0.5, Column: 0.5, Channel: 0.5}[cls]
    assert torch.equal(cls(sparsity=sparsity).support(w), expected())


def test_channel_on_conv_keeps_whole_input_channels_first_on_ties():
    w = torch.ones(4, 5, 3, 3)
    mask = Channel(sparsity=0.6).support(w)
    assert mask[:, :2].all() and not mask[:, 2:].any()
    col = Column(sparsity=0.6).support(w)  # 45 columns, keep round(18) = 18 first (ch 0, 1)
    assert as_cols(col)[:, :18].all() and not as_cols(col)[:, 18:].any()


def as_cols(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def test_channel_and_column_differ_on_conv_and_agree_on_linear():
    torch.manual_seed(0)
    lin = torch.randn(6, 10)
    assert torch.equal(Channel(sparsity=0.7).support(lin), Column(sparsity=0.7).support(lin))
    conv = torch.randn(6, 4, 3, 3)
    assert Channel(sparsity=0.5).n_groups(conv) == 4
    assert Column(sparsity=0.5).n_groups(conv) == 36
    assert Filter(sparsity=0.5).n_groups(conv) == 6


@pytest.mark.parametrize(
    ("cls", "shape", "sparsity", "kept_entries"),
    [
        (Unstructured, (500, 800), 0.99, 4000),
        (Unstructured, (50, 20, 5, 5), 0.9, 2500),
        (Filter, (50, 20, 5, 5), 0.5, 25 * 500),
        (Column, (50, 20, 5, 5), 0.8, 100 * 50),
        (Channel, (50, 20, 5, 5), 0.75, 5 * 25 * 50),
        (Filter, (300, 784), 0.9, 30 * 784),
    ],
)
def test_counts_on_lenet_sized_layers(cls, shape, sparsity, kept_entries):
    torch.manual_seed(1)
    w = torch.randn(shape)
    mask = cls(sparsity=sparsity).support(w)
    assert int(mask.sum()) == kept_entries
    # The kept entries are the largest: every kept group's norm >= every dropped group's norm.
    s = cls(sparsity=sparsity)
    ids, n = oracle_groups(s.kind, w)
    norms = torch.zeros(n, dtype=torch.float64).index_add_(0, ids.reshape(-1), w.reshape(-1).double() ** 2)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[ids[mask]] = True
    assert norms[kept].min() >= norms[~kept].max()


def test_unstructured_handles_one_dimensional_weights():
    w = torch.tensor([0.1, -3.0, 2.0, 0.0, 0.5])
    assert Unstructured(sparsity=0.6).support(w).tolist() == [False, True, True, False, False]


# --- construction and validation -------------------------------------------------------------


def test_sparsity_and_compression_resolve():
    assert Unstructured(compression=5).target_sparsity == pytest.approx(0.8, abs=1e-15)
    assert Filter(sparsity=0.25).target_sparsity == 0.25
    assert Column(compression=4).target_sparsity == 0.75


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.kind)
@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan")])
def test_sparsity_outside_open_unit_interval_is_rejected(cls, bad):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: sparsity=.* is outside \(0, 1\)"):
        cls(sparsity=bad)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.kind)
@pytest.mark.parametrize("bad", [1, 1.0, 0.5, 0, -3, float("nan")])
def test_compression_not_above_one_is_rejected(cls, bad):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: compression=.* must be > 1"):
        cls(compression=bad)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.kind)
@pytest.mark.parametrize(("key", "bad"), [("sparsity", "0.5"), ("sparsity", True), ("compression", "10")])
def test_a_target_given_as_text_or_a_boolean_says_so(cls, key, bad):
    """'0.5' quoted in YAML is text, not a number out of range: the message says what to write."""
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {key}=.* is (str|bool), not a number: write it"):
        cls(**{key: bad})


@pytest.mark.parametrize("bad", [float("inf"), 1e300])
def test_compression_so_large_that_nothing_would_be_kept_is_rejected(bad):
    # 1 - 1/c rounds to 1.0: that target could never be projected, so refuse it up front.
    with pytest.raises(ValueError, match="compression"):
        Unstructured(compression=bad)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.kind)
def test_exactly_one_of_sparsity_or_compression(cls):
    with pytest.raises(ValueError, match="give exactly one of sparsity"):
        cls()
    with pytest.raises(ValueError, match="give exactly one of sparsity"):
        cls(sparsity=0.5, compression=2)


def test_structures_are_frozen():
    s = Filter(sparsity=0.5)
    with pytest.raises(AttributeError):
        s.sparsity = 0.9


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.kind)
def test_with_sparsity_keeps_the_kind(cls):
    s = cls(compression=10).with_sparsity(0.3)
    assert type(s) is cls
    assert s.sparsity == 0.3 and s.compression is None and s.target_sparsity == 0.3


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.kind)
@pytest.mark.parametrize("target", [{"sparsity": 0.7}, {"compression": 8}])
def test_to_dict_round_trip(cls, target):
    s = cls(**target)
    d = s.to_dict()
    assert d == {"structure": cls.kind, **target}
    assert structure_from_dict(d) == s


@pytest.mark.parametrize(
    ("alias", "cls"),
    [("shape", Column), ("irregular", Unstructured), ("non-structured", Unstructured), ("row", Filter)],
)
def test_structure_aliases(alias, cls):
    assert type(structure_from_dict({"structure": alias, "sparsity": 0.5})) is cls


def test_list_structures_names_every_registered_structure():
    names = list_structures()
    assert set(STRUCTURES) <= set(names)
    assert {"unstructured", "filter", "column", "channel"} <= set(STRUCTURES)


def test_structure_from_dict_errors():
    with pytest.raises(ValueError, match="unknown structure 'blocky'; choose one of .*channel.*column"):
        structure_from_dict({"structure": "blocky", "sparsity": 0.5})
    with pytest.raises(ValueError, match="rule 3: missing 'structure'"):
        structure_from_dict({"sparsity": 0.5}, where="rule 3")
    with pytest.raises(ValueError, match=r"rule 3: Filter: sparsity=2 is outside \(0, 1\)"):
        structure_from_dict({"structure": "filter", "sparsity": 2}, where="rule 3")
    with pytest.raises(ValueError, match="give exactly one of"):
        structure_from_dict({"structure": "filter"})


# --- which modules a structure applies to -----------------------------------------------------


@pytest.mark.parametrize("cls", [Filter, Column, Channel], ids=lambda c: c.kind)
@pytest.mark.parametrize("module", [nn.BatchNorm2d(4), nn.Embedding(10, 4), nn.LayerNorm(4)], ids=type)
def test_gemm_structures_reject_non_gemm_modules(cls, module):
    name = type(module).__name__
    with pytest.raises(
        ValueError, match=rf"layer 'x' is {name}; structure '{cls.kind}' supports Linear, Conv1d"
    ):
        cls(sparsity=0.5).check_module(module, "x")


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.kind)
@pytest.mark.parametrize(
    "module", [nn.Linear(3, 2), nn.Conv1d(2, 3, 3), nn.Conv2d(2, 3, 3), nn.Conv3d(2, 3, 3)], ids=type
)
def test_all_structures_accept_gemm_modules(cls, module):
    cls(sparsity=0.5).check_module(module, "x")
    mask = cls(sparsity=0.5).support(module.weight)
    assert mask.shape == module.weight.shape and mask.any() and not mask.all()


def test_unstructured_needs_a_weight_tensor():
    Unstructured(sparsity=0.5).check_module(nn.BatchNorm2d(4), "bn")
    Unstructured(sparsity=0.5).check_module(nn.Embedding(10, 4), "emb")
    with pytest.raises(ValueError, match=r"layer 'pool' \(MaxPool2d\) has no 'weight' tensor to prune"):
        Unstructured(sparsity=0.5).check_module(nn.MaxPool2d(2), "pool")
