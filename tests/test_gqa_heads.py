"""Grouped-query attention: a key/value head and the query heads sharing it are pruned and removed together."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from admmcompress.drivers import ADMM
from admmcompress.executors.compact import compact
from admmcompress.executors.heads import dead_heads
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.plan.attention import attention_layouts
from admmcompress.structures import Filter, Heads


class GQA(nn.Module):
    """6 query heads sharing 3 key/value heads (2 each), head size 2; heads inferred from the widths."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim, self.num_key_value_heads, self.groups = 2, 3, 2
        self.q_proj, self.o_proj = nn.Linear(8, 12), nn.Linear(12, 8)
        self.k_proj, self.v_proj = nn.Linear(8, 6), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        k, v = k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1)
        out = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def gqa() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(GQA()).eval()


def test_the_layout_reads_the_key_value_groups():
    layout = attention_layouts(gqa())["0.q_proj"]
    assert (layout.heads, layout.kv_heads, layout.group, layout.head_dim, layout.kv_width) == (6, 3, 2, 2, 6)


def test_a_pruned_group_zeroes_its_key_value_head_and_every_query_head_reading_it():
    model = gqa()
    with torch.no_grad():  # key/value head 1 (query heads 2 and 3) is the weakest everywhere
        model[0].k_proj.weight[2:4] *= 0.01
        model[0].v_proj.weight[2:4] *= 0.01
        model[0].q_proj.weight[4:8] *= 0.01
        model[0].o_proj.weight[:, 4:8] *= 0.01
    (target,) = Plan([Rule(Heads(sparsity=0.34), match="0.q_proj")]).resolve(model)
    assert target.size == 6 and target.structure.head_dim == 2
    hard_prune(model, [target])
    attn = model[0]
    assert torch.all(attn.q_proj.weight[4:8] == 0) and torch.all(attn.q_proj.bias[4:8] == 0)
    assert torch.all(attn.k_proj.weight[2:4] == 0) and torch.all(attn.v_proj.weight[2:4] == 0)
    assert torch.all(attn.o_proj.weight[:, 4:8] == 0)
    assert int((attn.q_proj.weight != 0).any(1).sum()) == 8  # the other two groups' query rows are untouched
    x = torch.randn(2, 5, 8)
    result = compact(model, x)
    small = result.model[0]
    assert result.heads == {"0": (6, 4)} and small.num_key_value_heads == 2
    assert (small.q_proj.out_features, small.k_proj.out_features, small.o_proj.in_features) == (8, 4, 8)
    y = torch.randn(3, 7, 8)
    torch.testing.assert_close(result.model(y), model(y), atol=1e-5, rtol=0)


def test_admm_on_grouped_heads_ends_with_whole_groups_zero():
    model = gqa()
    admm = ADMM(model, Plan([Rule(Heads(sparsity=0.34), match="0.q_proj")]), rho=1.0)
    admm.step()
    admm.finalize()
    layout = attention_layouts(model)["0.q_proj"]
    dead = dead_heads(model, layout)
    assert int(dead.sum()) == 1
    group = int(torch.nonzero(dead))
    assert torch.all(model[0].q_proj.weight[4 * group:4 * group + 4] == 0)
    assert torch.all(model[0].k_proj.weight[2 * group:2 * group + 2] == 0)


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Mistral"])
def test_llama_family_heads_and_swiglu_units_compact_exactly_and_still_generate(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    x = {"input_ids": torch.randint(0, 100, (2, 5))}
    plan = Plan([Rule(Heads(sparsity=0.5), match="*self_attn.q_proj"), Rule(Filter(sparsity=0.5), match="*mlp.*_proj",
                                                                              exclude="*down_proj")])
    targets = plan.resolve_coupled(model, x)  # gate and up rows + down columns: one decision per unit
    assert sorted(len(t.members) for t in targets) == [3, 3, 4, 4]
    result = compact(model, x, hard_prune(model, targets))
    attn, mlp = result.model.model.layers[0].self_attn, result.model.model.layers[1].mlp
    assert result.heads == {f"model.layers.{i}.self_attn": (4, 2) for i in range(2)}
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (32, 32, 32)
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (16, 8, 8)
    for shape in [(2, 5), (3, 9)]:
        x = torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            torch.testing.assert_close(result.model(x).logits, model(x).logits, atol=1e-4, rtol=0)
    prompt = torch.randint(0, 100, (2, 4), generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(result.model.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


def test_a_filter_rule_on_a_query_projection_points_to_heads():
    with pytest.raises(PlanError, match="'0.q_proj' is an attention block's query/key projection"):
        Plan([Rule(Filter(sparsity=0.5), match="0.q_proj")]).resolve_coupled(gqa(), torch.randn(2, 5, 8))


@pytest.mark.parametrize("kv_heads, sparsity, hint", [(1, 0.5, "drop the target"), (2, 0.2, "at least 0.5")])
def test_a_heads_rate_that_removes_no_key_value_group_is_refused(kv_heads, sparsity, hint):
    """With one key/value head (MQA) or a rate below one group, a heads rule pruned nothing, silently (review)."""
    transformers = pytest.importorskip("transformers")
    from admmcompress.plan import Plan, PlanError, Rule
    from admmcompress.structures import Heads

    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(PlanError, match=f"query heads share {kv_heads} key/value head.* removes none; .*{hint}"):
        Plan([Rule(Heads(sparsity=sparsity), match="*q_proj")]).resolve(model)
