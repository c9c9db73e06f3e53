"""Every registered structure, pruning or quantization, against brute force on tiny tensors.

Parametrized over ``list_structures()``: a structure is tested here the moment it is registered, with
the instance its ``example()`` classmethod returns.

- Pruning structures (``quantizes`` False) built on a group partition (``group_ids``): every union of
  exactly ``kept_groups`` groups (per block when ``per_block``) is enumerated, and the projection must be
  the closest of them; its support is a union of groups with that count, and the projection keeps the
  weights on the support and zeroes the rest.
- Quantization structures (``quantizes`` True): the projection lies in its level set (at most
  ``2**code_bits`` nonzero values, pruned zeros stay zero), every weight sits on its nearest level, and
  where the level family is known the projection is the best over all code assignments with the best
  scale (fixed point, binary, ternary) or over every exponent (power of two). Clustering is Lloyd's
  local optimum: every level is also the mean of its members.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
import torch

from admmcompress.structures import (
    Binary,
    Clustering,
    FixedPoint,
    PowerOfTwo,
    QuantizationStructure,
    SparsityStructure,
    Structure,
    Ternary,
    kept_count,
    list_structures,
    register_structure,
    structure_class,
    structure_from_dict,
    unregister_structure,
)
from admmcompress.structures.base import _ALIASES
from admmcompress.structures.crossbar import Conductance

NAMES = list_structures(aliases=False)
SEEDS = (0, 1, 2)
# A Linear-like and a Conv-like weight: both 4x4 GEMM matrices, the conv with 2 channels x 2 kernel positions.
PRUNING_SHAPES = ((4, 4), (4, 2, 1, 2))
QUANT_SHAPE = (2, 4)  # one entry is set to zero: a pruned weight the quantizer must skip
TOL = 1e-5


def example(name: str) -> Structure:
    return structure_class(name).example()


def weights(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).sum())


# --- every structure ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_example_is_a_valid_registered_instance(name):
    structure = example(name)
    cls = structure_class(name)
    assert isinstance(structure, cls) and isinstance(structure, Structure)
    assert structure.kind == name
    assert structure.quantizes == isinstance(structure, QuantizationStructure)
    assert structure_from_dict(structure.to_dict()) == structure  # the plan form round-trips
    for alias, target in _ALIASES.items():
        if target == name:
            assert structure_class(alias) is cls


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", NAMES)
def test_projection_is_zero_outside_the_support(name, seed):
    structure = example(name)
    shapes = (QUANT_SHAPE,) if structure.quantizes else PRUNING_SHAPES
    for shape in shapes:
        w = weights(shape, seed)
        support = structure.support(w)
        assert support.dtype == torch.bool and support.shape == w.shape
        projected = structure.project(w)
        assert projected.shape == w.shape and projected.dtype == w.dtype
        assert torch.all(projected[~support] == 0)


# --- pruning -----------------------------------------------------------------------------------------


def feasible_supports(structure: SparsityStructure, w: torch.Tensor):
    """Every union of groups the structure allows: ``kept_groups`` of them, per block when balanced."""
    ids, n = structure.group_ids(w)
    ids = ids.reshape(w.shape)
    k = structure.kept_groups(w)
    owner = structure.partition(w)[2] if getattr(structure, "per_block", False) else None
    for kept in itertools.combinations(range(n), k):
        if owner is not None:
            counts = torch.bincount(owner[list(kept)], minlength=int(owner.max()) + 1)
            sizes = torch.bincount(owner)
            quota = [kept_count(int(s), structure.target_sparsity) if s else 0 for s in sizes]
            if counts.tolist() != quota:
                continue
        yield torch.isin(ids, torch.tensor(kept, device=ids.device))


@pytest.mark.parametrize("seed", SEEDS)
# Low-rank structures (factorizes) are no support pattern; tests/structures/test_lowrank.py checks their projections.
@pytest.mark.parametrize(
    "name", [n for n in NAMES if not structure_class(n).quantizes and not structure_class(n).factorizes]
)
def test_pruning_projection_is_the_closest_feasible_support(name, seed):
    structure = example(name)
    if not hasattr(structure, "group_ids"):
        pytest.fail(f"{name}: a pruning structure without group_ids needs its own brute force in this file")
    for shape in PRUNING_SHAPES:
        w = weights(shape, seed)
        projected, support = structure.project(w), structure.support(w)
        assert torch.equal(projected, w * support)  # kept weights keep their values
        ids, n = structure.group_ids(w)
        ids = ids.reshape(w.shape)
        kept_ids = ids[support].unique()
        assert torch.equal(torch.isin(ids, kept_ids), support), "the support is not a union of groups"
        assert kept_ids.numel() == structure.kept_groups(w)
        best = min(feasible_supports(structure, w), key=lambda mask: distance(w, w * mask))
        assert torch.equal(support, best), f"{name} {tuple(shape)}: the projection is not the closest support"


# --- quantization ------------------------------------------------------------------------------------


def quant_weights(seed: int) -> torch.Tensor:
    w = weights(QUANT_SHAPE, seed)
    w.view(-1)[3] = 0.0
    return w


def best_scaled_error(values: torch.Tensor, patterns) -> float:
    """min over patterns c and scales s of ||v - s c||^2 (the best scale is v.c / c.c)."""
    v = values.double()
    best = math.inf
    for c in patterns:
        c = torch.tensor(c, dtype=torch.float64)
        cc = float(c @ c)
        err = float(v @ v) - (float(v @ c) ** 2 / cc if cc > 0 else 0.0)
        best = min(best, err)
    return best


def exact_fixed_point(s: FixedPoint, v: torch.Tensor) -> float:
    n = 2 ** (s.bits - 1)
    signs = torch.sign(v).tolist()
    codes = itertools.product(range(1, n + 1), repeat=v.numel())
    return best_scaled_error(v, ([sg * c for sg, c in zip(signs, cs, strict=True)] for cs in codes))


def exact_binary(s: Binary, v: torch.Tensor) -> float:
    return best_scaled_error(v, itertools.product((-1.0, 1.0), repeat=v.numel()))


def exact_ternary(s: Ternary, v: torch.Tensor) -> float:
    return best_scaled_error(v, itertools.product((-1.0, 0.0, 1.0), repeat=v.numel()))


def exact_power_of_two(s: PowerOfTwo, v: torch.Tensor) -> float:
    count = 2 ** (s.bits - 1)
    a = v.abs().double()
    best = math.inf
    for e in range(-40, 41):  # far wider than any exponent that can be optimal for these weights
        levels = 2.0 ** torch.arange(e - count + 1, e + 1, dtype=torch.float64)
        best = min(best, float(((a[:, None] - levels[None, :]).abs().min(dim=1).values ** 2).sum()))
    return best


def exact_conductance(s: Conductance, v: torch.Tensor) -> float:
    signs = torch.sign(v).tolist()
    codes = itertools.product(range(1, s.magnitudes + 1), repeat=v.numel())
    return best_scaled_error(v, ([sg * c for sg, c in zip(signs, cs, strict=True)] for cs in codes))


# Exact brute force per level family; LOCAL_ONLY structures are checked for local optimality only.
EXACT = {FixedPoint: exact_fixed_point, Binary: exact_binary, Ternary: exact_ternary, PowerOfTwo: exact_power_of_two,
         Conductance: exact_conductance}
LOCAL_ONLY = (Clustering,)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", [n for n in NAMES if structure_class(n).quantizes])
def test_quantization_projection_is_on_its_levels_and_no_closer_point_exists(name, seed):
    structure = example(name)
    w = quant_weights(seed)
    projected = structure.project(w)
    q = structure.quantize(w)
    assert torch.equal(q.decode().to(w.dtype), projected)
    assert projected.view(-1)[3] == 0  # a pruned weight stays pruned
    levels = torch.unique(projected[projected != 0])
    assert levels.numel() <= 2**structure.code_bits  # as many values as the stored codes can name
    nonzero = w != 0
    # Every weight on its nearest level (zero is a candidate only for a structure that makes zeros).
    candidates = levels.double()
    if bool((projected[nonzero] == 0).any()):
        candidates = torch.cat([candidates, candidates.new_zeros(1)])
    gaps = (w[nonzero].double()[:, None] - candidates[None, :]).abs()
    own = (w[nonzero].double() - projected[nonzero].double()).abs()
    assert torch.all(own <= gaps.min(dim=1).values + TOL), "a single-entry move to another level is closer"
    exact = next((fn for cls, fn in EXACT.items() if isinstance(structure, cls)), None)
    if exact is not None:
        best = exact(structure, w[nonzero])
        assert distance(w, projected) <= best + TOL * (1 + best), f"{name}: brute force found a closer point"
    elif isinstance(structure, LOCAL_ONLY):
        codes = q.codes[nonzero]
        for code in codes.unique():
            members = w[nonzero][codes == code].double()
            assert float(q.levels[code]) == pytest.approx(float(members.mean()), abs=TOL)
    else:
        pytest.fail(f"{name}: add an exact brute force for its level family to EXACT (or to LOCAL_ONLY)")


# --- the registry ------------------------------------------------------------------------------------


def test_the_registry_lists_pruning_and_quantization_with_aliases():
    names = list_structures()
    assert {"unstructured", "filter", "column", "channel", "block", "block_row"} <= set(names)
    assert {"fixed_point", "power_of_two", "binary", "ternary", "clustering"} <= set(names)
    assert {"shape", "row", "block_column", "pow2", "cluster"} <= set(names)
    assert list_structures(aliases=False, quantizes=True) == ["binary", "clustering", "conductance", "fixed_point",
                                                               "power_of_two", "ternary"]


def test_the_registry_is_complete_whichever_module_is_imported_first():
    code = (
        "import admmcompress.structures.sparsity as s, sys\n"
        "from admmcompress.structures.registry import list_structures\n"
        "print(','.join(list_structures(aliases=False)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert {"binary", "block", "block_row", "clustering", "unstructured"} <= set(out.strip().split(","))


def test_register_structure_rejects_taken_names_and_non_structures():
    from dataclasses import dataclass

    @register_structure("toy_rows", aliases=("toy_alias",))
    @dataclass(frozen=True)
    class ToyRows(SparsityStructure):
        def group_ids(self, weight):
            from admmcompress.structures import groups

            rows, cols = groups.as_matrix(weight).shape
            return groups.row_ids(rows, cols, weight.device), rows

    try:
        assert ToyRows.kind == "toy_rows" and structure_class("toy_alias") is ToyRows
        assert type(structure_from_dict({"structure": "toy_alias", "sparsity": 0.5})) is ToyRows
        with pytest.raises(ValueError, match="'filter' already names .*Filter; choose another name"):
            register_structure("filter")(ToyRows)
        with pytest.raises(ValueError, match="'toy_alias' already names .*ToyRows"):
            register_structure("other", aliases=("toy_alias",))(type("Other", (Binary,), {}))
        with pytest.raises(ValueError, match="already has kind='toy_rows'; give extra names as aliases="):
            register_structure("toy_rows_again")(ToyRows)
        with pytest.raises(TypeError, match="is not a Structure; derive it from SparsityStructure"):
            register_structure("not_a_structure")(dict)
    finally:
        unregister_structure("toy_rows")
    assert structure_class("toy_alias") is None and "toy_rows" not in list_structures()


def test_unknown_structure_names_every_choice():
    with pytest.raises(ValueError, match=r"rule 1: unknown structure 'blocky'; choose one of .*binary.*unstructured"):
        structure_from_dict({"structure": "blocky", "sparsity": 0.5}, where="rule 1")
