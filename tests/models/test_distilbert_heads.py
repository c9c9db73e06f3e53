"""DistilBERT attention heads: its ``q_lin``/``k_lin``/``v_lin``/``out_lin`` blocks are read as head layouts, pruned
heads compact exactly, and ``n_heads`` / ``dim`` follow the narrower projections (transformers 4 reads both)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from admmcompress.drivers import ADMM
from admmcompress.executors.compact import compact
from admmcompress.executors.heads import dead_heads
from admmcompress.executors.hf_save import save_compacted_pretrained
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.plan.attention import attention_layouts
from admmcompress.structures import Heads

transformers = pytest.importorskip("transformers")

DIM, HEADS, LAYERS = 32, 4, 2
HEAD_DIM = DIM // HEADS
BLOCK = "distilbert.transformer.layer.{}.attention"


def config() -> transformers.DistilBertConfig:
    return transformers.DistilBertConfig(vocab_size=100, dim=DIM, n_layers=LAYERS, n_heads=HEADS, hidden_dim=64,
                                         max_position_embeddings=16, num_labels=3)


def quiet(factory):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory().eval()


def classifier() -> nn.Module:
    return quiet(lambda: transformers.DistilBertForSequenceClassification(config()))


def tokens(b: int, t: int) -> dict[str, torch.Tensor]:
    """Token ids with the last position of the first sequence padded (the attention mask is applied)."""
    g = torch.Generator().manual_seed(b * 31 + t)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, -1] = 0
    return {"input_ids": torch.randint(0, 100, (b, t), generator=g), "attention_mask": mask}


def outputs(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def weaken_heads(attention: nn.Module, heads: tuple[int, ...]) -> None:
    """Make ``heads`` the weakest in every projection, so a heads target removes exactly those."""
    with torch.no_grad():
        for head in heads:
            rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            for name in ("q_lin", "k_lin", "v_lin"):
                getattr(attention, name).weight[rows] *= 0.01
            attention.out_lin.weight[:, rows] *= 0.01


@pytest.mark.parametrize("factory", [transformers.DistilBertModel, transformers.DistilBertForSequenceClassification])
def test_every_block_is_found_with_n_heads_of_dim_over_n_heads(factory):
    model = quiet(lambda: factory(config()))
    prefix = "" if factory is transformers.DistilBertModel else "distilbert."
    layouts = attention_layouts(model)
    assert len(layouts) == LAYERS
    for i in range(LAYERS):
        block = f"{prefix}transformer.layer.{i}.attention"
        layout = layouts[f"{block}.q_lin"]
        assert (layout.module, layout.k, layout.v, layout.o) == (block, f"{block}.k_lin", f"{block}.v_lin",
                                                                  f"{block}.out_lin")
        assert (layout.heads, layout.head_dim, layout.kv_heads) == (HEADS, HEAD_DIM, None)


def test_two_of_four_heads_pruned_in_one_layer_compact_to_the_masked_outputs():
    model = classifier()
    pruned = model.distilbert.transformer.layer[0].attention
    weaken_heads(pruned, (1, 3))
    x = tokens(2, 5)
    targets = Plan([Rule(Heads(sparsity=0.5), match=f"{BLOCK.format(0)}.q_lin")]).resolve_coupled(model, x)
    hard_prune(model, targets)
    assert dead_heads(model, attention_layouts(model)[f"{BLOCK.format(0)}.q_lin"]).tolist() == [False, True, False,
                                                                                                 True]
    result = compact(model, x)
    assert result.heads == {BLOCK.format(0): (HEADS, HEADS // 2)}
    small, kept = result.model.distilbert.transformer.layer[0].attention, (HEADS // 2) * HEAD_DIM
    assert [getattr(small, n).out_features for n in ("q_lin", "k_lin", "v_lin")] == [kept] * 3
    assert small.out_lin.in_features == kept and small.out_lin.out_features == DIM
    assert (small.n_heads, small.dim, small.attention_head_size) == (HEADS // 2, kept, HEAD_DIM)
    other = result.model.distilbert.transformer.layer[1].attention
    assert (other.n_heads, other.dim, other.q_lin.out_features) == (HEADS, DIM, DIM)  # the unpruned layer
    for shape in [(2, 5), (3, 7)]:
        torch.testing.assert_close(outputs(result.model, tokens(*shape)), outputs(model, tokens(*shape)),
                                   atol=1e-5, rtol=0)
    assert attention_layouts(result.model)[f"{BLOCK.format(0)}.q_lin"].heads == HEADS // 2  # read back


def test_admm_on_every_layer_ends_with_whole_heads_zero_and_compacts_exactly():
    model = quiet(lambda: transformers.DistilBertModel(config()))
    admm = ADMM(model, Plan([Rule(Heads(sparsity=0.5), match="*attention.q_lin")]), rho=1.0)
    admm.step()
    masks = admm.finalize()
    x = tokens(2, 5)
    result = compact(model, x, masks)
    assert result.heads == {f"transformer.layer.{i}.attention": (HEADS, HEADS // 2) for i in range(LAYERS)}
    assert all(layer.attention.n_heads == HEADS // 2 and layer.attention.dim == DIM // 2
               for layer in result.model.transformer.layer)
    torch.testing.assert_close(outputs(result.model, tokens(3, 6)), outputs(model, tokens(3, 6)), atol=1e-5, rtol=0)


class LegacyAttention(nn.Module):
    """transformers 4's DistilBERT attention: no head-size attribute, its forward reads ``n_heads`` and ``dim``."""

    def __init__(self) -> None:
        super().__init__()
        self.n_heads, self.dim = HEADS, DIM
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (nn.Linear(DIM, DIM) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, size = x.shape[0], self.dim // self.n_heads

        def shape(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, -1, self.n_heads, size).transpose(1, 2)

        q, k, v = shape(self.q_lin(x)) / math.sqrt(size), shape(self.k_lin(x)), shape(self.v_lin(x))
        context = torch.softmax(q @ k.transpose(2, 3), dim=-1) @ v
        return self.out_lin(context.transpose(1, 2).reshape(b, -1, self.n_heads * size))


def test_a_block_without_a_head_size_attribute_derives_it_and_its_forward_still_runs():
    model = quiet(lambda: nn.Sequential(LegacyAttention()))
    layout = attention_layouts(model)["0.q_lin"]
    assert (layout.heads, layout.head_dim) == (HEADS, HEAD_DIM)
    weaken_heads(model[0], (0, 2))
    hard_prune(model, Plan([Rule(Heads(sparsity=0.5), match="0.q_lin")]).resolve(model))
    x = torch.randn(2, 5, DIM)
    result = compact(model, x)
    assert (result.model[0].n_heads, result.model[0].dim) == (HEADS // 2, DIM // 2)
    y = torch.randn(3, 4, DIM)
    torch.testing.assert_close(result.model(y), model(y), atol=1e-5, rtol=0)


def test_saving_falls_back_to_the_manifest_and_reloads_the_head_counts(tmp_path):
    """DistilBERT derives its head size from dim / n_heads, so no config builds the narrower blocks (as BERT)."""
    model = classifier()
    x = tokens(2, 5)
    hard_prune(model, Plan([Rule(Heads(sparsity=0.5), match="*attention.q_lin")]).resolve_coupled(model, x))
    small = compact(model, x).model
    saved = save_compacted_pretrained(small, tmp_path / "saved", example_inputs=tokens(3, 6), atol=1e-5)
    assert saved.format == "manifest" and "no config of DistilBertConfig builds these shapes" in saved.reason
    assert saved.max_abs_diff is not None and saved.max_abs_diff <= 1e-5
    from admmcompress.executors.manifest import load_compacted

    restored = load_compacted(tmp_path / "saved", classifier()).eval()
    assert all(layer.attention.n_heads == HEADS // 2 for layer in restored.distilbert.transformer.layer)
    assert {lay.heads for lay in attention_layouts(restored).values()} == {HEADS // 2}


def test_wrong_distilbert_heads_rules_are_one_clear_line():
    with pytest.raises(PlanError, match="not the query projection of an attention block"):
        Plan([Rule(Heads(sparsity=0.5), match=f"{BLOCK.format(0)}.out_lin")]).resolve(classifier())
    with pytest.raises(PlanError, match=f"head_dim={HEAD_DIM // 2} but the block's heads have {HEAD_DIM}"):
        rule = Rule(Heads(sparsity=0.5, head_dim=HEAD_DIM // 2), match=f"{BLOCK.format(0)}.q_lin")
        Plan([rule]).resolve(classifier())
