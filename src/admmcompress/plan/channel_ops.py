"""The op tables of channel coupling: which autograd ops act on each channel separately, which mix channels,
which keep a zero channel zero, and the roles a layer plays in a channel group. Hand-written from the ops torch
records (Torch-Pruning traces the graph; it does not say what an op does to a zeroed channel).

>>> keeps_zero("Relu"), keeps_zero("Sigmoid"), "Mm" in MIXING_OPS
(True, False, True)
"""

from __future__ import annotations

PRODUCER, CONSUMER, NORM, DEPTHWISE = "producer", "consumer", "norm", "depthwise"

# Autograd ops that act on each channel separately (so a channel group is closed under them).
# ``zero`` marks those with f(0) == 0: a channel that is zero before them stays zero after.
CHANNELWISE_OPS: dict[str, bool] = {
    "Relu": True,
    "Hardtanh": True,
    "LeakyRelu": True,
    "Elu": True,
    "Gelu": True,
    "Silu": True,
    "Hardswish": True,
    "Tanh": True,
    "Threshold": True,
    "Add": True,
    "Sub": True,
    "Mul": True,
    "Div": True,
    "Neg": True,
    "MaxPool2DWithIndices": True,
    "MaxPool1DWithIndices": True,
    "MaxPool3DWithIndices": True,
    "AvgPool2D": True,
    "AvgPool1D": True,
    "AvgPool3D": True,
    "AdaptiveAvgPool2D": True,
    "AdaptiveAvgPool1D": True,
    "AdaptiveMaxPool2D": True,
    "Mean": True,
    "Clone": True,
    "T": True,
    "NativeDropout": True,
    "Squeeze": True,
    "Select": True,  # x[:, 0] (a class token): picks along the sequence, every channel kept
    "Alias": True,  # x[:, slice(None)]: a view, every channel kept
    "RMSNorm": True,  # the inside of a LLaMA-style RMSNorm, recognised by module (plan.residual.record_rms_nodes)
    "Unsqueeze": True,
    "ZeroPad": True,  # ZeroPad2d / ConstantPadNd(value=0) modules, recognised by module (build_dependency_graph)
    "Pow": False,  # x ** p (GPT-2's tanh GELU): per channel; zero stays zero only for p > 0
    "Sigmoid": False,
    "Hardsigmoid": False,
    "Exp": False,
}

# Autograd ops that combine or reorder channels: never offered as extra channelwise ops in error messages.
MIXING_OPS = frozenset({
    "Addmm", "Mm", "Bmm", "Baddbmm", "Matmul", "Transpose", "Permute", "Softmax",
    "ScaledDotProductFlashAttentionForCpu", "ScaledDotProductEfficientAttention", "ScaledDotProductAttentionMath",
})

# A weight_norm parametrization's ops: its norm spans channels, so slicing the conv would change it.
WEIGHT_NORM_OPS = frozenset({"WeightNormInterface", "NormExceptDim"})

# Index-mapping nodes Torch-Pruning resolves itself (they move channels, never mix them).
STRUCTURAL_OPS = ("concat", "split", "reshape", "slice", "expand")

# Finite whatever their input, so a zero channel times them is zero (a squeeze-excite gate).
BOUNDED_OPS = frozenset({"Sigmoid", "Hardsigmoid", "Tanh", "Hardtanh"})
# Possibly infinite where their input is zero (x ** p with p < 0, y / x): a zero times them is not zero.
UNBOUNDED_OPS = frozenset({"Pow", "Div"})

# Axis moves: harmless in a group with no matrix product or attention (ViT's patch embedding flattened and
# transposed to channels-last, ConvNeXt's permutes), where Torch-Pruning's channel mapping stays right; next to
# attention they move heads and positions into channels, so there they remain problems (hand-written rule).
AXIS_MOVES = frozenset({"Transpose", "Permute"})


def keeps_zero(op: str) -> bool:
    """Whether op ``op`` maps a zero channel to a zero channel (whatever its other inputs are zero there too)."""
    return op in STRUCTURAL_OPS or op in AXIS_MOVES or CHANNELWISE_OPS.get(op, False)


__all__ = [
    "AXIS_MOVES",
    "BOUNDED_OPS",
    "CHANNELWISE_OPS",
    "CONSUMER",
    "DEPTHWISE",
    "MIXING_OPS",
    "NORM",
    "PRODUCER",
    "STRUCTURAL_OPS",
    "UNBOUNDED_OPS",
    "WEIGHT_NORM_OPS",
    "keeps_zero",
]
