"""Hard pruning and masked retraining: a ``MaskSet`` keeps pruned weights exactly zero.

Masks hold by construction under any optimizer: gradients are masked by a tensor hook,
and after every ``optimizer.step()`` (a registered post-step hook) the weights are
re-masked and every optimizer state tensor shaped like the weight (momentum buffers,
Adam moments) is zeroed at pruned entries, so nothing can revive them. The model stays a
plain ``nn.Module``: no renamed parameters, no parametrizations in its state dict.

>>> import torch.nn as nn
>>> model = nn.Linear(4, 2)
>>> masks = MaskSet({"weight": torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)})
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
>>> _ = masks.attach(model, opt)
>>> model(torch.randn(3, 4)).sum().backward(); opt.step()
>>> bool((model.weight[0, 1] == 0) and (model.weight[1, 0] == 0))
True
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch


class MaskSet:
    """Boolean keep-masks by parameter name (``"fc1.weight"``); True = kept."""

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None):
        self.masks: dict[str, torch.Tensor] = {k: v.to(torch.bool) for k, v in (masks or {}).items()}
        self._handles: list = []
        self._params: dict[str, torch.nn.Parameter] = {}
        self._model: weakref.ref | None = None  # the model attached to (a weak reference: no leak)

    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def items(self):
        return self.masks.items()

    def intersect(self, name: str, mask: torch.Tensor) -> None:
        """Add a mask for ``name``, AND-ed with any mask it already has (several targets per layer)."""
        mask = mask.to(torch.bool)
        self.masks[name] = self.masks[name] & mask if name in self.masks else mask

    def copy(self) -> MaskSet:
        """A new set with the same masks (one of the same kind: a ``QuantizedMaskSet`` keeps its levels)."""
        return MaskSet(self.masks)

    def merged(self, other: MaskSet) -> MaskSet:
        out = MaskSet(self.masks)
        for name, mask in other.items():
            out.intersect(name, mask)
        return out

    # --- applying ---------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        """Zero the pruned entries of the model's weights (in place)."""
        params = _named_params(model, self.masks)
        for name, mask in self.masks.items():
            params[name].mul_(mask.to(params[name].device, params[name].dtype))

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MaskSet:
        """Apply the masks and keep them: mask gradients and re-mask after each optimizer step.

        Call ``detach()`` to remove the hooks. Attaching again to the same model (e.g. with a new optimizer)
        first detaches. One set masks one model at a time: attaching it to a second model while the first is
        still attached raises ``RuntimeError`` and changes nothing, so the first model is never silently
        un-masked. ``detach()`` first to move it, or attach a copy to the second model:
        ``MaskSet(masks.state_dict()).attach(other)``.
        """
        attached = self._model() if self._model is not None else None
        if attached is not None and attached is not model:
            raise RuntimeError(
                f"MaskSet.attach: these masks are attached to another model ({type(attached).__name__}); attaching "
                "them here would stop masking it. Call masks.detach() first, or attach a copy: "
                "MaskSet(masks.state_dict()).attach(model)"
            )
        self.detach()
        self.apply(model)
        self._params = _named_params(model, self.masks)
        for name, param in self._params.items():
            if not param.requires_grad:  # a frozen weight gets no gradient; the re-mask after each step holds it
                continue
            keep = self.masks[name].to(param.device, param.dtype)
            self._handles.append(param.register_hook(lambda grad, keep=keep: grad * _like(keep, grad)))
        self._model = weakref.ref(model)  # only once attached: a failure above leaves the set free to attach
        if optimizer is not None:
            self.watch(optimizer)
        return self

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-mask weights and zero pruned optimizer state after every ``optimizer.step()``."""
        if not self._params:
            raise RuntimeError("MaskSet.watch: call attach(model) before watching an optimizer")
        self.zero_optimizer_state(optimizer)
        self._handles.append(optimizer.register_step_post_hook(lambda opt, *_: self._after_step(opt)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._params = {}
        self._model = None

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        for name, param in self._params.items():
            param.mul_(self.masks[name].to(param.device, param.dtype))
        self.zero_optimizer_state(optimizer)

    @torch.no_grad()
    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero momentum/moment buffers at pruned entries so they cannot move those weights."""
        for name, param in self._params.items():
            state = optimizer.state.get(param)
            if not state:
                continue
            keep = self.masks[name].to(param.device)
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.mul_(keep.to(value.dtype))

    # --- inspection and saving --------------------------------------------------------
    def sparsity(self) -> dict[str, float]:
        return {name: 1.0 - mask.float().mean().item() for name, mask in self.masks.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.clone() for name, mask in self.masks.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> MaskSet:
        return cls(state)


def _like(factor: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``factor`` in ``grad``'s dtype and device: a model cast (``.to(torch.bfloat16)``) or moved after attaching
    gets gradients of its new kind, which a hook may not change."""
    if factor.dtype == grad.dtype and factor.device == grad.device:
        return factor
    return factor.to(grad.device, grad.dtype)


def _named_params(model: torch.nn.Module, names) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"masks name parameters the model does not have: {missing}; was the model changed?")
    return {n: params[n] for n in names}


def masks_from_model(model: torch.nn.Module, names) -> MaskSet:
    """Masks of the current nonzero pattern of the named parameters (e.g. after loading a pruned model)."""
    params = _named_params(model, names)
    return MaskSet({n: p.detach() != 0 for n, p in params.items()})


@torch.no_grad()
def prune_masks(model: torch.nn.Module, targets, frozen: MaskSet | None = None) -> MaskSet:
    """Project each target's weight itself (not W+U, see SPEC P4), zero the rest, return the masks.

    Several targets on one parameter intersect; ``frozen`` masks from earlier stages are kept.
    Only the support is applied here: :func:`admmcompress.finalize.hard_prune` also quantizes.
    """
    masks = masks_of(dict(model.named_parameters()), targets, frozen)
    masks.apply(model)
    return masks


# Row (output) and column (input) structures: where both hit one weight, the columns are ranked on the weight
# with the pruned rows zeroed, as SS-Auto's sequential prox (SPEC 9: rows, then columns) chooses them, so a
# column that only pruned rows used is not kept in place of one the kept rows need.
_ROW_KINDS, _COLUMN_KINDS = ("filter", "heads"), ("column", "channel")


def masks_of(params: dict[str, torch.Tensor], targets, frozen: MaskSet | None = None) -> MaskSet:
    """The masks :func:`prune_masks` would apply to ``params``, without touching them.

    Every target ranks its groups on ``params``, except column/channel targets, which rank theirs on the weight
    with the row (filter/heads) targets' pruned rows zeroed; several targets on one parameter intersect.

    >>> import torch
    >>> from admmcompress.plan import Plan, Rule
    >>> from admmcompress.structures import Column, Filter
    >>> w = {"0.weight": torch.tensor([[5.0, 0.0], [3.9, 4.0]])}   # column 0 is large mostly in row 0
    >>> plan = Plan([Rule(Filter(sparsity=0.5), match="0"), Rule(Column(sparsity=0.5), match="0")])
    >>> targets = plan.resolve(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    >>> masks_of(w, targets)["0.weight"].int().tolist()    # row 0 pruned, then column 1 kept (alone: column 0)
    [[0, 0], [0, 1]]
    """
    masks = MaskSet(frozen.masks if frozen is not None else None)
    rows = MaskSet()
    with torch.no_grad():
        for target in targets:
            if target.structure.kind in _COLUMN_KINDS:
                continue
            for name, mask in target.masks(params).items():  # one parameter, or several for a coupled target
                masks.intersect(name, mask)
                if target.structure.kind in _ROW_KINDS:
                    rows.intersect(name, mask)
        ranked = {n: p * rows[n].to(p.dtype) if n in rows else p for n, p in params.items()}
        for target in targets:
            if target.structure.kind in _COLUMN_KINDS:
                for name, mask in target.masks(ranked).items():
                    masks.intersect(name, mask)
    return masks


__all__ = ["MaskSet", "masks_from_model", "masks_of", "prune_masks"]
