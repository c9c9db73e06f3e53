"""Channel groups: which layers' filters, input channels and BN entries must be removed together.

Torch-Pruning's ``DependencyGraph`` is asked once (it traces the model with autograd); its groups
are turned into plain ``ChannelGroup`` records (``cached_channel_groups`` keeps them per model and
example shape, so a plan's coupled resolution traces a model once) that name, for every channel of the group, the slice
of each member layer that carries it:

- ``producer``: a Conv or Linear computing the channel (weight row, bias entry);
- ``consumer``: a Conv or Linear reading it (weight columns; after a flatten one channel is several
  Linear columns; in a grouped conv, the column of the channel's conv group, see ``channel_index``);
- ``norm``: a BatchNorm entry (gamma, beta, running statistics);
- ``depthwise``: a depthwise conv, which maps the channel to itself (weight row, bias entry). One with a channel
  multiplier ``k`` (``out_channels == k * in_channels``) is a grouped conv of one input channel per conv group:
  its filters prune ``k'`` of ``k`` per input channel, and its input channels are not removed (``PlanError``);
- ``layernorm``, ``embedding``, ``parameter``: a transformer's residual stream (LayerNorm entries, embedding
  columns, free parameters such as position embeddings and layer scale; see :mod:`admmcompress.plan.residual`).

Residual adds, concatenations and depthwise convolutions tie channels across layers; a group lists
all of them, with each member's local index and the group ("root") channel it belongs to.

Zero preservation is traced per node, not judged by op names (:mod:`admmcompress.plan.zero_flow`): a channel
every member zeroes stays zero through ``sigmoid(gate) * x`` (a squeeze-excite), since a zero factor makes the
product zero. The op tables are :mod:`admmcompress.plan.channel_ops`.

A grouped conv that is not depthwise (``1 < groups < in_channels``) splits its input and its output
channels into ``groups`` equal conv groups, and PyTorch needs every conv group to keep the same number
of channels. A channel group it belongs to records that split in ``blocks`` (one block id per group
channel; the common refinement when several grouped convs split it), so pruning can keep the same
number of channels in every block and compaction can rebuild the conv with the same ``groups``.

>>> import torch.nn as nn
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
>>> [(g.label, g.size, g.problems) for g in channel_groups(model, torch.zeros(1, 3, 8, 8))]
[('0', 4, []), ('4', 2, ["its channels are model outputs (from '4')"])]
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from admmcompress.messages import first_line
from admmcompress.plan.attention import query_key_layers, query_key_norms
from admmcompress.plan.channel_ops import (
    AXIS_MOVES,
    CHANNELWISE_OPS,
    CONSUMER,
    DEPTHWISE,
    MIXING_OPS,
    NORM,
    PRODUCER,
    STRUCTURAL_OPS,
    WEIGHT_NORM_OPS,
    check_extra_ops,
    keeps_zero,
    op_name,
    refine_op,
    registered_channelwise_ops,
)
from admmcompress.plan.residual import (
    LAYERNORM,
    PARAMETER,
    STREAM_ROLES,
    is_rms_norm,
    is_unknown_norm,
    record_rms_nodes,
    stream_param_dims,
    stream_problem,
    stream_role,
)
from admmcompress.plan.targets import PlanError
from admmcompress.plan.tp_compat import patch_torch_pruning
from admmcompress.plan.zero_flow import INSIDE, zero_leaks


class GraphError(ValueError):
    """The model's channel coupling cannot be analysed; the message names the op and the fix."""


@dataclass(frozen=True)
class Member:
    """One layer's share of a channel group: ``local[i]`` (its index) carries group channel ``root[i]``."""

    layer: str
    role: str
    local: tuple[int, ...]
    root: tuple[int, ...]
    groups: int = 1  # conv groups of a grouped (not depthwise) conv; 1 otherwise
    dim: int = 0  # a free parameter's channel dimension (role "parameter"; its layer is the parameter's name)

    def param_dims(self, module: nn.Module) -> list[tuple[str, int]]:
        """``(parameter name, dimension)`` pairs whose slices at ``local`` carry the channel."""
        if self.role in STREAM_ROLES:  # LayerNorm, Embedding, free parameter (plan.residual)
            return stream_param_dims(self.role, module, self.dim)
        if self.role == CONSUMER:
            return [("weight", 1)]
        names = ["weight", "bias"]
        return [(n, 0) for n in names if isinstance(getattr(module, n, None), torch.Tensor)]


@dataclass
class ChannelGroup:
    """A set of channels that live or die together, and every member layer's slice of them."""

    size: int
    members: list[Member]
    ops: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    root: str = ""
    blocks: tuple[int, ...] = ()  # block id per channel when grouped convs split the channels; else ()
    leaks: list[str] | None = None  # traced: where a zeroed channel is read as nonzero (None: judge by ``ops``)

    def layers(self, role: str) -> list[str]:
        return list(dict.fromkeys(m.layer for m in self.members if m.role == role))

    @property
    def producers(self) -> list[str]:
        return self.layers(PRODUCER)

    @property
    def consumers(self) -> list[str]:
        return self.layers(CONSUMER)

    @property
    def label(self) -> str:
        """Producers joined by '+' (or the root layer when there is none): unique within a model."""
        names = self.producers + self.layers(DEPTHWISE)
        return "+".join(sorted(names)) if names else self.root

    @property
    def grouped(self) -> list[tuple[str, int]]:
        """``(layer, groups)`` of the grouped (not depthwise) convs among the members."""
        return list(dict.fromkeys((m.layer, m.groups) for m in self.members if m.groups > 1))

    @property
    def zero_preserving(self) -> bool:
        """True when a channel that every member zeroes is zero wherever a layer reads it: traced (``leaks``),
        else when every op in the group maps a zero channel to a zero channel."""
        if self.leaks is not None:
            return not self.leaks
        return all(keeps_zero(op) for op in self.ops)


def channel_index(shape: tuple[int, ...] | torch.Size, dim: int, groups: int = 1) -> torch.Tensor:
    """Flat indices into a tensor of ``shape``, one row per channel along ``dim`` (``(channels, width)``).

    Row ``c`` lists every entry that belongs to channel ``c``. For a grouped conv weight
    ``(O, I/g, kh, kw)`` read along its input side (``dim == 1``, ``groups > 1``) the channels are the
    ``I`` input channels: input channel ``c`` is column ``c % (I/g)`` of the ``O/g`` filters of conv group
    ``c // (I/g)``.

    >>> channel_index((4, 2, 1, 1), 1, groups=2).tolist()   # conv(4 -> 4, groups=2): 4 input channels
    [[0, 2], [1, 3], [4, 6], [5, 7]]
    """
    shape = tuple(shape)
    flat = torch.arange(math.prod(shape)).view(shape)
    if groups == 1 or dim != 1:
        return flat.movedim(dim, 0).reshape(shape[dim], -1)
    out, span = shape[0], shape[1]
    return flat.reshape(groups, out // groups, span, -1).permute(0, 2, 1, 3).reshape(groups * span, -1)


def channel_rows(tensor: torch.Tensor, dim: int, groups: int = 1) -> torch.Tensor:
    """``tensor``'s entries as ``(channels, width)``, row ``c`` = channel ``c`` (see ``channel_index``)."""
    index = channel_index(tensor.shape, dim, groups).to(tensor.device)
    return tensor.reshape(-1)[index]


def is_grouped_conv(module: nn.Module) -> bool:
    """A Conv with ``groups > 1`` that is not depthwise (``groups != in_channels``)."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and not module.transposed
        and 1 < module.groups
        and not module.groups == module.in_channels == module.out_channels
    )


def depthwise_multiplier(module: nn.Module) -> int:
    """``k`` of a depthwise conv with channel multiplier ``k >= 2`` (``groups == in_channels``, ``out_channels ==
    k * in_channels``: input channel ``c`` feeds only the rows ``c*k .. c*k+k-1``); 0 for any other layer.

    >>> depthwise_multiplier(nn.Conv2d(8, 16, 3, groups=8)), depthwise_multiplier(nn.Conv2d(8, 8, 3, groups=8))
    (2, 0)
    """
    if not isinstance(module, nn.modules.conv._ConvNd) or module.transposed:
        return 0
    channels, out = module.in_channels, module.out_channels
    if module.groups != channels or channels < 2 or out == channels or out % channels:
        return 0
    return out // channels


def call_model(model: nn.Module, example_inputs):
    """Call ``model`` on example inputs: a tuple/list is unpacked, a dict passed as keywords, a tensor as is.

    (Torch-Pruning's own default tries ``model(*inputs)`` first, which splits a batch-1 tensor into an
    unbatched sample; every trace here goes through this function instead.)
    """
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor of it: a tensor, or those of a tuple/list/dict, nested (other
    values as they are). The shape of example inputs as ``call_model`` takes them.

    >>> map_tensors(lambda t: t * 2, (torch.ones(1), {"k": torch.ones(1)}, True))
    (tensor([2.]), {'k': tensor([2.])}, True)
    """
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(fn, v) for v in value)
    return value


def first_sample(example: Any) -> Any:
    """``example`` cut to one sample: a tensor, or every tensor of a tuple/list/dict (other values as they are).

    >>> x = torch.zeros(4, 3)
    >>> [tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in first_sample((x, {"m": x}, True))[:1]]
    [(1, 3)]
    """
    return map_tensors(lambda t: t[:1], example)


def samples_of_call(module: nn.Module, args: Any, output: Any) -> int | None:
    """How many samples one call of a sequence-first layer ran on: a recurrent layer or an
    ``nn.MultiheadAttention`` with ``batch_first=False`` on a batched input (its batch is dim 1); None for every
    other call. Batch-first layers are not asked: the example's dim 0 is the batch there, and such a layer's own
    batch may be a folded one (windows or sentences of a sample, ``(B*W, L, E)``).

    >>> samples_of_call(nn.LSTM(2, 3), None, nn.LSTM(2, 3)(torch.zeros(7, 4, 2)))   # (steps, batch, features)
    4
    """
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)) and not module.batch_first:
        out = output[0]
        if isinstance(out, PackedSequence):
            return int(out.batch_sizes[0])
        return out.shape[1] if out.dim() == 3 else None
    return None


BATCH_AWARE = (nn.RNNBase, nn.MultiheadAttention)  # the layers samples_of_call may answer for


def _first_shape(example: Any) -> torch.Size | None:
    """The shape of the example's first tensor (None without one): the tensor whose axes say the batch."""
    found: list[torch.Size] = []
    map_tensors(lambda t: found.append(t.shape), example)
    return found[0] if found else None


def example_samples(example: Any) -> int:
    """The batch size of a batch-first example: dim 0 of its first tensor (1 without one).

    >>> example_samples({"ids": torch.zeros(3, 5, dtype=torch.long), "flag": True})
    3
    """
    shape = _first_shape(example)
    return shape[0] if shape else 1


def agreed_samples(seen: set[int], example: Any) -> int:
    """The samples an example held. Batch-first (dim 0 of its first tensor) unless the model is sequence-first:
    its sequence-first layers (``samples_of_call``) agree on one batch that is the example's dim 1.

    >>> x = torch.zeros(7, 4, 2)                                  # (steps, batch, features)
    >>> agreed_samples({4}, x), agreed_samples(set(), x), agreed_samples({8}, x)
    (4, 7, 7)
    """
    shape = _first_shape(example)
    if len(seen) == 1 and shape is not None and len(shape) >= 2 and shape[1] in seen:
        return shape[1]
    return example_samples(example)


Hook = Callable[[nn.Module, Any, Any], None]  # a forward hook's (module, args, output), its return ignored


def run_example(model: nn.Module, example: Any, hooks: Iterable[tuple[nn.Module, Hook]]) -> int:
    """Run the whole ``example`` through ``model`` once (eval mode, no grad; each layer's mode restored after), calling
    ``hook(module, args, output)`` after every call of each ``(module, hook)`` pair, and return the samples the
    example held: ``agreed_samples`` over the model's sequence-first layers (``samples_of_call``) and, where they
    say the same, its recurrent cells (``cell_samples``).

    The whole example runs, not a slice of it: cutting dim 0 of a sequence-first example would cut time.

    >>> lstm, seen = nn.LSTM(2, 3), []                                   # sequence-first: (steps, batch, features)
    >>> run_example(lstm, torch.zeros(7, 4, 2), [(lstm, lambda m, args, out: seen.append(tuple(out[0].shape)))])
    4
    >>> seen
    [(7, 4, 3)]
    """
    seen: set[int] = set()
    cells: dict[nn.Module, list[int | None]] = {}

    def batch(module: nn.Module, args: Any, output: Any) -> None:
        if (found := samples_of_call(module, args, output)) is not None:
            seen.add(found)

    def cell(module: nn.Module, args: Any, output: Any) -> None:
        found = output_tensors(output)  # LSTMCell returns (h, c); a user's cell may return a list or a dict
        h = found[0] if found else None
        cells.setdefault(module, []).append(h.shape[0] if h is not None and h.dim() == 2 else None)

    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    handles += [m.register_forward_hook(batch) for m in model.modules() if isinstance(m, BATCH_AWARE)]
    handles += [m.register_forward_hook(cell) for m in model.modules() if isinstance(m, nn.RNNCellBase)]
    modes = [(m, m.training) for m in model.modules()]  # each layer's own: a frozen BatchNorm stays in eval
    try:
        model.eval()
        with torch.no_grad():
            returned = call_model(model, example)
    finally:
        for module, training in modes:
            module.training = training
        for h in handles:
            h.remove()
    if (found := cell_samples(cells, example, returned)) is not None:
        seen.add(found)
    return agreed_samples(seen, example)


def cell_samples(calls: Mapping[nn.Module, list[int | None]], example: Any, returned: Any = None) -> int | None:
    """The batch a model's own loop over recurrent cells (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``) says a
    sequence-first example held, from each cell's calls (the batch of each: dim 0 of a ``(B, F)`` input, None when
    unbatched); None when the cells say nothing sure.

    A cell's input does not say which axis of the example its batch came from, and a model may fold other axes into
    it (``(B*T, F)``, or the words of a sentence), so the cells count only as a sequence-first loop would look: every
    call on one batch ``B`` that is the example's dim 1 and not its dim 0, and every cell called once per step of dim
    0 (a multiple of it, at least 2: with one step a batch-first single sample folded over dim 1 looks the same).
    A batch-first model stepping a cell over each sample's words (``cell(x[b])``) calls it the same way, so the
    model's output (``returned``, when given) must say so too: a tensor led by that batch (``(B, ...)``, a
    classifier on the last state) or by the steps and then the batch (``(T, B, ...)``, a tagger).

    >>> cell, x = nn.LSTMCell(2, 3), torch.zeros(5, 4, 2)               # (steps, batch, features)
    >>> cell_samples({cell: [4] * 5}, x), cell_samples({cell: [4] * 3}, x), cell_samples({cell: [20]}, x)
    (4, None, None)
    >>> cell_samples({cell: [4] * 5}, x, torch.zeros(4, 10)), cell_samples({cell: [4] * 5}, x, torch.zeros(5, 10))
    (4, None)
    """
    shape = _first_shape(example)
    if not calls or shape is None or len(shape) < 2:
        return None
    steps, batch = shape[0], shape[1]
    batches = {b for made in calls.values() for b in made}
    if batches != {batch} or steps == batch or steps < 2:
        return None
    if returned is not None and not any(t.dim() >= 1 and (t.shape[0] == batch or tuple(t.shape[:2]) == (steps, batch))
                                        for t in output_tensors(returned)):
        return None  # the output is not the sequence-first batch's: each call may be one sample's words
    return batch if all(len(made) % steps == 0 for made in calls.values()) else None


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output: a tensor, tuples/lists and mappings (``ModelOutput``) of them. Other objects
    (a generation cache) are not outputs whose channels matter here, and the tracer cannot walk them."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    return []


def build_dependency_graph(model: nn.Module, example_inputs):
    """Trace ``model`` once with Torch-Pruning; the model's train/eval mode is restored afterwards."""
    try:
        import torch_pruning as tp
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("channel coupling needs Torch-Pruning: pip install torch-pruning") from err
    patch_torch_pruning()  # Torch-Pruning 1.6.0 fails on a concat along a negative axis (plan.tp_compat)
    was_training = {m: m.training for m in model.modules()}
    # Frozen parameters (Whisper's sinusoidal positions, a user's frozen layers) leave no autograd node, so the
    # trace would not see them: they get a gradient for the trace only.
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    zero_pads: set[int] = set()
    rms_nodes: dict[int, str] = {}
    odd_norms: dict[int, str] = {}  # autograd nodes inside a norm the library does not know -> the norm
    hooks: list = []
    cut: list[torch.Tensor] = []  # query/key projections' outputs: traced as model outputs (plan.attention)
    dead: dict[int, Any] = {}  # autograd nodes of layer outputs the model does not return (see _dead_ends)
    try:
        for p in frozen:
            p.requires_grad_(True)
        hooks += [m.register_forward_hook(_record_zero_pad(zero_pads)) for m in model.modules()
                  if _is_spatial_zero_pad(m)]
        hooks += [m.register_forward_hook(record_rms_nodes(rms_nodes), with_kwargs=True) for m in model.modules()
                  if is_rms_norm(m)]
        unknown = [(n, m) for n, m in model.named_modules() if is_unknown_norm(m) and ".parametrizations." not in n]
        hooks += [m.register_forward_hook(record_rms_nodes(odd_norms, f"'{n}' ({type(m).__name__})",
                                                           reducing_only=True), with_kwargs=True) for n, m in unknown]
        cut_layers = [model.get_submodule(n) for n in query_key_layers(model) + query_key_norms(model)]
        graph = _trace(tp, model, example_inputs, cut, cut_layers, dead)
    finally:
        for hook in hooks:
            hook.remove()
        for p in frozen:
            p.requires_grad_(False)
        for module, mode in was_training.items():
            module.train(mode)
    graph.admm_zero_pads = zero_pads  # autograd nodes of zero-padding modules (channelwise, see _convert)
    graph.admm_param_names = {id(p): n for n, p in model.named_parameters()}  # free parameters' names
    graph.admm_rms_nodes = rms_nodes  # autograd nodes inside RMSNorm modules
    graph.admm_unknown_norms = odd_norms  # autograd nodes inside norms this library does not know
    graph.admm_cut_layers = {id(layer) for layer in cut_layers}
    graph.admm_dead_ends = dead  # traced as outputs, but no one sees their channels (see _convert)
    return graph


def _trace(tp, model: nn.Module, example_inputs, cut: list[torch.Tensor], cut_layers: list[nn.Module],
           dead: dict[int, Any]):
    """Torch-Pruning's dependency graph of ``model``, the query/key projections' outputs cut into ``cut`` and the
    outputs of layers whose result the model drops recorded in ``dead`` (autograd node by id)."""
    produced: list[torch.Tensor] = []
    layers = [m for m in model.modules() if any(p is not None for p in m._parameters.values())]

    def forward(m: nn.Module, inputs):
        cut.clear()  # hooked here, after Torch-Pruning's own hooks, so those still see the layers' real outputs
        produced.clear()
        handles = [layer.register_forward_hook(_cut_into(cut)) for layer in cut_layers]
        handles += [layer.register_forward_hook(_record_output(produced)) for layer in layers]
        try:
            return call_model(m, inputs)
        except Exception as err:  # the example does not fit the model: a PlanError, not torch's error
            raise PlanError(example_problem(m, inputs, err)) from None
        finally:
            for handle in handles:
                handle.remove()

    before = {m: set(m._forward_hooks) for m in model.modules()}
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, forward_fn=forward,
                output_transform=lambda out: _with_dead_ends(output_tensors(out) + cut, produced, dead),
                verbose=False,
            )
    except PlanError:
        # Torch-Pruning removes its recording hooks only after a forward that returned: remove them here
        for m, kept in before.items():
            for key in set(m._forward_hooks) - kept:
                m._forward_hooks.pop(key, None)
        raise


def _record_output(found: list[torch.Tensor]):
    def hook(module: nn.Module, inputs, output) -> None:
        found.extend(t for t in output_tensors(output) if t.grad_fn is not None)

    return hook


def _with_dead_ends(outputs: list[torch.Tensor], produced: list[torch.Tensor], dead: dict[int, Any]):
    """``outputs`` and the layer outputs that none of them depends on (an auxiliary head whose result the model
    drops): Torch-Pruning traces back from the outputs only, so such a layer would be missing from its input's
    channel group and compaction would leave it reading the removed channels. Latest first, each one only when
    not reached from the outputs or a later one; their autograd nodes go into ``dead``."""
    reached: set[int] = set()
    _reach([t.grad_fn for t in outputs], reached)
    extra = []
    for tensor in reversed(produced):
        if id(tensor.grad_fn) not in reached:
            extra.append(tensor)
            dead[id(tensor.grad_fn)] = tensor.grad_fn  # kept alive, so the id stays its own
            _reach([tensor.grad_fn], reached)
    return outputs + extra


def _reach(roots: list, reached: set[int]) -> None:
    """Add the ids of every autograd node ``roots`` depend on (themselves included) to ``reached``."""
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in reached:
            continue
        reached.add(id(node))
        stack.extend(fn for fn, _ in getattr(node, "next_functions", ()) if fn is not None)


def example_problem(model: nn.Module, inputs: Any, err: Exception) -> str:
    """One line: the example the model could not read, what the model said, and what to pass instead."""
    said = first_line(err, 200)
    return (
        f"the example input ({describe_input(inputs)}) does not fit {type(model).__name__}: {type(err).__name__}: "
        f"{said}; pass one batch the model accepts (a tensor, a tuple of positional inputs or a dict of keywords)"
    )


def describe_input(value: Any) -> str:
    """A short description of an example input for error messages (the plan's and the run's): shapes and dtypes,
    not values."""
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)}: " + ", ".join(describe_input(v) for v in value[:4])
    if isinstance(value, dict):
        return "dict " + ", ".join(f"{k}: {describe_input(v)}" for k, v in list(value.items())[:4])
    return type(value).__name__


def _cut_into(found: list[torch.Tensor]):
    def hook(module: nn.Module, inputs, output):
        if not isinstance(output, torch.Tensor) or output.grad_fn is None:
            return None
        found.append(output)
        return output.detach()  # what follows (rotary halves, attention) no longer reaches the trace

    return hook


def _is_spatial_zero_pad(module: nn.Module) -> bool:
    """nn.ZeroPad2d / ConstantPadNd(value=0): pads only spatial axes, so it acts on each channel separately and
    keeps a zero channel zero. (The autograd node alone does not say the pad value; the module does.)"""
    return isinstance(module, nn.modules.padding._ConstantPadNd) and float(module.value) == 0.0


def _record_zero_pad(found: set[int]):
    def hook(module: nn.Module, inputs, output) -> None:
        spatial = len(module.padding) <= 2 * (output.dim() - 2)  # never reaches the channel (or batch) axis
        if spatial and output.grad_fn is not None:
            found.add(id(output.grad_fn))

    return hook


def channel_groups(
    model: nn.Module, example_inputs, extra_channelwise_ops: Iterable[str] = (), graph=None
) -> list[ChannelGroup]:
    """Every channel group of ``model`` (one per independent channel space), in a stable order.

    ``extra_channelwise_ops`` names further autograd ops (e.g. ``"MyOp"`` for ``MyOpBackward0``)
    known to act on each channel separately; any other unknown op in a group is recorded in
    ``problems`` so that nothing is removed across it.
    """
    return [g for g, _ in _groups_with_roots(model, example_inputs, tuple(extra_channelwise_ops), graph)]


# model -> {(example key, extra ops): (module signature, groups)}; entries die with the model.
_GROUP_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[tuple, list[ChannelGroup]]]] = (
    weakref.WeakKeyDictionary()
)


def cached_channel_groups(
    model: nn.Module, example_inputs, extra_channelwise_ops: Iterable[str] = ()
) -> list[ChannelGroup]:
    """``channel_groups``, traced once per model, example shape and extra ops (then served from a cache).

    The cache is keyed weakly by the model and checked against its module names, types and parameter
    shapes: replacing or resizing a layer traces again; switching train/eval mode does not (the groups
    depend on the layers, not on the mode). Every call returns fresh
    ``ChannelGroup`` records, so a caller may edit them. Example inputs that are not tensors (or
    tuples/lists/dicts of tensors and plain scalars) are traced every time.

    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    >>> first = cached_channel_groups(model, torch.zeros(1, 3, 8, 8))
    >>> [g.label for g in cached_channel_groups(model, torch.ones(1, 3, 8, 8))] == [g.label for g in first]
    True
    """
    extra = tuple(extra_channelwise_ops)
    example_key = _inputs_key(example_inputs)
    if example_key is None:
        return channel_groups(model, example_inputs, extra)
    key = (example_key, tuple(sorted(set(extra))), tuple(sorted(registered_channelwise_ops().items())))
    signature = _module_signature(model)
    entries = _GROUP_CACHE.setdefault(model, {})
    hit = entries.get(key)
    if hit is None or hit[0] != signature:
        hit = entries[key] = (signature, channel_groups(model, example_inputs, extra))
    return [replace(g, members=list(g.members), ops=list(g.ops), problems=list(g.problems),
                    leaks=None if g.leaks is None else list(g.leaks)) for g in hit[1]]


def clear_channel_group_cache(model: nn.Module | None = None) -> None:
    """Forget the cached channel groups of ``model`` (of every model when None)."""
    if model is None:
        _GROUP_CACHE.clear()
    else:
        _GROUP_CACHE.pop(model, None)


def _inputs_key(example: Any) -> tuple | None:
    """A hashable description of the example's structure (shapes, dtypes, devices); None if unknown."""
    if isinstance(example, torch.Tensor):
        return ("tensor", tuple(example.shape), str(example.dtype), str(example.device))
    if isinstance(example, (tuple, list)):
        parts = [_inputs_key(x) for x in example]
        return None if None in parts else (type(example).__name__, tuple(parts))
    if isinstance(example, dict):
        parts = [(k, _inputs_key(v)) for k, v in example.items()]
        if not all(isinstance(k, str) for k, _ in parts) or any(v is None for _, v in parts):
            return None
        return ("dict", tuple(sorted(parts)))
    if example is None or isinstance(example, (bool, int, float, str)):
        return ("value", type(example).__name__, example)
    return None


def _module_signature(model: nn.Module) -> tuple:
    """What the traced graph depends on besides the inputs: the modules and their parameter shapes."""
    modules = tuple((name, type(m)) for name, m in model.named_modules())
    params = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
    return modules, params


def _groups_with_roots(model, example_inputs, extra_ops: tuple[str, ...], graph=None):
    """``(ChannelGroup, (root module, root pruning function))`` pairs; builds the graph unless given."""
    graph = graph if graph is not None else build_dependency_graph(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    known = dict(CHANNELWISE_OPS, **registered_channelwise_ops(), **{op: True for op in check_extra_ops(extra_ops)})
    out, seen = [], set()
    for tp_group in graph.get_all_groups(root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
        group = _convert(tp_group, graph, names, known)
        key = frozenset((m.layer, m.role, m.local) for m in group.members) or group.root  # memberless: its root
        if key in seen:  # a depthwise conv roots a second copy of its producer's group
            continue
        seen.add(key)
        root = tp_group[0].dep
        out.append((group, (root.target.module, root.handler)))
    modules = dict(model.named_modules())
    for group, _ in out:
        group.blocks, why = _blocks(group.members, group.size, modules)
        reducing = [_reducing_problem(m.layer, modules[m.layer]) for m in group.members if m.layer in modules]
        broadcast = [_broadcast_problem(m, modules[m.layer], group.size) for m in group.members if m.layer in modules]
        collapsed = [_collapsed_problem(m, modules[m.layer], group.size) for m in group.members if m.layer in modules]
        group.problems += [p for p in dict.fromkeys([why, *reducing, *broadcast, *collapsed]) if p]
    out.sort(key=lambda pair: pair[0].label)
    return out


def _broadcast_problem(member: Member, module: nn.Module, size: int) -> str:
    """Why a layer that writes fewer channels than its group has (one channel broadcast over all of them by an add
    or a multiply) cannot follow the group ("" where it writes them all)."""
    if member.role not in (PRODUCER, DEPTHWISE) or not member.local:
        return ""
    for name, dim in member.param_dims(module):
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor) and tensor.dim() > dim and max(member.local) >= tensor.shape[dim]:
            return (f"layer '{member.layer}' writes {tensor.shape[dim]} channel(s) that are broadcast over these "
                    f"{size} (an add or multiply), so its channels cannot follow the group's; exclude the group's "
                    "layers from the rule")
    return ""


def _collapsed_problem(member: Member, module: nn.Module, size: int) -> str:
    """Why a group of one channel holds a producer of many ("" otherwise): a reduction across channels (a mean
    over a channels-last axis, a max over channels) feeding a one-channel layer makes the trace map every
    channel onto that one, so the group's target would prune nothing (a review's finding: accepted, 0 of 8
    filters pruned, silently)."""
    if size != 1 or member.role != PRODUCER:
        return ""
    channels = getattr(module, "out_channels", getattr(module, "out_features", 1))
    if not isinstance(channels, int) or channels <= 1:
        return ""
    return (f"layer '{member.layer}' writes {channels} channels, but the trace ties them to one channel (a reduction "
            "or broadcast across channels, e.g. a mean or max over them feeding a one-channel layer): keep these "
            "channels (exclude the layer from the rule)")


def _reducing_problem(layer: str, module: nn.Module) -> str:
    """Why a conv with ``groups == out_channels < in_channels`` blocks its groups ("" for any other layer):
    Torch-Pruning takes it for a depthwise conv and ties its input channels one to one to its outputs."""
    if not isinstance(module, nn.modules.conv._ConvNd) or not 1 < module.groups == module.out_channels \
            or module.in_channels == module.out_channels:
        return ""
    return (f"conv '{layer}' (groups={module.groups}) reads {module.in_channels} input channels into "
            f"{module.out_channels} outputs, but the dependency graph (Torch-Pruning) takes it for a depthwise conv "
            f"and maps them one to one; drop the filter/channel targets on '{layer}' and the layers that feed it, or "
            "give it groups=1 or in_channels == groups")


def _convert(tp_group, graph, names: dict, known: dict[str, bool]) -> ChannelGroup:
    import torch_pruning as tp

    members: dict[tuple[str, str], list[tuple[int, int]]] = {}
    modules: dict[str, nn.Module] = {}
    dims: dict[str, int] = {}
    moves: list[str] = []
    means: list[Any] = []  # Mean nodes: channelwise unless they average over the channel axis (_averages_channels)
    reshapes: list[Any] = []  # reshape nodes: a split of the channel axis next to an axis move shuffles channels
    ops: list[str] = []
    problems: list[str] = []
    node_roles: dict[Any, set[str]] = {}  # traced node -> member roles, and -> op name (for zero_leaks)
    node_ops: dict[Any, str] = {}
    size = 0
    for item in tp_group:
        node, handler = item.dep.target, item.dep.handler
        module = node.module
        pairs = list(zip(item.idxs, item.root_idxs, strict=True))
        size = max([size] + [r + 1 for _, r in pairs])
        if node.type == tp.ops.OPTYPE.OUTPUT or (
            isinstance(module, nn.Module)
            and module in names
            and graph.is_out_channel_pruning_fn(handler)
            and not node.outputs
        ):
            if id(node.grad_fn) in getattr(graph, "admm_dead_ends", {}):  # computed, then dropped by the model: it
                # may still be read where the trace cannot see (an attribute, an if, an argmax)
                layer = names.get(module) or next((names[i.module] for i in node.inputs if i.module in names), "?")
                problems.append(f"its channels leave '{layer}' in a result the model computes but does not return "
                                "(kept, compared or branched on where the trace cannot follow)")
                continue
            if id(module) in getattr(graph, "admm_cut_layers", ()):  # traced as an output on purpose (see above)
                problems.append(f"'{names[module]}' is an attention block's query/key projection (or its norm): its "
                                "channels are heads, pruned with structure: heads on the block's query projection")
            else:
                problems.append(f"its channels are model outputs (from '{names.get(module, node.name)}')")
            continue
        if node.type == tp.ops.OPTYPE.PARAMETER and id(module) in getattr(graph, "admm_param_names", {}):
            layer = graph.admm_param_names[id(module)]  # a free nn.Parameter (position embeddings, layer scale)
            members.setdefault((layer, PARAMETER), []).extend(pairs)
            modules[layer], dims[layer] = module, node.pruning_dim
            node_roles.setdefault(node, set()).add(PARAMETER)
            continue
        role = _role(module, handler, graph)
        if role == LAYERNORM and stream_problem(names[module], module):
            problems.append(stream_problem(names[module], module))
        if role is None:
            if node.type == tp.ops.OPTYPE.ELEMENTWISE:
                op = refine_op(op_name(str(module._grad_fn)), node.grad_fn)
                if _inside_linear(op, node, names):
                    node_ops[node] = INSIDE
                    continue
                if id(node.grad_fn) in getattr(graph, "admm_zero_pads", ()):
                    ops.append(node_ops.setdefault(node, "ZeroPad"))
                    continue
                if id(node.grad_fn) in getattr(graph, "admm_rms_nodes", ()):
                    ops.append(node_ops.setdefault(node, "RMSNorm"))
                    continue
                ops.append(node_ops.setdefault(node, op))
                norm = getattr(graph, "admm_unknown_norms", {}).get(id(node.grad_fn))
                if norm is not None:  # one line per norm, no channelwise op offered (a review's finding)
                    problems.append(f"normalization {norm} is not one this library knows (its statistics span the "
                                    "channels; known: BatchNorm, LayerNorm, LLaMA-style RMSNorm): keep these channels "
                                    "(exclude the layers that feed it from the rule)")
                    continue
                if op in REDUCTIONS:
                    means.append(node)
                if op in AXIS_MOVES and op not in known:
                    moves.append(f"op '{op}'{_near(node, names)}")
                elif op in MIXING_OPS and op not in known:
                    problems.append(
                        f"op '{op}'{_near(node, names)} mixes or moves channels (a matrix product, attention, an "
                        "axis permutation outside nn.Linear/Conv, a pixel shuffle or a normalization across "
                        "channels): keep these channels (exclude the layer from the rule)"
                    )
                elif op in WEIGHT_NORM_OPS and op not in known:
                    problems.append(
                        f"a weight_norm parametrization (op '{op}'{_near(node, names)}) normalizes across channels: "
                        "fold it first with torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') "
                        "(or torch.nn.utils.remove_weight_norm(module) for the older weight_norm; outputs unchanged; "
                        "Wav2Vec2's positional conv has one), then prune"
                    )
                elif op == "Embedding":  # a lookup whose module returns more (Gemma's scaled embedding)
                    problems.append(
                        f"an embedding lookup{_near(node, names)} sits inside a module that returns more than the "
                        "lookup (a scaled embedding), so the trace cannot tie its weight's columns to these channels: "
                        "keep these channels (exclude the layers they feed from the rule)"
                    )
                elif op not in known:
                    problems.append(
                        f"op '{op}'{_near(node, names)} is not known to act on each channel separately; if it "
                        f"does, call admmcompress.plan.register_channelwise_op('{op}') before resolving (in a "
                        "plugin module for run configs), otherwise keep these channels"
                    )
            elif node.type.name.lower() in STRUCTURAL_OPS:
                ops.append(node_ops.setdefault(node, node.type.name.lower()))
                if node.type.name.lower() == "reshape":
                    reshapes.append(node)
            elif isinstance(module, nn.Module) and module in names:
                problems.append(
                    f"layer '{names[module]}' ({type(module).__name__}) has no channel rule here (supported: Conv "
                    "(not transposed), Linear, BatchNorm, LayerNorm, Embedding); exclude the layers whose channels it "
                    "reads from the rule"
                )
            else:
                problems.append(f"'{node.name}' cannot be sliced by channel")
            continue
        members.setdefault((names[module], role), []).extend(pairs)
        modules[names[module]] = module
        node_roles.setdefault(node, set()).add(role)
    result = []
    for (layer, role), pairs in members.items():
        pairs = sorted(set(pairs))
        conv_groups = modules[layer].groups if is_grouped_conv(modules[layer]) else 1
        result.append(Member(layer, role, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), conv_groups,
                             dims.get(layer, 0)))
    for node in means:
        if _averages_channels(node.grad_fn, size, moved=bool(moves)):
            op = node_ops.get(node, "Mean")
            problems.append(f"op '{op}'{_near(node, names)} reduces over the channel axis (a mean or max across "
                            "channels), so every channel's value depends on the pruned ones: keep these channels "
                            "(exclude the layer from the rule)")
    split = next((node for node in reshapes if _shuffled(node, size)), None)
    if moves and split is not None:
        problems.append(f"a view splits the channel axis{_near(split, names)} and an axis move reorders the parts (a "
                        "channel shuffle): the channels' order changes, so they cannot be pruned as one group: keep "
                        "these channels (exclude the layers before the shuffle from the rule)")
    if moves and any(op in MIXING_OPS and op not in AXIS_MOVES and op not in known for op in ops):
        problems += [f"{m} moves an axis next to a matrix product or attention, so channels may mix: keep these "
                     "channels (exclude the layer from the rule)" for m in dict.fromkeys(moves)]
    root_module = tp_group[0].dep.target.module
    return ChannelGroup(
        size=size,
        members=result,
        ops=sorted(set(ops)),
        problems=list(dict.fromkeys(problems)),
        root=names.get(root_module, ""),
        leaks=zero_leaks(node_roles, node_ops, names),
    )


def _averages_channels(grad_fn: Any, channels: int, moved: bool) -> bool:
    """Whether a traced mean averages over the channel axis of its input (``y.mean(1)`` on NCHW), which mixes the
    channels, rather than over positions (a global average pool, ``y.mean((2, 3))``). The channel axis is one of
    ``channels`` entries: when only reduced axes have that many it is reduced; when kept and reduced axes both do
    (8 channels at 8 x 8), a 4-D or 5-D tensor no axis move has touched has its channels at dim 1; otherwise
    undecided (False), and compaction's output check is the guard."""
    sizes = [int(n) for n in getattr(grad_fn, "_saved_self_sym_sizes", ()) or ()]
    if not sizes and isinstance(getattr(grad_fn, "_saved_self", None), torch.Tensor):  # amax saves its input
        sizes = [int(n) for n in grad_fn._saved_self.shape]
    if not sizes:
        return False
    dims = getattr(grad_fn, "_saved_dim", None)  # None: the mean (max) of everything
    dims = (dims,) if isinstance(dims, int) else dims  # max(dim) saves one int
    reduced = {_axis(d, len(sizes)) for d in dims} if dims is not None else set(range(len(sizes)))
    if not any(sizes[d] == channels for d in reduced):
        return False
    if not any(sizes[d] == channels for d in range(len(sizes)) if d not in reduced):
        return True
    return len(sizes) in (4, 5) and not moved and 1 in reduced


def _shuffled(node: Any, channels: int) -> bool:
    """Whether a traced reshape splits an axis of ``channels`` entries and the op right after it swaps two of the
    parts (ShuffleNet's ``view(b, g, c // g, h, w).transpose(1, 2)``). A permute that moves a part past other axes
    (a channels-last window partition whose height equals the channel count) is not taken for one (a review of
    the change found it refused)."""
    split = _split_axes(node.grad_fn, channels)
    if split is None:
        return False
    start, end = split
    for later in getattr(node, "outputs", ()):
        fn = later.grad_fn
        rank = len(fn._input_metadata[0].shape) if getattr(fn, "_input_metadata", ()) else 0
        if not rank:
            continue
        if type(fn).__name__.startswith("TransposeBackward"):
            axes = {_axis(fn._saved_dim0, rank), _axis(fn._saved_dim1, rank)}
        elif type(fn).__name__.startswith("PermuteBackward"):
            axes = {i for i, d in enumerate(fn._saved_dims) if _axis(d, rank) != i}
        else:
            continue
        if len(axes) > 1 and all(start <= a < end for a in axes):
            return True
    return False


def _axis(dim: int, rank: int) -> int:
    """An axis autograd saved (negative ones as unsigned 64-bit values) as 0..rank-1."""
    dim = int(dim)
    return (dim - 2**64 if dim >= 2**63 else dim) % rank


def _split_axes(grad_fn: Any, channels: int) -> tuple[int, int] | None:
    """The output axes ``[start, end)`` a traced reshape splits an axis of ``channels`` entries into (None when it
    splits none), read from the input sizes autograd saved and the output's metadata. Torch-Pruning maps channels
    through a reshape as if it only merged or split trailing axes, which an axis move of the parts afterwards
    breaks (a review's finding: accepted, then compaction failed). Hand-written."""
    sizes = [int(n) for n in getattr(grad_fn, "_saved_self_sym_sizes", ()) or ()]
    meta = getattr(grad_fn, "_input_metadata", ())
    if not sizes or not meta:
        return None
    out = [int(n) for n in meta[0].shape]
    prefix_in, prefix = 1, {}
    acc = 1
    for i, n in enumerate(out):  # output axis index at which each prefix product is reached
        prefix.setdefault(acc, i)
        acc *= n
    for n in sizes:
        if n == channels and prefix_in in prefix:
            start, acc, end = prefix[prefix_in], 1, prefix[prefix_in]
            while end < len(out) and acc < n:
                acc *= out[end]
                end += 1
            if acc == n and end - start > 1 and all(out[i] != n for i in range(start, end)):
                return start, end
        prefix_in *= n
    return None


# Reductions that are per channel over positions and mix the channels over the channel axis (see
# _averages_channels): a mean, amax or max(dim).
REDUCTIONS = frozenset({"Mean", "Amax", "Max"})


# On inputs of more than 2 dimensions nn.Linear runs a matrix product on a flattened view and returns a view
# of it; the trace records the view as the Linear and the product as a separate node in front of it, which
# carries the Linear's input channels. Hand-written here (Torch-Pruning leaves it to the caller).
_LINEAR_PRODUCTS = ("Addmm", "Mm")


def _near(node, names: dict) -> str:
    """' (feeding 'fc2')': the named module an op's channels flow into, so the message points at model code."""
    seen, frontier = set(), list(node.outputs)
    while frontier:
        nxt = frontier.pop(0)
        if id(nxt) in seen or len(seen) > 50:
            continue
        seen.add(id(nxt))
        if isinstance(nxt.module, nn.Module) and nxt.module in names:
            return f" (feeding '{names[nxt.module]}')"
        frontier.extend(nxt.outputs)
    return ""


def _inside_linear(op: str, node, names: dict) -> bool:
    """Whether an elementwise-looking node is the matrix product inside an ``nn.Linear`` (3-D inputs)."""
    outputs = list(node.outputs)
    if op == "NativeLayerNorm":  # a LayerNorm subclass that permutes around it (ConvNeXt channels_first): the
        return bool(outputs) and all(isinstance(o.module, nn.LayerNorm) for o in outputs)  # module is the member
    return (
        op in _LINEAR_PRODUCTS
        and bool(outputs)
        and all(isinstance(o.module, nn.Linear) and o.module in names for o in outputs)
    )


def _blocks(members: list[Member], size: int, modules: dict[str, nn.Module]) -> tuple[tuple[int, ...], str]:
    """Block id per group channel from the grouped convs' splits (their common refinement), or a reason.

    Every block must have the same size, so that "the same number of channels in every block" keeps the
    same number in every conv group of every grouped member.
    """
    keys: list[tuple[int, ...]] = [() for _ in range(size)]
    for m in members:
        if m.groups == 1:
            continue
        module = modules[m.layer]
        channels = module.out_channels if m.role == PRODUCER else module.in_channels
        side = "output" if m.role == PRODUCER else "input"
        span = channels // m.groups
        block: dict[int, int] = {}
        for local, root in zip(m.local, m.root, strict=True):
            if block.setdefault(root, local // span) != local // span:
                block[root] = -1
        if sorted(set(m.local)) != list(range(channels)) or len(block) != size or -1 in block.values():
            return (), (
                f"grouped conv '{m.layer}' (groups={m.groups}) shares only part of its {side} channels with "
                "this channel group (a concat/split in between), so its conv groups cannot be kept equal; "
                f"drop the filter/channel targets on the layers that feed or read '{m.layer}', or make it "
                "depthwise (groups = channels) or groups=1"
            )
        keys = [k + (block[r],) for r, k in enumerate(keys)]
    if not any(keys):
        return (), ""
    ids: dict[tuple[int, ...], int] = {}
    blocks = tuple(ids.setdefault(k, len(ids)) for k in keys)
    counts = torch.bincount(torch.tensor(blocks))
    if bool((counts != counts[0]).any()):
        named = ", ".join(f"'{layer}' (groups={g})" for layer, g in dict.fromkeys((m.layer, m.groups)
                          for m in members if m.groups > 1))
        return (), (
            f"grouped convs {named} split these channels into conv groups that do not nest (blocks of sizes "
            f"{sorted(set(counts.tolist()))}), so no pruning keeps every conv group equal; drop the "
            "filter/channel targets on these channels, or give the convs nesting groups (e.g. 2 and 4)"
        )
    return blocks, ""


def _role(module, handler, graph) -> str | None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return NORM
    if stream_role(module) is not None:
        return stream_role(module)
    if isinstance(module, nn.modules.conv._ConvNd):
        if getattr(module, "transposed", False):
            return None
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
            return DEPTHWISE
        return PRODUCER if graph.is_out_channel_pruning_fn(handler) else CONSUMER
    if isinstance(module, nn.Linear):
        return PRODUCER if graph.is_out_channel_pruning_fn(handler) else CONSUMER
    return None


def group_of(groups: list[ChannelGroup], layer: str, roles: tuple[str, ...]) -> ChannelGroup | None:
    """The group in which ``layer`` appears with one of ``roles`` (None if there is none)."""
    for group in groups:
        if any(m.layer == layer and m.role in roles for m in group.members):
            return group
    return None


__all__ = [
    "CHANNELWISE_OPS",
    "CONSUMER",
    "DEPTHWISE",
    "NORM",
    "PRODUCER",
    "STRUCTURAL_OPS",
    "ChannelGroup",
    "GraphError",
    "Hook",
    "Member",
    "build_dependency_graph",
    "cached_channel_groups",
    "call_model",
    "channel_groups",
    "clear_channel_group_cache",
    "channel_index",
    "channel_rows",
    "depthwise_multiplier",
    "example_problem",
    "group_of",
    "is_grouped_conv",
    "keeps_zero",
    "first_sample",
    "agreed_samples",
    "cell_samples",
    "example_samples",
    "map_tensors",
    "samples_of_call",
    "op_name",
    "run_example",
    "zero_leaks",
]
