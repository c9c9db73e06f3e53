"""What the budget's trace sees: a layer called several times per sample counts every call, and the example is
called as the plan's tracer calls it (a tuple as positional inputs, a dict as keywords)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.drivers.budget import LatencyTable, gemm_shapes, structured_cost
from admmcompress.drivers.soft import SoftConfig, SoftThreshold
from admmcompress.plan import Plan, Rule
from admmcompress.plan.graph import first_sample
from admmcompress.structures import Filter
from admmcompress.timing import LatencyCache

pytestmark = pytest.mark.usefixtures("private_rng")  # seeded, the global RNG restored after


class Shared(nn.Module):
    """One block applied ``times`` times per sample (ALBERT-style sharing, a looped refinement)."""

    def __init__(self, times: int = 3) -> None:
        super().__init__()
        self.times = times
        self.inp, self.block, self.out = nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for _ in range(self.times):
            h = torch.relu(self.block(h))
        return self.out(h)


class TwoScales(nn.Module):
    """One conv applied at 8x8 and again at 4x4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).sum() + self.conv(nn.functional.avg_pool2d(x, 2)).sum()


def test_a_layer_called_several_times_counts_the_macs_of_every_call():
    shapes = gemm_shapes(Shared(), torch.randn(2, 8))
    assert shapes["block.weight"].positions == 3
    assert structured_cost(shapes, {}, "macs") == 8 * 64 + 3 * 64 * 64 + 64 * 2  # before: 4736, the block once
    assert structured_cost(shapes, {}, "params") == 8 * 64 + 64 * 64 + 64 * 2  # its weights are stored once
    conv = gemm_shapes(TwoScales(), torch.randn(1, 4, 8, 8))["conv.weight"]
    assert conv.positions == 8 * 8 + 4 * 4 and conv.calls == ((4, 8, 8), (4, 4, 4))
    assert conv.in_shape == (4, 8, 8)  # the first call's


def test_a_layer_seen_without_a_traced_pass_has_one_call_of_unknown_shape():
    shapes = gemm_shapes(Shared(times=3), None)
    assert {p: (s.positions, s.calls, s.in_shape) for p, s in shapes.items()} == dict.fromkeys(
        ["inp.weight", "block.weight", "out.weight"], (1, ((),), ())
    )


def test_latency_sums_the_lookups_of_every_call(tmp_path):
    cache = LatencyCache("t", folder=tmp_path)
    x = torch.randn(1, 8)
    once = LatencyTable(gemm_shapes(Shared(times=1), x), grid=(0.5, 1.0), cache=cache, rounds=1)
    thrice = LatencyTable(gemm_shapes(Shared(times=3), x), grid=(0.5, 1.0), cache=cache, rounds=1)
    for rows, cols in ((64, 64), (40, 48)):
        assert thrice.ms("block.weight", rows, cols) == pytest.approx(3 * once.ms("block.weight", rows, cols))
    assert thrice.ms("inp.weight", 64, 8) == pytest.approx(once.ms("inp.weight", 64, 8))
    scales = LatencyTable(gemm_shapes(TwoScales(), torch.randn(1, 4, 8, 8)), grid=(1.0,), cache=cache, rounds=1)
    assert len(scales._tables["conv.weight"]) == 2  # one table per input size


class Keywords(nn.Module):
    """A model called with an input and a mask, as a transformer with an attention mask is."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)) * mask.unsqueeze(-1))


def test_tuple_and_dict_examples_are_cut_to_one_sample_and_called_as_the_plan_tracer_calls_them():
    x, mask = torch.randn(4, 5, 6), torch.ones(4, 5)
    by_tuple = gemm_shapes(Keywords(), (x, mask))
    by_dict = gemm_shapes(Keywords(), {"x": x, "mask": mask})
    assert by_tuple == by_dict and by_dict["fc1.weight"].positions == 5 and by_dict["fc1.weight"].in_shape == (5, 6)
    cut = first_sample({"x": x, "pair": (x, mask), "flag": True})
    assert cut["x"].shape[0] == cut["pair"][1].shape[0] == 1 and cut["flag"] is True


def test_the_soft_driver_meets_a_mac_budget_on_a_dict_example():
    model, example = Keywords(), {"x": torch.randn(2, 5, 6), "mask": torch.ones(2, 5)}
    plan = Plan([Rule(Filter(sparsity=0.9), match="fc1")])
    soft = SoftThreshold(model, plan.resolve_coupled(model, example, "strict"),
                         SoftConfig(budget={"kind": "macs", "reduction": 2}), example=example)  # before: TypeError
    soft.step()
    soft.finalize()
    assert soft.dense_cost == 5 * (6 * 16 + 16 * 3) and soft.final_cost <= soft.target_cost


def test_a_bert_with_an_attention_mask_is_traced_by_the_budget():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    example = {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    plan = Plan.from_dict({"rules": [{"match": "*intermediate.dense", "structure": "filter", "sparsity": 0.9}]})
    soft = SoftThreshold(model, plan.resolve_coupled(model, example), SoftConfig(budget={"kind": "macs",
                         "reduction": 1.2}), example=example)
    assert soft.shapes["encoder.layer.0.intermediate.dense.weight"].positions == 12
    soft.step()
    soft.finalize()
    assert soft.final_cost <= soft.target_cost


def test_a_sequence_first_transformer_counts_every_position_per_sample():
    """nn.TransformerEncoderLayer is sequence-first by default: an example (L, B, E) is not cut along L; the batch
    comes from the attention's batch axis, so each Linear makes L passes per sample with an (L, E) input."""
    torch.manual_seed(0)
    first = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0)
    batched = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    seq_first, batch_first = gemm_shapes(first, torch.randn(9, 3, 16)), gemm_shapes(batched, torch.randn(3, 9, 16))
    assert seq_first == batch_first
    assert seq_first["linear1.weight"].positions == 9 and seq_first["linear1.weight"].in_shape == (9, 16)
