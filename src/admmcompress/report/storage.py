"""The storage table of a model, exactly as SPEC 4.2 counts it, computed from the model itself.

``storage(model)`` gives every weight layer's bits under every scheme (dense, bitmask, relative index
with filler entries, CSR, structured; codebooks included) and the model totals; ``render_storage``
prints them as the markdown table of report.md. How a weight is coded and what each scheme costs
(value formats, relative-index gaps, the formulas) lives one level down in :mod:`admmcompress.encoding`,
shared with the executors that write those bits for real (``executors.packed``); its names are
re-exported here for existing imports.

"Weight reduction" = total weights / nonzero weights; "storage reduction" = ``32 N / S`` (``16 N`` for a
half-precision model's weights: the dense baseline is the weights at their own width).

>>> w = torch.tensor([[0.5, 0, 0, 0, 0, 0, -0.5, 0.5, 0.5, -0.5]]).T   # one column; a gap of 5 zeros
>>> layer_storage("w", w, index_bits=2).bits["relative"]    # 6 entries * (2 + 2) + 2 pointers * 3 + grid 64
94
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from admmcompress.encoding import (  # noqa: F401  (moved there; re-exported for existing imports)
    FLOAT32,
    GRID_INT_BITS,
    MAX_LEVELS,
    SCHEMES,
    LayerStorage,
    ValueFormat,
    bitmask_bits,
    clog2,
    codes_of,
    csr_bits,
    dense_bits,
    grid_format,
    grid_of,
    layer_storage,
    layer_weights,
    levels_of,
    ratio,
    relative_bits,
    relative_entries,
    relative_gaps,
    structured_bits,
    table_format,
    value_format,
    weight_layers,
)
from admmcompress.structures.groups import factor_params


@dataclass
class StorageReport:
    """Per-layer storage and model totals; ``other_bits`` = biases and every other parameter."""

    layers: list[LayerStorage]
    other_bits: int
    other_params: int
    scheme: str = "best"
    #: factorized layers (stored as their factors' rows): the weights of the dense conv each replaced
    factorized: dict[str, int] = field(default_factory=dict)
    #: the buffers a saved model holds (BatchNorm running statistics and counters), at their own width
    buffer_bits: int = 0
    buffer_values: int = 0

    def _factor_rows(self, name: str) -> list[LayerStorage]:
        prefix = f"{name}." if name else ""
        return [layer for layer in self.layers if layer.name.startswith(prefix)]

    def _dense_rows(self) -> list[LayerStorage]:
        factors = {id(row) for name in self.factorized for row in self._factor_rows(name)}
        return [layer for layer in self.layers if id(layer) not in factors]

    @property
    def params(self) -> int:
        """The weights before compression: a factorized layer's count is the dense conv's it replaced (as in the
        layer table's compression), not its factors'."""
        return sum(layer.params for layer in self._dense_rows()) + sum(self.factorized.values())

    @property
    def nnz(self) -> int:
        return sum(layer.nnz for layer in self.layers)

    def bits(self, scheme: str | None = None) -> int:
        """Total weight bits under ``scheme`` ("best" = each layer's cheapest scheme)."""
        scheme = scheme or self.scheme
        if scheme != "best" and scheme not in SCHEMES:
            raise ValueError(f"scheme={scheme!r}; choose 'best' or one of {SCHEMES}")
        return sum(layer.bits[layer.best if scheme == "best" else scheme] for layer in self.layers)

    @property
    def weight_reduction(self) -> float:
        return ratio(self.params, self.nnz)

    @property
    def dense_bits(self) -> int:
        """The unpruned, unquantized weights at their own width (32 bits a value; 16 for half-precision ones); a
        factorized layer's are the dense conv's it replaced, at its factors' width."""
        bits = sum(layer.dense_value_bits * layer.params for layer in self._dense_rows())
        for name, count in self.factorized.items():
            rows = self._factor_rows(name)
            bits += (rows[0].dense_value_bits if rows else 32) * count
        return bits

    def storage_reduction(self, scheme: str | None = None) -> float:
        return ratio(self.dense_bits, self.bits(scheme))

    @property
    def whole_model_reduction(self) -> float:
        """Everything a saved model holds, dense at its own width / as stored: the weights (indices and codebooks
        included) plus the other parameters and buffers, which compression leaves as they are."""
        rest = self.other_bits + self.buffer_bits
        return ratio(self.dense_bits + rest, self.bits() + rest)

    @property
    def paper_reduction(self) -> float:
        """``32 N / sum(nnz * b)``: no indices, no codebooks (how 1,910x-style figures are computed)."""
        return ratio(self.dense_bits, sum(layer.nnz * layer.value.code_bits for layer in self.layers))

    def render(self) -> str:
        """The markdown table (``render_storage``); executors get it through an opened run, never by import."""
        return render_storage(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (an infinite ratio, from a layer with no nonzero, is the string "inf")."""
        return _json_safe({
            "layers": [layer.to_dict() for layer in self.layers],
            "scheme": self.scheme,
            "weight_bits": {s: self.bits(s) for s in ("best", *SCHEMES)},
            "other_bits": self.other_bits,
            "other_params": self.other_params,
            "buffer_bits": self.buffer_bits,
            "buffer_values": self.buffer_values,
            "whole_model_reduction": self.whole_model_reduction,
            "weight_reduction": self.weight_reduction,
            "storage_reduction": {s: self.storage_reduction(s) for s in ("best", *SCHEMES)},
            "paper_reduction": self.paper_reduction,
            **({"factorized": self.factorized} if self.factorized else {}),  # (absent: as pruning runs wrote it)
        })


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


@torch.no_grad()
def storage(
    model: torch.nn.Module,
    layers: list[str] | None = None,
    index_bits: int | str = "best",
    order: str = "column",
    compacted: bool = False,
) -> StorageReport:
    """Storage of the weight matrices of ``layers`` (module names; default: every layer whose weight
    is a matrix or kernel: conv, linear, embedding, recurrent). Normalisation scales (BatchNorm,
    LayerNorm: one value per channel) are counted with the biases under "other parameters",
    at full width, unless named in ``layers``. A tensor several layers share (tied weights: an LM head whose
    weight IS the embedding's, any ``b.weight = a.weight``) is one tensor, counted once: one row, under the first
    name ``layers`` reaches it by (the packed file stores it once too, ``executors.packed.tied_names``).

    >>> import torch.nn as nn
    >>> report = storage(nn.Linear(4, 2, bias=False))
    >>> report.bits("dense"), report.storage_reduction("dense")
    (256, 1.0)
    """
    modules = dict(model.named_modules())
    if layers is None:
        layers = weight_layers(model)
    unknown = [n for n in layers if n not in modules]
    if unknown:
        raise ValueError(f"storage: the model has no layer(s) {unknown}; give module names such as 'fc1'")
    rows, counted, factorized = [], {}, {}  # counted: id -> tensor (held, so that no id is reused while we look)
    for name in dict.fromkeys(layers):
        # a factorized layer stores its factors (one row each), not the dense weight they make
        if factor_params(modules[name]):
            factorized[name] = modules[name].weight.numel()
        for param, tensor in layer_weights(modules[name]):
            full = f"{name}.{param}" if name else param
            # a factor is also its own layer (Tucker2Conv's convs) when layers=None; a tied weight (lm_head.weight
            # IS the embedding's, or any b.weight = a.weight) is one tensor, stored once: one row, under its first name
            if id(tensor) not in counted:
                counted[id(tensor)] = tensor
                if tensor.numel():  # an empty weight (nn.Linear(0, n)) stores nothing and has no GEMM view
                    rows.append(layer_storage(full, tensor, index_bits, order, compacted))
    # every other parameter once (named_parameters gives a shared one once, under its first name, which need not be
    # the name it was counted under above: by identity, not by name)
    others = [(n, p) for n, p in model.named_parameters() if id(p) not in counted]
    other_bits = sum(p.numel() * p.element_size() * 8 for _, p in others)
    buffers = _saved_buffers(model)
    return StorageReport(rows, other_bits, sum(p.numel() for _, p in others), factorized=factorized,
                         buffer_bits=sum(b.numel() * b.element_size() * 8 for b in buffers),
                         buffer_values=sum(b.numel() for b in buffers))


def _saved_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers a state dict holds (persistent ones), each once: rebuilding the model needs them (a review
    found a ResNet-20's 6,440 B of BatchNorm statistics in the packed file and nowhere in the report)."""
    out, seen = [], set()
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is None or name in module._non_persistent_buffers_set or id(buffer) in seen:
                continue
            seen.add(id(buffer))
            out.append(buffer)
    return out


def render_storage(report: StorageReport | dict[str, Any]) -> str:
    """A markdown table: per layer value format, bits per scheme, best scheme; totals and ratios."""
    data = report.to_dict() if isinstance(report, StorageReport) else report
    lines = [
        "| weight | nnz / N | values | b | b_r | " + " | ".join(SCHEMES) + " | best |",
        "|---|---:|---|---:|---:|" + "---:|" * len(SCHEMES) + "---|",
    ]
    for layer in data["layers"]:
        value = layer["value"]
        kind = value["kind"] if value["kind"].startswith("float") else f"{value['kind']} K={value['levels']}"
        lines.append(
            f"| {layer['name']} | {layer['nnz']:,} / {layer['params']:,} | {kind} | {value['code_bits']} | "
            f"{layer['index_bits']} | "
            + " | ".join(f"{layer['bits'][s]:,}" for s in SCHEMES)
            + f" | {layer['best']} |"
        )
    bits = data["weight_bits"]
    lines.append(
        "| **total** | | | | | " + " | ".join(f"{bits[s]:,}" for s in SCHEMES) + f" | {bits['best']:,} |"
    )
    reduction = data["storage_reduction"]
    lines += [
        "",
        f"- Weight reduction (weights / nonzero): **{_x(data['weight_reduction'])}**",
        f"- Storage reduction (dense weights at their own width, 32 or 16 bits / stored bits, indices and "
        "codebooks included): "
        f"**{_x(reduction['best'])}** with each layer's best scheme; "
        + ", ".join(f"{s} {_x(reduction[s])}" for s in SCHEMES),
        "- Paper-style storage reduction (32 N, or 16 N for half precision, / sum nnz*b, no indices or codebooks): "
        f"{_x(data['paper_reduction'])}",
        f"- Other parameters (biases etc.): {data['other_params']:,} = {data['other_bits']:,} bits, "
        "not included above",
    ]
    if "buffer_bits" in data:  # (absent from reports written before buffers were counted)
        lines += [
            f"- Buffers (BatchNorm running statistics and counters): {data['buffer_values']:,} values = "
            f"{data['buffer_bits']:,} bits, not included above",
            "- Whole model (weights as stored + other parameters + buffers, against all of them dense): "
            f"**{_x(data['whole_model_reduction'])}**",
        ]
    if data.get("factorized"):
        lines.append(
            f"- Factorized layers ({len(data['factorized'])}) are stored as their factors (the rows "
            "'<layer>.first.weight', '<layer>.coefs', ...); the reductions above start from the dense convs they "
            f"replaced, {sum(data['factorized'].values()):,} weights, as the layer table's compression does"
        )
    return "\n".join(lines) + "\n"


def _x(value: float) -> str:
    return "inf" if value == math.inf or value == "inf" else f"{value:,.1f}x"


__all__ = [
    "SCHEMES",
    "LayerStorage",
    "StorageReport",
    "ValueFormat",
    "layer_storage",
    "render_storage",
    "storage",
    "value_format",
    "weight_layers",
]
