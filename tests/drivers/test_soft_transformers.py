"""Method soft (SS-Auto) on transformers: heads and FFN units from one threshold, and the hidden size."""

from __future__ import annotations

import pytest
import torch

from admmcompress.drivers.allocation import rates_plan
from admmcompress.drivers.soft import SoftConfig, SoftThreshold
from admmcompress.executors.compact import compact
from admmcompress.plan import Plan
from admmcompress.structures.groups import group_scores

transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("private_rng")  # seeded, the global RNG restored after


def bert() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


def drive(model, targets, config: SoftConfig, output, updates: int = 4) -> SoftThreshold:
    soft = SoftThreshold(model, targets, config, example=TOKENS, updates=updates)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(updates):
        for _ in range(3):
            loss = output(model).pow(2).mean() + soft.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        soft.step()
    return soft


def test_a_weak_head_is_zeroed_by_the_threshold_and_the_result_compacts_exactly():
    model = bert()
    attention = model.encoder.layer[0].attention
    weak = slice(8, 16)  # head 1 of layer 0 (head_dim 8): every weight it owns made small
    with torch.no_grad():
        for layer in (attention.self.query, attention.self.key, attention.self.value):
            layer.weight[weak] *= 1e-3
            layer.bias[weak] *= 1e-3
        attention.output.dense.weight[:, weak] *= 1e-3
    plan = Plan.from_dict({"rules": [
        {"match": "*intermediate.dense", "structure": "filter", "sparsity": 0.9},
        {"match": "*attention.self.query", "structure": "heads", "sparsity": 0.75},
    ]})
    targets = plan.resolve_coupled(model, TOKENS)
    head_targets = [t for t in targets if t.structure.kind == "heads"]
    assert len(head_targets) == 2

    def hidden(m):
        return m(TOKENS).last_hidden_state

    soft = drive(model, targets, SoftConfig(budget={"kind": "macs", "reduction": 1.3}, rho=0.1), hidden)
    masks = soft.finalize()
    assert soft.final_cost <= soft.target_cost and soft.final_cost >= 0.99 * soft.target_cost
    assert soft.outcome["share_soft_threshold"] == 1.0
    assert torch.count_nonzero(attention.self.query.weight[weak]) == 0  # the weak head went first
    assert torch.count_nonzero(attention.output.dense.weight[:, weak]) == 0
    found = {r.match: r.structure for r in rates_plan(model, targets).rules}
    assert found["encoder.layer.0.attention.self.query"].kind == "heads"
    assert found["encoder.layer.0.attention.self.query"].target_sparsity >= 0.25
    with torch.no_grad():
        reference = hidden(model)
        small = compact(model, TOKENS, masks).model
        torch.testing.assert_close(hidden(small), reference, rtol=1e-4, atol=1e-5)
        longer = torch.randint(0, 100, (3, 7))
        torch.testing.assert_close(small(longer).last_hidden_state, model(longer).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)
    heads = small.encoder.layer[0].attention.self
    assert heads.num_attention_heads == 4 - round(4 * found["encoder.layer.0.attention.self.query"].target_sparsity)


def test_a_head_group_norm_spans_its_query_key_value_rows_and_output_columns():
    model = llama()
    plan = Plan.from_dict({"rules": [{"match": "*q_proj", "structure": "heads", "sparsity": 0.5}]})
    targets = plan.resolve_coupled(model, TOKENS)
    soft = SoftThreshold(model, targets, SoftConfig(strength=1e-3))
    params = dict(model.named_parameters())
    flat = soft._flat({n: params[n].detach() for n in soft.names})
    for t in targets:
        value = t.value(params).detach()
        ids, n = t.structure.group_ids(value)
        assert n == 2  # grouped-query attention: a group is a key/value head with the query heads reading it
        torch.testing.assert_close(soft._norms(t, flat), group_scores(value, ids, n).sqrt())


def test_pinned_key_value_groups_compact_with_grouped_query_attention():
    model = llama()
    plan = Plan.from_dict({"rules": [
        {"match": "*mlp.*_proj", "exclude": "*down_proj", "structure": "filter", "sparsity": 0.9},
        {"match": "*q_proj", "structure": "heads", "sparsity": 0.5},
    ]})
    targets = plan.resolve_coupled(model, TOKENS)

    def logits(m):
        return m(TOKENS).logits

    config = SoftConfig(budget={"kind": "params", "reduction": 1.5}, pin={"*q_proj": 0.5}, rho=0.1)
    soft = drive(model, targets, config, logits)
    masks = soft.finalize()
    assert soft.final_cost <= soft.target_cost and soft.final_cost >= 0.99 * soft.target_cost
    with torch.no_grad():
        reference = logits(model)
        small = compact(model, TOKENS, masks).model
        torch.testing.assert_close(logits(small), reference, rtol=1e-4, atol=1e-5)
    for block in small.model.layers:
        assert block.self_attn.k_proj.out_features == 8  # one of two key/value heads (head_dim 8) kept
        assert block.self_attn.q_proj.out_features == 16  # with the two query heads that read it


def test_the_hidden_size_is_one_row_group_per_stream_channel_and_compacts_exactly():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertForSequenceClassification(config).eval()
    plan = Plan.from_dict({"rules": [{"match": "*output.dense", "structure": "filter", "sparsity": 0.5}]})
    (target,) = plan.resolve_coupled(model, TOKENS, mode="extend")  # one target: the residual stream

    def logits(m):
        return m(TOKENS).logits

    soft = drive(model, [target], SoftConfig(budget={"kind": "params", "reduction": 1.2}, rho=0.1), logits, updates=3)
    masks = soft.finalize()
    assert soft.final_cost <= soft.target_cost and soft.outcome["share_soft_threshold"] == 1.0
    pruned = soft.outcome["zeroed_by_soft_threshold"]
    assert pruned > 0
    with torch.no_grad():
        reference = logits(model)
        small = compact(model, TOKENS, masks).model
        torch.testing.assert_close(logits(small), reference, rtol=1e-4, atol=1e-5)
    assert small.config.hidden_size == 32 - pruned


def test_output_columns_beside_heads_count_only_what_compaction_removes():
    """A zero output-projection column does not remove its query/key rows (the scores read them): whole heads go."""
    model = bert()
    plan = Plan.from_dict({"rules": [
        {"match": "*attention.self.query", "structure": "heads", "sparsity": 0.75},
        {"match": "*attention.output.dense", "structure": "column", "sparsity": 0.5},
    ]})
    targets = plan.resolve_coupled(model, TOKENS)

    def hidden(m):
        return m(TOKENS).last_hidden_state

    soft = drive(model, targets, SoftConfig(budget={"kind": "params", "reduction": 1.3}, rho=0.1), hidden, updates=2)
    masks = soft.finalize()
    assert soft.final_cost <= soft.target_cost
    with torch.no_grad():
        reference = hidden(model)
        small = compact(model, TOKENS, masks).model
        torch.testing.assert_close(hidden(small), reference, rtol=1e-4, atol=1e-5)
    linear = sum(m.weight.numel() for m in small.modules() if isinstance(m, torch.nn.Linear))
    assert linear == soft.final_cost
