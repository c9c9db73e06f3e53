"""Block-sparse CPU executor: swap the pruned layers of a model for block-sparse ones (inference).

After block pruning (``structures.Block``), ``to_blocksparse(model)`` replaces every
``nn.Linear``, ``nn.Conv2d``, ``nn.GRU``, ``nn.LSTM``, ``nn.GRUCell`` and ``nn.LSTMCell`` whose
weights are sparse enough with a module that computes the same outputs from packed row blocks
(each row block: its kept columns + a small dense matrix; see
:mod:`admmcompress.executors.blockmatrix`). The model stays an ``nn.Module``; the swap is
explicit and one-way (keep the masked model to train further). The ``blocksparse`` executor
(``get_executor("blocksparse").convert(model, block_rows=...)``) does the same on a copy.
``choose="measured"`` picks each layer's implementation per batch size (dense, the torch path, the
compiled kernel or torch BSR) from latencies measured once per machine (see
:mod:`admmcompress.executors.blocksparse_choice`).

>>> from admmcompress.structures import Block
>>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
>>> with torch.no_grad():
...     _ = model[0].weight.copy_(Block(compression=8, block=(8, 8)).project(model[0].weight))
>>> x = torch.randn(4, 64)
>>> expected = model(x)
>>> plan = Plan({"0": Block(compression=8, block=(8, 8))})
>>> to_blocksparse(model, block_rows=block_rows_from(plan, model))    # r = 8 for layer "0"
['0']
>>> torch.allclose(model(x), expected, atol=1e-5)
True
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from admmcompress.executors import blocksparse_cpp
from admmcompress.executors.base import Executor, register_executor, reject_unknown
from admmcompress.executors.blockmatrix import BlockSparseMatrix, stored_dtype
from admmcompress.executors.blocksparse_choice import (
    MeasuredChoice,
    Table,
    batch_axis,
    check_batches,
    choice_report,
    choose_layer,
    recorded_shapes,
    weight_dtype,
)
from admmcompress.executors.blocksparse_layers import BlockSparseConv2d, BlockSparseLinear, conv_blockers
from admmcompress.executors.blocksparse_rnn import KERNELS, BlockSparseCell, BlockSparseGRU, BlockSparseLSTM
from admmcompress.module_swap import replace_module
from admmcompress.plan import Plan, Target
from admmcompress.structures.block import Block
from admmcompress.structures.groups import gemm_params

SUPPORTED = (nn.Linear, nn.Conv2d, nn.GRU, nn.LSTM, nn.GRUCell, nn.LSTMCell)


def block_rows_from(targets: Plan | list[Target], model: nn.Module | None = None) -> dict[str, int]:
    """``{layer: r}`` from the plan's ``Block``/``BlockRow`` targets (the executor's row block size)."""
    if isinstance(targets, Plan):
        if model is None:
            raise ValueError("block_rows_from(plan): pass the model too, or the resolved targets")
        targets = targets.resolve(model)
    return {t.layer: t.structure.block[0] for t in targets if isinstance(t.structure, Block)}


def weight_readers(model: nn.Module) -> dict[str, str]:
    """``{layer: owner type}`` for the Linears of ``model`` whose owner reads their ``weight`` itself rather than
    calling them: every ``nn.MultiheadAttention``'s ``out_proj`` (``F.multi_head_attention_forward``) and the
    ``linear1``/``linear2`` of an ``nn.TransformerEncoderLayer`` with ``batch_first=True`` (its eval-mode fast
    path). A block-sparse replacement has no ``weight``: the owner's forward would fail."""
    readers: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            subs = [sub for sub, _ in module.named_modules() if sub]
        elif isinstance(module, nn.TransformerEncoderLayer) and module.self_attn.batch_first:
            subs = ["linear1", "linear2"]  # torch's fast path (layer and encoder stack) needs batch_first=True
        else:
            continue
        for sub in subs:
            readers[f"{name}.{sub}" if name else sub] = type(module).__name__
    return readers


def sparsity_of(module: nn.Module) -> float:
    """Fraction of zeros over the module's GEMM weight matrices."""
    weights = [getattr(module, p) for p in gemm_params(module)]
    total = sum(w.numel() for w in weights)
    return 1.0 - sum(int(torch.count_nonzero(w)) for w in weights) / total if total else 0.0


def convert_module(module: nn.Module, block_rows: int = 16, name: str = "layer", **kwargs) -> nn.Module:
    """The block-sparse replacement of one supported module (its weights are copied, not shared).

    ``kernel`` ("torch" or "cpp") applies to GRU/LSTM sequences only; ``min_sparsity`` to their
    matrices (one that is denser stays dense).
    """
    kernel = kwargs.get("kernel", "torch")
    if kernel not in KERNELS:  # checked for every layer type, though only GRU/LSTM sequences use it
        raise ValueError(f"layer '{name}': kernel={kernel!r}; choose one of {KERNELS}")
    if isinstance(block_rows, bool):  # True would pass as r = 1
        raise ValueError(f"layer '{name}': block_rows={block_rows!r} must be a positive integer, e.g. 16")
    if not isinstance(module, (nn.GRU, nn.LSTM)):
        kwargs.pop("kernel", None)
    if isinstance(module, nn.Linear):
        kwargs.pop("min_sparsity", None)
        return BlockSparseLinear.from_dense(module, block_rows, **kwargs)
    if isinstance(module, nn.Conv2d):
        kwargs.pop("min_sparsity", None)
        return BlockSparseConv2d.from_dense(module, block_rows, name=name, **kwargs)
    if isinstance(module, nn.GRU):
        return BlockSparseGRU.from_dense(module, block_rows, name=name, **kwargs)
    if isinstance(module, nn.LSTM):
        return BlockSparseLSTM.from_dense(module, block_rows, name=name, **kwargs)
    if isinstance(module, (nn.GRUCell, nn.LSTMCell)):
        return BlockSparseCell.from_dense(module, block_rows, **kwargs)
    supported = ", ".join(t.__name__ for t in SUPPORTED)
    raise ValueError(
        f"layer '{name}' is {type(module).__name__}; the block-sparse executor supports {supported}"
    )


@torch.no_grad()
def to_blocksparse(
    model: nn.Module,
    block_rows: int | Mapping[str, int] = 16,
    layers: Iterable[str] | None = None,
    min_sparsity: float = 0.5,
    impl: str = "gather",
    buckets: int = 1,
    kernel: str = "torch",
    choose: str = "fixed",
    batches: Sequence[int] = (1,),
    example: Any = None,
    table: Table | None = None,
    rounds: int = 9,
    steps: int = 16,
    values_dtype: torch.dtype | str | None = None,
) -> list[str]:
    """Replace sparse layers of ``model`` in place with block-sparse executors; returns their names.

    Args:
        block_rows: rows per row block, one for all or ``{layer: r}`` (see ``block_rows_from``);
            layers missing from the mapping use 16.
        layers: names to convert (each must be a supported type); default: every supported layer
            whose weights are at least ``min_sparsity`` zero (grouped/depthwise convs, ``proj_size`` LSTMs and
            the Linears whose weight attention reads directly, see :func:`weight_readers`, stay dense).
        min_sparsity: below it a layer (or, in a GRU/LSTM, one matrix) stays dense: packing pays
            off only when most columns of a row block are gone.
        impl, buckets: see :class:`~admmcompress.executors.blockmatrix.BlockSparseMatrix`.
        kernel: ``"cpp"`` runs GRU/LSTM sequences in the compiled kernel (``blocksparse_cpp``; built on
            first use, about a minute; falls back to ``"torch"`` with a warning where it cannot be built).
        choose: ``"fixed"`` (every converted layer uses ``impl``/``kernel``) or ``"measured"`` (``impl`` and
            ``kernel`` unused): each layer becomes the fastest of dense, the torch path (``impl="gather"``,
            ``buckets``), the compiled kernel (where it builds) and torch BSR (where ``r`` tiles the weight)
            at each of ``batches`` (a :class:`~admmcompress.executors.blocksparse_choice.MeasuredChoice`
            where that differs between batches), timed ``rounds`` times interleaved and cached per machine
            in ``table`` (default: the ``LatencyCache`` "blocksparse-choice"). ``example`` (a model input,
            or a tuple of them) gives each layer's input shape; without it Linear/cells are timed on
            ``(batch, in)`` and GRU/LSTM on ``steps`` steps (convolutions need it). ``choice_report(model)``
            says how often dense won.
        values_dtype: ``torch.float16`` stores the kept weights of every packed matrix in half precision (half
            their bytes; products stay float32, see :class:`~admmcompress.executors.blockmatrix.BlockSparseMatrix`);
            matrices that stay dense (below ``min_sparsity``) keep float32. Not with ``choose="measured"``, which
            times float32 layers.

    >>> from admmcompress.structures import Block
    >>> model = nn.Sequential(nn.Linear(64, 32)).eval()
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(Block(compression=8, block=(8, 8)).project(model[0].weight))
    >>> to_blocksparse(model, block_rows=8, values_dtype=torch.float16)
    ['0']
    >>> model[0].matrix.values_dtype, model(torch.randn(2, 64)).dtype
    (torch.float16, torch.float32)
    """
    if choose not in ("fixed", "measured"):
        raise ValueError(f"to_blocksparse: choose={choose!r}; choose 'fixed' or 'measured'")
    if kernel not in KERNELS:  # else unseen on a model without GRU/LSTM layers
        raise ValueError(f"to_blocksparse: kernel={kernel!r}; choose one of {KERNELS}")
    halves = values_dtype is not None and stored_dtype(values_dtype, torch.float32) is not torch.float32
    if choose == "measured" and halves:
        raise ValueError(
            "to_blocksparse: choose='measured' times float32 layers and cannot store float16 weights; use "
            "choose='fixed' with values_dtype, or leave values_dtype unset"
        )
    modules = dict(model.named_modules())
    readers = weight_readers(model)
    if layers is None:
        # Depthwise/grouped or reflect-padded convs, proj_size LSTMs and the Linears whose weight attention reads
        # directly have no block-sparse form: by default they stay dense.
        chosen = [
            n for n, m in modules.items()
            if isinstance(m, SUPPORTED) and n not in readers and not getattr(m, "proj_size", 0)
            and sparsity_of(m) >= min_sparsity
            and not (isinstance(m, nn.Conv2d) and conv_blockers(m)[0])
        ]
    else:
        if isinstance(layers, str):  # "fc" would be the layers 'f' and 'c'
            raise ValueError(f"to_blocksparse: layers={layers!r} is one name; give a list, e.g. layers=[{layers!r}]")
        chosen = list(dict.fromkeys(layers))
        unknown = [n for n in chosen if n not in modules]
        if unknown:
            raise ValueError(f"to_blocksparse: the model has no layer(s) {unknown}; check the names")
        wrong = {n: type(modules[n]).__name__ for n in chosen if not isinstance(modules[n], SUPPORTED)}
        if wrong:
            supported = ", ".join(t.__name__ for t in SUPPORTED)
            raise ValueError(f"to_blocksparse: {wrong} cannot be converted; supported types are {supported}")
        read = {n: readers[n] for n in chosen if n in readers}
        if read:
            raise ValueError(
                f"to_blocksparse: {read} are Linears whose owner reads their weight directly instead of calling "
                "them, which a block-sparse layer would break; leave them dense (pass layers=... without them)"
            )
    if "" in chosen:
        raise ValueError(
            "to_blocksparse: the model itself is a single layer; wrap it, e.g. nn.Sequential(layer)"
        )
    if isinstance(block_rows, Mapping):  # a typo would silently take r = 16 for the layer meant (layers that stay
        stray = sorted(str(n) for n in block_rows if n not in modules)  # dense may be named: block_rows_from(plan)
        if stray:
            raise ValueError(f"to_blocksparse: block_rows names {stray}, which the model does not have; check the "
                             f"names (its layers converted here: {chosen[:6]})")
    shapes: dict[str, tuple[int, ...]] = {}
    if choose == "measured":
        check_batches(batches)
        shapes = recorded_shapes(model, example, chosen) if example is not None else {}
    # Every replacement is built before any is swapped in: a layer refused halfway (a float16 request on a float64
    # weight, say) must leave the model as it was, not half converted.
    replacements: dict[str, nn.Module] = {}
    for name in chosen:
        rows = block_rows.get(name, 16) if isinstance(block_rows, Mapping) else block_rows
        if choose == "measured":
            impls = candidates(modules[name], rows, name, buckets, min_sparsity)
            key = layer_key(modules[name], impls["torch"], rows, shapes.get(name), steps)
            replacements[name] = choose_layer(name, impls, key, batches, shapes.get(name), table, rounds, steps)
            continue
        try:
            replacements[name] = convert_module(
                modules[name],
                rows,
                name=name,
                impl=impl,
                buckets=buckets,
                min_sparsity=min_sparsity,
                kernel=kernel,
                **({} if values_dtype is None else {"values_dtype": values_dtype}),
            )
        except ValueError as err:
            text = str(err)
            raise ValueError(text if f"'{name}'" in text else f"layer '{name}': {text}") from None
    for name, new in replacements.items():
        replace_module(model, name, new)
    return chosen


def candidates(
    module: nn.Module, block_rows: int, name: str, buckets: int = 1, min_sparsity: float = 0.5
) -> dict[str, nn.Module]:
    """Every implementation of ``module`` that runs here: ``{"dense", "torch", "cpp", "bsr"}`` (fewer when
    the compiled kernel cannot be built or ``block_rows`` does not tile the weight into square blocks)."""
    impls: dict[str, nn.Module] = {"dense": module}
    common = {"name": name, "min_sparsity": min_sparsity}
    impls["torch"] = convert_module(module, block_rows, impl="gather", buckets=buckets, kernel="torch", **common)
    if blocksparse_cpp.available():
        impls["cpp"] = convert_module(module, block_rows, impl="cpp", kernel="cpp", **common)
    try:
        impls["bsr"] = convert_module(module, block_rows, impl="bsr", kernel="torch", **common)
    except ValueError:  # r does not tile the weight into square blocks (MKL's BSR takes no others)
        pass
    return {impl: m.eval() for impl, m in impls.items()}


def layer_key(
    module: nn.Module, packed: nn.Module, block_rows: int, shape: Sequence[int] | None, steps: int
) -> str:
    """What a latency of ``module`` depends on besides batch and threads: settings, input (and its dtype where not
    float32), pattern size, and the compiled kernel's version and build target (a table measured with an older
    kernel or another target's build is measured again, not trusted)."""
    matrices = [m for m in packed.modules() if isinstance(m, BlockSparseMatrix)]
    stored = sum(m.stored_values for m in matrices)
    nonzeros = sum(m.nonzeros for m in matrices)
    if shape is None:
        where = f"default, {steps} steps" if isinstance(module, nn.RNNBase) else "default"
    else:
        batch_dim, batched_ndim = batch_axis(module)
        where = str([s for i, s in enumerate(shape) if len(shape) < batched_ndim or i != batch_dim])
    dtype = weight_dtype(module)
    # float32 keys carry no dtype, as before dtypes were timed, so the tables measured then stay valid
    typed = "" if dtype == torch.float32 else f"|dtype={str(dtype).removeprefix('torch.')}"
    return (
        f"{type(module).__name__}({module.extra_repr()})|x={where}{typed}|r={block_rows}|stored={stored}"
        f"|nnz={nonzeros}|kernel=v{blocksparse_cpp.VERSION}-{blocksparse_cpp.DEFAULT_MARCH}"
    )


_OPTIONS = (
    "block_rows", "layers", "min_sparsity", "impl", "buckets", "kernel", "choose", "batches", "table", "rounds",
    "steps", "values_dtype",
)


@register_executor("blocksparse")
class BlocksparseExecutor(Executor):
    """Block-sparse CPU layers (Linear, Conv2d, GRU, LSTM and their cells) for block-pruned weights."""

    summary = "block-sparse CPU layers for block-pruned weights"
    hints = {
        "save": "save the masked model's state dict; convert after loading it",
        "load": "load the masked model, then convert it",
        "export": "load the run's model, then convert it",
    }

    def convert(self, model: nn.Module, masks: Any = None, example: Any = None, **options: Any) -> nn.Module:
        """A copy of ``model`` (``masks`` applied) with its sparse layers block-sparse; options as
        ``to_blocksparse`` (``block_rows``, ``layers``, ``min_sparsity``, ``impl``, ``buckets``, ``kernel``,
        ``choose``, ``batches``, ``table``, ``rounds``, ``steps``, ``values_dtype``). ``example`` (a model input)
        is used by ``choose="measured"`` only, for the layers' input shapes."""
        reject_unknown("blocksparse", "convert", options, _OPTIONS)
        work = copy.deepcopy(model)
        if masks is not None:
            masks.apply(work)
        to_blocksparse(work, example=example if options.get("choose") == "measured" else None, **options)
        return work


__all__ = [
    "SUPPORTED",
    "BlockSparseCell",
    "BlockSparseConv2d",
    "BlockSparseGRU",
    "BlockSparseLSTM",
    "BlockSparseLinear",
    "BlockSparseMatrix",
    "BlocksparseExecutor",
    "MeasuredChoice",
    "block_rows_from",
    "candidates",
    "choice_report",
    "convert_module",
    "layer_key",
    "sparsity_of",
    "to_blocksparse",
    "weight_readers",
]
