"""GPT-2: FFN units (c_fc rows + c_proj columns) and whole heads of the fused c_attn pruned and compacted exactly,
after its Conv1D layers become nn.Linear; the pruned model still generates the same tokens."""

from __future__ import annotations

import warnings

import pytest
import torch

from admmcompress.executors.compact import compact
from admmcompress.finalize import hard_prune
from admmcompress.models.conv1d import conv1d_from_linear, linear_from_conv1d
from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.plan.attention import attention_layouts
from admmcompress.structures import Filter, Heads

transformers = pytest.importorskip("transformers")


def gpt2(swap: bool = True):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPT2LMHeadModel(config).eval()
    return model, (linear_from_conv1d(model) if swap else [])


def ids(b: int, t: int) -> torch.Tensor:
    return torch.randint(0, 100, (b, t), generator=torch.Generator().manual_seed(b * 7 + t))


PLAN = [Rule(Filter(sparsity=0.5), match="*mlp.c_fc"), Rule(Heads(sparsity=0.5), match="*attn.c_attn")]


def pruned_and_compacted():
    model, swapped = gpt2()
    targets = Plan(PLAN).resolve_coupled(model, {"input_ids": ids(2, 5)})  # traced with the key/value cache on
    result = compact(model, {"input_ids": ids(2, 5)}, hard_prune(model, targets))
    return model, result, swapped


def test_the_fused_query_key_value_projection_is_one_attention_layout():
    model, _ = gpt2()
    layout = attention_layouts(model)["transformer.h.0.attn.c_attn"]
    assert (layout.fused, layout.heads, layout.head_dim, layout.o) == (True, 4, 8, "transformer.h.0.attn.c_proj")


def test_ffn_units_and_heads_compact_exactly_and_the_attention_bookkeeping_follows():
    model, result, _ = pruned_and_compacted()
    attn = result.model.transformer.h[0].attn
    assert result.heads == {"transformer.h.0.attn": (4, 2), "transformer.h.1.attn": (4, 2)}
    assert (attn.num_heads, attn.split_size, attn.c_attn.out_features, attn.c_proj.in_features) == (2, 16, 48, 16)
    assert result.model.transformer.h[1].mlp.c_fc.out_features == 64
    for shape in [(2, 5), (3, 9)]:
        with torch.no_grad():
            got, want = result.model(ids(*shape)).logits, model(ids(*shape)).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_the_pruned_model_still_generates_the_masked_models_tokens():
    model, result, swapped = pruned_and_compacted()
    prompt = ids(2, 4)
    want = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = result.model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got.shape == (2, 10) and torch.equal(got, want)
    conv1d_from_linear(result.model, swapped)  # back to GPT-2's own layers, narrower
    assert type(result.model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert torch.equal(result.model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), want)


def test_heads_on_an_unconverted_conv1d_name_the_fix():
    model, _ = gpt2(swap=False)
    with pytest.raises(PlanError, match=r"GPT-style Conv1D .*linear_from_conv1d\(model\)"):
        Plan([Rule(Heads(sparsity=0.5), match="*attn.c_attn")]).resolve(model)


def test_hidden_size_with_the_lm_head_tied_to_the_embedding_stays_tied_and_exact():
    model, _ = gpt2()
    x = {"input_ids": ids(2, 5)}
    (target,) = Plan([Rule(Filter(sparsity=0.25), match="*attn.c_proj")]).resolve_coupled(model, x, mode="extend")
    assert "transformer.wte.weight" in target.param_names and "lm_head.weight" not in target.param_names  # one name
    result = compact(model, x, hard_prune(model, [target]))
    small = result.model
    assert result.hidden == (32, 24) and small.config.n_embd == 24
    assert small.lm_head.weight is small.transformer.wte.weight and small.lm_head.in_features == 24
    with torch.no_grad():
        torch.testing.assert_close(small(ids(3, 9)).logits, model(ids(3, 9)).logits, atol=1e-4, rtol=0)
    prompt, kwargs = ids(2, 4), {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(small.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


def test_a_target_on_the_tied_lm_head_names_the_embedding_that_holds_the_tensor():
    model, _ = gpt2()
    with pytest.raises(PlanError, match=r"layer 'lm_head' shares its 'weight' tensor with 'transformer.wte.weight'"):
        Plan([Rule(Filter(sparsity=0.5), type="Linear")]).resolve(model)
