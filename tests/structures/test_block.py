"""Block structures: exact projections (brute force), gate boundaries, errors that name the fix."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan, PlanError
from admmcompress.report.metrics import measure
from admmcompress.structures import Block, BlockRow, Unstructured, structure_from_dict
from admmcompress.structures.block import top_groups_per_block
from admmcompress.structures.groups import kept_count

pytestmark = pytest.mark.usefixtures("private_rng")  # seeded, the global RNG restored after


def oracle(rows, cols, r, c, axis, gates=1):
    """Group label and block label of every entry, by explicit loops over blocks."""
    height = rows // gates
    per_gate = -(-height // r)
    n_cb = -(-cols // c)
    group = torch.empty(rows, cols, dtype=torch.long)
    block = torch.empty(rows, cols, dtype=torch.long)
    labels: dict = {}
    for i in range(rows):
        rb = (i // height) * per_gate + (i % height) // r
        for j in range(cols):
            key = (rb, j) if axis == "column" else (i, j // c)
            group[i, j] = labels.setdefault(key, len(labels))
            block[i, j] = rb * n_cb + j // c
    return group, block


def brute_force(m, group, block, k_of_block):
    """Smallest distance over all choices of k groups per block (one global block = plain top-k)."""
    n = int(group.max()) + 1
    owner = {int(group[i, j]): int(block[i, j]) for i in range(m.shape[0]) for j in range(m.shape[1])}
    per_block: dict = {}
    for g in range(n):
        per_block.setdefault(owner[g], []).append(g)
    choices = [itertools.combinations(gs, k_of_block(len(gs))) for _, gs in sorted(per_block.items())]
    best = None
    for combo in itertools.product(*choices):
        kept = torch.isin(group, torch.tensor([g for part in combo for g in part]))
        dist = float(((m - m * kept).double() ** 2).sum())
        if best is None or dist < best - 1e-12:
            best = dist
    return best


# (rows, cols, r, c, gates): at most 12 groups, so brute force over every subset stays fast.
shapes = st.sampled_from(
    [(4, 4, 2, 2, 1), (4, 6, 2, 3, 1), (6, 2, 1, 2, 3), (4, 3, 2, 1, 2), (2, 8, 2, 4, 1)]
)
values_of = st.integers(-3, 3).map(float)


@settings(max_examples=20)
@given(shape=shapes, sparsity=st.sampled_from([0.25, 0.5, 0.75]), data=st.data())
def test_block_projection_is_the_nearest_point(shape, sparsity, data):
    rows, cols, r, c, gates = shape
    values = data.draw(st.lists(values_of, min_size=rows * cols, max_size=rows * cols))
    m = torch.tensor(values).reshape(rows, cols)
    for cls in (Block, BlockRow):
        s = cls(sparsity=sparsity, block=(r, c), gates=gates)
        group, _ = oracle(rows, cols, r, c, cls.axis, gates)
        ids, n = s.group_ids(m)
        # Same partition as the loop oracle (labels may differ; the equivalence must not).
        assert n == int(group.max()) + 1
        assert len({(int(a), int(b)) for a, b in zip(ids.flatten(), group.flatten(), strict=True)}) == n
        mask = s.support(m)
        assert int(sum(bool(mask[group == g].any()) for g in range(n))) == s.kept_groups(m)
        for g in range(n):  # whole groups only
            assert bool(mask[group == g].all()) or not bool(mask[group == g].any())
        k = s.kept_groups(m)
        best = brute_force(m, group, torch.zeros_like(group), lambda size, k=k: k)
        assert float(((m - s.project(m)).double() ** 2).sum()) == pytest.approx(best, abs=1e-9)


@settings(max_examples=20)
@given(shape=shapes, sparsity=st.sampled_from([0.3, 0.5, 0.7]), data=st.data())
def test_per_block_projection_is_the_nearest_balanced_point(shape, sparsity, data):
    rows, cols, r, c, gates = shape
    values = data.draw(st.lists(values_of, min_size=rows * cols, max_size=rows * cols))
    m = torch.tensor(values).reshape(rows, cols)
    for cls in (Block, BlockRow):
        s = cls(sparsity=sparsity, block=(r, c), gates=gates, per_block=True)
        group, block = oracle(rows, cols, r, c, cls.axis, gates)
        mask = s.support(m)
        for b in block.unique():  # every block keeps exactly its quota of whole groups
            in_block = group[block == b].unique()
            kept = sum(bool(mask[group == g].any()) for g in in_block)
            assert kept == kept_count(len(in_block), sparsity)
        best = brute_force(m, group, block, lambda size: kept_count(size, sparsity))
        assert float(((m - s.project(m)).double() ** 2).sum()) == pytest.approx(best, abs=1e-9)


def test_projection_is_idempotent_and_ties_go_to_the_lower_index():
    m = torch.ones(4, 4)
    s = Block(sparsity=0.5, block=(2, 2))
    z = s.project(m)
    assert torch.equal(s.project(z), z)
    assert z.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    tied = top_groups_per_block(torch.zeros(4, dtype=torch.float64), torch.tensor([0, 0, 1, 1]), 0.5)
    assert tied.tolist() == [True, False, True, False]


def test_conv_weight_blocks_follow_the_gemm_view():
    w = torch.randn(8, 2, 3, 3)  # GEMM 8 x 18
    mask = Block(sparsity=0.8, block=(4, 6)).support(w).reshape(8, 18)
    for rb in range(2):  # every block-column is 4 whole rows of one column
        rows = mask[4 * rb : 4 * rb + 4]
        assert torch.equal(rows, rows[:1].expand(4, 18))


# --- recurrent weights: gates --------------------------------------------------------------


@pytest.mark.parametrize(("cls", "gates"), [(nn.GRU, 3), (nn.LSTM, 4)])
def test_plan_gives_each_recurrent_matrix_its_own_target_with_gate_count(cls, gates):
    model = nn.Sequential(cls(6, 8, num_layers=2))
    targets = Plan({"0": Block(sparsity=0.5, block=(4, 2))}).resolve(model)
    assert [t.param for t in targets] == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]
    assert {t.structure.gates for t in targets} == {gates}
    masks = hard_prune(model, targets)
    assert set(masks.masks) == {f"0.{t.param}" for t in targets}
    assert all(abs(v - 0.5) < 1e-9 for v in masks.sparsity().values())


def test_ragged_row_blocks_never_straddle_a_gate_boundary():
    gru = nn.GRU(4, 5)  # gates of 5 rows, blocks of 2: ragged last block in each gate
    targets = Plan({"": Block(sparsity=0.5, block=(2, 1), allow_ragged=True)}).resolve(gru)
    (target,) = [t for t in targets if t.param == "weight_hh_l0"]
    ids, _ = target.structure.group_ids(gru.weight_hh_l0)
    gate_of_row = torch.arange(15) // 5
    for g in ids.unique():
        rows = (ids == g).nonzero()[:, 0]
        assert gate_of_row[rows].unique().numel() == 1, f"group {int(g)} straddles gates: {rows.tolist()}"
    assert torch.unique(ids[:, 0], return_counts=True)[1].tolist() == [2, 2, 1] * 3


def test_unstructured_prunes_gru_and_lstm_weights():
    model = nn.ModuleDict({"gru": nn.GRU(3, 4), "lstm": nn.LSTM(4, 4), "cell": nn.LSTMCell(3, 4)})
    targets = Plan({"*": Unstructured(sparsity=0.75)}).resolve(model)
    assert {t.param_name for t in targets} == {
        "gru.weight_ih_l0",
        "gru.weight_hh_l0",
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "cell.weight_ih",
        "cell.weight_hh",
    }
    hard_prune(model, targets)
    stats = measure(model, ["gru", "lstm", "cell"])
    assert [layer.name for layer in stats.layers][:2] == ["gru.weight_ih_l0", "gru.weight_hh_l0"]
    assert stats.overall_compression == pytest.approx(4.0)


# --- errors ------------------------------------------------------------------------------------


def test_block_that_does_not_divide_names_layer_shape_and_fix():
    model = nn.Sequential(nn.Linear(10, 12))
    expected = (
        r"layer '0' weight: GEMM shape 12x10, block 5x4: "
        r"block rows 5 do not divide 12; use one of \[1, 2, 3, 4, 6\]; "
        r"block cols 4 do not divide 10; use one of \[1, 2, 5, 10\], or set allow_ragged=True"
    )
    with pytest.raises(PlanError, match=expected):
        Plan({"0": Block(sparsity=0.5, block=(5, 4))}).resolve(model)
    Plan({"0": Block(sparsity=0.5, block=(5, 4), allow_ragged=True)}).resolve(model)  # documented alternative


def test_block_that_straddles_gates_is_refused_with_the_gate_height():
    expected = (
        r"layer 'gru' weight_ih_l0: GEMM shape 30x4 \(3 gates of 10 rows\), block 4x4: "
        r"block rows 4 do not divide 10 \(the gate height\)"
    )
    with pytest.raises(PlanError, match=expected):
        Plan({"gru": Block(sparsity=0.5, block=(4, 4))}).resolve(nn.ModuleDict({"gru": nn.GRU(4, 10)}))


def test_direct_projection_error_names_the_weight_shape():
    with pytest.raises(ValueError, match=r"weight: GEMM shape 6x18, block 4x4: block rows 4 do not divide 6"):
        Block(sparsity=0.5, block=(4, 4)).project(torch.randn(6, 2, 3, 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block": (0, 4)}, r"block=\(0, 4\) must be two positive integers"),
        ({"block": "16x16"}, r"block='16x16' must be two positive integers"),
        ({"per_block": "yes"}, r"per_block='yes' must be true or false"),
        ({"gates": 0}, r"gates=0 must be a positive integer"),
    ],
)
def test_invalid_block_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Block(sparsity=0.5, **kwargs)


def test_block_rejects_non_gemm_modules():
    with pytest.raises(ValueError, match=r"layer 'emb' is Embedding; structure 'block' supports Linear"):
        Block(sparsity=0.5).check_module(nn.Embedding(10, 4), "emb")


# --- serialisation --------------------------------------------------------------------------


def test_yaml_rule_with_block_options_round_trips():
    plan = Plan.from_yaml(
        "rules:\n"
        "  - {type: GRU, structure: block, compression: 10, block: [8, 4], per_block: true}\n"
        "  - {match: fc, structure: block_row, sparsity: 0.5, block: 4}\n"
    )
    first, second = plan.rules[0].structure, plan.rules[1].structure
    assert first == Block(compression=10, block=(8, 4), per_block=True)
    assert second == BlockRow(sparsity=0.5, block=(4, 4))
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    assert structure_from_dict({"structure": "block_column", "sparsity": 0.5}).kind == "block"
    with pytest.raises(PlanError, match=r"unknown key\(s\) \['block'\]"):
        Plan.from_dict({"rules": [{"match": "fc", "structure": "filter", "sparsity": 0.5, "block": 4}]})
