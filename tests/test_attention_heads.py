"""Attention-head pruning: block layouts, coupled head targets, exact projection, dead-head removal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.drivers import ADMM
from admmcompress.executors.compact import compact
from admmcompress.executors.heads import dead_heads, remove_dead_heads
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.plan.attention import attention_layouts
from admmcompress.structures import Heads


class Attention(nn.Module):
    """Multi-head self-attention written the way transformers' blocks are (heads inferred with -1)."""

    def __init__(self, width: int = 12, heads: int = 3, kv_heads: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, width // heads
        if kv_heads is not None:
            self.num_key_value_heads = kv_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.attn = Attention(**kwargs)
        self.norm = nn.LayerNorm(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.attn(x))


def block(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return Block(**kwargs).eval()


def test_the_layout_names_the_four_projections():
    (layout,) = attention_layouts(block()).values()
    assert (layout.module, layout.q, layout.o, layout.heads, layout.head_dim) == ("attn", "attn.q_proj", "attn.o_proj",
                                                                                3, 4)


def test_a_heads_target_spans_q_k_v_rows_and_o_columns():
    (t,) = Plan([Rule(Heads(sparsity=0.34), match="attn.q_proj")]).resolve(block())
    assert t.members == ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj")
    assert t.structure == Heads(sparsity=0.34, head_dim=4) and t.size == 12
    assert {(s.param, s.dim) for s in t.slices} >= {("attn.o_proj.weight", 1), ("attn.q_proj.bias", 0)}


def test_hard_prune_zeroes_the_weakest_heads_everywhere_and_compacts_exactly():
    model = block()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(model.attn, name).weight[4:8] *= 0.01  # head 1 is the weakest in every projection
        model.attn.o_proj.weight[:, 4:8] *= 0.01
    targets = Plan([Rule(Heads(sparsity=0.34), match="attn.q_proj")]).resolve(model)
    hard_prune(model, targets)
    assert dead_heads(model, attention_layouts(model)["attn.q_proj"]).tolist() == [False, True, False]
    assert torch.all(model.attn.v_proj.weight[4:8] == 0) and torch.all(model.attn.o_proj.weight[:, 4:8] == 0)
    x = torch.randn(2, 5, 12)
    result = compact(model, x)
    assert result.heads == {"attn": (3, 2)} and result.model.attn.num_heads == 2
    assert result.model.attn.q_proj.out_features == 8 and result.model.attn.o_proj.in_features == 8
    y = torch.randn(3, 7, 12)
    torch.testing.assert_close(result.model(y), model(y), atol=1e-5, rtol=0)


def test_frozen_projections_stay_frozen_after_their_heads_are_removed():
    model = block()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(model.attn, name).requires_grad_(False)
    hard_prune(model, Plan([Rule(Heads(sparsity=0.34), match="attn.q_proj")]).resolve(model))
    small = compact(model, torch.randn(2, 5, 12)).model
    assert small.attn.q_proj.out_features == 8  # rebuilt layers: new parameters
    frozen = {n for n, p in small.named_parameters() if not p.requires_grad}
    assert frozen == {f"attn.{m}.{k}" for m in ("q_proj", "k_proj", "v_proj", "o_proj") for k in ("weight", "bias")}


def test_admm_on_heads_ends_with_whole_heads_zero():
    model = block()
    admm = ADMM(model, Plan([Rule(Heads(sparsity=0.34), match="attn.q_proj")]), rho=1.0)
    admm.step()
    admm.finalize()
    dead = dead_heads(model, attention_layouts(model)["attn.q_proj"])
    assert int(dead.sum()) == 1
    head = int(torch.nonzero(dead))
    rows = slice(4 * head, 4 * head + 4)
    assert all(torch.all(getattr(model.attn, p).weight[rows] == 0) for p in ("q_proj", "k_proj", "v_proj"))


def test_a_head_with_zero_values_is_dead_even_if_its_output_columns_are_not():
    model = block()
    with torch.no_grad():
        model.attn.v_proj.weight[8:] = 0
        model.attn.v_proj.bias[8:] = 0
    x = torch.randn(2, 4, 12)
    expected = model(x)
    assert remove_dead_heads(model) == {"attn": (3, 2)}
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_wrong_layers_and_a_key_value_head_count_that_disagrees_are_one_clear_line():
    with pytest.raises(PlanError, match="not the query projection of an attention block"):
        Plan([Rule(Heads(sparsity=0.5), match="attn.o_proj")]).resolve(block())
    with pytest.raises(PlanError, match="says num_key_value_heads=1 but its key projection holds 3 heads"):
        Plan([Rule(Heads(sparsity=0.5), match="attn.q_proj")]).resolve(block(kv_heads=1))
    with pytest.raises(PlanError, match="head_dim=3 but the block's heads have 4"):
        Plan([Rule(Heads(sparsity=0.5, head_dim=3), match="attn.q_proj")]).resolve(block())
    with pytest.raises(PlanError, match="a heads rule names an attention block's query projection"):
        Plan([Rule(Heads(sparsity=0.5), match="norm")]).resolve(block())
