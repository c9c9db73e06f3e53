"""ONNX export of models called with named inputs and returning mappings (the transformers calling convention),
with dynamic batch and sequence axes, checked with ONNX Runtime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.executors import get_executor
from admmcompress.executors.onnx_export import export_onnx, max_onnx_diff, run_onnx

pytest.importorskip("onnxruntime")


class TinyEncoder(nn.Module):
    """Token ids + mask in, a dict of tensors out (and a None, as ModelOutput fields often are)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.ffn = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        h = self.embed(input_ids)
        h = h + self.ffn(h)
        pooled = (h * attention_mask.unsqueeze(-1)).sum(1) / attention_mask.sum(1, keepdim=True)
        return {"hidden": h, "loss": None, "logits": self.head(pooled)}


def batch(b: int, t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(b * 100 + t)
    return {"input_ids": torch.randint(0, 50, (b, t), generator=g), "attention_mask": torch.ones(b, t)}


def test_named_inputs_and_mapping_outputs_with_dynamic_batch_and_sequence(tmp_path):
    model = TinyEncoder().eval()
    path = tmp_path / "enc.onnx"
    summary = export_onnx(model, batch(2, 5), path, dynamic_sequence=True)
    assert summary.inputs == ["input_ids", "attention_mask"]
    assert summary.outputs == ["hidden", "logits"]
    for b, t in [(2, 5), (1, 9), (4, 3)]:  # other batch sizes and sequence lengths than traced
        assert max_onnx_diff(path, model, batch(b, t)) < 1e-5
    out = run_onnx(path, **batch(3, 4))
    assert out[0].shape == (3, 4, 16) and out[1].shape == (3, 3)


def test_the_onnx_executor_checks_every_output(tmp_path):
    model = TinyEncoder().eval()
    summary = get_executor("onnx").save(model, tmp_path / "m.onnx", example=batch(2, 6), dynamic_sequence=True)
    assert summary.dynamic_sequence and summary.outputs == ["hidden", "logits"]


def test_non_tensor_named_input_is_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match="input 'attention_mask' is list; named inputs must all be tensors"):
        export_onnx(TinyEncoder(), {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": [1]},
                    tmp_path / "x.onnx")


@pytest.mark.slow
def test_a_transformers_bert_exports_with_its_model_output(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )
    model = transformers.BertModel(config).eval()

    def ids(b, t):
        g = torch.Generator().manual_seed(b + t)
        return {"input_ids": torch.randint(0, 100, (b, t), generator=g), "attention_mask": torch.ones(b, t).long()}

    summary = export_onnx(model, ids(2, 7), tmp_path / "bert.onnx", dynamic_sequence=True)
    assert summary.outputs == ["last_hidden_state", "pooler_output"]
    for b, t in [(2, 7), (3, 11)]:
        assert max_onnx_diff(tmp_path / "bert.onnx", model, ids(b, t)) < 1e-4
