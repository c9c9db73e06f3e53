"""GPT-style Conv1D layers: swapped for the equal nn.Linear, pruned and compacted like any Linear, and back."""

from __future__ import annotations

import warnings

import pytest
import torch

from admmcompress.executors.blocksparse import to_blocksparse
from admmcompress.finalize import hard_prune
from admmcompress.models.conv1d import conv1d_from_linear, is_conv1d, linear_from_conv1d
from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.structures import Block, Filter

transformers = pytest.importorskip("transformers")


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(config).eval()


def ids(b: int, t: int) -> torch.Tensor:
    return torch.randint(1, 100, (b, t), generator=torch.Generator().manual_seed(b * 7 + t))


def test_structures_name_the_conversion_for_conv1d():
    with pytest.raises(PlanError, match=r"GPT-style Conv1D .*linear_from_conv1d\(model\)"):
        Plan([Rule(Filter(sparsity=0.5), match="*mlp.c_fc")]).resolve(gpt2())


def test_conversion_is_exact_and_reversible():
    model = gpt2()
    x = ids(2, 6)
    with torch.no_grad():
        before = model(x).logits
        names = linear_from_conv1d(model)
        assert len(names) == 8 and not any(is_conv1d(m) for m in model.modules())  # c_attn, c_proj, c_fc, c_proj
        torch.testing.assert_close(model(x).logits, before, atol=1e-5, rtol=0)
        conv1d_from_linear(model, names)
        assert sum(is_conv1d(m) for m in model.modules()) == 8
        torch.testing.assert_close(model(x).logits, before, atol=1e-5, rtol=0)


def test_converted_gpt2_takes_block_pruning_and_blocksparse_and_still_generates():
    """Coupled compaction of GPT-2 is not there yet: Torch-Pruning's trace fails on the fused q/k/v split."""
    model = gpt2()
    names = linear_from_conv1d(model)
    plan = Plan([Rule(Block(sparsity=0.75, block=(4, 4)), type="Linear", exclude="lm_head")])
    targets = plan.resolve(model)
    assert sorted(t.layer for t in targets) == sorted(names)
    hard_prune(model, targets)
    with torch.no_grad():
        prompt = ids(1, 4)
        expected = model(ids(2, 6)).logits
        generated = model.generate(prompt, max_new_tokens=5, do_sample=False)
        assert to_blocksparse(model, block_rows=4) == names
        torch.testing.assert_close(model(ids(2, 6)).logits, expected, atol=1e-4, rtol=0)
        assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), generated)
