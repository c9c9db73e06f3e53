"""Compacted transformers (hidden size, FFN units and heads pruned) saved as a shape manifest + safetensors and
rebuilt by ``load_compacted`` into a fresh model of the ORIGINAL config: narrower LayerNorms (width-keeping),
RMSNorms (weight shape and eps), Embeddings, free parameters (ViT's position embeddings and class token,
ConvNeXt's layer scale), head-count attributes and the config fields compaction edits all come back."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from admmcompress.executors import get_executor
from admmcompress.executors.compact import compact
from admmcompress.executors.manifest import ManifestError, canonical_sha256, load_compacted
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan, Rule
from admmcompress.plan.residual import WidthKeepingLayerNorm
from admmcompress.structures import Filter, Heads

transformers = pytest.importorskip("transformers")
COMPACT = get_executor("compact")


def tokens(b: int, t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(b * 31 + t)
    return {"input_ids": torch.randint(0, 100, (b, t), generator=g), "attention_mask": torch.ones(b, t).long()}


def images(b: int, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b + size))


# name: (model class, config, hidden-size writers, rules for heads and FFN units, inputs(batch, length))
CASES = {
    "bert": (lambda: transformers.BertForSequenceClassification, lambda: transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3), "*output.dense",
        [Rule(Heads(sparsity=0.5), match="*attention.self.query"),
         Rule(Filter(sparsity=0.5), match="*intermediate.dense")], tokens),
    "vit": (lambda: transformers.ViTForImageClassification, lambda: transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3), "*o_proj",
        [Rule(Heads(sparsity=0.5), match="*attention.q_proj"), Rule(Filter(sparsity=0.5), match="*mlp.fc1")],
        lambda b, t: images(b)),
    "llama": (lambda: transformers.LlamaForCausalLM, lambda: transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64), "*o_proj",
        [Rule(Heads(sparsity=0.5), match="*self_attn.q_proj"),
         Rule(Filter(sparsity=0.5), match="*mlp.*_proj", exclude="*down_proj")],
        lambda b, t: {"input_ids": tokens(b, t)["input_ids"]}),
    "convnext": (lambda: transformers.ConvNextForImageClassification, lambda: transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32, num_labels=3,
        layer_scale_init_value=0.5), "*pwconv2", [], lambda b, t: images(b, 8 * t)),
}


def fresh(name: str) -> torch.nn.Module:
    """A model of the original config, with other random weights than the one that was compacted."""
    cls, config = CASES[name][0](), CASES[name][1]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(config).eval()


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return (model(**x) if isinstance(x, dict) else model(x)).logits


@pytest.fixture(scope="module", params=list(CASES))
def compacted(request):
    """(name, compacted model): hidden size first (one channel set through the stream), then heads and FFN."""
    name = request.param
    torch.manual_seed(0)
    model = fresh(name)
    with torch.no_grad():  # norms away from their all-ones start, so their recorded widths and eps matter
        for pname, p in model.named_parameters():
            if pname.endswith(("norm.weight", "layernorm.weight", "LayerNorm.weight")):
                p.normal_(1.0, 0.3)
    _, _, writers, rules, inputs = CASES[name]
    x = inputs(2, 4)
    targets = Plan([Rule(Filter(sparsity=0.25), match=writers)]).resolve_coupled(model, x, mode="extend")
    small = compact(model, x, hard_prune(model, targets)).model
    if rules:
        small = compact(small, x, hard_prune(small, Plan(rules).resolve_coupled(small, x))).model
    return name, small.eval()


def test_a_compacted_transformer_reloads_into_a_skeleton_of_the_original_config(compacted, tmp_path):
    name, small = compacted
    COMPACT.save(small, tmp_path)
    skeleton = fresh(name)
    restored = load_compacted(tmp_path, skeleton).eval()
    assert restored is skeleton
    assert restored.state_dict().keys() == small.state_dict().keys()
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in restored.state_dict().items())
    inputs = CASES[name][4]
    for shape in [(2, 4), (3, 5)]:  # another batch size and sequence length (image size for ConvNeXt)
        torch.testing.assert_close(logits(restored, inputs(*shape)), logits(small, inputs(*shape)), atol=1e-5, rtol=0)
    if name == "convnext":
        assert restored.config.hidden_sizes == small.config.hidden_sizes == [12, 24]
    else:
        assert restored.config.hidden_size == small.config.hidden_size == 24
    if name == "llama":
        assert restored.config.rms_norm_eps == small.config.rms_norm_eps
        assert restored.model.norm.variance_epsilon == small.model.norm.variance_epsilon
    norms = [m for m in restored.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(isinstance(m, WidthKeepingLayerNorm) for m in norms)  # every LayerNorm of the stream narrowed



def test_a_skeleton_built_from_the_compacted_config_works_too(compacted, tmp_path):
    """hf_save's fallback builds the skeleton from the compacted config: BERT then derives a wrong head size
    (hidden_size / heads) and ViT a narrower stream; the recorded head size, scale and shapes correct it."""
    name, small = compacted
    COMPACT.save(small, tmp_path)
    restored = load_compacted(tmp_path, CASES[name][0]()(copy.deepcopy(small.config))).eval()
    for shape in [(2, 4), (3, 5)]:
        torch.testing.assert_close(logits(restored, CASES[name][4](*shape)), logits(small, CASES[name][4](*shape)),
                                   atol=1e-5, rtol=0)


def test_head_counts_come_back_on_the_attention_modules(compacted, tmp_path):
    name, small = compacted
    COMPACT.save(small, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    if name == "convnext":  # no attention, no RMSNorm: nothing of the kind to record
        assert manifest["attributes"] == {}
        return
    restored = load_compacted(tmp_path, fresh(name))
    for module, values in manifest["attributes"].items():
        for attr, value in values.items():
            assert getattr(restored.get_submodule(module), attr) == getattr(small.get_submodule(module), attr) == value
    heads = [v for values in manifest["attributes"].values() for k, v in values.items() if k in HEAD_ATTRS]
    if name == "llama":  # LLaMA's attention keeps no head count: it reads it from its projections' widths
        attention = restored.model.layers[0].self_attn
        assert heads == [] and attention.q_proj.out_features == 16 and attention.k_proj.out_features == 8
    else:
        assert heads and all(v == 2 for v in heads)  # 4 heads halved, in every block


HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads")


def rewritten(folder, edit) -> None:
    """``folder``'s manifest changed by ``edit`` with its checksum recomputed (a hostile file, not an accident)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest.pop("sha256")
    manifest["sha256"] = canonical_sha256(manifest)
    path.write_text(json.dumps(manifest))


def _first(mapping: dict, prefix: str = "") -> str:
    return next(k for k in mapping if k.startswith(prefix))


TAMPERS = {
    "tensor shape": (lambda m: m["tensors"].__setitem__("vit.embeddings.cls_token", [1, 1, 30]),
                     "does not fit the layers"),
    "tensor rank": (lambda m: m["tensors"].__setitem__("vit.embeddings.cls_token", [1, 30]), "3 dimensions"),
    "tensor name": (lambda m: m["tensors"].__setitem__("vit.embeddings.no\nthing", [3]), "does not have"),
    "module name": (lambda m: m["attributes"].__setitem__("vit.encoder.\nlayer", {"num_heads": 2}), "does not have"),
    "head count": (lambda m: m["attributes"][_first(m["attributes"])].__setitem__("num_attention_heads", "2"),
                   "must be of type int"),
    "unknown attribute": (lambda m: m["attributes"][_first(m["attributes"])].__setitem__("training", True),
                          "are restored"),
    "config": (lambda m: m["config"].__setitem__("hidden_size", -3), "config.hidden_size"),
    "config field": (lambda m: m["config"].__setitem__("num_labels", 5), "only"),
    "layernorm eps": (lambda m: m["layers"]["vit.layernorm"].__setitem__("eps", "1e-5"), "it needs exactly"),
    "layernorm width": (lambda m: m["layers"]["vit.layernorm"].__setitem__("full_width", 8), "cannot be built"),
    "layernorm extra": (lambda m: m["layers"]["vit.layernorm"].__setitem__("dtype", "float64"), "it needs exactly"),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_tampered_shape_or_attribute_is_refused_in_one_line(tamper, tmp_path):
    torch.manual_seed(0)
    model = fresh("vit")
    x = images(2)
    targets = Plan([Rule(Filter(sparsity=0.25), match="*o_proj")]).resolve_coupled(model, x, mode="extend")
    small = compact(model, x, hard_prune(model, targets)).model
    small = compact(small, x, hard_prune(small, Plan(CASES["vit"][3]).resolve_coupled(small, x))).model
    COMPACT.save(small, tmp_path)
    edit, message = TAMPERS[tamper]
    rewritten(tmp_path, edit)
    skeleton = fresh("vit")
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(ManifestError, match=message) as err:
        load_compacted(tmp_path, skeleton)
    assert "\n" not in str(err.value)
    # refused before anything was built: the skeleton passed in is untouched
    assert all(torch.equal(v, before[k]) for k, v in skeleton.state_dict().items())
    assert skeleton.config.hidden_size == 32


def test_a_plain_model_needs_no_config_and_a_recorded_config_needs_one(tmp_path):
    """Fields for a transformers config are refused, in one line, when the skeleton has no config."""
    layer = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Embedding(5, 3))
    COMPACT.save(layer, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"] == {} and manifest["layers"]["1"]["type"] == "LayerNorm"
    assert load_compacted(tmp_path, torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6),
                                                        torch.nn.Embedding(9, 6)))[2].num_embeddings == 5
    rewritten(tmp_path, lambda m: m["config"].__setitem__("hidden_size", 3))
    with pytest.raises(ManifestError, match="the skeleton has no config"):
        load_compacted(tmp_path, torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3),
                                                     torch.nn.Embedding(5, 3)))


@pytest.mark.parametrize("checksums", [True, False], ids=["before-transformers", "before-checksums"])
def test_manifests_of_the_older_formats_still_load(checksums, tmp_path):
    """A manifest without the 'tensors', 'attributes', 'config' and 'tied' keys (and one without checksums either)."""
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.Conv2d(5, 2, 1)).eval()
    COMPACT.save(small, tmp_path)

    def old(manifest: dict) -> None:
        for key in ("tensors", "attributes", "config", "tied") + (() if checksums else ("weights",)):
            del manifest[key]

    rewritten(tmp_path, old)
    if not checksums:  # the oldest manifests have no checksum of their own either
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        del manifest["sha256"]
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    skeleton = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.Conv2d(16, 2, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = load_compacted(tmp_path, skeleton).eval()
    assert any("before compacted models carried checksums" in str(w.message) for w in caught) != checksums
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(restored(x), small(x))


def test_gpt2_with_hidden_size_heads_and_ffn_pruned_reloads_with_its_lm_head_still_tied(tmp_path):
    """GPT-2's LM head shares the token embedding's tensor: saved once per name, tied again on load; the skeleton
    has GPT-2's own Conv1D layers, replaced by the recorded Linears."""
    from admmcompress.models.conv1d import linear_from_conv1d

    def gpt2():
        config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                         bos_token_id=0, eos_token_id=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transformers.GPT2LMHeadModel(config).eval()

    torch.manual_seed(0)
    model = gpt2()
    linear_from_conv1d(model)
    x = {"input_ids": tokens(2, 5)["input_ids"]}
    targets = Plan([Rule(Filter(sparsity=0.25), match="*attn.c_proj")]).resolve_coupled(model, x, mode="extend")
    small = compact(model, x, hard_prune(model, targets)).model
    rules = [Rule(Filter(sparsity=0.5), match="*mlp.c_fc"), Rule(Heads(sparsity=0.5), match="*attn.c_attn")]
    small = compact(small, x, hard_prune(small, Plan(rules).resolve_coupled(small, x))).model.eval()
    COMPACT.save(small, tmp_path)
    restored = load_compacted(tmp_path, gpt2()).eval()
    assert restored.lm_head.weight is restored.transformer.wte.weight and restored.lm_head.in_features == 24
    attn = restored.transformer.h[0].attn
    assert (attn.num_heads, attn.split_size) == (small.transformer.h[0].attn.num_heads, 16)
    for shape in [(2, 5), (3, 9)]:
        y = tokens(*shape)["input_ids"]
        torch.testing.assert_close(logits(restored, y), logits(small, y), atol=1e-5, rtol=0)


def test_tied_parameters_stay_one_tensor_and_a_tampered_tie_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    COMPACT.save(model, tmp_path)
    skeleton = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10, bias=False))
    restored = load_compacted(tmp_path, skeleton)
    assert restored[1].weight is restored[0].weight and restored[0].weight.shape == (10, 4)
    for tied, message in [([["0.weight", "1.bias"]], "as one tensor, but they are not parameters of one shape"),
                          ([["0.weight", "1.weight", "0.weight"]], "lists of two or more distinct parameter names")]:
        rewritten(tmp_path, lambda m, tied=tied: m.__setitem__("tied", tied))
        with pytest.raises(ManifestError, match=message):
            load_compacted(tmp_path, torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10, bias=False)))
