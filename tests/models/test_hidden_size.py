"""Hidden size across the residual stream: embeddings, writers, readers, LayerNorms and free parameters pruned as one
channel group, compacted exactly (LayerNorms keep the divisor of the full width), config.hidden_size updated."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from admmcompress.executors.compact import compact
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.plan.residual import WidthKeepingLayerNorm
from admmcompress.structures import Filter

transformers = pytest.importorskip("transformers")


def tokens(b: int, t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(b * 31 + t)
    return {"input_ids": torch.randint(0, 100, (b, t), generator=g), "attention_mask": torch.ones(b, t).long()}


def images(b: int, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b + size))


def bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(config), "*output.dense", tokens


def vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=3)
    return transformers.ViTForImageClassification(config), "*o_proj", lambda b, t: images(b)


def whisper():
    config = transformers.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                        num_mel_bins=16, max_source_positions=20, vocab_size=100, num_labels=3,
                                        classifier_proj_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        decoder_start_token_id=1)
    g = torch.Generator()  # Whisper's encoder takes a fixed number of frames (2 x max_source_positions)
    return transformers.WhisperForAudioClassification(config), "*fc2", lambda b, t: torch.randn(
        b, 16, 40, generator=g.manual_seed(b))


def wav2vec2():
    config = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                         conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                         num_conv_pos_embedding_groups=4, num_labels=3, classifier_proj_size=8)
    g = torch.Generator()
    return transformers.Wav2Vec2ForSequenceClassification(config), "*feed_forward.output_dense", lambda b, t: (
        torch.randn(b, 100 * t, generator=g.manual_seed(b + t)))


def build(factory):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, writers, inputs = factory()
    return model.eval(), writers, inputs


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return (model(**x) if isinstance(x, dict) else model(x)).logits


@pytest.mark.parametrize("factory", [bert, vit], ids=["bert", "vit"])
def test_hidden_size_prunes_the_whole_residual_stream_and_compacts_exactly(factory):
    model, writers, inputs = build(factory)
    x = inputs(2, 4)
    (target,) = Plan([Rule(Filter(sparsity=0.25), match=writers)]).resolve_coupled(model, x, mode="extend")
    kinds = {type(model.get_submodule(m)).__name__ for m in target.members if m in dict(model.named_modules())}
    assert target.size == 32 and {"LayerNorm", "Linear"} <= kinds  # writers, readers and norms: one decision
    masks = hard_prune(model, [target])
    result = compact(model, x, masks)
    small = result.model
    assert result.hidden == (32, 24) and small.config.hidden_size == 24
    norms = [m for m in small.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(isinstance(m, WidthKeepingLayerNorm) and m.full_width == 32 for m in norms)
    head = small.bert.pooler.dense if hasattr(small, "bert") else small.classifier  # the stream's last reader
    assert head.in_features == 24
    readers = [m for n, m in small.named_modules() if n.endswith(("query", "q_proj", "fc1", "intermediate.dense"))]
    assert readers and all(m.in_features == 24 for m in readers)
    for shape in [(2, 4), (3, 7)]:  # another batch size and sequence length (image batch for ViT)
        torch.testing.assert_close(logits(small, inputs(*shape)), logits(model, inputs(*shape)), atol=1e-4, rtol=0)


def test_bert_embeddings_and_vit_free_parameters_are_members():
    model, writers, inputs = build(vit)
    (target,) = Plan([Rule(Filter(sparsity=0.25), match=writers)]).resolve_coupled(model, inputs(2, 4), mode="extend")
    params = set(target.param_names)
    assert {"vit.embeddings.position_embeddings", "vit.embeddings.cls_token",
            "vit.embeddings.patch_embeddings.projection.weight", "vit.layernorm.bias"} <= params
    model, writers, inputs = build(bert)
    (target,) = Plan([Rule(Filter(sparsity=0.25), match=writers)]).resolve_coupled(model, inputs(2, 4), mode="extend")
    embeddings = [s for s in target.slices if "embeddings" in s.param and s.param.endswith("embeddings.weight")]
    assert len(embeddings) == 3 and all(s.dim == 1 for s in embeddings)  # word, position, token type columns


def test_convnext_residual_stream_with_layer_scale_and_permutes_compacts_exactly():
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                         image_size=32, num_labels=3, layer_scale_init_value=0.5)
    model = transformers.ConvNextForImageClassification(config).eval()
    x = images(2)
    targets = Plan([Rule(Filter(sparsity=0.25), match="*pwconv2")]).resolve_coupled(model, x, mode="extend")
    assert len(targets) == 2 and all(any(m.endswith("layer_scale_parameter") for m in t.members) for t in targets)
    result = compact(model, x, hard_prune(model, targets))
    small = result.model
    assert small.classifier.in_features == 24 and small.convnext.embeddings.patch_embeddings.out_channels == 12
    assert small.config.hidden_sizes == [12, 24]
    for y in (images(3), images(2, 40)):
        torch.testing.assert_close(logits(result.model, y), logits(model, y), atol=1e-4, rtol=0)


@pytest.mark.parametrize("channels_first", [False, True])
def test_width_keeping_layernorm_equals_layernorm_on_zero_padded_input(channels_first):
    torch.manual_seed(0)
    full = nn.LayerNorm(10)
    with torch.no_grad():
        full.weight.normal_(), full.bias.normal_()
    x = torch.randn(3, 6, 10) * 5 + 3
    x[..., 7:] = 0  # three removed channels
    small = WidthKeepingLayerNorm(7, full_width=10, channels_first=channels_first)
    with torch.no_grad():
        small.weight.copy_(full.weight[:7]), small.bias.copy_(full.bias[:7])
    got = small(x[..., :7].movedim(-1, 1)).movedim(1, -1) if channels_first else small(x[..., :7])
    torch.testing.assert_close(got, full(x)[..., :7], atol=1e-5, rtol=0)


class Stream(nn.Module):
    """A writer, a LayerNorm and a reader on one residual stream of width 16."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.write, self.read = nn.Linear(8, 16), nn.Linear(16, 4)
        self.norm = nn.LayerNorm(16, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.read(self.norm(self.write(x)))


def test_a_layernorm_without_weight_refuses_hidden_size_pruning():
    with pytest.raises(PlanError, match="LayerNorm 'norm' has no weight"):
        Plan([Rule(Filter(sparsity=0.25), match="write")]).resolve_coupled(Stream(affine=False), torch.randn(2, 3, 8))


def test_channels_only_unread_are_kept_where_a_layernorm_sees_them():
    """Zero reader columns alone do not make a channel removable: the LayerNorm's mean and variance still see it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[2].weight[:, :4] = 0
        model[1].weight[:4] = 0
    x = torch.randn(2, 5, 8)
    result = compact(model, x)
    assert result.model[1].normalized_shape == (16,) and result.model[2].in_features == 16
    torch.testing.assert_close(result.model(x), model(x), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_a_hidden_size_pruned_bert_exports_to_onnx_and_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from admmcompress.executors.onnx_export import export_onnx, max_onnx_diff

    model, writers, inputs = build(bert)
    x = inputs(2, 4)
    targets = Plan([Rule(Filter(sparsity=0.25), match=writers)]).resolve_coupled(model, x, mode="extend")
    small = compact(model, x, hard_prune(model, targets)).model
    export_onnx(small, x, tmp_path / "m.onnx", dynamic_sequence=True)
    assert max_onnx_diff(tmp_path / "m.onnx", small, inputs(3, 6)) < 1e-4


def test_llama_hidden_size_keeps_standard_rmsnorms_and_saves_with_save_pretrained(tmp_path):
    """RMSNorm over the kept channels equals the full-width one with eps * full / kept and the weight scaled by
    sqrt(full / kept): the compacted model stays a plain LLaMA that from_pretrained rebuilds."""
    from admmcompress.executors.hf_save import save_compacted_pretrained

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from their all-ones start, so the rescaling is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
    x = {"input_ids": torch.randint(0, 100, (2, 5))}
    (target,) = Plan([Rule(Filter(sparsity=0.25), match="*o_proj")]).resolve_coupled(model, x, mode="extend")
    assert {"model.embed_tokens", "lm_head", "model.norm.weight"} <= set(target.members)
    result = compact(model, x, hard_prune(model, [target]))
    small = result.model
    assert result.hidden == (32, 24) and small.config.hidden_size == 24
    assert small.config.rms_norm_eps == pytest.approx(config.rms_norm_eps * 32 / 24)
    assert type(small.model.norm).__name__ == "LlamaRMSNorm" and small.model.norm.weight.shape == (24,)
    for shape in [(2, 5), (3, 9)]:
        y = torch.randint(0, 100, shape)
        torch.testing.assert_close(logits(small, y), logits(model, y), atol=1e-4, rtol=0)
    saved = save_compacted_pretrained(small, tmp_path, example_inputs=x)
    assert saved.format == "pretrained" and saved.max_abs_diff <= 1e-4


def test_admm_on_the_hidden_size_ends_in_removable_channels():
    from admmcompress.drivers import ADMM

    model, writers, inputs = build(vit)
    x = inputs(2, 4)
    targets = Plan([Rule(Filter(sparsity=0.25), match=writers)]).resolve_coupled(model, x, mode="extend")
    admm = ADMM(model, targets, rho=1.0)
    admm.step()
    masks = admm.finalize()
    result = compact(model, x, masks)
    assert result.hidden == (32, 24)
    torch.testing.assert_close(logits(result.model, inputs(3, 4)), logits(model, inputs(3, 4)), atol=1e-4, rtol=0)


def test_whisper_hidden_size_includes_its_frozen_positions_and_keeps_them_frozen():
    """Whisper's sinusoidal position table does not require grad (no autograd node): it is traced all the same."""
    model, writers, inputs = build(whisper)
    x = inputs(2, 4)
    (target,) = Plan([Rule(Filter(sparsity=0.25), match=writers)]).resolve_coupled(model, x, mode="extend")
    assert "encoder.embed_positions" in target.members
    assert not model.encoder.embed_positions.weight.requires_grad  # the trace gave it a gradient only meanwhile
    result = compact(model, x, hard_prune(model, [target]))
    small = result.model
    assert result.hidden == (32, 24) and small.encoder.embed_positions.weight.shape == (20, 24)
    assert not small.encoder.embed_positions.weight.requires_grad
    for shape in [(2, 4), (3, 4)]:
        torch.testing.assert_close(logits(small, inputs(*shape)), logits(model, inputs(*shape)), atol=1e-4, rtol=0)


def test_wav2vec2_weight_norm_is_refused_with_the_fold_and_prunes_once_folded():
    model, writers, inputs = build(wav2vec2)
    x = inputs(2, 4)
    plan = Plan([Rule(Filter(sparsity=0.25), match=writers)])
    with pytest.raises(PlanError, match="weight_norm parametrization .*remove_parametrizations"):
        plan.resolve_coupled(model, x, mode="extend")
    torch.nn.utils.parametrize.remove_parametrizations(model.wav2vec2.encoder.pos_conv_embed.conv, "weight")
    (target,) = plan.resolve_coupled(model, x, mode="extend")
    result = compact(model, x, hard_prune(model, [target]))
    assert result.hidden == (32, 24) and result.model.config.hidden_size == 24
    for shape in [(2, 4), (3, 7)]:  # another batch size and clip length
        torch.testing.assert_close(logits(result.model, inputs(*shape)), logits(model, inputs(*shape)), atol=1e-4,
                                   rtol=0)


def test_a_model_that_returns_the_stream_itself_is_told_to_prune_one_with_a_head():
    """A bare BertModel returns the hidden states: their width is the output's, so compaction cannot narrow them."""
    from admmcompress.executors.compact import CompactionError

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    model, example = transformers.BertModel(config).eval(), tokens(2, 8)
    targets = Plan([Rule(Filter(sparsity=0.25), match="*output.dense")]).resolve_coupled(model, example, mode="extend")
    with pytest.raises(CompactionError, match=r"the model returns pruned channels themselves \(e\.g\. a bare "
                                              r"BertModel's hidden states\).*BertForSequenceClassification"):
        compact(model, example, hard_prune(model, targets))


def test_a_norm_the_library_does_not_know_is_named_once_and_no_op_is_offered():
    """Gemma's RMSNorm (x * (1 + w)) is not the LLaMA one: the refusal offered register_channelwise_op('Rsqrt')
    and ('Embedding'), neither per channel (a review's finding); it now names the norm."""
    import transformers

    from admmcompress.plan import Plan, PlanError, Rule
    from admmcompress.structures import Filter

    config = transformers.GemmaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(config).eval()
    x = {"input_ids": torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))}
    with pytest.raises(PlanError) as err:
        Plan([Rule(Filter(sparsity=0.25), match="*o_proj")]).resolve_coupled(model, x, mode="extend")
    text = str(err.value)
    assert "normalization 'model.norm' (GemmaRMSNorm) is not one this library knows" in text
    assert "register_channelwise_op" not in text
