"""Hard quantization and quantized retraining: a ``QuantizedMaskSet`` holds masks *and* levels.

``hard_quantize`` projects every quantization target's weight (already hard-pruned, so pruned
weights are exactly zero and are skipped) and records per parameter its ``levels`` and integer
``codes`` (-1 = zero). Attached to a model and optimizer, the set keeps the model on those levels
during retraining under any optimizer:

- ``"hold"`` (fixed point, power of two, binary, ternary): gradients of quantized weights are
  zeroed, their optimizer state is zeroed, and after every ``optimizer.step()`` the values are
  written back bit-exactly, so weight decay or stale momentum cannot move them. Biases and
  unquantized layers keep training.
- ``"centroids"`` (clustering): every weight trains, then after each step each centroid becomes
  the mean of its members and the members are set to it (centroid updating, SPEC 2.2): the
  layer keeps exactly its ``K`` shared values and its codes, while the values learn.
- ``"ste"`` (any fixed level set; ``with_update("ste")``): quantization-aware retraining with a
  straight-through estimator. The set keeps a float *shadow* of each weight; the gradient taken at
  the quantized values updates the shadow (the optimizer's step is added to it), and after every
  step each weight becomes the level nearest its shadow (clamped to the outermost levels). The
  levels stay fixed, the codes move, pruned weights stay zero. With ``"hold"`` a layer quantized
  to 2 bits can only be compensated by its biases and by other layers; with ``"ste"`` it learns
  which level each weight should take.

Masks (pruning) still hold as in ``MaskSet``; zeros a quantizer creates (ternary) are added to
the masks, so joint prune + quantize needs nothing else.

>>> import torch.nn as nn
>>> from admmcompress.plan import Plan
>>> from admmcompress.structures.quantization import FixedPoint
>>> model = nn.Linear(4, 2)
>>> masks = hard_quantize(model, Plan({"": FixedPoint(bits=2)}).resolve(model))
>>> len(torch.unique(model.weight.detach())) <= 4
True
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

import torch

from admmcompress.finalize.masks import MaskSet, _like, _named_params, prune_masks
from admmcompress.structures.quantization import Ternary, storable_levels

UPDATES = ("hold", "centroids", "ste")
FIXED_LEVEL_UPDATES = ("hold", "ste")  # how values on fixed levels train (a phase's ``quantized_weights``)
SEP = "@"  # state-dict keys: "fc1.weight@codes", "fc1.weight@levels", "fc1.weight@update"


@dataclass
class HeldValues:
    """The quantized state of one parameter: ``weight == levels[codes]`` (0 where ``codes == -1``)."""

    levels: torch.Tensor
    codes: torch.Tensor
    update: str = "hold"
    #: Entries held on their level (None: all). Partial quantization holds a growing subset.
    frozen: torch.Tensor | None = None
    #: ``update="ste"``: the float weights the optimizer trains (None until attached).
    shadow: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.update not in UPDATES:
            raise ValueError(f"update={self.update!r}; choose one of {UPDATES}")
        if self.frozen is not None and self.update != "hold":
            raise ValueError(
                f"partial quantization (frozen=...) holds values; it cannot use update={self.update!r}"
            )
        if self.shadow is not None and self.update != "ste":
            raise ValueError(f"a float shadow belongs to update='ste', not update={self.update!r}")
        self.codes = self.codes.to(torch.int64)

    @property
    def fully_quantized(self) -> bool:
        """Whether every entry is on its level: no partial freeze, or one that has frozen them all."""
        return self.frozen is None or bool(self.frozen.all())

    def decode(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        levels = self.levels.to(device=device, dtype=dtype)
        codes = self.codes.to(device)
        values = (
            levels[codes.clamp(min=0)] if levels.numel() else torch.zeros(codes.shape, dtype=levels.dtype)
        )
        return torch.where(codes >= 0, values, torch.zeros((), dtype=values.dtype, device=values.device))


class QuantizedMaskSet(MaskSet):
    """A ``MaskSet`` whose quantized parameters are also held on their levels during retraining."""

    def __init__(
        self,
        masks: Mapping[str, torch.Tensor] | None = None,
        held: Mapping[str, HeldValues] | None = None,
    ):
        super().__init__(masks)
        self.held: dict[str, HeldValues] = dict(held or {})
        self._held_params: dict[str, torch.nn.Parameter] = {}

    def quantized(self) -> dict[str, HeldValues]:
        return dict(self.held)

    def with_update(self, update: str, leave: Collection[str] = ()) -> QuantizedMaskSet:
        """This set with its fixed-level values trained as ``update``: ``"hold"`` or ``"ste"``.

        Clustered layers keep centroid updating and partially quantized ones their holds; a layer whose
        every entry is frozen (the last round of iterative quantization) is fully quantized and switches
        like a hard-quantized one. Names in ``leave`` stay as they are (a phase's own driver manages
        them). Switching to ``"ste"`` starts each shadow at the quantized values; an ``"ste"`` entry
        already training keeps its shadow, so resuming a run continues exactly.

        >>> import torch.nn as nn
        >>> from admmcompress.plan import Plan
        >>> from admmcompress.structures.quantization import FixedPoint
        >>> model = nn.Linear(8, 4)
        >>> masks = hard_quantize(model, Plan({"": FixedPoint(bits=2)}).resolve(model)).with_update("ste")
        >>> opt = torch.optim.SGD(model.parameters(), lr=1.0)
        >>> _ = masks.attach(model, opt)
        >>> model(torch.randn(16, 8)).pow(2).sum().backward(); opt.step()
        >>> len(torch.unique(model.weight.detach())) <= 4     # still on the 2-bit levels
        True
        """
        if update not in FIXED_LEVEL_UPDATES:
            raise ValueError(f"quantized_weights={update!r}; choose 'hold' (frozen values) or 'ste' (straight-through)")
        switch = [
            n
            for n, h in self.held.items()
            if h.update in FIXED_LEVEL_UPDATES and h.update != update and n not in leave and h.fully_quantized
        ]
        if not switch:
            return self  # nothing to change: the same set (a schedule may hold on to it)
        held = dict(self.held)
        for name in switch:
            held[name] = HeldValues(held[name].levels, held[name].codes, update)
        return QuantizedMaskSet(self.masks, held)

    @torch.no_grad()
    def refit_centroids(self, model: torch.nn.Module) -> None:
        """Clustered entries take their levels from ``model``'s weights: each the mean of its code's members.

        Their codes are fixed, so weights that changed while keeping them (a mean of snapshots of the layer,
        as weight averaging takes) give every member of a cluster one value; this makes it the centroid, so
        ``apply`` keeps it instead of writing the old levels back. Fixed levels are left as they are.
        """
        params = _named_params(model, self.held)
        for name, held in self.held.items():
            if held.update == "centroids":
                param = params[name].detach()
                held.levels = _centroids(param, held.codes.to(param.device), held.levels).cpu()

    def copy(self) -> QuantizedMaskSet:
        return QuantizedMaskSet(self.masks, self.held)

    def intersect(self, name: str, mask: torch.Tensor) -> None:
        """AND a mask in, and prune the held codes it removes (``apply`` wrote their levels back: a review found
        ``merged`` reviving pruned weights)."""
        super().intersect(name, mask)
        held = self.held.get(name)
        if held is not None:
            keep = self.masks[name].cpu()
            if bool((held.codes[~keep] >= 0).any()):
                codes = torch.where(keep, held.codes, torch.full_like(held.codes, -1))
                self.held[name] = replace(held, codes=codes)

    def merged(self, other: MaskSet) -> QuantizedMaskSet:
        out = QuantizedMaskSet(self.masks, self.held)
        for name, mask in other.items():
            out.intersect(name, mask)
        if isinstance(other, QuantizedMaskSet):
            out.held.update(other.held)
        return out

    # --- applying ---------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        """Zero pruned entries and write the quantized values (in place)."""
        super().apply(model)
        params = _named_params(model, self.held)
        for name, held in self.held.items():
            _write(params[name], held)

    def attach(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> QuantizedMaskSet:
        """Apply masks and values and keep them (see the module docstring); ``detach()`` removes all hooks."""
        super().attach(model, optimizer)
        self.apply(model)
        self._held_params = _named_params(model, self.held)
        for name, param in self._held_params.items():
            held = self.held[name]
            if not param.requires_grad and held.update != "ste":  # no gradient to hold back; the values are re-set
                continue
            if held.frozen is not None:
                free = (~held.frozen).to(param.device, param.dtype)
                self._handles.append(param.register_hook(lambda grad, free=free: grad * _like(free, grad)))
            elif held.update == "hold":
                self._handles.append(param.register_hook(torch.zeros_like))
            elif held.update == "ste":  # a new shadow starts at the values; a restored one continues
                shadow = param.detach().clone() if held.shadow is None else held.shadow
                held.shadow = shadow.to(param.device, param.dtype)
        if optimizer is not None:
            self._zero_held_state(optimizer)
            self._handles.append(
                optimizer.register_step_post_hook(lambda opt, *_: self._after_held_step(opt))
            )
        return self

    @torch.no_grad()
    def _after_held_step(self, optimizer: torch.optim.Optimizer) -> None:
        for name, param in self._held_params.items():
            held = self.held[name]
            if held.update == "centroids":
                held.levels = _centroids(param.detach(), held.codes.to(param.device), held.levels).cpu()
            elif held.update == "ste":
                _straight_through_step(param.detach(), held)
            _write(param, held)
        self._zero_held_state(optimizer)

    @torch.no_grad()
    def _zero_held_state(self, optimizer: torch.optim.Optimizer) -> None:
        for name, param in self._held_params.items():
            held = self.held[name]
            if held.update != "hold":
                continue
            free = None if held.frozen is None else (~held.frozen).to(param.device)
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.zero_() if free is None else value.mul_(free.to(value.dtype))

    # --- saving -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = super().state_dict()
        for name, held in self.held.items():
            out[f"{name}{SEP}codes"] = held.codes.to("cpu", torch.int32).clone()
            out[f"{name}{SEP}levels"] = held.levels.cpu().clone()
            out[f"{name}{SEP}update"] = torch.tensor([UPDATES.index(held.update)], dtype=torch.int32)
            if held.frozen is not None:
                out[f"{name}{SEP}frozen"] = held.frozen.clone()
            if held.shadow is not None:
                out[f"{name}{SEP}shadow"] = held.shadow.detach().cpu().clone()
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> QuantizedMaskSet:
        masks = {k: v for k, v in state.items() if SEP not in k}
        names = sorted({k.rsplit(SEP, 1)[0] for k in state if SEP in k})
        held = {
            n: HeldValues(
                levels=state[f"{n}{SEP}levels"].clone(),
                codes=state[f"{n}{SEP}codes"].clone(),
                update=UPDATES[int(state[f"{n}{SEP}update"][0])],
                frozen=state.get(f"{n}{SEP}frozen"),
                shadow=state.get(f"{n}{SEP}shadow"),
            )
            for n in names
        }
        return cls(masks, held)


def _write(param: torch.Tensor, held: HeldValues) -> None:
    """Write the held values into ``param`` (only the frozen entries under partial quantization)."""
    values = held.decode(param.dtype, param.device)
    if held.frozen is None:
        param.copy_(values)
    else:
        frozen = held.frozen.to(param.device)
        param.copy_(torch.where(frozen, values, param))


@torch.no_grad()
def _straight_through_step(param: torch.Tensor, held: HeldValues) -> None:
    """Add the optimizer's step to the shadow and move each kept weight to the level nearest it."""
    before = held.decode(param.dtype, param.device)  # what the step started from
    codes = held.codes.to(param.device)
    kept = codes >= 0
    levels = held.levels.to(param.device, param.dtype)
    shadow = (held.shadow + (param - before)).clamp(levels[0], levels[-1])  # no drift past the grid
    held.shadow = torch.where(kept, shadow, torch.zeros((), dtype=shadow.dtype, device=shadow.device))
    nearest = _nearest_level(held.shadow, levels)
    held.codes = torch.where(kept, nearest, torch.full_like(nearest, -1))


def _nearest_level(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``levels`` for every value (a tie goes to the lower level)."""
    return torch.bucketize(values, (levels[1:] + levels[:-1]) / 2)


def mask_set_from_state(state: Mapping[str, torch.Tensor]) -> MaskSet:
    """A ``MaskSet`` or, when the state holds quantized values, a ``QuantizedMaskSet``."""
    if any(SEP in key for key in state):
        return QuantizedMaskSet.from_state_dict(state)
    return MaskSet(state)


def _centroids(weight: torch.Tensor, codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Mean of the members of each cluster (a cluster without members keeps its value, and so does one whose mean
    is exactly 0, the code of a pruned weight: its members would be pruned by the update).

    >>> _centroids(torch.tensor([-1.0, 1.0, 3.0]), torch.tensor([0, 0, 1]), torch.tensor([0.5, 2.0]))
    tensor([0.5000, 3.0000])
    """
    flat, flat_codes = weight.reshape(-1), codes.reshape(-1)
    members = flat_codes >= 0
    dtype = torch.float64
    sums = torch.zeros(levels.numel(), dtype=dtype, device=weight.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, flat_codes[members], flat[members].to(dtype))
    counts.index_add_(0, flat_codes[members], torch.ones_like(flat[members], dtype=dtype))
    means = storable_levels(sums / counts.clamp(min=1), levels.dtype)
    return torch.where((counts > 0) & (means != 0), means, levels.to(weight.device))


def is_quantization(target) -> bool:
    """Whether ``target`` quantizes (kept for older callers: ask ``target.structure.quantizes``)."""
    return target.structure.quantizes


@torch.no_grad()
def hard_quantize(
    model: torch.nn.Module, targets, masks: MaskSet | None = None, frozen: MaskSet | None = None
) -> QuantizedMaskSet:
    """Quantize every quantization target's weight in place; return masks + held values.

    ``masks``: the masks of this stage's hard pruning (``prune_masks`` runs first when not given,
    so pruning comes before quantizing and only kept weights are quantized). Values held by
    ``frozen`` (an earlier stage) are kept for parameters this call does not quantize again.
    """
    targets = list(targets)
    if masks is None:
        masks = prune_masks(model, [t for t in targets if not t.structure.quantizes], frozen)
    params = dict(model.named_parameters())
    held: dict[str, HeldValues] = {}
    if isinstance(frozen, QuantizedMaskSet):
        for name, before in frozen.held.items():
            keep = masks.masks.get(name)
            if keep is not None and bool((before.codes[~keep.cpu()] >= 0).any()):
                # Pruned after it was quantized (a later stage prunes a held layer): pruned stays zero.
                codes = torch.where(keep.cpu(), before.codes, torch.full_like(before.codes, -1))
                before = HeldValues(before.levels, codes, before.update, before.frozen)
            held[name] = before
    out = QuantizedMaskSet(masks.masks, {})
    out.apply(model)
    for target in targets:
        if not target.structure.quantizes:
            continue
        name = target.param_name
        q = target.structure.quantize(params[name].detach())
        held[name] = HeldValues(q.levels.detach().cpu(), q.codes.cpu(), target.structure.update)
        out.intersect(name, q.codes >= 0)  # zeros a quantizer makes (ternary) are pruned from now on
    out.held = held
    out.apply(model)
    return out


def release_holds(masks: MaskSet, targets) -> MaskSet:
    """The set a new stage starts from: masks carry; values the stage quantizes again are released.

    Progressive quantization (8 -> 4 -> 2 bits) re-quantizes the same layers, so their weights
    must be free to move during the new stage's ADMM phase; other held layers stay held.
    """
    if not isinstance(masks, QuantizedMaskSet):
        return MaskSet(masks.masks)
    again = {t.param_name for t in targets if t.structure.quantizes}
    kept = {n: h for n, h in masks.held.items() if n not in again}
    return QuantizedMaskSet(masks.masks, kept) if kept else MaskSet(masks.masks)


@torch.no_grad()
def partial_quantize(
    model: torch.nn.Module, targets, fraction: float, previous: MaskSet | None = None
) -> QuantizedMaskSet:
    """One round of iterative quantization (ADMM-NN, SPEC 2.3): freeze part of each layer on its levels.

    The levels come from the first round (the structure's projection of the current weights) and stay
    fixed. In every round each not-yet-frozen kept weight is assigned its nearest level; weights
    already equal to a level are frozen, and of the rest, in every level's bin, the
    ``ceil(fraction * n_bin)`` closest to the level are snapped to it and frozen. The others keep
    training (attach the result to an optimizer). ``fraction=1.0`` freezes everything: the final
    projection onto the fixed levels. Pruned positions are those the masks of ``previous`` prune, and the
    nonzero weights the first round's projection sets to zero (a ternary dead zone, pruned then, as
    ``hard_quantize`` does, and for ternary, whose zero is a level, the exact zeros): they stay zero and frozen. A
    kept weight that is exactly 0.0 (it trained there, or no mask was given) is not pruned: it stays free, in its
    nearest level's bin, until a round snaps it to that level. Only a layer with no level at all (no nonzero
    weight in the first round) is held at zero.

    >>> import torch.nn as nn
    >>> from admmcompress.plan import Plan
    >>> model = nn.Linear(10, 10)
    >>> targets = Plan.from_dict([{"match": "", "structure": "fixed_point", "bits": 2}]).resolve(model)
    >>> first = partial_quantize(model, targets, 0.3)
    >>> 30 <= int(first.held["weight"].frozen.sum()) <= 34      # 30% per level bin, rounded up
    True
    >>> int(partial_quantize(model, targets, 1.0, first).held["weight"].frozen.sum())
    100
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"partial_quantize: fraction={fraction!r} must be in (0, 1], e.g. 0.3 per round")
    masks = previous.masks if previous is not None else None
    held = dict(previous.held) if isinstance(previous, QuantizedMaskSet) else {}
    out = QuantizedMaskSet(masks, {})
    params = dict(model.named_parameters())
    for target in targets:
        if not target.structure.quantizes:
            continue
        name = target.param_name
        w = params[name].detach()
        before = held.get(name)
        # Pruned = what the masks prune (SPEC 2.3: pruned weights stay 0), never "the value is exactly 0": a free
        # weight can train to 0.0 and must stay free (a review found it frozen at 0 for good, code -1).
        mask = out.masks.get(name)
        kept = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.to(w.device)
        w = torch.where(kept, w, torch.zeros((), dtype=w.dtype, device=w.device))
        keep = torch.ones_like(w, dtype=torch.bool)
        if before is None or before.frozen is None:
            q = target.structure.quantize(w)  # levels from the kept weights (exact zeros take no part in them)
            levels = q.levels.to(w.dtype)
            # nonzero weights the projection itself zeroes (ternary's dead zone) are pruned, as in hard_quantize, not
            # snapped to +-a; an exact zero the projection skips is kept (the masks say what is pruned), except where
            # zero is a level of the set (ternary): its projection is that level, the dead zone's
            keep = (q.codes >= 0) | ((w == 0) & (not isinstance(target.structure, Ternary)))
            kept = kept & keep
            w = torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))
            frozen, prior = ~kept, None
        else:
            levels, prior = before.levels.to(w.dtype), before.frozen.to(w.device)
            frozen = prior | ~kept
        if levels.numel() == 0:  # no level to hold a weight on (no nonzero weight in the first round): held at zero
            codes = torch.full(w.shape, -1, dtype=torch.int64, device=w.device)
            frozen = torch.ones_like(frozen)
        else:
            codes = _nearest_level(w, levels)
        codes = torch.where(kept, codes, torch.full_like(codes, -1))
        if prior is not None:  # frozen entries keep the codes they are held on
            codes = torch.where(prior, before.codes.to(w.device), codes)
        distance = (w - levels[codes.clamp(min=0)]).abs() if levels.numel() else torch.zeros_like(w)
        frozen = frozen | ((distance == 0) & (codes >= 0))
        free = (~frozen).reshape(-1).nonzero().reshape(-1)
        if free.numel():
            bins, dist = codes.reshape(-1)[free], distance.reshape(-1)[free].to(torch.float64)
            order = torch.argsort(dist, stable=True)
            order = order[torch.argsort(bins[order], stable=True)]  # by bin, then by distance
            counts = torch.bincount(bins, minlength=levels.numel())
            quota = torch.ceil(fraction * counts.to(torch.float64)).to(torch.int64)
            start = torch.cumsum(counts, 0) - counts
            rank = torch.arange(free.numel(), device=w.device) - start[bins[order]]
            chosen = free[order[rank < quota[bins[order]]]]
            frozen = frozen.reshape(-1).clone()
            frozen[chosen] = True
            frozen = frozen.reshape(w.shape)
        held[name] = HeldValues(levels.cpu(), codes.cpu(), "hold", frozen.cpu())
        out.intersect(name, keep)  # only what the projection zeroes in the first round is pruned
    out.held = held
    out.apply(model)
    return out


__all__ = [
    "FIXED_LEVEL_UPDATES",
    "UPDATES",
    "HeldValues",
    "QuantizedMaskSet",
    "hard_quantize",
    "is_quantization",
    "mask_set_from_state",
    "partial_quantize",
    "release_holds",
]
