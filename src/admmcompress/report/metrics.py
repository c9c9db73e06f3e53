"""Sparsity and compression measured from the model itself (reports are computed, never typed in).

Definitions:
- a layer's *compression* = its weights / its nonzero weights;
- *overall compression* = (total weights of the pruned layers) / (their nonzero weights),
  the figure the ADMM papers quote (71.2x for LeNet-5);
- *compression over all parameters* = every parameter of the model (biases and unpruned
  layers included) / the nonzero ones among the pruned weights plus everything else.

>>> import torch.nn as nn
>>> m = nn.Linear(4, 2)
>>> with torch.no_grad():
...     _ = m.weight.zero_()
...     m.weight[0, 0] = 1.0
>>> measure(m, [""]).overall_compression
8.0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from admmcompress.structures.groups import gemm_params


@dataclass
class LayerStats:
    name: str
    type: str
    shape: list[int]
    params: int
    kept: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.params if self.params else 0.0

    @property
    def compression(self) -> float:
        return self.params / self.kept if self.kept else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity, "compression": self.compression}


@dataclass
class ModelStats:
    layers: list[LayerStats] = field(default_factory=list)
    total_params: int = 0

    @property
    def pruned_weights(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def kept_weights(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def overall_compression(self) -> float:
        if not self.pruned_weights:  # no pruned layers (a dense run): nothing was compressed
            return 1.0
        return self.pruned_weights / self.kept_weights if self.kept_weights else float("inf")

    @property
    def nonzero_params(self) -> int:
        return self.total_params - (self.pruned_weights - self.kept_weights)

    @property
    def compression_all_params(self) -> float:
        return self.total_params / self.nonzero_params if self.nonzero_params else float("inf")

    def to_dict(self) -> dict:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "total_params": self.total_params,
            "pruned_layer_weights": self.pruned_weights,
            "kept_weights": self.kept_weights,
            "overall_compression": self.overall_compression,
            "nonzero_params": self.nonzero_params,
            "compression_all_params": self.compression_all_params,
        }


@torch.no_grad()
def measure(model: torch.nn.Module, layers: list[str]) -> ModelStats:
    """Count weights and nonzeros of the named layers' ``weight`` (in the order given)."""
    modules = dict(model.named_modules())
    unknown = [n for n in layers if n not in modules]
    if unknown:
        raise ValueError(f"measure: the model has no layer(s) {unknown}")
    stats = ModelStats(total_params=sum(p.numel() for p in model.parameters()))
    for name in dict.fromkeys(layers):
        # One row per weight matrix: "weight", or each GRU/LSTM weight_ih/hh_l{k} as "<layer>.<param>".
        params = gemm_params(modules[name]) or ["weight"]
        for param in params:
            weight = getattr(modules[name], param)
            stats.layers.append(
                LayerStats(
                    name=name if param == "weight" else f"{name}.{param}",
                    type=type(modules[name]).__name__,
                    shape=list(weight.shape),
                    params=weight.numel(),
                    kept=int(torch.count_nonzero(weight).item()),
                )
            )
    return stats
