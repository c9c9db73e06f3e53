"""The ``compact`` executor, and compaction as a run step: compact, check on random inputs, save, report.

``get_executor("compact")``: ``convert`` = :func:`~admmcompress.executors.compact.compact` (a physically
smaller copy, same outputs), ``save`` / ``load`` = ``manifest.json`` + ``model.safetensors``
(:mod:`admmcompress.executors.manifest`, reloaded without the original widths), ``export`` = a finished
run's model compacted, checked, saved and reloaded (``admmcompress export --compact``).
The ``Runner`` (``compact: true`` in a run config) uses ``compact_checked``; the figures (parameters and
MACs before and after, the largest output difference) go into ``metrics.json`` and, through
``render_compaction``, into ``report.md``.

>>> import torch.nn as nn
>>> from admmcompress.executors import get_executor
>>> model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
>>> with torch.no_grad():
...     model[0].weight[:2] = 0; model[0].bias[:2] = 0            # two neurons pruned
>>> get_executor("compact").convert(model, example=torch.randn(2, 6))[0].out_features
2
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from typing_extensions import deprecated

from admmcompress.executors.base import Executor, FinishedRun, register_executor, reject_unknown
from admmcompress.executors.compact import (
    CompactConfig,
    CompactionError,
    CompactionResult,
    compact,
    count_params,
)
from admmcompress.executors.fold import forward
from admmcompress.executors.manifest import _write_compacted, load_compacted
from admmcompress.executors.penni import SharedKernelConv, compact_shared, shared_layers
from admmcompress.finalize import MaskSet
from admmcompress.plan.attention import attention_layouts
from admmcompress.plan.graph import first_sample
from admmcompress.structures.groups import gemm_params
from admmcompress.structures.registry import structure_class

COMPACT_DIR = "compact"
# Structures whose zeros are meant to remove channels: compaction must then remove every zero filter.
CHANNEL_STRUCTURES = frozenset({"filter", "channel", "heads"})
# Structures that never zero a whole filter by chance (columns zero a layer's inputs, not its filters).
NO_CHANCE_ZERO_FILTERS = CHANNEL_STRUCTURES | {"column"}


def strict_compaction(stages: list[dict[str, Any]]) -> bool:
    """Whether compaction at the end of a run with these stages (``StageConfig.to_dict()`` form, as a run
    folder's config.yaml holds them) must remove every zero filter: when some rule prunes channels on purpose
    (filter/channel/heads) and no rule can zero a filter by chance (only those and column rules).

    Unstructured, N:M, block, quantization or factorizing rules can zero a whole filter by chance (a 16-filter
    conv at 90% unstructured sparsity often does); where a residual add ties it to live filters it cannot go,
    and it is kept with a warning rather than failing the run at its end (or its export). The channel rules of
    such a plan are held to removal before training instead: the runner's preflight compacts their targets
    alone, strictly (``structured_targets``).

    >>> rules = [{"type": "Conv2d", "structure": "row", "sparsity": 0.5}]  # "row" is an alias of "filter"
    >>> strict_compaction([{"plan": {"rules": rules}}])
    True
    >>> strict_compaction([{"plan": {"rules": rules}}, {"plan": {"rules": [{"structure": "unstructured"}]}}])
    False
    """
    kinds = []
    for stage in stages:
        rules = ((stage.get("plan") or {}).get("rules") or []) if isinstance(stage, dict) else []
        for rule in rules:
            cls = structure_class(rule.get("structure")) if isinstance(rule, dict) else None
            kinds.append(cls.kind if cls is not None else None)
    return any(k in CHANNEL_STRUCTURES for k in kinds) and all(k in NO_CHANCE_ZERO_FILTERS for k in kinds)


def structured_targets(targets: list) -> list:
    """The targets that never zero a filter by chance: coupled ones, and filter/channel/heads/column
    structures (what the runner's preflight compacts strictly)."""
    from admmcompress.plan import CoupledTarget

    return [t for t in targets if isinstance(t, CoupledTarget) or t.structure.kind in NO_CHANCE_ZERO_FILTERS]


def preflight_compaction(
    model: nn.Module,
    stage_targets: list[list],
    example,
    columns: str = "off",
    keep_zero_filters: bool = False,
) -> str | None:
    """Check before training that compaction can remove what the stages' targets prune on purpose: raises
    ``CompactionError`` naming the channels; returns a note when the plans remove no width at all (else None).

    The structured targets (``structured_targets``) alone are hard-pruned by magnitude on a copy of ``model``
    whose BatchNorm shifts and statistics are made nonzero (as after training), and the copy is compacted,
    strictly when they prune channels. Other rules are left out, since the filters they zero by chance are
    kept with a warning at the end (``strict_compaction``); so are zero filters the model already has (from
    its checkpoint), which training revives, unless ``keep_zero_filters`` (the run keeps its pretrained zeros).
    A plan without structured targets is compacted whole, only to say when it removes no width (one that
    factorizes layers is not: its compacted model holds the factors).
    """
    from admmcompress.finalize import hard_prune
    from admmcompress.plan import CoupledTarget

    trial = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in trial.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats:
                m.bias.add_(torch.rand(m.num_features, generator=generator) - 0.5)
                m.running_mean.add_(torch.rand(m.num_features, generator=generator) - 0.5)
            weight = m._parameters.get("weight") if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) else None
            if weight is not None and not keep_zero_filters:
                zero = weight == 0
                weight[zero] = torch.rand(int(zero.sum()), generator=generator).to(weight.dtype) + 0.5
    structured = [structured_targets(targets) for targets in stage_targets]
    if not any(structured) and any(getattr(getattr(t, "structure", None), "factorizes", False)
                                   for targets in stage_targets for t in targets):
        return None  # no width to check: the compacted model holds the factorized layers (smaller by their factors)
    strict = any(isinstance(t, CoupledTarget) or t.structure.kind in CHANNEL_STRUCTURES
                 for targets in structured for t in targets)
    masks = None
    for targets in structured if any(structured) else stage_targets:
        masks = hard_prune(trial, targets, masks) if targets else masks
    # columns as the run will compact them ("auto" chooses by timing: every candidate counts here)
    config = CompactConfig(atol=float("inf"), strict=strict, columns="off" if columns == "off" else "on")
    with warnings.catch_warnings():
        # notes about chance-zero filters of this made-up copy would only confuse
        warnings.filterwarnings("ignore", message="compact: ", category=RuntimeWarning)
        result = compact(trial, example, masks, config)
    if strict or result.params_after < result.params_before:
        return None
    if columns == "off" and any(t.structure.kind == "column" for targets in structured for t in targets):
        return ("compact.columns is off, so the column rules remove nothing and the compacted model is as large "
                "as the dense one; set compact: {columns: on} (or auto), or drop 'compact'")
    return ("the plans prune no whole filter, channel or column, so the compacted model is as large as the "
            "dense one; add structured rules (filter, channel, column) or drop 'compact'")


def _rows(t: torch.Tensor | PackedSequence) -> int:
    """Positions (steps x batch) a sequence holds: a packed one its real lengths, a padded one all its steps."""
    data = t.data if isinstance(t, PackedSequence) else t
    return data.numel() // data.shape[-1] if data.shape[-1] else 0


def _step_macs(layer: nn.RNNBase | nn.RNNCellBase) -> int:
    """Multiply-accumulates of one position through a recurrent layer (every layer and direction) or cell: each of
    its weight matrices (``weight_ih``, ``weight_hh``, an LSTM's ``weight_hr`` projection) is used once per position
    and direction, so the sum of their sizes (``gates * hidden * (input + recurrent)`` and ``hidden * proj_size``)."""
    return sum(getattr(layer, param).numel() for param in gemm_params(layer))


def _cell_macs(cell: nn.RNNCellBase, output) -> int:
    """One step of a GRU/LSTM/RNN cell on every row of its call (``output``: ``h'`` or ``(h', c')``)."""
    return _rows(output[0] if isinstance(output, tuple) else output) * _step_macs(cell)


def _batch_and_length(t: torch.Tensor, batch_first: bool) -> tuple[int, int]:
    """``(batch, length)`` of a sequence-layer tensor: ``(L, E)`` unbatched, else ``(N, L, E)`` or ``(L, N, E)``."""
    if t.dim() == 2:
        return 1, t.shape[0]
    return (t.shape[0], t.shape[1]) if batch_first else (t.shape[1], t.shape[0])


def _mha_macs(mha: nn.MultiheadAttention, args: tuple, kwargs: dict[str, Any], output, products: bool) -> int:
    """``nn.MultiheadAttention``: its packed query/key/value projections and ``out_proj``; Q K^T and A V if
    ``products``.

    Its forward reads ``out_proj``'s weight directly (the Linear is never called, so its hook never runs):
    it is counted here, and left out of the Linear hook should a torch version call it."""
    key = args[1] if len(args) > 1 else kwargs["key"]
    width = mha.embed_dim
    batch, q_len = _batch_and_length(output[0], mha.batch_first)
    k_len = _batch_and_length(key, mha.batch_first)[1]
    q_rows, k_rows = batch * q_len, batch * k_len
    projections = q_rows * width * width + k_rows * (mha.kdim + mha.vdim) * width + q_rows * width * width
    return projections + (2 * width * batch * q_len * k_len if products else 0)


def _attention_product_hooks(model: nn.Module) -> tuple[list, Any]:
    """Hooks on the query and key projections of every block ``attention_layouts`` reads, and a function giving
    the products' MACs once the forward has run: ``2 * heads * head_dim * L_q * L_k`` per sequence (Q K^T and
    A V), the lengths read from the projections' outputs ``(..., L, width)`` (the dims before ``L`` batch).

    The head count is the block's own (lowered by compaction), so removed heads show as fewer MACs."""
    try:
        layouts = attention_layouts(model)
    except ValueError:  # a block that cannot be read (its stated key/value heads disagree): its products uncounted
        return [], lambda: 0
    modules = dict(model.named_modules())
    seen: dict[str, dict[str, list[tuple[int, int]]]] = {}

    def record(block: str, roles: tuple[str, ...]):
        def hook(_module: nn.Module, _inputs, output) -> None:
            length = output.shape[-2] if output.dim() >= 3 else output.shape[0]  # (L, width): one sequence
            for role in roles:
                seen[block][role].append((output.numel() // (output.shape[-1] * length), length))
        return hook

    handles = []
    for layout in layouts.values():
        seen[layout.q] = {"q": [], "k": []}
        # fused (GPT-2 c_attn): one call gives the queries and keys
        sides = [(layout.q, ("q", "k"))] if layout.q == layout.k else [(layout.q, ("q",)), (layout.k, ("k",))]
        handles += [modules[name].register_forward_hook(record(layout.q, roles)) for name, roles in sides]

    def macs() -> int:
        # the i-th query call pairs with the i-th key call (a block called twice runs twice); not strict: a query
        # with no key call of its own (keys from a cache) has no product counted
        return sum(2 * layouts[block].width * batch * q_len * k_len
                   for block, calls in seen.items()
                   for (batch, q_len), (_, k_len) in zip(calls["q"], calls["k"], strict=False))

    return handles, macs


def count_macs(model: nn.Module, example_inputs, attention_products: bool = False) -> int:
    """Multiply-accumulates of the model on the first sample of ``example_inputs`` (dim 0 the batch).

    Counted: Conv/Linear layers (and column and shared-kernel executors) on their first output row;
    recurrent layers ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (every layer and direction, ``proj_size``) on every
    position they run, a packed sequence its real lengths and a padded one every padded step; the cells
    ``nn.RNNCell``/``nn.GRUCell``/``nn.LSTMCell`` per call; ``nn.MultiheadAttention``'s projections: the products
    with weights (the MAC budgets of :mod:`admmcompress.drivers.budget` count their Linear/Conv part).
    ``attention_products=True`` adds the products of activations: ``Q K^T`` and ``A V`` of every block that
    :func:`~admmcompress.plan.attention.attention_layouts` reads (``2 * heads * head_dim * L_q * L_k``) and of
    every ``nn.MultiheadAttention`` (fewer heads after compaction: fewer of them).
    Gate and softmax arithmetic is not counted (as activations are not). The block-sparse executors
    (``BlockSparseLinear``/``Conv2d``, ``BlockSparseGRU``/``LSTM``/``Cell``) are not counted: this figure compares
    a masked dense model with its compacted copy, which holds none of them.

    >>> count_macs(nn.GRU(4, 8, batch_first=True), torch.zeros(1, 5, 4)) == 5 * 3 * 8 * (4 + 8)
    True
    """
    from admmcompress.executors.column import ColumnConv2d, ColumnLinear

    total = 0
    # counted by their MultiheadAttention (see _mha_macs)
    mha_out = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}

    def hook(module: nn.Module, _inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvNd):
            per_out = module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
            total += output[0].numel() * per_out
        elif isinstance(module, nn.Linear):
            total += 0 if id(module) in mha_out else output[0].numel() * module.in_features
        elif isinstance(module, (ColumnConv2d, ColumnLinear)):
            total += output[0].numel() * module.kept.numel()
        elif isinstance(module, SharedKernelConv):  # its forward is the dense conv of the kernels it rebuilds
            total += output[0].numel() * module.in_channels * int(torch.tensor(module.kernel_size).prod())
        elif isinstance(module, nn.RNNBase):  # output: (sequence, state); every position the layer ran
            total += _rows(output[0]) * _step_macs(module)
        elif isinstance(module, nn.RNNCellBase):
            total += _cell_macs(module, output)

    def mha_hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict[str, Any], output) -> None:
        nonlocal total
        total += _mha_macs(module, args, kwargs, output, attention_products)

    kinds = (nn.modules.conv._ConvNd, nn.Linear, ColumnConv2d, ColumnLinear, SharedKernelConv, nn.RNNBase,
             nn.RNNCellBase)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    handles += [m.register_forward_hook(mha_hook, with_kwargs=True)
                for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    product_handles, products = _attention_product_hooks(model) if attention_products else ([], lambda: 0)
    handles += product_handles
    training = model.training
    try:
        with torch.no_grad():
            forward(model.eval(), first_sample(example_inputs))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return total + products()


def random_inputs(example: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` standard-normal inputs shaped like one sample of ``example`` (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, *example.shape[1:], generator=generator, dtype=example.dtype)


def _compact(model: nn.Module, example: Any, masks: MaskSet | None = None,
             config: CompactConfig | None = None) -> CompactionResult:
    """``compact``, or ``penni.compact_shared`` for a model holding shared-kernel convs (compacted through their
    plain equivalent: Torch-Pruning cannot see into them, and ``compact`` refuses them)."""
    return (compact_shared if shared_layers(model) else compact)(model, example, masks, config)


def compact_checked(
    model: nn.Module,
    example: torch.Tensor,
    masks: MaskSet | None = None,
    atol: float = 1e-4,
    samples: int = 8,
    columns: str = "off",
    seed: int = 0,
    strict: bool = True,
) -> tuple[CompactionResult, dict[str, Any]]:
    """Compact ``model`` (masks applied), verify on two sets of random inputs; return the result and figures.

    ``example`` gives the input shape (one batch from the data). The compactor checks its own trace
    inputs; a second, independent set of ``samples`` random inputs is checked here against the masked
    model, and any ``max |diff| > atol`` raises ``CompactionError`` (the model is never silently wrong).
    ``strict=False`` keeps zero filters that cannot be removed instead of raising (``CompactConfig.strict``).
    """
    masked = copy.deepcopy(model)
    if masks is not None:
        masks.apply(masked)
    masked.eval()
    trace = random_inputs(example, max(2, samples), seed)
    result = _compact(masked, trace, config=CompactConfig(atol=atol, columns=columns, strict=strict))
    small = result.model.eval()
    check = random_inputs(example, samples, seed + 1)
    with torch.no_grad():
        diff = float((small(check) - masked(check)).abs().max())
    if not diff <= atol:
        raise CompactionError(
            f"the compacted model differs from the masked model by {diff:.3g} (> atol={atol:g}) on "
            f"{samples} random inputs; report the model (compaction of its layers is not exact)"
        )
    figures = {
        "params_before": result.params_before,
        "params_after": result.params_after,
        "macs_before": count_macs(masked, example),
        "macs_after": count_macs(small, example),
        "max_abs_diff": max(diff, result.max_abs_diff),
        "atol": atol,
        "random_inputs": samples + max(2, samples),
        "removed": {label: list(pair) for label, pair in result.removed.items() if pair[0]},
        "folded": dict(result.folded),
        "columns": {name: str(info) for name, info in result.columns.items()},
    }
    return result, figures


@deprecated(
    "save_compact(result, figures, folder, spec) is deprecated; use "
    "admmcompress.executors.get_executor('compact').save(result.model, folder, model_spec=spec) "
    "and figures['folder'] = str(folder)"
)
def save_compact(
    result: CompactionResult, figures: dict[str, Any], folder: str | Path, model_spec: dict[str, Any]
) -> dict[str, Any]:
    """Deprecated: save the compacted model into ``folder``; ``figures`` gains its path."""
    folder = Path(folder)
    _write_compacted(result.model, folder, model_spec)
    return {**figures, "folder": str(folder)}


def model_spec(model_config: dict[str, Any]) -> dict[str, Any]:
    """``{"name", "kwargs"}`` for the manifest, from a run config's ``model:`` mapping."""
    return {"name": model_config["name"], "kwargs": {k: v for k, v in model_config.items() if k != "name"}}


def render_compaction(figures: dict[str, Any]) -> str:
    """Markdown lines for report.md's "Compacted model" section, from ``compact_checked``'s figures."""
    pb, pa = figures["params_before"], figures["params_after"]
    mb, ma = figures["macs_before"], figures["macs_after"]
    lines = [
        f"- Parameters: {pb:,} -> {pa:,} ({pb / max(1, pa):.2f}x fewer)",
        f"- MACs per sample: {mb:,} -> {ma:,} ({mb / max(1, ma):.2f}x fewer)",
        f"- Outputs vs the masked model: max |diff| {figures['max_abs_diff']:.2e} on {figures['random_inputs']} "
        f"random inputs (atol {figures['atol']:g})",
    ]
    removed = figures.get("removed") or {}
    if removed:
        shown = ", ".join(f"{label} {r}/{n}" for label, (r, n) in list(removed.items())[:8])
        more = f" and {len(removed) - 8} more groups" if len(removed) > 8 else ""
        lines.append(f"- Channels removed: {shown}{more}")
    if figures.get("folder"):
        folder = figures["folder"]
        lines.append(f"- Files: {folder}/manifest.json + {folder}/model.safetensors (reload: load_compacted)")
    return "\n".join(lines)


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(CompactConfig))


@register_executor("compact")
class CompactExecutor(Executor):
    """Physical compaction: pruned channels removed, a smaller dense model with the same outputs."""

    summary = "physically compacted model: --out FOLDER gets manifest + safetensors"
    writes_folder = True

    def convert(
        self, model: nn.Module, masks: MaskSet | None = None, example: Any = None, **options: Any
    ) -> nn.Module:
        """``compact(model, example, masks, CompactConfig(**options)).model`` (``penni.compact_shared`` for a model
        holding shared-kernel convs); ``example`` is required."""
        if example is None:
            raise ValueError(
                "compact.convert needs example=<inputs the model is called with> (e.g. torch.randn(2, 3, 32, 32)): "
                "compaction traces the model"
            )
        reject_unknown("compact", "convert", options, _CONFIG_FIELDS)
        return _compact(model, example, masks, CompactConfig(**options)).model

    def save(self, model: nn.Module, path: str | Path, model_spec: dict[str, Any] | None = None) -> Path:
        """``manifest.json`` + ``model.safetensors`` into the folder ``path``; ``model_spec``
        (``{"name", "kwargs"}``, see ``model_spec()``) lets ``load`` rebuild it without a skeleton."""
        return _write_compacted(model, path, model_spec)

    def load(self, path: str | Path, skeleton: nn.Module | None = None) -> nn.Module:
        """The compacted model saved in the folder ``path`` (``load_compacted``)."""
        return load_compacted(path, skeleton)

    def export(
        self, run: FinishedRun, out: str | Path, atol: float | None = None, samples: int = 8
    ) -> str:
        """Compact the run's model (its config's ``compact:`` atol and columns), check it, save it, reload it."""
        model = run.model
        options = run.settings.get("compact") or {}
        atol = float(atol) if atol is not None else options.get("atol", 1e-4)
        columns = options.get("columns", "off")
        samples = int(samples)
        example = run.example(2)
        strict = strict_compaction(run.settings.get("stages") or [])  # as the run itself compacted
        result, figures = compact_checked(model, example, atol=atol, samples=samples, columns=columns, strict=strict)
        self.save(result.model, out, model_spec(run.model_config))
        figures = {**figures, "folder": str(Path(out))}
        restored = self.load(out).eval()
        check = random_inputs(example, samples, seed=2)
        with torch.no_grad():
            diff = float((restored(check) - model(check)).abs().max())
        if not diff <= atol:
            raise CompactionError(
                f"the reloaded compacted model differs by {diff:.3g} (> atol={atol:g}); report this"
            )
        return (
            f"compacted: {out}/manifest.json + model.safetensors ({count_params(restored):,} parameters)\n"
            + render_compaction(figures)
            + f"\n- Reloaded from {out} without the model's widths: max |diff| {diff:.2e}"
        )


__all__ = [
    "COMPACT_DIR",
    "CompactExecutor",
    "compact_checked",
    "count_macs",
    "model_spec",
    "random_inputs",
    "render_compaction",
    "save_compact",
]
