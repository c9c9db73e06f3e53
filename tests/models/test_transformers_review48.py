"""Review 48 of the transformer path: wrong inputs to the heads structure, to ``conv1d_from_linear`` and to
``WidthKeepingLayerNorm`` are one clear ValueError line (they were a ZeroDivisionError, an AttributeError on the
letter 't', and a silently truncated divisor)."""

from __future__ import annotations

import warnings

import pytest
import torch

from admmcompress.models.conv1d import conv1d_from_linear, linear_from_conv1d
from admmcompress.plan import Plan, PlanError
from admmcompress.plan.residual import WidthKeepingLayerNorm
from admmcompress.structures import Heads


@pytest.mark.parametrize("head_dim", [0, -2, 2.5, "8", True])
def test_a_head_size_that_is_no_positive_integer_is_refused_in_one_line(head_dim: object) -> None:
    with pytest.raises(ValueError, match=r"Heads: head_dim=.* must be a positive integer"):
        Heads(sparsity=0.5, head_dim=head_dim)
    with pytest.raises(PlanError, match=r"head_dim=.* must be a positive integer"):
        Plan.from_dict({"rules": [{"match": "*q_proj", "structure": "heads", "sparsity": 0.5, "head_dim": head_dim}]})


def test_a_valid_head_size_still_projects_whole_heads() -> None:
    w = torch.tensor([[1.0], [1.0], [3.0], [0.0], [0.5], [0.5]])
    assert Heads(sparsity=0.5, head_dim=2).project(w).flatten().tolist() == [1.0, 1.0, 3.0, 0.0, 0.0, 0.0]


def gpt2_swapped() -> tuple[torch.nn.Module, list[str]]:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPT2LMHeadModel(config).eval()
    return model, linear_from_conv1d(model)


@pytest.mark.parametrize("names, message", [
    ("transformer.h.0.attn.c_attn", "is one string; give the list"),
    (["transformer.h.0.attn.c_attn", "transformer.h.9.attn.c_attn"], "has no layer 'transformer.h.9.attn.c_attn'"),
    (["transformer.h.0.attn.c_attn", "transformer.h.0.ln_1"], "'transformer.h.0.ln_1' is LayerNorm"),
])
def test_conv1d_from_linear_names_a_wrong_name_and_changes_nothing(names: object, message: str) -> None:
    model, _ = gpt2_swapped()
    with pytest.raises(ValueError, match=message):
        conv1d_from_linear(model, names)
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)  # none was swapped before the refusal


def test_conv1d_from_linear_with_the_returned_names_still_works() -> None:
    model, names = gpt2_swapped()
    conv1d_from_linear(model, names)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


@pytest.mark.parametrize("full_width", [4.5, True, "6"])
def test_a_full_width_that_is_no_integer_is_refused(full_width: object) -> None:
    with pytest.raises(ValueError, match="full_width=.* must be an integer"):
        WidthKeepingLayerNorm(4, full_width)


# --- zero rows a model has by itself are not pruned channels ---------------------------------------------------------


def test_bart_compacts_although_its_tied_lm_head_has_a_zero_padding_row():
    transformers = pytest.importorskip("transformers")
    from admmcompress.executors.compact import CompactionError, compact
    from admmcompress.finalize import hard_prune
    from admmcompress.plan import Rule
    from admmcompress.structures import Filter

    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.BartForConditionalGeneration(config).eval()
    assert bool((model.lm_head.weight[0] == 0).all())  # the padding embedding, tied: no pruning made it
    x = {"input_ids": torch.randint(3, 100, (2, 5))}
    masks = hard_prune(model, Plan([Rule(Filter(sparsity=0.5), match="*fc1")]).resolve_coupled(model, x))
    small = compact(model, x, masks)  # was: "channels [0] of 'lm_head' are pruned but its channels are model outputs"
    assert small.params_after < small.params_before and small.max_abs_diff < 1e-5
    with pytest.raises(CompactionError, match="model outputs"):  # without masks the zero row cannot be told apart
        compact(model, x)
