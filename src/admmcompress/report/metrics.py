"""Sparsity and compression measured from the model itself (reports are computed, never typed in).

Definitions:
- a layer's *compression* = its weights / its nonzero weights;
- *overall compression* = (total weights of the pruned layers) / (their nonzero weights),
  the figure the ADMM papers quote (71.2x for LeNet-5);
- *compression over all parameters* = every parameter of the model (biases and unpruned
  layers included) / the nonzero ones among the pruned weights plus everything else.

A *factorized* layer (one a low-rank target replaced by its factors: ``Tucker2Conv``, ``SharedKernelConv``;
``structures.groups.factor_params``) is not pruned: its row counts the weights of the dense conv it replaced
(``params``, ``shape``) against the nonzero weights of its factors (``kept``; ``factors`` = all of them), so its
compression is dense weights / factor weights. The model's parameters are then counted as the dense model had
them before the rewrite (``total_params``; ``model_params`` = what the factorized model holds), so the
compression over all parameters compares the dense model with the factorized one.

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

from admmcompress.structures.groups import factor_params, gemm_params


@dataclass
class LayerStats:
    """One weight's row. A factorized layer: ``params``/``shape`` are the dense conv's it replaced, ``kept`` the
    nonzero weights of its factors, ``factors`` all its factors' weights, ``factorized`` how, in words."""

    name: str
    type: str
    shape: list[int]
    params: int
    kept: int
    factors: int | None = None
    factorized: str | None = None

    @property
    def sparsity(self) -> float:
        """Zero weights / weights; of a factorized layer, zero factor weights / factor weights."""
        whole = self.params if self.factors is None else self.factors
        return 1.0 - self.kept / whole if whole else 0.0

    @property
    def compression(self) -> float:
        return self.params / self.kept if self.kept else float("inf")

    def to_dict(self) -> dict:
        row = asdict(self)
        if self.factors is None:  # a pruned (or dense) layer: its row as it always was
            del row["factors"], row["factorized"]
        return {**row, "sparsity": self.sparsity, "compression": self.compression}


@dataclass
class ModelStats:
    """``total_params``: every parameter of the model, its factorized layers counted as the dense convs they
    replaced (the dense model's count; :attr:`model_params` is what the model holds now)."""

    layers: list[LayerStats] = field(default_factory=list)
    total_params: int = 0

    @property
    def factorized(self) -> list[LayerStats]:
        return [layer for layer in self.layers if layer.factors is not None]

    @property
    def model_params(self) -> int:
        """The parameters the model holds (its factorized layers' factors instead of their dense weights)."""
        return self.total_params - sum(layer.params - layer.factors for layer in self.factorized)

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
        out = {
            "layers": [layer.to_dict() for layer in self.layers],
            "total_params": self.total_params,
            "pruned_layer_weights": self.pruned_weights,
            "kept_weights": self.kept_weights,
            "overall_compression": self.overall_compression,
            "nonzero_params": self.nonzero_params,
            "compression_all_params": self.compression_all_params,
        }
        if self.factorized:  # only then: the figures of pruning runs stay as they were
            out["model_params"] = self.model_params
            out["factorized_layers"] = len(self.factorized)
        return out


@torch.no_grad()
def measure(model: torch.nn.Module, layers: list[str]) -> ModelStats:
    """Count weights and nonzeros of the named layers' ``weight`` (in the order given); a factorized layer's
    row counts the dense conv it replaced against its factors (see the module's docstring). A weight tensor that
    several layers share (tied weights) is counted once, under the first of their names.

    >>> from admmcompress.executors.tucker import Tucker2Conv
    >>> m = torch.nn.Sequential(Tucker2Conv(torch.nn.Conv2d(8, 16, 3, bias=False), (4, 2)))
    >>> stats = measure(m, ["0"])   # dense 16*8*3*3 = 1152; factors 2*8 + 4*2*3*3 + 16*4 = 152
    >>> stats.layers[0].params, stats.layers[0].factors, stats.total_params, stats.model_params
    (1152, 152, 1152, 152)
    """
    modules = dict(model.named_modules())
    unknown = [n for n in layers if n not in modules]
    if unknown:
        raise ValueError(f"measure: the model has no layer(s) {unknown}")
    stats = ModelStats(total_params=sum(p.numel() for p in model.parameters()))
    factorized = [n for n in layers if factor_params(modules[n])]
    seen: dict[int, torch.Tensor] = {}  # id -> weight (held, so no id is reused): a tied weight counts once
    for name in dict.fromkeys(layers):
        if any(name.startswith(f"{f}.") or not f for f in factorized if f != name):
            continue  # a factor of a factorized layer (Tucker2Conv's convs): counted in that layer's row
        factors = [modules[name].get_parameter(p) for p in factor_params(modules[name])]
        if factors:  # replaced by its factors: the dense conv's weights against the factors' nonzero weights
            dense = modules[name].weight
            row = LayerStats(
                name=name,
                type=type(modules[name]).__name__,
                shape=list(dense.shape),
                params=dense.numel(),
                kept=sum(int(torch.count_nonzero(f).item()) for f in factors),
                factors=sum(f.numel() for f in factors),
                factorized=str(getattr(modules[name], "factorization", type(modules[name]).__name__)),
            )
            stats.layers.append(row)
            stats.total_params += row.params - row.factors  # the dense model's count
            continue
        # One row per weight matrix: "weight", or each GRU/LSTM weight_ih/hh_l{k} as "<layer>.<param>".
        params = gemm_params(modules[name]) or ["weight"]
        for param in params:
            weight = getattr(modules[name], param)
            # a weight several layers share (an LM head tied to the embedding) is one tensor: one row, under the
            # first name, as the storage report and the packed file count it
            if id(weight) in seen:
                continue
            seen[id(weight)] = weight
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
