"""measure() counts a weight that several layers share (tied weights) once, as storage() and the packed file do."""

from __future__ import annotations

import torch
from torch import nn

from admmcompress.report.metrics import measure
from admmcompress.report.storage import storage


class TiedLM(nn.Module):
    """An embedding whose weight the output layer reuses (GPT-2, BART and tied LLaMA heads do this)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 4), nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_a_tied_weight_is_one_row_and_counted_once_in_the_totals():
    model = TiedLM()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.emb.weight[:5] = 0  # 20 of the shared 40 weights pruned
    stats = measure(model, ["emb", "fc", "head"])
    assert [row.name for row in stats.layers] == ["emb", "fc"]
    assert stats.pruned_weights == 40 + 16 == stats.total_params  # every parameter once
    assert stats.kept_weights == 20
    assert stats.overall_compression == 56 / 20
    assert stats.nonzero_params == 20


def test_measure_and_storage_list_the_same_rows_for_tied_weights():
    model = TiedLM()
    layers = ["head", "fc", "emb"]  # the first name reached is the one kept, by both
    assert [row.name for row in measure(model, layers).layers] == ["head", "fc"]
    assert [row.name for row in storage(model, layers).layers] == ["head.weight", "fc.weight"]
