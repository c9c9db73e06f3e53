"""Block-sparse GRU/LSTM for inference: the cell's two matmuls run on block-sparse gate matrices.

Per layer and direction, the input matmul ``x @ W_ih.T`` runs once for the whole sequence (the
``T*B`` rows make it a real GEMM even at batch 1); the hidden matmul ``h @ W_hh.T`` runs at every
step; the gate arithmetic is PyTorch's, in PyTorch's gate order (GRU r, z, n; LSTM i, f, g, o):

- GRU: ``r = s(x_r + h_r)``, ``z = s(x_z + h_z)``, ``n = tanh(x_n + r * h_n)``, ``h' = (1 - z) * n + z * h``
- LSTM: ``c' = s(f) * c + s(i) * tanh(g)``, ``h' = s(o) * tanh(c')``

with the biases ``b_ih`` in ``x_*`` and ``b_hh`` in ``h_*``. ``from_dense`` copies every setting of
the original module (layers, bidirectional, batch_first) and gives outputs equal to it (to float
rounding); ``proj_size`` LSTMs and packed sequences are refused with an error naming the fix.

>>> gru = nn.GRU(4, 8, num_layers=2, batch_first=True)
>>> fast = BlockSparseGRU.from_dense(gru, block_rows=4)
>>> x = torch.randn(3, 5, 4)
>>> all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast(x), gru(x)))
True
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from admmcompress.executors import blocksparse_cpp
from admmcompress.executors.blockmatrix import BlockSparseMatrix, InferenceOnly, kernel_may_take

KERNELS = ("torch", "cpp")


def gru_cell(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One GRU step from the input part ``gi`` and hidden part ``gh`` (biases included)."""
    size = h.shape[-1]
    rz = torch.sigmoid(gi[..., : 2 * size] + gh[..., : 2 * size])
    n = torch.tanh(torch.addcmul(gi[..., 2 * size :], rz[..., :size], gh[..., 2 * size :]))
    return torch.lerp(n, h, rz[..., size:])  # (1 - z) * n + z * h


def lstm_cell(
    gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step; returns ``(h', c')``."""
    size = h.shape[-1]
    gates = gi + gh
    s = torch.sigmoid(gates)  # i, f, (g: unused), o
    c = torch.addcmul(s[..., size : 2 * size] * c, s[..., :size], torch.tanh(gates[..., 2 * size : 3 * size]))
    return s[..., 3 * size :] * torch.tanh(c), c


def check_state_kind(owner: str, hx, lstm: bool) -> None:
    """One clear line when a recurrent state is not one tensor (GRU) or a pair ``(h, c)`` of tensors (LSTM)."""
    pair = isinstance(hx, (tuple, list)) and len(hx) == 2 and all(isinstance(t, torch.Tensor) for t in hx)
    if lstm and not pair:
        raise ValueError(f"{owner}: the LSTM state is a pair (h, c) of tensors, got {_kind(hx)}")
    if not lstm and not isinstance(hx, torch.Tensor):
        raise ValueError(f"{owner}: the GRU state is one tensor h, got {_kind(hx)}")


def _kind(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


def _matrix(
    weight: torch.Tensor, bias: torch.Tensor | None, block_rows: int, min_sparsity: float, **kwargs
) -> BlockSparseMatrix:
    """Block-sparse when sparse enough to pay off, else dense (``impl="dense"``, float32: ``values_dtype`` applies to
    packed matrices only, and a dense one widened per recurrent step would cost more than it saves)."""
    sparsity = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
    impl = kwargs.pop("impl", "gather")
    if sparsity < min_sparsity:
        kwargs.pop("values_dtype", None)
    return BlockSparseMatrix(
        weight, block_rows, impl=impl if sparsity >= min_sparsity else "dense", bias=bias, **kwargs
    )


class _BlockSparseRNNBase(InferenceOnly):
    """Shared sequence loop of the GRU/LSTM executors; subclasses give the cell and the state."""

    mode = ""

    def __init__(
        self,
        rnn: nn.RNNBase,
        block_rows: int = 16,
        min_sparsity: float = 0.0,
        name: str = "rnn",
        kernel: str = "torch",
        **kwargs,
    ):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"layer '{name}': kernel={kernel!r}; choose one of {KERNELS}")
        # "cpp": the whole sequence loop in the compiled kernel (blocksparse_cpp), where it can be built.
        self.kernel = kernel if kernel == "torch" or blocksparse_cpp.available() else "torch"
        if getattr(rnn, "proj_size", 0):
            raise ValueError(
                f"layer '{name}' (LSTM): proj_size={rnn.proj_size} is not supported by the block-sparse "
                "executor; leave it dense (pass layers=... without it)"
            )
        self.input_size, self.hidden_size = rnn.input_size, rnn.hidden_size
        self.num_layers, self.batch_first = rnn.num_layers, rnn.batch_first
        self.directions = 2 if rnn.bidirectional else 1
        self.dropout = rnn.dropout
        self.ih, self.hh = (
            nn.ModuleList(),
            nn.ModuleList(),
        )  # one matrix per (layer, direction), biases inside
        for layer in range(self.num_layers):
            for direction in range(self.directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                for kind, matrices in (("ih", self.ih), ("hh", self.hh)):
                    weight = getattr(rnn, f"weight_{kind}{suffix}")
                    bias = getattr(rnn, f"bias_{kind}{suffix}") if rnn.bias else None
                    matrices.append(_matrix(weight, bias, block_rows, min_sparsity, **kwargs))

    @classmethod
    def from_dense(cls, rnn: nn.RNNBase, block_rows: int = 16, **kwargs):
        if rnn.mode != cls.mode:
            raise ValueError(f"{cls.__name__}.from_dense needs an nn.{cls.mode}, got {type(rnn).__name__}")
        return cls(rnn, block_rows, **kwargs)

    # The state: a tensor (GRU) or an (h, c) pair (LSTM).
    def _zeros_state(self, batch: int, like: torch.Tensor):
        raise NotImplementedError

    def _step(self, gi: torch.Tensor, gh: torch.Tensor, state):
        raise NotImplementedError

    def _hidden(self, state) -> torch.Tensor:
        raise NotImplementedError

    def _map(self, fn, state):
        """Apply a tensor function to every tensor of the state."""
        raise NotImplementedError

    def _extension(self, matrix: BlockSparseMatrix, allowed: bool = True) -> ModuleType | None:
        """The compiled kernel when this layer uses it and it runs ``matrix`` (``None``: the torch path,
        e.g. a model saved with ``kernel="cpp"`` and loaded where nothing can be compiled, or a call the kernel
        must not take, ``allowed=False``: see :meth:`forward`)."""
        if self.kernel != "cpp" or not allowed or not blocksparse_cpp.supports(matrix):
            return None
        return blocksparse_cpp.load()

    def _input_product(self, ih: BlockSparseMatrix, x: torch.Tensor, allowed: bool = True) -> torch.Tensor:
        """``x @ W_ih.T + b_ih`` for all steps at once (compiled when the kernel is "cpp")."""
        ext = self._extension(ih, allowed)
        if ext is not None:
            return ext.bsmm(x, *blocksparse_cpp.packed(ih), ih.out_features)
        return ih(x)

    def _compiled(self, ext, x: torch.Tensor, state, ih: BlockSparseMatrix, hh: BlockSparseMatrix, reverse: bool):
        """The whole layer in the compiled kernel, from its inputs x (T, N, I): ``(outputs (T, N, H), final
        state)``. With enough inputs per thread the kernel computes each step's input product inside the sequence
        (kept in cache), else all steps' at once before it."""
        raise NotImplementedError

    def _compiled_hidden(self, ext, gi: torch.Tensor, state, hh: BlockSparseMatrix, reverse: bool):
        """The sequence in the compiled kernel from the input products gi (T, N, gates*H), when only the
        hidden matrix runs compiled."""
        raise NotImplementedError

    def _stack(self, states: list):
        raise NotImplementedError

    def _check_state_kind(self, hx) -> None:
        """An initial state of the layer's kind: one tensor (GRU), or ``(h, c)`` (LSTM; a list is accepted)."""
        check_state_kind(type(self).__name__, hx, self.mode == "LSTM")

    def _direction(
        self, x: torch.Tensor, state, ih: BlockSparseMatrix, hh: BlockSparseMatrix, reverse: bool, allowed: bool
    ):
        """One direction of one layer over x (T, N, I): ``(outputs (T, N, H), final state)``, compiled as far as
        the kernel runs its matrices (and ``allowed``: see :meth:`forward`)."""
        ext = self._extension(hh, allowed)
        if ext is not None and self._extension(ih, allowed) is not None:  # both products and the gates compiled
            return self._compiled(ext, x, state, ih, hh, reverse)
        steps, batch = x.shape[0], x.shape[1]
        # explicit sizes: with batch 0, -1 cannot be inferred
        gi = self._input_product(ih, x.reshape(steps * batch, x.shape[2]), allowed)
        gi = gi.view(steps, batch, ih.out_features)
        if ext is not None:
            return self._compiled_hidden(ext, gi, state, hh, reverse)
        out: list[torch.Tensor] = [x] * steps
        product = hh.forward  # the bound method: no module-call overhead on every step
        for t in range(steps - 1, -1, -1) if reverse else range(steps):
            state = self._step(gi[t], product(self._hidden(state)), state)
            out[t] = self._hidden(state)
        return torch.stack(out), state

    def forward(self, x: torch.Tensor, hx=None):
        if isinstance(x, PackedSequence):
            raise ValueError(
                f"{type(self).__name__}: packed sequences are not supported; pad them (batch of equal length)"
            )
        if x.dim() not in (2, 3):
            raise ValueError(
                f"{type(self).__name__}: input of {x.dim()} dimensions; give (steps, batch, features), batch first"
                " when batch_first=True, or (steps, features)"
            )
        if hx is not None:
            self._check_state_kind(hx)
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(1)
            hx = None if hx is None else self._map(lambda t: t.unsqueeze(1), hx)
        elif self.batch_first:
            x = x.transpose(0, 1)
        batch = x.shape[1]
        if x.shape[2] != self.input_size:  # the compiled kernel reads input columns by index, unchecked
            raise ValueError(
                f"{type(self).__name__}: input has {x.shape[2]} features, expected input_size={self.input_size}"
            )
        if x.shape[0] == 0:  # as nn.GRU / nn.LSTM: nothing to run, and no final state to give
            raise ValueError(f"{type(self).__name__}: the sequence has 0 steps; give at least one")
        states = tuple(hx) if isinstance(hx, (tuple, list)) else (hx,) if hx is not None else ()
        # else the torch path, which gives the same result; a state that needs a gradient keeps the kernel out too
        kernel_ok = kernel_may_take(x) and not (torch.is_grad_enabled() and any(t.requires_grad for t in states))
        if hx is None:
            hx = self._zeros_state(batch, x)
        expected = (self.num_layers * self.directions, batch, self.hidden_size)
        for state in tuple(hx) if isinstance(hx, (tuple, list)) else (hx,):  # LSTM: (h, c) or [h, c]
            if tuple(state.shape) != expected:
                raise ValueError(
                    f"{type(self).__name__}: initial state of shape {tuple(state.shape)}, expected {expected}"
                    " (layers x directions, batch, hidden_size)"
                )
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.directions):
                index = layer * self.directions + direction
                state = self._map(lambda t, i=index: t[i], hx)
                sequence, state = self._direction(
                    x, state, self.ih[index], self.hh[index], bool(direction), kernel_ok
                )
                outputs.append(sequence)
                finals.append(state)
            x = outputs[0] if self.directions == 1 else torch.cat(outputs, 2)
            if self.training and self.dropout and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout)
        hn = self._stack(finals)
        if not batched:
            return x.squeeze(1), self._map(lambda t: t.squeeze(1), hn)
        return (x.transpose(0, 1) if self.batch_first else x), hn


class BlockSparseGRU(_BlockSparseRNNBase):
    """Drop-in for ``nn.GRU`` (inference): ``output, h_n = gru(x, h0)``."""

    mode = "GRU"

    def _zeros_state(self, batch, like):
        return like.new_zeros(self.num_layers * self.directions, batch, self.hidden_size)

    def _step(self, gi, gh, state):
        return gru_cell(gi, gh, state)

    def _hidden(self, state):
        return state

    def _map(self, fn, state):
        return fn(state)

    def _compiled(self, ext, x, state, ih, hh, reverse):
        out, h = ext.gru_layer(x, state, *blocksparse_cpp.packed(ih), *blocksparse_cpp.packed(hh), reverse)
        return out, h

    def _compiled_hidden(self, ext, gi, state, hh, reverse):
        out, h = ext.gru_sequence(gi.contiguous(), state, *blocksparse_cpp.packed(hh), reverse)
        return out, h

    def _stack(self, states):
        return torch.stack(states)


class BlockSparseLSTM(_BlockSparseRNNBase):
    """Drop-in for ``nn.LSTM``, no ``proj_size`` (inference): ``output, (h_n, c_n) = lstm(x, (h0, c0))``."""

    mode = "LSTM"

    def _zeros_state(self, batch, like):
        zeros = like.new_zeros(self.num_layers * self.directions, batch, self.hidden_size)
        return zeros, zeros

    def _step(self, gi, gh, state):
        return lstm_cell(gi, gh, *state)

    def _hidden(self, state):
        return state[0]

    def _map(self, fn, state):
        return fn(state[0]), fn(state[1])

    def _compiled(self, ext, x, state, ih, hh, reverse):
        out, h, c = ext.lstm_layer(
            x, state[0], state[1], *blocksparse_cpp.packed(ih), *blocksparse_cpp.packed(hh), reverse
        )
        return out, (h, c)

    def _compiled_hidden(self, ext, gi, state, hh, reverse):
        out, h, c = ext.lstm_sequence(
            gi.contiguous(), state[0], state[1], *blocksparse_cpp.packed(hh), reverse
        )
        return out, (h, c)

    def _stack(self, states):
        return torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states])


class BlockSparseCell(InferenceOnly):
    """Drop-in for ``nn.GRUCell`` or ``nn.LSTMCell`` (inference): one step on block-sparse matrices."""

    def __init__(self, cell: nn.RNNCellBase, block_rows: int = 16, min_sparsity: float = 0.0, **kwargs):
        super().__init__()
        if not isinstance(cell, (nn.GRUCell, nn.LSTMCell)):
            raise ValueError(
                f"{type(self).__name__} needs an nn.GRUCell or nn.LSTMCell, got {type(cell).__name__}"
            )
        self.lstm = isinstance(cell, nn.LSTMCell)
        self.hidden_size = cell.hidden_size
        biases = (cell.bias_ih, cell.bias_hh) if cell.bias else (None, None)
        self.ih = _matrix(cell.weight_ih, biases[0], block_rows, min_sparsity, **kwargs)
        self.hh = _matrix(cell.weight_hh, biases[1], block_rows, min_sparsity, **kwargs)

    @classmethod
    def from_dense(cls, cell: nn.RNNCellBase, block_rows: int = 16, **kwargs) -> BlockSparseCell:
        return cls(cell, block_rows, **kwargs)

    def forward(self, x: torch.Tensor, hx=None):
        name = type(self).__name__
        if x.dim() not in (1, 2):  # as nn.GRUCell / nn.LSTMCell
            raise ValueError(f"{name}: input of {x.dim()} dimensions; give (batch, features) or (features)")
        batched = x.dim() == 2
        if not batched:
            x = x.unsqueeze(0)
        zeros = x.new_zeros(x.shape[0], self.hidden_size)
        if hx is None:
            hx = (zeros, zeros) if self.lstm else zeros
        else:
            check_state_kind(name, hx, self.lstm)
            if not batched:
                hx = tuple(h.unsqueeze(0) for h in hx) if self.lstm else hx.unsqueeze(0)
            expected = (x.shape[0], self.hidden_size)
            for state in hx if self.lstm else (hx,):  # a state of batch 1 would broadcast silently
                if tuple(state.shape) != expected:
                    raise ValueError(f"{name}: state of shape {tuple(state.shape)}, expected {expected} (batch, "
                                     "hidden_size)")
        h = hx[0] if self.lstm else hx
        gi, gh = self.ih(x), self.hh(h)
        out = lstm_cell(gi, gh, h, hx[1]) if self.lstm else gru_cell(gi, gh, h)
        if not batched:
            return tuple(o.squeeze(0) for o in out) if self.lstm else out.squeeze(0)
        return out


__all__ = [
    "BlockSparseCell",
    "BlockSparseGRU",
    "BlockSparseLSTM",
    "gru_cell",
    "lstm_cell",
]
