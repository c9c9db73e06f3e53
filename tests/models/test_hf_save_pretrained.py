"""Compacted transformers models saved with save_pretrained where the config can say their shapes (uniform FFN
width, uniform head counts with a stated head_dim), reloaded by from_pretrained with equal outputs; the manifest,
with one line saying why, otherwise."""

from __future__ import annotations

import warnings

import pytest
import torch

from admmcompress.executors.compact import compact
from admmcompress.executors.hf_save import pretrained_config, save_compacted_pretrained
from admmcompress.finalize import hard_prune
from admmcompress.models.conv1d import linear_from_conv1d
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Filter, Heads

transformers = pytest.importorskip("transformers")


def quiet(factory):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory().eval()


def ids(b: int = 2, t: int = 5) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (b, t), generator=torch.Generator().manual_seed(b + t))}


def bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return quiet(lambda: transformers.BertForSequenceClassification(config))


def compacted(model, rules, x=None):
    x = ids() if x is None else x
    targets = Plan(rules).resolve_coupled(model, x)
    return compact(model, x, hard_prune(model, targets)).model


def test_uniform_ffn_width_becomes_intermediate_size_and_reloads_equal(tmp_path):
    small = compacted(bert(), [Rule(Filter(sparsity=0.5), match="*intermediate.dense")])
    saved = save_compacted_pretrained(small, tmp_path, example_inputs=ids(3, 7))
    assert saved.format == "pretrained" and saved.changed == {"intermediate_size": 32}
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.intermediate_size == 32
    for x in (ids(2, 5), ids(3, 9)):
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**x).logits, small(**x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("n_inner", "kept"), [(64, 48), (None, 96)])  # None: GPT-2's default, 4 x n_embd
def test_gpt2_ffn_goes_back_to_conv1d_and_reloaded_model_generates_the_same(tmp_path, n_inner, kept):
    model = quiet(lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=n_inner, bos_token_id=0,
        eos_token_id=0)))
    swapped = linear_from_conv1d(model)
    small = compacted(model, [Rule(Filter(sparsity=0.25), match="*mlp.c_fc")])
    saved = save_compacted_pretrained(small, tmp_path, example_inputs=ids(), conv1d_names=swapped)
    assert saved.format == "pretrained" and saved.changed == {"n_inner": kept}, saved.reason
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert type(reloaded.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    prompt, kwargs = ids(2, 4)["input_ids"], {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(reloaded.generate(prompt, **kwargs), small.generate(prompt, **kwargs))


def test_uniform_grouped_query_heads_and_ffn_width_become_the_config(tmp_path):
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = quiet(lambda: transformers.LlamaForCausalLM(config))
    small = compacted(model, [Rule(Heads(sparsity=0.5), match="*self_attn.q_proj"),
                              Rule(Filter(sparsity=0.25), match="*mlp.*_proj", exclude="*down_proj")])
    saved = save_compacted_pretrained(small, tmp_path, example_inputs=ids(3, 6))
    assert saved.format == "pretrained"
    assert saved.changed == {"intermediate_size": 48, "num_attention_heads": 2, "head_dim": 8, "num_key_value_heads": 1}
    assert saved.max_abs_diff is not None and saved.max_abs_diff <= 1e-4


def test_per_layer_widths_fall_back_to_the_manifest_with_the_reason(tmp_path):
    model = bert()
    small = compacted(model, [Rule(Filter(sparsity=0.5), match="*layer.0.intermediate.dense"),
                              Rule(Filter(sparsity=0.25), match="*layer.1.intermediate.dense")])
    saved = save_compacted_pretrained(small, tmp_path, example_inputs=ids(3, 7))
    assert saved.format == "manifest" and (tmp_path / "manifest.json").is_file()
    assert "the FFN layers keep different widths [32, 48]" in saved.reason
    assert saved.max_abs_diff is not None and saved.max_abs_diff <= 1e-4  # reloaded with load_compacted


def test_head_counts_the_config_cannot_say_and_pruned_hidden_size_are_refused_in_one_line():
    small = compacted(bert(), [Rule(Heads(sparsity=0.5), match="*attention.self.query")])
    config, _, reason = pretrained_config(small)  # BERT derives the head size from hidden_size / heads
    assert config is None and reason.startswith("no config of BertConfig builds these shapes")
    model = bert()
    x = ids()
    targets = Plan([Rule(Filter(sparsity=0.25), match="*output.dense")]).resolve_coupled(model, x, mode="extend")
    small = compact(model, x, hard_prune(model, targets)).model
    config, _, reason = pretrained_config(small)
    assert config is None and "keep the statistics of the original width" in reason


def test_a_pruned_hidden_size_under_a_derived_head_size_saves_pretrained(tmp_path):
    """Qwen2's config derives head_dim from hidden_size: after hidden-size pruning it derived 6 for 8-wide heads,
    and the reload check crashed in the rotary embedding (a review's finding); the config now states head_dim."""
    config = transformers.Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = quiet(lambda: transformers.Qwen2ForCausalLM(config))
    x = ids(1, 6)
    hard_prune(model, Plan([Rule(Filter(sparsity=0.25), match="*o_proj")]).resolve_coupled(model, x, mode="extend"))
    small = compact(model, x).model
    assert small.config.hidden_size == 24 and small.config.head_dim == 8
    saved = save_compacted_pretrained(small, tmp_path / "pretrained", example_inputs=ids(2, 5))
    assert saved.format == "pretrained" and saved.max_abs_diff is not None and saved.max_abs_diff <= 1e-4
    from admmcompress.executors import get_executor
    from admmcompress.executors.manifest import load_compacted

    get_executor("compact").save(small, tmp_path / "manifest")  # the manifest keeps the stated head_dim too
    back = load_compacted(tmp_path / "manifest", quiet(lambda: transformers.Qwen2ForCausalLM(config)))
    assert back.config.head_dim == 8 and back.config.hidden_size == 24


def test_distilbert_ffn_width_is_its_hidden_dim(tmp_path):
    """DistilBERT names its FFN width hidden_dim: a uniform FFN fell back to the manifest (review)."""
    config = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=16)
    model = quiet(lambda: transformers.DistilBertForSequenceClassification(config))
    small = compacted(model, [Rule(Filter(sparsity=0.5), match="*ffn.lin1")])
    saved = save_compacted_pretrained(small, tmp_path, example_inputs=ids(2, 5))
    assert saved.format == "pretrained" and saved.changed == {"hidden_dim": 32}


# --- nothing the user had is lost: the folder is written whole, and replaced only when asked ------------------------


def ffn_halved():
    return compacted(bert(), [Rule(Filter(sparsity=0.5), match="*intermediate.dense")])


def test_a_folder_that_holds_files_is_refused_unless_overwrite_and_then_replaced_whole(tmp_path):
    small = ffn_halved()
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds files; .* overwrite=True"):
        save_compacted_pretrained(small, folder)
    assert (folder / "notes.txt").read_text() == "mine"
    saved = save_compacted_pretrained(small, folder, example_inputs=ids(), overwrite=True)
    assert saved.format == "pretrained" and saved.folder == folder
    assert not (folder / "notes.txt").exists() and (folder / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no staged or set-aside folder left


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_save_that_fails_its_check_leaves_what_was_there(tmp_path, overwrite):
    small = ffn_halved()
    folder = tmp_path / "saved"
    if overwrite:
        save_compacted_pretrained(small, folder)
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="differs from the saved one"):
        save_compacted_pretrained(small, folder, example_inputs=ids(), atol=-1.0, overwrite=overwrite)
    if overwrite:
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    else:
        assert not folder.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["saved"] if overwrite else [])


def test_the_manifest_fallback_is_written_whole_too(tmp_path):
    model = bert()
    targets = Plan([Rule(Filter(sparsity=0.5), match="*layer.0.intermediate.dense")]).resolve_coupled(model, ids())
    small = compact(model, ids(), hard_prune(model, targets)).model  # one layer pruned: widths differ
    with pytest.raises(ValueError, match="differs from the saved one"):
        save_compacted_pretrained(small, tmp_path / "m", example_inputs=ids(), atol=-1.0)
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())
    saved = save_compacted_pretrained(small, tmp_path / "m", example_inputs=ids())
    assert saved.format == "manifest" and (tmp_path / "m" / "manifest.json").exists()


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(ValueError, match="is a file; a model is saved as a folder"):
        save_compacted_pretrained(ffn_halved(), tmp_path / "x")
