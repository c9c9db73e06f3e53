"""The GEMM view of a weight and the one projection every sparsity structure uses.

Every weight is seen as a matrix whose rows are filters/neurons and whose columns are
(input channel, kernel position) "shapes". A sparsity structure is a partition of that
matrix into groups; projecting onto "at most k nonzero groups" keeps the k groups of
largest L2 norm and zeroes the rest. Ties are broken by group index (lower index wins)
so results never depend on the sort implementation.
"""

from __future__ import annotations

import math

import torch


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Return the GEMM view ``(rows, cols)`` of a weight tensor, in its logical (contiguous) order.

    ``Conv(O, I/g, kh, kw) -> (O, I/g*kh*kw)``, ``Linear(O, I) -> (O, I)``; a 1-D tensor
    becomes a single column. A view of a contiguous weight; a copy of a channels-last one (whose
    memory holds each row as ``kh, kw, I``): read it, never write into it.

    >>> as_matrix(torch.zeros(20, 1, 5, 5)).shape
    torch.Size([20, 25])
    """
    if weight.dim() == 0:
        raise ValueError("as_matrix: a scalar parameter has no GEMM view; prune only weight tensors")
    if weight.dim() == 1:
        return weight.view(-1, 1)
    return weight.reshape(weight.shape[0], -1)


def kept_count(n_groups: int, sparsity: float) -> int:
    """How many of ``n_groups`` survive pruning at ``sparsity`` (fraction of groups removed).

    ``k = round(n * (1 - sparsity))`` with Python's round-half-to-even, clamped to
    ``[1, n]``: at least one group is always kept so no layer is cut off entirely.

    >>> kept_count(500, 0.8), kept_count(10, 0.999)
    (100, 1)
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return max(1, min(n_groups, int(round(n_groups * (1.0 - sparsity)))))


def group_scores(matrix: torch.Tensor, group_ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum of squared entries of each group (float64 so that sums of tiny values still rank)."""
    flat = matrix.detach().reshape(-1).to(torch.float64)
    scores = torch.zeros(n_groups, dtype=torch.float64, device=matrix.device)
    return scores.index_add_(0, group_ids.reshape(-1), flat * flat)


def top_groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean vector marking the ``k`` largest scores; ties go to the lower index."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()} groups")
    order = torch.argsort(scores, descending=True, stable=True)
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[:k]] = True
    return keep


def project_groups(matrix: torch.Tensor, group_ids: torch.Tensor, n_groups: int, k: int) -> torch.Tensor:
    """Euclidean projection of ``matrix`` onto "at most ``k`` nonzero groups".

    ``group_ids`` has the matrix's shape and gives each entry's group in ``[0, n_groups)``.
    Returns the support mask (bool, matrix shape); the projection is ``matrix * mask``.
    """
    keep = top_groups(group_scores(matrix, group_ids, n_groups), k)
    return keep[group_ids]


def element_ids(rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.arange(rows * cols, device=device).view(rows, cols)


def row_ids(rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.arange(rows, device=device).view(rows, 1).expand(rows, cols)


def column_ids(rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.arange(cols, device=device).view(1, cols).expand(rows, cols)


def channel_ids(rows: int, cols: int, kernel_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Columns are ordered (channel, ky, kx), so a channel is ``kernel_size`` adjacent columns."""
    if cols % kernel_size:
        raise ValueError(f"{cols} columns do not split into input channels of {kernel_size} kernel positions")
    return column_ids(rows, cols, device) // kernel_size


# Gates stacked along the rows of a recurrent weight (torch order: LSTM i,f,g,o; GRU r,z,n).
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
CELL_GATES = {"LSTMCell": 4, "GRUCell": 3, "RNNCell": 1}


def gemm_params(module: torch.nn.Module) -> list[str]:
    """Names of the module's weight matrices in the GEMM view (what structures may prune).

    ``["weight"]`` for a module with a ``weight`` tensor; for GRU/LSTM/RNN every
    ``weight_ih_l{k}``/``weight_hh_l{k}`` (and ``_reverse``, ``weight_hr_l{k}``) matrix; for
    their cells ``weight_ih``/``weight_hh``; else ``[]``.

    >>> gemm_params(torch.nn.GRU(4, 8, num_layers=2))
    ['weight_ih_l0', 'weight_hh_l0', 'weight_ih_l1', 'weight_hh_l1']
    >>> gemm_params(torch.nn.Linear(3, 2)), gemm_params(torch.nn.ReLU())
    (['weight'], [])
    """
    if isinstance(module, (torch.nn.RNNBase, torch.nn.RNNCellBase)):
        params = module.named_parameters(recurse=False)
        return [n for n, p in params if n.startswith("weight_") and p.dim() == 2]
    return ["weight"] if isinstance(getattr(module, "weight", None), torch.Tensor) else []


def factor_params(module: torch.nn.Module) -> list[str]:
    """Names (under ``module``) of the factors' weights of a factorized layer, ``[]`` for any other module.

    A layer a low-rank target rewrote (``Tucker2Conv``: ``first.weight``, ``core.weight``, ``last.weight``;
    ``SharedKernelConv``: ``basis``, ``coefs``) holds these parameters; its ``weight`` is the dense conv weight
    they make, computed, of the shape of the conv it replaced. Reports and storage count the factors.

    >>> class Factored(torch.nn.Module):                    # as executors.tucker.Tucker2Conv declares its factors
    ...     factor_params = ("first.weight", "last.weight")
    >>> factor_params(Factored()), factor_params(torch.nn.Conv2d(4, 8, 3))
    (['first.weight', 'last.weight'], [])
    """
    names = getattr(type(module), "factor_params", None)
    return list(names) if isinstance(names, tuple) else []


def factorized_layers(model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s factorized layers (those with :func:`factor_params`), in module order.

    >>> factorized_layers(torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3)))
    []
    """
    return [name for name, module in model.named_modules() if factor_params(module)]


def gate_count(module: torch.nn.Module, param: str) -> int:
    """How many gate matrices are stacked along the rows of ``module.<param>`` (1 if none).

    Row blocks of a recurrent weight must stay inside one gate (SPEC P13): the ``3H`` rows
    of a GRU ``weight_ih_l0`` are three ``H``-row matrices (r, z, n).

    >>> gate_count(torch.nn.LSTM(4, 8), "weight_hh_l0"), gate_count(torch.nn.Linear(3, 2), "weight")
    (4, 1)
    """
    if isinstance(module, torch.nn.RNNBase) and not param.startswith("weight_hr"):
        return RECURRENT_GATES.get(module.mode, 1)
    if isinstance(module, torch.nn.RNNCellBase):
        return CELL_GATES.get(type(module).__name__, 1)
    return 1


def kernel_positions(weight: torch.Tensor) -> int:
    """Number of kernel positions per input channel (1 for Linear)."""
    return math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
