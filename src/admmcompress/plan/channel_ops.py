"""The op tables of channel coupling: which autograd ops act on each channel separately, which mix channels,
which keep a zero channel zero, and the roles a layer plays in a channel group. Hand-written from the ops torch
records (Torch-Pruning traces the graph; it does not say what an op does to a zeroed channel).

>>> keeps_zero("Relu"), keeps_zero("Sigmoid"), "Mm" in MIXING_OPS
(True, False, True)
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

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
    "Mean": True,  # over positions; over the channel axis it mixes them (graph._averages_channels refuses that)
    "Amax": True,  # the same for a max (a global max pool, or CBAM's max over channels)
    "Max": True,
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
    "Clamp": True,  # clamp(y, lo, hi) with lo <= 0 <= hi (see refine_op; others are "Clamp(f(0) != 0)")
    "ClampMin": True,
    "ClampMax": True,
    "Add(constant)": False,  # y + c, c a number or a tensor outside the trace (see refine_op)
    "Sub(constant)": False,
    "Rsub": False,  # c - y
    "Hardtanh(f(0) != 0)": False,  # hardtanh(y, 0.1, 1): see refine_op
    "Threshold(f(0) != 0)": False,
    "Clamp(f(0) != 0)": False,
    "Sigmoid": False,
    "Hardsigmoid": False,
    "Exp": False,
    # Resampling and padding of each channel's map (U-Nets, FPNs, segmentation heads): per channel, 0 stays 0
    **{f"Upsample{kind}{d}D": True for kind in ("Nearest", "NearestExact", "Bilinear", "Bicubic", "Linear",
                                                "Trilinear") for d in (1, 2, 3)},
    **{f"{kind}Pad{d}D": True for kind in ("Reflection", "Replication") for d in (1, 2, 3)},
    "Mish": True,
    "Celu": True,
    "Hardshrink": True,
    "Softshrink": True,
    "Softplus": False,  # softplus(0) = ln 2
    "LogSigmoid": False,
}

# Ops that change the channel count or order themselves (channels moved into space and back, or split into
# halves that multiply each other): never per channel, so never accepted as extra ones either.
RESHAPING_OPS = frozenset({"PixelShuffle", "PixelUnshuffle", "ChannelShuffle", "Glu"})

# Autograd ops that combine or reorder channels: never offered as extra channelwise ops in error messages
# (NativeLayerNorm: a LayerNorm's F.layer_norm outside a module the trace knows normalizes over the channels).
MIXING_OPS = frozenset({
    "Addmm", "Mm", "Bmm", "Baddbmm", "Matmul", "Transpose", "Permute", "Softmax",
    "ScaledDotProductFlashAttentionForCpu", "ScaledDotProductEfficientAttention", "ScaledDotProductAttentionMath",
    "NativeLayerNorm",
}) | RESHAPING_OPS


def op_name(grad_fn_name: str) -> str:
    """``"ReluBackward0" -> "Relu"`` (the autograd node name without suffix).

    >>> op_name("ReluBackward0"), op_name("Relu")
    ('Relu', 'Relu')
    """
    return re.sub(r"Backward\d*$", "", grad_fn_name)


# Ops a user declared channelwise once for every trace (``register_channelwise_op``): compress() and run configs
# (through a plugin module) reach the graph without an argument to thread through. Op name -> f(0) == 0.
_REGISTERED: dict[str, bool] = {}


def register_channelwise_op(name: str, keeps_zero: bool = False) -> None:
    """Declare autograd op ``name`` (``"MyAct"`` for ``MyActBackward0``; the suffix may be given) to act on each
    channel separately, for every later trace: ``Plan.resolve_coupled``, ``compress()``, run configs (call it in a
    module named under ``plugins:``) and compaction. ``keeps_zero=True`` also says ``f(0) == 0``, so a pruned
    channel stays zero through it (a bias-free activation); leave it False when unsure (compaction then keeps
    what a zero channel would still feed). Ops that move or mix channels are refused in one line.

    >>> register_channelwise_op("MySwishBackward0", keeps_zero=True)
    >>> registered_channelwise_ops()["MySwish"]
    True
    >>> unregister_channelwise_op("MySwish")
    """
    op = op_name(name) if isinstance(name, str) else name
    if not isinstance(op, str) or not op.isidentifier():
        raise ValueError(f"register_channelwise_op: name {name!r} is not an autograd op name; give the name of "
                         "its grad_fn without 'Backward0', e.g. 'MyAct' for MyActBackward0")
    if op in MIXING_OPS or op in WEIGHT_NORM_OPS:
        raise ValueError(f"register_channelwise_op: '{op}' combines or moves channels, so it cannot act on each "
                         "channel separately; keep the channels it reads (exclude those layers from the rule)")
    if not isinstance(keeps_zero, bool):
        raise ValueError(f"register_channelwise_op: keeps_zero={keeps_zero!r}; give True (f(0) == 0) or False")
    _REGISTERED[op] = keeps_zero


def unregister_channelwise_op(name: str) -> None:
    """Forget an op declared with ``register_channelwise_op`` (no error if it was not); the suffix may be given."""
    _REGISTERED.pop(op_name(name) if isinstance(name, str) else name, None)


def registered_channelwise_ops() -> dict[str, bool]:
    """The ops declared with ``register_channelwise_op`` (a copy): name -> whether f(0) == 0."""
    return dict(_REGISTERED)


def check_extra_ops(extra_ops: Iterable[str]) -> tuple[str, ...]:
    """``extra_ops`` as a tuple of op names; an op that moves channels (pixel shuffle, GLU) is refused in one line.

    >>> check_extra_ops(["UpsampleNearest2D"])
    ('UpsampleNearest2D',)
    """
    ops = tuple(extra_ops)
    bad = [op for op in ops if not isinstance(op, str)] or sorted(set(ops) & RESHAPING_OPS)
    if bad:
        raise ValueError(f"extra_channelwise_ops: {bad} cannot act on each channel separately (they change the "
                         "channel count or order); keep the channels they read (exclude those layers from the rule)")
    return ops


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


def refine_op(op: str, grad_fn) -> str:
    """``op`` renamed where its arguments decide whether it keeps a zero channel zero, from what autograd saved.

    ``y + 1.0`` and ``y + buffer`` have an operand outside the trace (``next_functions`` holds ``None`` for it), so
    a zero ``y`` gives the constant; ``hardtanh``/``clamp`` with both bounds on one side of 0 map 0 to a bound;
    ``threshold(y, t, v)`` maps 0 to ``v`` for ``t >= 0``, and autograd does not save ``v``.

    >>> import torch
    >>> y = torch.ones(2, requires_grad=True)
    >>> [refine_op("Add", (y + 1).grad_fn), refine_op("Add", (y + y).grad_fn)]
    ['Add(constant)', 'Add']
    >>> refine_op("Hardtanh", torch.nn.functional.hardtanh(y, 0.1, 1.0).grad_fn)
    'Hardtanh(f(0) != 0)'
    """
    if op in ("Add", "Sub"):
        if any(fn is None for fn, _ in getattr(grad_fn, "next_functions", ())):
            return f"{op}(constant)"
    elif op in ("Hardtanh", "Clamp", "ClampMin", "ClampMax"):
        lo = getattr(grad_fn, "_saved_min_val", getattr(grad_fn, "_saved_min", None))
        hi = getattr(grad_fn, "_saved_max_val", getattr(grad_fn, "_saved_max", None))
        if _any(lo, lambda v: v > 0) or _any(hi, lambda v: v < 0):  # a bound (number or tensor) excludes 0
            return f"{'Hardtanh' if op == 'Hardtanh' else 'Clamp'}(f(0) != 0)"
    elif op == "Threshold" and float(getattr(grad_fn, "_saved_threshold", 0.0)) >= 0:
        return "Threshold(f(0) != 0)"
    return op


def _any(bound, test) -> bool:
    return bound is not None and bool(test(torch.as_tensor(bound)).any())


def keeps_zero(op: str) -> bool:
    """Whether op ``op`` maps a zero channel to a zero channel (whatever its other inputs are zero there too)."""
    return op in STRUCTURAL_OPS or op in AXIS_MOVES or CHANNELWISE_OPS.get(op, _REGISTERED.get(op, False))


__all__ = [
    "AXIS_MOVES",
    "BOUNDED_OPS",
    "CHANNELWISE_OPS",
    "CONSUMER",
    "DEPTHWISE",
    "MIXING_OPS",
    "RESHAPING_OPS",
    "check_extra_ops",
    "NORM",
    "PRODUCER",
    "STRUCTURAL_OPS",
    "UNBOUNDED_OPS",
    "WEIGHT_NORM_OPS",
    "keeps_zero",
    "op_name",
    "refine_op",
    "register_channelwise_op",
    "registered_channelwise_ops",
    "unregister_channelwise_op",
]
