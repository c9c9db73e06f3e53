"""Whether a channel that every member of its group zeroes stays zero wherever a layer reads it, followed node by
node through the traced graph (:func:`zero_leaks`): this project's rule, so that a squeeze-excite gate
(``y * sigmoid(fc(mean(y)))``) keeps a pruned ``y`` channel zero while ``y + sigmoid(...)`` does not.

>>> _is_zero({"producer"}, None, [], []), _is_zero(set(), "Mul", [True, False], [True, True])
(True, True)
"""

from __future__ import annotations

from typing import Any

from admmcompress.plan.channel_ops import BOUNDED_OPS, CHANNELWISE_OPS, CONSUMER, PRODUCER, UNBOUNDED_OPS, keeps_zero
from admmcompress.plan.residual import EMBEDDING, LAYERNORM, PARAMETER

INSIDE = "inside"  # the matrix product inside an nn.Linear, the statistics inside a LayerNorm: see _inside_linear
_WRITERS = frozenset({PRODUCER, LAYERNORM, EMBEDDING, PARAMETER})  # a zeroed channel's entries there are zero
_READERS = frozenset({CONSUMER, LAYERNORM})  # their result changes unless they read the channel as zero


def zero_leaks(roles: dict[Any, set[str]], ops: dict[Any, str], names: dict) -> list[str] | None:
    """Where a channel that every member zeroes (filter rows, biases, BN shifts, LayerNorm entries) is read as
    nonzero, one line per cause and reader; empty when it is zero wherever a layer reads it.

    Traced node by node (``roles``: a traced node's member roles; ``ops``: its op): writers (producers, LayerNorms,
    embeddings, free parameters) output zero; BN, depthwise convs and ops that keep zero (``keeps_zero``) are zero
    when all their inputs are; a multiply is zero when one factor is and the others are finite, so the gate of a
    squeeze-excite (``sigmoid(fc(x)) * y``) keeps a zeroed ``y`` zero whatever the gate's own value; inside an
    RMSNorm the input is scaled by a finite factor. Consumers and LayerNorms must then read zero. None when the
    traced nodes form a cycle (a layer called twice): then ``ChannelGroup.zero_preserving`` judges by op names.
    """
    nodes = list(dict.fromkeys([*roles, *ops]))
    known = set(nodes)
    inputs = {n: [i for i in n.inputs if i in known] for n in nodes}
    zero: dict[Any, bool] = {}
    finite: dict[Any, bool] = {}
    cause: dict[Any, Any] = {}
    order = _topological(nodes, inputs)
    if order is None:
        return None
    traced = {id(getattr(n, "grad_fn", None)) for n in nodes}
    for n in order:
        ins, op = inputs[n], ops.get(n)
        passes = op in (None, INSIDE) or keeps_zero(op)  # zero in, zero out
        zero[n] = _is_zero(roles.get(n, set()), op, [zero[i] for i in ins], [finite[i] for i in ins])
        if op in ("Add", "Sub") and zero[n] and _adds_outside(n, traced):
            zero[n] = False  # y + p (a scalar parameter the trace has no node for) is p on a zeroed channel
        if op == "Div" and zero[n]:  # 0 / y is zero only for a numerator of the group over a divisor outside it
            zero[n] = bool(n.inputs) and n.inputs[0] in known and all(i not in known for i in n.inputs[1:])
        finite[n] = zero[n] or op in BOUNDED_OPS or (
            op not in UNBOUNDED_OPS and (passes or op in CHANNELWISE_OPS) and all(finite[i] for i in ins)
        )
        if not zero[n]:  # the op that first made the channel nonzero, for the message
            cause[n] = next((cause[i] for i in ins if not zero[i] and passes), n)
    leaks = []
    for n in nodes:
        if roles.get(n, set()) & _READERS:
            for i in inputs[n]:
                if not zero.get(i, False):
                    leaks.append(f"{_describe_node(cause.get(i, i), ops, names)} makes them nonzero where "
                                 f"'{names.get(n.module, n.name)}' reads them")
    return list(dict.fromkeys(leaks))


def _is_zero(roles: set[str], op: str | None, zeros: list[bool], finites: list[bool]) -> bool:
    """Whether a traced node outputs zero on a channel that every member zeroes (see ``zero_leaks``)."""
    if roles & _WRITERS:
        return True
    if op is not None and op != INSIDE and not keeps_zero(op):
        return False
    if not zeros:  # no input in the group (a weight's transpose): zero when the op keeps zero
        return True
    if op == "Mul":
        return any(zeros) and all(finites)
    if op == "RMSNorm":
        return any(zeros)
    return all(zeros)


def _adds_outside(node, traced: set[int]) -> bool:
    """Whether a sum reads an operand that is not one of the group's traced nodes: a parameter the trace has no
    node for (a scalar), or another path (``refine_op`` names literals and tensors without gradient)."""
    functions = getattr(getattr(node, "grad_fn", None), "next_functions", ())
    return any(fn is not None and id(fn) not in traced for fn, _ in functions)


def _topological(nodes: list, inputs: dict[Any, list]) -> list | None:
    """``nodes`` with every node after its inputs (Kahn's algorithm); None when they form a cycle."""
    waiting = {n: len(inputs[n]) for n in nodes}
    users: dict[Any, list] = {}
    for n in nodes:
        for i in inputs[n]:
            users.setdefault(i, []).append(n)
    ready, order = [n for n in nodes if not waiting[n]], []
    while ready:
        n = ready.pop()
        order.append(n)
        for user in users.get(n, []):
            waiting[user] -= 1
            if not waiting[user]:
                ready.append(user)
    return order if len(order) == len(nodes) else None


def _describe_node(node, ops: dict[Any, str], names: dict) -> str:
    if node in ops and ops[node] != INSIDE:
        return f"op '{ops[node]}'"
    return f"'{names.get(node.module, node.name)}'"


__all__ = ["INSIDE", "zero_leaks"]
