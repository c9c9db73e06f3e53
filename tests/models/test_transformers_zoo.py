"""Models users bring: transformers architectures built from small configs (random init, nothing downloaded).

Each goes through what suits it: the FFN hidden units pruned with coupled filters and compacted (outputs equal on
two input shapes), unstructured ADMM ending in masks, block pruning + ``to_blocksparse``, and (slow) ONNX export
checked with ONNX Runtime. Skipped cleanly without ``transformers`` (the ``hf`` extra).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

from admmcompress.drivers import ADMM
from admmcompress.executors.blocksparse import to_blocksparse
from admmcompress.executors.compact import compact
from admmcompress.executors.onnx_export import export_onnx, max_onnx_diff, output_tensors
from admmcompress.finalize import hard_prune
from admmcompress.models.conv1d import linear_from_conv1d
from admmcompress.plan import Plan, Rule
from admmcompress.plan.attention import attention_layouts
from admmcompress.structures import Block, Filter, Heads, Unstructured

transformers = pytest.importorskip("transformers")


def tokens(b: int, t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(b * 31 + t)
    return {"input_ids": torch.randint(0, 100, (b, t), generator=g), "attention_mask": torch.ones(b, t).long()}


def images(b: int, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b))


def bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(config), "*intermediate.dense", tokens


def vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64)
    return transformers.ViTModel(config), "*mlp.fc1", lambda b, t: images(b)


def wav2vec2():
    config = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                         conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                         num_conv_pos_embedding_groups=4)
    def audio(b: int, t: int) -> torch.Tensor:
        return torch.randn(b, 100 * t, generator=torch.Generator().manual_seed(b + t))

    return transformers.Wav2Vec2Model(config), "*feed_forward.intermediate_dense", audio


def whisper_encoder():
    config = transformers.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                        num_mel_bins=16, max_source_positions=20, vocab_size=100, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    def mel(b: int, t: int) -> torch.Tensor:  # Whisper's encoder takes a fixed number of frames (2 x 20)
        return torch.randn(b, 16, 40, generator=torch.Generator().manual_seed(b))

    return transformers.WhisperModel(config).encoder, "*fc1", mel


def convnext():
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                         image_size=32)
    return transformers.ConvNextModel(config), "*pwconv1", lambda b, t: images(b, 8 * t)


def mobilevit():
    config = transformers.MobileViTConfig(image_size=32, hidden_sizes=[16, 24, 32],
                                          neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64])
    return transformers.MobileViTModel(config), "*intermediate.dense", lambda b, t: images(b)


def token_ids(b: int, t: int) -> dict[str, torch.Tensor]:
    return {"input_ids": tokens(b, t)["input_ids"]}


def gpt2():
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    linear_from_conv1d(model)  # GPT-2's Conv1D layers as the equal nn.Linear (models/conv1d.py)
    return model, "*mlp.c_fc", token_ids


def llama():
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config), "*mlp.[gu]*_proj", token_ids


def qwen3():
    """Per-head RMSNorms on the queries and keys (their weights brought the rotary halves back into the trace:
    resolving a plan ran for minutes, a review's finding)."""
    config = transformers.Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64)
    return transformers.Qwen3ForCausalLM(config), "*mlp.[gu]*_proj", token_ids


MODELS: dict[str, Callable] = {"bert": bert, "vit": vit, "wav2vec2": wav2vec2, "whisper_encoder": whisper_encoder,
                               "convnext": convnext, "mobilevit": mobilevit, "gpt2": gpt2, "llama": llama,
                               "qwen3": qwen3}


def build(name: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, ffn, inputs = MODELS[name]()
    return model.eval(), ffn, inputs


def call(model, x):
    return model(**x) if isinstance(x, dict) else model(x)


def assert_same_outputs(a, b, x, atol=1e-4):
    with torch.no_grad():
        for got, want in zip(output_tensors(call(a, x))[1], output_tensors(call(b, x))[1], strict=True):
            torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_ffn_hidden_units_prune_and_compact_exactly(name):
    model, ffn, inputs = build(name)
    x = inputs(2, 4)
    targets = Plan([Rule(Filter(sparsity=0.5), match=ffn)]).resolve_coupled(model, x)
    # fc1 rows + fc2 columns (SwiGLU: gate and up rows), decided together
    width = 3 if name in ("llama", "qwen3") else 2
    assert targets and all(len(t.members) == width for t in targets)
    masks = hard_prune(model, targets)
    result = compact(model, x, masks)
    assert result.params_after < result.params_before
    for shape in [(2, 4), (3, 5)]:  # a second batch size and sequence length / image size
        assert_same_outputs(result.model, model, inputs(*shape))


def efficientnet():
    # hidden_dim must equal the top conv's width (round_filters(1280) at this width), or the model cannot run.
    config = transformers.EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                                             hidden_dim=320)
    return transformers.EfficientNetModel(config), "encoder.top_conv"


# ConvNeXt's residual stream (LayerNorm, layer scale, channels-last permutes) is pruned in test_hidden_size.py.
@pytest.mark.parametrize("backbone", [efficientnet])
def test_cnn_backbone_channels_prune_and_compact_exactly(backbone):
    """Channels of every conv (whole coupled groups: residual stream, depthwise, squeeze-excite, zero padding),
    except the layers whose channels are the model's outputs."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, outputs = backbone()
    model.eval()
    rule = Rule(Filter(sparsity=0.5), type="Conv2d", exclude=outputs)
    targets = Plan([rule]).resolve_coupled(model, images(2), mode="extend")
    result = compact(model, images(2), hard_prune(model, targets))
    assert result.params_after < 0.8 * result.params_before
    for x in (images(3), images(2, 40)):
        assert_same_outputs(result.model, model, x)


QUERIES = {"bert": "*attention.self.query", "vit": "*attention.q_proj", "wav2vec2": "*attention.q_proj",
           "whisper_encoder": "*self_attn.q_proj", "mobilevit": "*attention.attention.query", "gpt2": "*attn.c_attn",
           "llama": "*self_attn.q_proj", "qwen3": "*self_attn.q_proj"}


@pytest.mark.parametrize("name", QUERIES)
def test_attention_heads_and_ffn_units_prune_and_compact_exactly(name):
    model, ffn, inputs = build(name)
    x = inputs(2, 4)
    plan = Plan([Rule(Heads(sparsity=0.5), match=QUERIES[name]), Rule(Filter(sparsity=0.5), match=ffn)])
    targets = plan.resolve_coupled(model, x)
    result = compact(model, x, hard_prune(model, targets))
    assert result.heads and all(after == before // 2 for before, after in result.heads.values())
    kept = {layout.module: layout.heads for layout in attention_layouts(result.model).values()}
    assert all(kept[block] == after for block, (_, after) in result.heads.items())  # the layout reads the new count
    for shape in [(2, 4), (3, 5)]:
        assert_same_outputs(result.model, model, inputs(*shape))


@pytest.mark.parametrize("name", MODELS)
def test_unstructured_admm_ends_in_masks_on_every_linear(name):
    model, _, inputs = build(name)
    rule = Rule(Unstructured(sparsity=0.75), type="Linear", exclude="lm_head")  # GPT-2's is tied to its embedding
    admm = ADMM(model, Plan([rule]), rho=1.0)
    admm.step()
    masks = admm.finalize()
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert linears and all(float((m.weight == 0).float().mean()) >= 0.74 for m in linears)
    assert len(masks.masks) == len(linears)
    assert all(torch.isfinite(t).all() for t in output_tensors(call(model, inputs(2, 4)))[1])


@pytest.mark.parametrize("name", MODELS)
def test_block_pruning_then_blocksparse_is_exact(name):
    model, _, inputs = build(name)
    plan = Plan([Rule(Block(sparsity=0.75, block=(4, 4), allow_ragged=True), type="Linear", exclude="lm_head")])
    hard_prune(model, plan.resolve(model))
    x = inputs(2, 4)
    with torch.no_grad():
        expected = output_tensors(call(model, x))[1]
    converted = to_blocksparse(model, block_rows=4)
    assert converted
    with torch.no_grad():
        for got, want in zip(output_tensors(call(model, x))[1], expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_pruned_model_exports_to_onnx_and_matches_onnxruntime(name, tmp_path):
    pytest.importorskip("onnxruntime")
    model, ffn, inputs = build(name)
    x = inputs(2, 4)
    masks = hard_prune(model, Plan([Rule(Filter(sparsity=0.5), match=ffn)]).resolve_coupled(model, x))
    small = compact(model, x, masks).model
    sequence = name in ("bert",)
    export_onnx(small, x if isinstance(x, dict) else (x,), tmp_path / "m.onnx", dynamic_sequence=sequence)
    assert max_onnx_diff(tmp_path / "m.onnx", small, inputs(3, 6 if sequence else 4)) < 1e-4


def test_t5_ffn_units_prune_and_compact_exactly():
    """The decoder's relative position bias (an Embedding of buckets x heads) sits in the attention group, whose
    channel mapping the trace loses; compaction indexed it with a bucket and raised a bare IndexError (review)."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                   num_heads=4, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()

    def inputs(b, t):
        g = torch.Generator().manual_seed(b * 10 + t)
        return {"input_ids": torch.randint(0, 100, (b, t), generator=g),
                "decoder_input_ids": torch.randint(0, 100, (b, 3), generator=g)}

    x = inputs(2, 6)
    targets = Plan([Rule(Filter(sparsity=0.5), match="*DenseReluDense.wi")]).resolve_coupled(model, x)
    result = compact(model, x, hard_prune(model, targets))
    assert result.params_after < result.params_before
    for shape in [(2, 6), (3, 5)]:
        assert_same_outputs(result.model, model, inputs(*shape))
