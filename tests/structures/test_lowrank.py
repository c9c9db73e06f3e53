"""Low-rank structures: Tucker-2 (truncated HOSVD) and shared kernels (PCA without the mean)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from admmcompress.plan import Plan, PlanError
from admmcompress.structures import SharedKernels, Tucker2, structure_from_dict
from admmcompress.structures.lowrank import shared_kernel_factors, shared_kernel_weight

pytest.importorskip("tensorly")


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unfolding_rank(w: torch.Tensor, mode: int) -> int:
    return int(torch.linalg.matrix_rank(w.movedim(mode, 0).reshape(w.shape[mode], -1).double(), rtol=1e-6))


def tail(w: torch.Tensor, mode: int, rank: int) -> float:
    """Squared singular values of the mode unfolding beyond ``rank`` (the best mode-``mode``-rank error)."""
    s = torch.linalg.svdvals(w.movedim(mode, 0).reshape(w.shape[mode], -1).double())
    return float((s[rank:] ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ranks", [(3, 2), (6, 5), (1, 1)])
def test_hosvd_projection_respects_ranks_and_is_idempotent(seed, ranks):
    w = randn(8, 6, 3, 3, seed=seed)
    s = Tucker2(ranks=ranks)
    z = s.project(w)
    assert unfolding_rank(z, 0) <= ranks[0] and unfolding_rank(z, 1) <= ranks[1]
    assert torch.allclose(s.project(z), z, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hosvd_error_within_its_quasi_optimal_bounds(seed):
    """max(tail_0, tail_1) <= err^2 <= tail_0 + tail_1, and err <= sqrt(2) * HOOI's error (>= the optimum)."""
    from tensorly import backend_context, tucker_to_tensor
    from tensorly.decomposition import partial_tucker

    w = randn(10, 8, 3, 3, seed=seed).double()
    ranks = (4, 3)
    err2 = float((w - Tucker2(ranks=ranks).project(w)).pow(2).sum())
    t0, t1 = tail(w, 0, ranks[0]), tail(w, 1, ranks[1])
    assert max(t0, t1) - 1e-9 <= err2 <= t0 + t1 + 1e-9
    with backend_context("pytorch"):
        (core, factors), _ = partial_tucker(w, rank=list(ranks), modes=[0, 1], n_iter_max=50)
        hooi = tucker_to_tensor((core, [*factors, torch.eye(3, dtype=w.dtype), torch.eye(3, dtype=w.dtype)]))
    assert math.sqrt(err2) <= math.sqrt(2) * float((w - hooi).norm()) + 1e-9


def test_full_rank_tucker2_reproduces_the_weight():
    w = randn(8, 6, 3, 3)
    assert torch.allclose(Tucker2(ranks=(8, 6)).project(w), w, atol=1e-5)
    assert torch.allclose(Tucker2(rank_ratio=1.0).project(w), w, atol=1e-5)


def test_ranks_above_the_layer_dimensions_are_clear_errors():
    conv = nn.Conv2d(4, 8, 3)
    message = r"ranks \(9, 2\) exceed layer 'c''s dimensions \(out=8, in=4\); give ranks <= \(8, 4\)"
    with pytest.raises(ValueError, match=message):
        Tucker2(ranks=(9, 2)).check_module(conv, "c")
    with pytest.raises(ValueError, match="give ranks <= "):
        Tucker2(ranks=(2, 5)).project(conv.weight.detach())
    with pytest.raises(PlanError, match="exceed layer '0'"):
        Plan({"0": Tucker2(ranks=(2, 5))}).resolve(nn.Sequential(conv))
    with pytest.raises(ValueError, match="two positive integers"):
        Tucker2(ranks=(0, 2))
    with pytest.raises(ValueError, match="exactly one of"):
        Tucker2()
    with pytest.raises(ValueError, match="bases=10 exceeds the 9 positions"):
        SharedKernels(bases=10).check_module(conv, "c")
    with pytest.raises(ValueError, match="skips 1x1 convs"):
        SharedKernels(bases=1).check_module(nn.Conv2d(4, 8, 1), "c")


def test_rank_ratio_binds_to_concrete_ranks_per_layer():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 16, 3))
    targets = Plan({"*": Tucker2(rank_ratio=0.5)}).resolve(model)
    assert [t.structure.ranks for t in targets] == [(4, 2), (8, 4)]
    rule = {"structure": "tucker2", "ranks": [3, 2]}
    assert structure_from_dict(rule) == Tucker2(ranks=(3, 2)) and Tucker2(ranks=(3, 2)).to_dict() == rule


def test_pca_decomposition_is_exact_at_d_equal_k_squared():
    w = randn(8, 6, 3, 3)
    coefs, basis = shared_kernel_factors(w, 9)
    assert torch.allclose(shared_kernel_weight(coefs, basis), w, atol=1e-5)


@pytest.mark.parametrize("d", [1, 3, 5])
def test_shared_kernels_projection_is_the_truncated_svd(d):
    """Rank <= d kernel matrix, error = discarded squared singular values (Eckart-Young), idempotent."""
    w = randn(8, 6, 3, 3, seed=d)
    z = SharedKernels(bases=d).project(w)
    kernels = z.reshape(48, 9).double()
    assert int(torch.linalg.matrix_rank(kernels, rtol=1e-6)) <= d
    s = torch.linalg.svdvals(w.reshape(48, 9).double())
    assert math.isclose(float((w - z).double().pow(2).sum()), float((s[d:] ** 2).sum()), rel_tol=1e-4)
    assert torch.allclose(SharedKernels(bases=d).project(z), z, atol=1e-5)
    # No mean is subtracted: the basis spans the kernels themselves (PENNI drops the PCA mean).
    coefs, basis = shared_kernel_factors(w, d)
    assert torch.allclose(shared_kernel_weight(coefs, basis), z, atol=1e-5)
