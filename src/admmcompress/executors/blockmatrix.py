"""A block-sparse weight matrix for CPU inference: per row block, a dense GEMM on gathered inputs.

The matrix ``W (O, I)`` is cut into row blocks of ``r`` rows. Block pruning (``structures.Block``)
leaves all rows of a row block with one shared set of nonzero columns, so a row block is stored
as the list of its kept columns and a small dense ``(K, r)`` matrix. The product ``x @ W.T`` is
then one gather of ``x``'s columns and one batched matmul over the row blocks (``torch.bmm``),
with every row block padded to the same ``K`` (zeros, index 0). ``buckets > 1`` sorts the row
blocks by their column count and pads each bucket to its own ``K`` instead, which wastes less
when the counts differ (global top-k pruning).

Any mask packs exactly: a row block keeps the union of its rows' columns, storing explicit
zeros where rows differ, so outputs always equal the dense product (to float rounding). Speed
comes only when row blocks share columns. The gather + ``bmm`` implementation was chosen by
measurement against torch CSR (``W_csr @ x.T``) and dense ``F.linear`` on this project's CPU:
see ``benchmarks/blocksparse_kernels.py`` and RESULTS.md; ``impl="csr"``/``"bsr"``/``"dense"`` keep the
others selectable, and ``to_blocksparse(choose="measured")`` picks among them per machine and batch
(``benchmarks/blocksparse_grid.py``).

>>> w = torch.zeros(4, 6)
>>> w[:2, [1, 4]] = 1.0; w[2:, [0]] = 2.0
>>> m = BlockSparseMatrix(w, block_rows=2)
>>> m.index0.tolist(), m.stored_columns    # block 2 keeps column 0, padded to 2 columns
([1, 4, 0, 0], 4)
>>> torch.equal(m(torch.ones(1, 6)), torch.ones(1, 6) @ w.T)
True
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from admmcompress.executors import blocksparse_cpp  # importing it compiles nothing: load() does, once

IMPLS = ("gather", "cpp", "csr", "dense", "bsr")
# From this many input rows the gather path puts the batch last in its matmuls: measured here (2026-12,
# 3072x768 at 10x, 1 thread) 1.4-2x faster at 16-64 rows, slower at 8 and below.
ROWS_LAST_FROM = 16


TRAIN_MODE_WARNING = (
    "block-sparse layers run inference only: their weights are buffers and get no gradients; call model.eval() "
    "after converting, and to fine-tune, train the masked dense model (masks.attach) and convert it again"
)


class InferenceOnly(nn.Module):
    """Base of the block-sparse modules: switching one to train mode (``model.train()``, or converting a model
    that is in train mode) warns that it cannot learn, instead of a later ``backward()`` failing with torch's
    "element 0 of tensors does not require grad". A check here, not in ``forward``: free at call time."""

    def train(self, mode: bool = True) -> InferenceOnly:
        if mode:
            warnings.warn(TRAIN_MODE_WARNING, UserWarning, stacklevel=2)
        return super().train(mode)

    def __prepare_scriptable__(self) -> InferenceOnly:
        # torch.jit.script calls this on every submodule first: one line instead of the script compiler's
        # error deep inside the kernel loader (the forward picks its implementation in Python, per call)
        raise TypeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script (it chooses its kernel in Python per "
            "call); use torch.jit.trace(model, example), which records its torch path"
        )


class BlockSparseMatrix(InferenceOnly):
    """``x -> x @ W.T (+ b)`` for a weight with shared column patterns per row block (inference only).

    Args:
        weight: the dense (masked) ``(O, I)`` matrix; packed, not kept (except ``impl="dense"``).
        block_rows: rows per row block ``r`` (use the ``Block`` structure's ``r``); the last may be ragged.
        impl: ``"gather"`` (gather + batched dense matmul), ``"cpp"`` (the same packing, multiplied by the
            optional compiled kernel of ``blocksparse_cpp``; ``"gather"`` where it cannot be built),
            ``"csr"`` (torch sparse CSR), ``"bsr"`` (torch sparse BSR with square ``r x r`` blocks: whole empty
            blocks are skipped; needs ``r`` to divide both dimensions) or ``"dense"``.
        buckets: groups of row blocks padded separately (``"gather"`` only), sorted by column count.
        bias: optional ``(O,)`` bias, added inside the batched matmul (``baddbmm``).
        values_dtype: what the kept weights are stored in: the weight's dtype (default), or ``torch.float16``
            (also ``"float16"``) for a float32 weight with ``impl="gather"``/``"cpp"``: half the bytes to store
            and for a product to read, while inputs, bias and products stay float32 (the weights are widened as
            they are read). Outputs then equal the masked layer with its weights rounded to float16 (about 2e-4
            of the largest output away from the float32 layer's, measured at 10x), not the float32 layer.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        block_rows: int = 16,
        impl: str = "gather",
        buckets: int = 1,
        bias: torch.Tensor | None = None,
        values_dtype: torch.dtype | str | None = None,
    ):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"BlockSparseMatrix: weight must be 2-D (O, I), got shape {tuple(weight.shape)}")
        if impl not in IMPLS:
            raise ValueError(f"BlockSparseMatrix: impl={impl!r}; choose one of {IMPLS}")
        if not isinstance(block_rows, int) or block_rows < 1:
            raise ValueError(
                f"BlockSparseMatrix: block_rows={block_rows!r} must be a positive integer, e.g. 16"
            )
        if not isinstance(buckets, int) or buckets < 1:
            raise ValueError(f"BlockSparseMatrix: buckets={buckets!r} must be a positive integer")
        weight = weight.detach()
        stored_as = stored_dtype(values_dtype, weight.dtype, impl)
        # float16 storage of a float32 layer: it takes float32 inputs only (float16 ones would silently compute in
        # float16); a model turned to float16 as a whole (.half()) takes float16 inputs as before
        self.half_storage = stored_as is not weight.dtype
        self.out_features, self.in_features = weight.shape
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"BlockSparseMatrix: bias shape {tuple(bias.shape)} != ({self.out_features},)")
        self.block_rows, self.impl = block_rows, impl
        self.nonzeros = int(torch.count_nonzero(weight))
        self.n_buckets = 0
        bias = None if bias is None else bias.detach().clone()
        if impl == "dense":
            self.register_buffer("weight", weight.clone())
            self.register_buffer("bias", bias)
            self.stored_columns = self.in_features * ((self.out_features + block_rows - 1) // block_rows)
            return
        if impl == "csr":
            with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and measured
                warnings.simplefilter("ignore", UserWarning)
                self._keep_sparse(weight.to_sparse_csr())
            self.register_buffer("bias", bias)
            self.stored_columns = 0
            return
        if impl == "bsr":
            if self.out_features % block_rows or self.in_features % block_rows:
                raise ValueError(
                    f"BlockSparseMatrix: impl='bsr' needs square {block_rows}x{block_rows} blocks tiling the "
                    f"{self.out_features}x{self.in_features} weight; use impl='gather'"
                )
            with warnings.catch_warnings():  # "sparse BSR support is in beta": known, and measured
                warnings.simplefilter("ignore", UserWarning)
                self._keep_sparse(weight.to_sparse_bsr((block_rows, block_rows)))  # MKL: square blocks only
            self.register_buffer("bias", bias)
            self.stored_columns = 0
            return
        if impl == "cpp":
            self.impl = impl if blocksparse_cpp.available() and weight.dtype == torch.float32 else "gather"
            buckets = 1  # the kernel reads one packed bucket
        # Normal tensors even when converted under torch.inference_mode: inference tensors have no version
        # counter, and the compiled kernel's cached arguments (blocksparse_cpp.packed) would then be rebuilt per call.
        with torch.inference_mode(False), torch.no_grad():
            self._pack(weight, buckets, bias, stored_as)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # The kernel's cached arguments derive from the buffers loaded here: dropped, not trusted to version
        # counters (inference tensors, loaded in place under torch.inference_mode, have none).
        self.__dict__.pop("_kernel_args", None)
        super()._load_from_state_dict(*args, **kwargs)

    def _keep_sparse(self, sparse: torch.Tensor) -> None:
        """Keep a CSR/BSR weight as three dense buffers (row pointers, column indices, values), so that it is in
        the state dict and follows ``load_state_dict``, ``deepcopy`` and ``.to()``; the sparse tensor is a view
        of them, made per product (:meth:`sparse_weight`)."""
        self.register_buffer("crow_indices", sparse.crow_indices().clone())
        self.register_buffer("col_indices", sparse.col_indices().clone())
        self.register_buffer("sparse_values", sparse.values().clone())

    def sparse_weight(self) -> torch.Tensor:
        """The CSR (``impl="csr"``) or BSR (``"bsr"``) weight, built over the saved buffers without copying them."""
        buffers, size = self._buffers, (self.out_features, self.in_features)
        make = torch.sparse_csr_tensor if self.impl == "csr" else torch.sparse_bsr_tensor
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return make(buffers["crow_indices"], buffers["col_indices"], buffers["sparse_values"], size,
                        check_invariants=False)

    def _pack(self, weight: torch.Tensor, buckets: int, bias: torch.Tensor | None, stored_as: torch.dtype) -> None:
        rows, cols, r = self.out_features, self.in_features, self.block_rows
        n_blocks = (rows + r - 1) // r
        padded = torch.zeros(n_blocks * r, cols + 1, dtype=weight.dtype, device=weight.device)
        padded[:rows, :cols] = weight
        if bias is not None:
            padded[:rows, cols] = bias
        blocks = padded.view(n_blocks, r, cols + 1)
        keep = (blocks[:, :, :cols] != 0).any(1)  # (n_blocks, I): the columns each row block needs
        counts = keep.sum(1)
        # Row blocks sorted by column count (descending; ties by index) so buckets pad little.
        order = torch.argsort(counts, descending=True, stable=True)
        chunks = [c for c in torch.tensor_split(order, min(buckets, n_blocks)) if c.numel()]
        self.n_buckets = len(chunks)
        for b, chunk in enumerate(chunks):
            chunk = chunk if self.n_buckets > 1 else torch.arange(n_blocks, device=weight.device)
            k = max(1, int(counts[chunk].max()))
            # Kept columns first, in ascending order (stable sort of "not kept").
            cols_sorted = torch.argsort((~keep[chunk]).to(torch.int8), dim=1, stable=True)[:, :k]
            valid = torch.arange(k, device=weight.device).view(1, k) < counts[chunk].view(-1, 1)
            index = torch.where(valid, cols_sorted, torch.zeros_like(cols_sorted))
            values = blocks[chunk].gather(2, index.unsqueeze(1).expand(-1, r, k)) * valid.unsqueeze(1)
            if stored_as is not values.dtype:
                _check_representable(values, stored_as)
            self.register_buffer(f"index{b}", index.reshape(-1).contiguous())
            self.register_buffer(f"values{b}", values.transpose(1, 2).to(stored_as).contiguous())  # (blocks, K, r)
            block_bias = None if bias is None else blocks[chunk][:, :, cols].unsqueeze(1).contiguous()
            self.register_buffer(f"bias{b}", block_bias)  # (blocks, 1, r)
        self.register_buffer("unpermute", torch.argsort(torch.cat(chunks)) if self.n_buckets > 1 else None)
        self.stored_columns = sum(int(getattr(self, f"index{b}").numel()) for b in range(self.n_buckets))

    def __getstate__(self) -> dict:
        """Pickled without the compiled kernel's arguments (derived copies, rebuilt on the first call)."""
        state = super().__getstate__()
        state.pop("_kernel_args", None)
        return state

    @property
    def counts0(self) -> torch.Tensor | None:
        """Each row block's kept columns, what the compiled kernel reads (one bucket only; else ``None``).

        Derived from the saved buffers through the kernel's cached arguments, so it follows
        ``load_state_dict`` and in-place writes and is never saved.
        """
        return blocksparse_cpp.packed(self)[3] if self.n_buckets == 1 else None

    @property
    def stored_values(self) -> int:
        """Weights stored, padding and in-block zeros included (what a product reads)."""
        if self.impl == "bsr":
            return int(self._buffers["sparse_values"].numel())
        return self.stored_columns * self.block_rows if self.impl != "csr" else self.nonzeros

    def macs(self, batch: int = 1) -> int:
        """Multiply-adds of one product on ``batch`` rows (padding included)."""
        return batch * self.stored_values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (N, I) -> x @ W.T + b (N, O)``."""
        buffers = self._buffers  # direct lookups: this runs once per RNN step, where overhead counts
        if x.shape[-1] != self.in_features:  # the gather and the kernel read columns by index: a wider x would pass
            raise ValueError(self._width_error(x.shape[-1]))
        if self.impl == "dense":
            return F.linear(x, buffers["weight"], buffers["bias"])
        if self.impl in ("csr", "bsr"):
            if self.impl == "bsr" and x.requires_grad and _grad_enabled():
                # torch has no backward of a BSR product to its dense operand ("addmm ... Strided + SparseBsc"):
                # as the compiled kernel hands gradients to the gather path, the dense product of the same
                # weights computes this one
                return F.linear(x, self.sparse_weight().to_dense(), buffers["bias"])
            y = (self.sparse_weight() @ x.t()).t()
            return y if buffers["bias"] is None else y + buffers["bias"]
        if self.impl == "cpp" and self._kernel_takes(x):
            ext = blocksparse_cpp.load()
            if ext is not None:  # None: loaded on a machine without a compiler; the packing runs in torch
                return ext.bsmm(x, *blocksparse_cpp.packed(self), self.out_features)
        n = x.shape[0]
        stored = buffers["values0"].dtype
        widen = stored is _F16 and x.dtype is _F32
        if x.dtype != stored and not widen:
            raise TypeError(
                f"block-sparse matrix {self.out_features}x{self.in_features}: input is {x.dtype}, its weights are "
                f"{stored}; convert one to the other (e.g. x.float(), or the model with .double())"
            )
        if stored is _F16 and not widen and self.__dict__.get("half_storage"):
            raise TypeError(
                f"block-sparse matrix {self.out_features}x{self.in_features}: input is {x.dtype}; its weights are "
                "stored in float16 (values_dtype) for float32 inputs and products: pass x.float()"
            )
        if n == 0:  # view(0, blocks, -1) below cannot infer its last size
            return x.new_zeros(0, self.out_features)
        if n >= ROWS_LAST_FROM:
            return self._rows_last(x)
        outs = []
        for b in range(self.n_buckets):
            values, bias = _like(buffers[f"values{b}"], x), _like(buffers[f"bias{b}"], x)
            # (blocks, N, K) @ (blocks, K, r) -> (blocks, N, r); at N = 1 no transpose is needed, and the
            # gather is a 1-D index_select (a quarter faster than along dim 1 of a (1, I) tensor here)
            if n == 1:
                gathered = x.reshape(-1).index_select(0, buffers[f"index{b}"]).view(values.shape[0], 1, -1)
            else:
                gathered = x.index_select(1, buffers[f"index{b}"]).view(n, values.shape[0], -1).transpose(0, 1)
            outs.append(
                torch.bmm(gathered, values) if bias is None else torch.baddbmm(bias, gathered, values)
            )
        y = outs[0] if self.n_buckets == 1 else torch.cat(outs, 0).index_select(0, buffers["unpermute"])
        y = y.view(1, -1) if n == 1 else y.transpose(0, 1).reshape(n, -1)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]

    def forward_transposed(self, xt: torch.Tensor) -> torch.Tensor:
        """``xt (I, N) -> xt.T @ W.T + b (N, O)``: the product from inputs stored column by column (an im2col
        matrix), without transposing them first where the implementation reads them that way."""
        if self.impl == "cpp" and self._kernel_takes(xt):
            ext = blocksparse_cpp.load()
            if ext is not None:
                if xt.shape[0] != self.in_features:
                    raise ValueError(self._width_error(xt.shape[0]))
                return ext.bsmm_t(xt, *blocksparse_cpp.packed(self), self.out_features)
        return self.forward(xt.t())  # the gather path's batch-last layout transposes it back for free

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        """Whether the compiled kernel can run this product (:func:`kernel_may_take`, float32 or float16 weights and
        a float32 bias); else the gather path runs it, which gives the same result."""
        buffers = self._buffers
        bias = buffers["bias0"]
        return (
            buffers["values0"].dtype in _KERNEL_DTYPES and (bias is None or bias.dtype is _F32) and kernel_may_take(x)
        )

    def _width_error(self, width: int) -> str:
        return (
            f"block-sparse matrix {self.out_features}x{self.in_features}: input has {width} features, expected "
            f"{self.in_features}; pass inputs of the layer's in_features"
        )

    def _rows_last(self, x: torch.Tensor) -> torch.Tensor:
        """The gather product with the batch as the matmuls' last dimension: ``(blocks, r, K) @ (blocks, K, N)``
        on the gathered rows of ``x.T``; no transposed copy of the gathered inputs for ``bmm`` to walk."""
        buffers, n = self._buffers, x.shape[0]
        xt = x.t().contiguous()
        outs = []
        for b in range(self.n_buckets):
            values, bias = _like(buffers[f"values{b}"], x), _like(buffers[f"bias{b}"], x)
            gathered = xt.index_select(0, buffers[f"index{b}"]).view(values.shape[0], values.shape[1], n)
            weights = values.transpose(1, 2)  # (blocks, r, K), a view
            outs.append(
                torch.bmm(weights, gathered) if bias is None else torch.baddbmm(bias.transpose(1, 2), weights, gathered)
            )
        y = outs[0] if self.n_buckets == 1 else torch.cat(outs, 0).index_select(0, buffers["unpermute"])
        return y.reshape(-1, n)[: self.out_features].t().contiguous()

    @property
    def values_dtype(self) -> torch.dtype:
        """The dtype the kept weights are stored in (``torch.float16``: widened to float32 per product)."""
        values = self._buffers.get("values0")
        if values is None:
            values = self._buffers.get("weight", self._buffers.get("sparse_values"))
        return values.dtype

    def extra_repr(self) -> str:
        stored = "" if self.values_dtype is not _F16 else ", values_dtype=float16"
        return (
            f"{self.out_features}x{self.in_features}, block_rows={self.block_rows}, impl={self.impl}, "
            f"nonzeros={self.nonzeros}, stored={self.stored_values}{stored}"
        )


# torch.is_grad_enabled and torch.jit.is_tracing without their Python wrappers (what they call)
_grad_enabled, _tracing_state, _F32 = torch._C.is_grad_enabled, torch._C._get_tracing_state, torch.float32
_F16 = torch.float16
_KERNEL_DTYPES = (_F32, _F16)
VALUES_DTYPES = ("float16",)  # storage other than the weight's own dtype


def stored_dtype(
    values_dtype: torch.dtype | str | None, weight_dtype: torch.dtype, impl: str = "gather"
) -> torch.dtype:
    """The dtype the kept weights are stored in, checked: the weight's own, or float16 for a float32 packed one.

    >>> stored_dtype("float16", torch.float32), stored_dtype(None, torch.float64)
    (torch.float16, torch.float64)
    """
    if values_dtype is None:
        return weight_dtype
    named = values_dtype.removeprefix("torch.") if isinstance(values_dtype, str) else None
    dtype = getattr(torch, named, None) if named in VALUES_DTYPES + ("float32",) else values_dtype
    if dtype == weight_dtype:
        return weight_dtype
    if dtype is not _F16:
        raise ValueError(
            f"BlockSparseMatrix: values_dtype={values_dtype!r}; choose torch.float16 (half the weight bytes) or "
            f"leave it unset (the weight's {str(weight_dtype).removeprefix('torch.')})"
        )
    if weight_dtype is not _F32:
        raise ValueError(
            f"BlockSparseMatrix: values_dtype=float16 stores a float32 weight in half precision; this weight is "
            f"{str(weight_dtype).removeprefix('torch.')}: pass a float32 one, or leave values_dtype unset"
        )
    if impl not in ("gather", "cpp"):
        raise ValueError(
            f"BlockSparseMatrix: values_dtype=float16 applies to impl='gather' or 'cpp', not {impl!r}; use one of "
            "those, or leave values_dtype unset"
        )
    return _F16


# float16's largest finite value, and its smallest positive one (subnormal)
_F16_MAX, _F16_TINY = 65504.0, 2.0**-24
_LOST_SHARE = 0.01  # of the nonzeros: warned above this


def _check_representable(values: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse weights that float16 would turn into infinities; warn about nonzeros it would turn into zeros."""
    largest = float(values.abs().max()) if values.numel() else 0.0
    if largest > _F16_MAX:
        raise ValueError(
            f"BlockSparseMatrix: values_dtype=float16 cannot hold this weight (its largest |w| is {largest:.4g}, "
            f"float16 stops at {_F16_MAX:g}); leave values_dtype unset for this layer"
        )
    # A few weights of a trained or random layer fall below float16's smallest by chance and change nothing; many
    # mean a badly scaled layer
    nonzero = values != 0
    lost = int((nonzero & (values.abs() < _F16_TINY / 2)).sum())
    if lost > _LOST_SHARE * int(nonzero.sum()):
        warnings.warn(
            f"BlockSparseMatrix: {lost} nonzero weight(s) below float16's smallest ({_F16_TINY:.2g}) are stored as "
            "zero with values_dtype=float16; leave values_dtype unset for this layer to keep them",
            RuntimeWarning,
            stacklevel=4,
        )


def _like(tensor: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``tensor`` in ``x``'s dtype (float16 weights widened for a float32 input; else itself, no copy)."""
    return tensor if tensor is None or tensor.dtype is x.dtype else tensor.to(x.dtype)



def kernel_may_take(x: torch.Tensor) -> bool:
    """Whether a call on input ``x`` may run in the compiled kernel rather than in torch ops (same result): not for
    a gradient (the kernel's outputs have none), nor under ``torch.jit.trace`` (which cannot see into it and would
    record an empty tensor), nor for other dtypes than the float32 it reads. Cheapest checks first, torch's C
    functions called directly and no generators: at batch 1 a product takes ~10 us."""
    if x.requires_grad and _grad_enabled():
        return False
    return x.dtype is _F32 and _tracing_state() is None

__all__ = [
    "IMPLS",
    "TRAIN_MODE_WARNING",
    "VALUES_DTYPES",
    "BlockSparseMatrix",
    "InferenceOnly",
    "kernel_may_take",
    "stored_dtype",
]
