"""The ADMM driver: pushes training toward each target's structure through a quadratic penalty.

For every target i the driver keeps ``Z_i`` (a feasible copy), ``U_i`` (the scaled dual)
and ``rho_i``. The W-step is the user's optimizer on
``loss + sum_i rho_i/2 * ||W_i - Z_i + U_i||_F^2`` (the squared norm: its gradient
``rho_i (W_i - Z_i + U_i)`` is finite everywhere, unlike a square-root penalty, SPEC P1);
``step()`` does the Z-step ``Z_i = project(W_i + U_i)``, the U-step ``U_i += W_i - Z_i``
and the rho schedule. The driver never knows which structure it drives: it only calls
``structure.project``.

Three lines in your own loop::

    admm = ADMM(model, plan)                     # Z = project(W), U = 0 from the pretrained W
    for epoch in range(epochs):
        for x, y in loader:
            loss = loss_fn(model(x), y) + admm.penalty()
            opt.zero_grad(); loss.backward(); opt.step()
        admm.step()                              # Z-, U-update, rho schedule, residual log
    masks = admm.finalize()                      # hard prune; masks.attach(model, new_opt) to retrain
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from admmcompress.drivers.base import Driver, DriverContext, ModuleTransform, register_driver
from admmcompress.drivers.factorize import FactorizeTransform, check_factorized_targets
from admmcompress.finalize import MaskSet, hard_prune
from admmcompress.plan import CoupledTarget, Plan, Target, resolve_targets
from admmcompress.structures.scalars import plain_number

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _finite(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        hint = " (YAML read it as text: write it with a dot, e.g. 1.0e-3)" if isinstance(value, str) else ""
        raise ValueError(f"{name}={value!r} must be a finite number{hint}")


@dataclass(frozen=True)
class RhoSchedule:
    """rho starts at ``initial`` and is multiplied by ``growth`` after each ADMM update, up to ``maximum``.

    ``growth=1.0`` gives the constant-rho recipe (the TF LeNet-5 code uses 1e-4 constant);
    the default 1e-3 x1.3 follows the PyTorch progressive code (SPEC 1.3). The cap keeps a
    growing rho from freezing training (SPEC P8). This is the one place rho is validated.

    ``rescale_dual``: U is the *scaled* dual (the multiplier divided by rho), so when rho grows the
    multiplier it stands for grows with it unless U is rescaled by ``rho_old / rho_new`` (Boyd et al.
    2011, section 3.4.1). The reference pruning code does not rescale, so the default keeps its
    behaviour; ``True`` keeps the multiplier itself unchanged across the growth.

    >>> RhoSchedule(1e-3, 2.0, rescale_dual=True).dual_scale(1e-3)
    0.5
    """

    initial: float = 1e-3
    growth: float = 1.3
    maximum: float | None = None  # default: max(1.0, initial)
    rescale_dual: bool = False

    def __post_init__(self) -> None:
        for key in ("initial", "growth", "maximum"):  # np.float32(1e-3) or a 0-d tensor is the number it holds
            object.__setattr__(self, key, plain_number(getattr(self, key)))
        if isinstance(self.initial, str):
            _finite(self.initial, "rho")
        if isinstance(self.initial, bool) or not (
            isinstance(self.initial, (int, float)) and self.initial > 0 and math.isfinite(self.initial)
        ):
            raise ValueError(f"rho={self.initial!r} must be a positive number, e.g. 1e-3")
        if self.maximum is None:
            object.__setattr__(self, "maximum", max(1.0, float(self.initial)))
        _finite(self.maximum, "rho_max")
        if isinstance(self.growth, str):
            _finite(self.growth, "rho_growth")
        if not self.growth >= 1.0:
            raise ValueError(f"rho_growth={self.growth!r} must be >= 1 (1 keeps rho constant)")
        _finite(self.growth, "rho_growth")
        if not self.maximum >= self.initial:
            raise ValueError(f"rho_max={self.maximum!r} must be >= rho={self.initial!r}")
        for name, value in (("rho", self.initial), ("rho_max", self.maximum)):  # the penalty is summed in float32
            if value > FLOAT32_MAX:
                raise ValueError(f"{name}={value!r} is beyond float32's range (about 3.4e38): the penalty would be "
                                 "infinite; give a realistic value, e.g. 1e-3")
        if type(self.rescale_dual).__module__ == "numpy" and type(self.rescale_dual).__name__ in ("bool", "bool_"):
            object.__setattr__(self, "rescale_dual", bool(self.rescale_dual))
        if not isinstance(self.rescale_dual, bool):
            raise ValueError(f"rescale_dual={self.rescale_dual!r} must be true or false")

    def next(self, rho: float) -> float:
        return min(rho * self.growth, self.maximum)

    def dual_scale(self, rho: float) -> float:
        """The factor U takes when rho steps from ``rho`` to ``next(rho)``: 1 unless ``rescale_dual``."""
        return rho / self.next(rho) if self.rescale_dual else 1.0


@dataclass(frozen=True)
class ADMMConfig:
    """Options of method ``admm`` (a run config's ``options:``; older configs give them inside ``admm:``).

    >>> ADMMConfig(rho=1e-3, rho_growth=1.1).schedule()
    RhoSchedule(initial=0.001, growth=1.1, maximum=1.0, rescale_dual=False)
    """

    rho: float = 1e-3
    rho_growth: float = 1.3
    rho_max: float = 1.0
    rescale_dual: bool = False  # RhoSchedule: U rescaled as rho grows (off: the reference code's behaviour)

    def __post_init__(self) -> None:
        for key in ("rho", "rho_growth", "rho_max"):  # numpy/torch scalars: the Python numbers they hold
            object.__setattr__(self, key, plain_number(getattr(self, key)))
        self.schedule()  # validates

    def schedule(self) -> RhoSchedule:
        return RhoSchedule(self.rho, self.rho_growth, self.rho_max, self.rescale_dual)


@register_driver("admm", ADMMConfig)
class ADMM(Driver):
    """ADMM state for every target of a plan on one model (shaped like an optimizer's state).

    Args:
        model: the model being trained (weights are read at construction: start from a pretrained model).
        plan: a ``Plan`` or the resolved targets.
        rho: initial rho, or a full ``RhoSchedule``.
        frozen: masks from an earlier stage (progressive pruning); they are merged into ``finalize()``.
    """

    factorizes = True  # low-rank targets end in their factors (FactorizeTransform)

    def __init__(
        self,
        model: torch.nn.Module,
        plan: Plan | list[Target],
        rho: float | RhoSchedule = 1e-3,
        frozen: MaskSet | None = None,
    ):
        self.model = model
        self.targets: list[Target] = resolve_targets(model, plan, type(self).__name__)
        self.accept_targets(self.targets)  # as the runner does: a rule this driver would drop is refused here too
        self.schedule = rho if isinstance(rho, RhoSchedule) else RhoSchedule(initial=plain_number(rho))
        self.frozen = frozen
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self._params = dict(model.named_parameters())
        self.state: dict[str, dict[str, Any]] = {}
        # Pruning targets before quantization targets: a layer's levels are fit on the weights its pruning keeps.
        self.targets = sorted(self.targets, key=lambda t: t.structure.quantizes)
        with torch.no_grad():
            for t in self.targets:
                w = t.value(self._params)
                self.state[t.key] = {
                    "Z": self._project(t, w.detach()),
                    "U": torch.zeros_like(w),
                    "rho": self.schedule.initial,
                }
        self._refresh_anchors()

    def _project(self, target: Target, value: torch.Tensor) -> torch.Tensor:
        """``Z = project(value)``; for a quantization target, on the support of its layer's pruning (this step's
        pruning Z of the same weight, and the masks of earlier stages).

        Pruning and quantizing one weight in one stage: SPEC 2.1 fits the levels on the nonzero weights and skips
        the pruned ones, which stay 0. Projected on all of ``W + U`` the levels were fit to the whole distribution
        (a review's finding: levels +-0.036/0.072 where the kept weights end at +-0.095), and the weights about to
        be pruned were pulled toward +-q instead of 0."""
        if not target.structure.quantizes:
            return target.structure.project(value)
        keep = self._kept(target.param_name)
        return target.structure.project(value if keep is None else value * keep.to(value.device))

    def _kept(self, name: str) -> torch.Tensor | None:
        """Where the pruning targets' Z (and earlier stages' masks) keep parameter ``name``; None: everywhere."""
        keep = self.frozen.masks.get(name) if self.frozen is not None else None
        for t in self.targets:
            if t.structure.quantizes or t.key not in self.state:
                continue
            z = self.state[t.key]["Z"]
            if isinstance(t, CoupledTarget):
                if name not in t.param_names:
                    continue
                part = t.masks_for_channels(self._params, (z != 0).any(dim=1))[name]
            elif t.param_name == name:
                part = z != 0
            else:
                continue
            keep = part if keep is None else keep & part.to(keep.device)
        return keep

    supports_coupling = True

    @classmethod
    def from_config(cls, model: torch.nn.Module, targets: list[Target], config: ADMMConfig,
                    context: DriverContext) -> ADMM:
        return cls(model, targets, rho=config.schedule(), frozen=context.frozen)

    # --- the W-step penalty -------------------------------------------------------------
    def _refresh_anchors(self) -> None:
        # The penalty only needs Z - U; caching it halves the per-batch work.
        self._anchors = {k: (s["Z"] - s["U"]).detach() for k, s in self.state.items()}

    def _follow_model(self) -> None:
        """Read the model's parameters anew: ``load_state_dict(assign=True)``, or a conversion that makes new
        tensors, replaces them, and a penalty on the old ones would train nothing. A model moved to another
        device takes Z and U along."""
        self._params = dict(self.model.named_parameters())
        names = (n for t in self.targets for n in t.param_names)
        device = next((self._params[n].device for n in names if n in self._params), None)
        if device is not None and any(s["Z"].device != device for s in self.state.values()):
            for s in self.state.values():
                s["Z"], s["U"] = s["Z"].to(device), s["U"].to(device)
            self._refresh_anchors()

    def penalty(self) -> torch.Tensor:
        """``sum_i rho_i/2 * ||W_i - Z_i + U_i||_F^2`` as a differentiable scalar."""
        self._follow_model()
        total = None
        for t in self.targets:
            diff = t.value(self._params) - self._anchors[t.key]
            term = 0.5 * self.state[t.key]["rho"] * diff.pow(2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return total

    # --- Z-, U-steps ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> dict[str, Any]:
        """One ADMM update: Z = project(W + U), U += W - Z, rho schedule. Returns the log entry."""
        entry: dict[str, Any] = {"iteration": self.iteration + 1, "rho": {}, "residual": {}, "dual": {}}
        self._follow_model()
        for t in self.targets:
            s = self.state[t.key]
            w = t.value(self._params).detach()
            z_old = s["Z"]
            s["Z"] = self._project(t, w + s["U"])
            s["U"] += w - s["Z"]
            entry["rho"][t.key] = s["rho"]
            entry["residual"][t.key] = _relative(w - s["Z"], w)
            entry["dual"][t.key] = _relative(s["Z"] - z_old, w)
            if (scale := self.schedule.dual_scale(s["rho"])) != 1.0:  # off by default: no pass over U
                s["U"] *= scale
            s["rho"] = self.schedule.next(s["rho"])
        self.iteration += 1
        self.history.append(entry)
        self._refresh_anchors()
        return entry

    @torch.no_grad()
    def residuals(self) -> dict[str, float]:
        """Current ``||W - Z|| / ||W||`` per target (0 means W already satisfies the structure)."""
        return {
            t.key: _relative(t.value(self._params).detach() - self.state[t.key]["Z"], t.value(self._params))
            for t in self.targets
        }

    def progress(self) -> dict[str, Any]:
        return {"residual": self.residuals(), "rho": max((s["rho"] for s in self.state.values()), default=0.0)}

    def summary(self) -> dict[str, Any]:
        return {"admm_history": self.history}

    def finalize(self) -> MaskSet | ModuleTransform:
        """Hard-prune each target from W itself; returns the masks (attach them for retraining).

        Low-rank targets (``tucker2``, ``shared_kernels``) end in a ``FactorizeTransform`` instead: their convs
        are replaced by the factors of W, and the other targets' masks hold afterwards.
        """
        self._warn_if_not_converging()
        factored = [t for t in self.targets if t.structure.factorizes]
        masks = hard_prune(self.model, [t for t in self.targets if not t.structure.factorizes], self.frozen)
        if not factored:
            return masks
        return FactorizeTransform({t.layer: t.structure for t in factored}, masks)

    @classmethod
    def check_targets(cls, targets: list) -> None:
        check_factorized_targets(targets)

    @classmethod
    def rebuild(cls, model: torch.nn.Module, spec: dict[str, Any]) -> None:
        FactorizeTransform.rebuild(model, spec)

    @torch.no_grad()
    def _warn_if_not_converging(self) -> None:
        """Warn when the hard prune moves W as far as pruning the starting weights would have: the first update's
        residual is ``||W0 - proj(W0)|| / ||W0||`` (U starts at 0), and what ADMM is for is making the final
        ``||W - proj(W)|| / ||W||`` smaller. The residual ``||W - Z||`` itself usually rises before it falls (Z and
        U move early on), so its last value against its first said "did not decrease" on most short schedules
        (a user review's finding on the quick start's schedule)."""
        if len(self.history) < 2:
            return
        first = self.history[0]["residual"]
        now = {}
        for t in self.targets:
            if t.key in first and first[t.key] > 1e-6 and not t.structure.factorizes:
                w = t.value(self._params).detach()
                now[t.key] = _relative(w - self._project(t, w), w)
        stuck = [k for k, d in now.items() if d >= first[k]]
        if stuck:
            shown = ", ".join(f"{k} {first[k]:.3g} -> {now[k]:.3g}" for k in stuck[:4])
            warnings.warn(
                f"ADMM residual: W came no closer to its structure for {stuck} (||W - proj(W)||/||W|| at the first "
                f"update and now: {shown}); hard pruning may cost accuracy. Train longer per ADMM iteration or raise "
                "rho",
                RuntimeWarning,
                stacklevel=3,
            )

    # --- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "history": list(self.history),  # a snapshot: later steps must not append to it
            "state": {k: {"Z": s["Z"].clone(), "U": s["U"].clone(), "rho": s["rho"]} for k, s in self.state.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        entries = state.get("state") if isinstance(state, dict) else None
        if not isinstance(entries, dict) or not {"iteration", "history"} <= set(state):
            raise ValueError(
                "ADMM.load_state_dict: this is not an ADMM driver state (it needs 'iteration', 'history' and "
                "'state'); pass what ADMM.state_dict() returned"
            )
        missing = sorted(set(self.state) - set(entries))
        extra = sorted(set(entries) - set(self.state))
        if missing or extra:
            raise ValueError(f"ADMM state does not match the plan: missing {missing}, unexpected {extra}")
        for k, s in entries.items():
            want = tuple(self.state[k]["Z"].shape)
            got = {n: tuple(s[n].shape) if isinstance(s, dict) and isinstance(s.get(n), torch.Tensor) else None
                   for n in ("Z", "U")}
            rho = s.get("rho") if isinstance(s, dict) else None
            number = isinstance(rho, (int, float)) or (isinstance(rho, torch.Tensor) and rho.numel() == 1)
            if any(shape != want for shape in got.values()) or not number:
                raise ValueError(
                    f"ADMM state of '{k}': Z {got['Z']}, U {got['U']} (tensors of the target's shape {want} and a "
                    "number rho expected); load the state saved with this model and plan"
                )
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        for k, s in state["state"].items():
            self.state[k] = {"Z": s["Z"].clone(), "U": s["U"].clone(), "rho": float(s["rho"])}
        self._refresh_anchors()


def _relative(diff: torch.Tensor, ref: torch.Tensor) -> float:
    denom = ref.detach().norm().item()
    return diff.norm().item() / denom if denom > 0 else diff.norm().item()
