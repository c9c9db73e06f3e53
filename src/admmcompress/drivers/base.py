"""The driver protocol and registry: how a method pushes training toward a plan's structures.

A driver is one class with the calls below, registered under a method name with its typed config::

    @register_driver("admm", ADMMConfig)
    class ADMM(Driver):
        @classmethod
        def from_config(cls, model, targets, config, context): ...
        def penalty(self): ...          # added to the loss at every training step (optional)
        def step(self): ...             # one update at the phase's cadence (Z/U step, reweighting, a mask step)
        def finalize(self): ...         # a MaskSet (masks, held quantized values) or a ModuleTransform
        def state_dict(self) / load_state_dict(state)

The runner, run configs (``method:`` + ``options:``), ``compress()`` and the benchmarks dispatch through
:func:`get_driver`; the cadence of ``step()`` is decided by :class:`admmcompress.train.cadence.Cadence`
alone, and a driver that needs to know how many updates its phase has reads ``context.updates``.

A driver ends in one of two things:

- a :class:`~admmcompress.finalize.MaskSet` (or ``QuantizedMaskSet``): masks and held values that keep the
  structure during retraining (pruning, quantization);
- a :class:`ModuleTransform`: the model's modules are rewritten in place (a factorized or shared-kernel
  conv replaces a conv), with optional masks to hold afterwards. The transform's ``spec()`` is recorded
  in the checkpoint and in ``metrics.json`` so that ``--resume``, ``report`` and ``export`` rebuild the
  same module structure before loading weights (``Driver.rebuild``).

A driver that acts during training rather than through the loss (e.g. noise injected by a forward hook)
does so in ``prepare(model)`` and undoes it in ``close()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from admmcompress.finalize import MaskSet
from admmcompress.plan import PlanError


class DriverError(ValueError):
    """An unknown method, a bad registration or options that do not fit the driver."""


@dataclass
class DriverContext:
    """What the runner knows about the phase a driver is built for.

    Attributes:
        frozen: masks (and held values) carried from earlier stages; None at the first stage.
        updates: how many ``step()`` calls the phase will make (from its cadence), at least 1.
        steps_per_epoch: optimizer steps per epoch.
        example: a small input batch (traces, compaction checks).
        resuming: True when the driver's state will be restored from a checkpoint next.
    """

    frozen: MaskSet | None = None
    updates: int = 1
    steps_per_epoch: int = 1
    example: torch.Tensor | None = None
    resuming: bool = False


class ModuleTransform:
    """What a reparametrizing driver ends in: an in-place rewrite of the model's modules.

    Subclasses implement :meth:`apply` (replace submodules in place; the top-level model object stays the
    same, so callers holding it see the change) and :meth:`spec` (JSON-able; the driver's ``rebuild``
    turns it back into the same module structure). ``masks`` hold after the rewrite (may be empty).
    """

    masks: MaskSet

    def apply(self, model: nn.Module) -> None:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError


class Driver:
    """Base class of every registered driver (see the module docstring for the protocol).

    Defaults: no penalty (zero), nothing to prepare or close, no masks of its own during the phase.
    ``supports_coupling`` says whether the driver accepts coupled (channel-group) targets.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = type(None)
    supports_coupling: ClassVar[bool] = False
    #: False for a driver that changes which parameters train during its phase (DDP's reducer would not follow).
    supports_distributed: ClassVar[bool] = True
    #: True for a driver that ends low-rank targets (``structure.factorizes``: tucker2, shared_kernels) in their
    #: factors (a ``FactorizeTransform``); ``accept_targets`` refuses such targets for any other driver.
    factorizes: ClassVar[bool] = False
    history: list[dict[str, Any]]

    @classmethod
    def from_config(cls, model: nn.Module, targets: list, config: Any, context: DriverContext) -> Driver:
        """Build the driver for ``targets`` of ``model`` from its typed ``config``."""
        raise NotImplementedError(f"driver '{cls.name}' does not implement from_config")

    @classmethod
    def check_targets(cls, targets: list) -> None:
        """Raise ``PlanError`` if this driver cannot drive ``targets`` (its own refusals; the default has none).
        Callers use :meth:`accept_targets`, which adds the refusals every driver shares."""

    @classmethod
    def accept_targets(cls, targets: list) -> None:
        """Raise ``PlanError`` if this driver cannot drive ``targets``, before any training: the one entry for the
        runner, the HF and Lightning callbacks and the drivers' constructors (:meth:`check_low_rank`, then
        :meth:`check_targets`, so an override need not call ``super()``)."""
        cls.check_low_rank(targets)
        cls.check_targets(targets)

    @classmethod
    def check_low_rank(cls, targets: list) -> None:
        """Raise ``PlanError`` for low-rank targets given to a driver that does not factorize (it would drive them
        as masks and leave the layers dense)."""
        low_rank = None if cls.factorizes else next((t for t in targets if t.structure.factorizes), None)
        if low_rank is not None:
            raise PlanError(
                f"method '{cls.__dict__.get('name') or cls.__name__}' does not factorize layers, so its "
                f"'{low_rank.structure.kind}' targets would stay dense; use method admm (or penni for "
                "shared_kernels), or another structure"
            )

    @classmethod
    def preflight(cls, model: nn.Module, targets: list, config: Any, example: torch.Tensor | None) -> None:
        """Raise ``ValueError`` (one line, with the fix) if ``config`` cannot work on ``model`` and ``targets``;
        called by the runner before any training (and so by ``--dry-run``). Cheap checks only: nothing is timed."""

    @classmethod
    def rebuild(cls, model: nn.Module, spec: dict[str, Any]) -> None:
        """Re-apply a recorded :class:`ModuleTransform` spec to a freshly built model (resume, report)."""
        raise NotImplementedError(f"driver '{cls.name}' ends in masks; it has no module transform to rebuild")

    def prepare(self, model: nn.Module) -> None:
        """Called when the phase starts or resumes, after any state was loaded (hooks go here)."""

    def close(self) -> None:
        """Called when the phase ends, before ``finalize()`` (remove what ``prepare`` added)."""

    def penalty(self) -> torch.Tensor:
        """A differentiable scalar added to the loss at every step (zero by default)."""
        return torch.zeros(())

    def step(self) -> Any:
        """One update at the phase's cadence; the return value is driver-specific (a log entry, masks)."""
        raise NotImplementedError

    #: Whether the driver's work is done in ``step()`` (ADMM's Z/U step, a mask step): a phase whose cadence never
    #: calls it gets a warning before training. False for a driver that prunes once when it is built.
    needs_updates: bool = True

    #: Masks this driver keeps during its phase (None: it leaves the carried masks as they are). A driver
    #: whose ``step()`` changes masks sets this attribute; the runner re-attaches it after each update.
    masks: MaskSet | None = None

    def progress(self) -> dict[str, Any]:
        """Extra fields for the per-epoch history (e.g. ADMM's residuals and rho); none by default."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Extra fields for the stage's record in metrics.json when the phase ends; none by default."""
        return {}

    def finalize(self) -> MaskSet | ModuleTransform:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class DriverSpec:
    """A registry entry: the method name, the driver class and its config dataclass."""

    name: str
    cls: type[Driver]
    config_class: type
    doc: str = field(default="", compare=False)

    def make_config(self, options: Any, where: str = "options") -> Any:
        """The typed config from a mapping (unknown keys named), an instance, or None (defaults)."""
        if isinstance(options, self.config_class):
            return options
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise DriverError(f"{where}: method '{self.name}' takes a mapping of options, got {options!r}")
        names = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise DriverError(
                f"{where}: unknown option(s) {unknown} for method '{self.name}'; allowed: {sorted(names) or 'none'}"
            )
        try:
            return self.config_class(**options)
        except (TypeError, ValueError) as err:
            raise DriverError(f"{where}: {err}") from None


# Filled by @register_driver. The built-in drivers are imported by ``admmcompress/drivers/__init__.py``,
# which Python runs before this module whatever the import path, so the registry is complete when read.
_REGISTRY: dict[str, DriverSpec] = {}


def register_driver(name: str, config_class: type) -> Callable[[type[Driver]], type[Driver]]:
    """Class decorator: register a :class:`Driver` subclass as method ``name`` with its config dataclass.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class NoOptions:
    ...     pass
    >>> @register_driver("doc_example_noop", NoOptions)
    ... class Noop(Driver):
    ...     pass
    >>> "doc_example_noop" in list_drivers()
    True
    >>> _ = unregister_driver("doc_example_noop")
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise DriverError(f"driver name {name!r} must be an identifier such as 'my_admm'")
    if not dataclasses.is_dataclass(config_class):
        raise DriverError(f"driver '{name}': its config {config_class!r} must be a dataclass")

    def decorate(cls: type[Driver]) -> type[Driver]:
        if not (isinstance(cls, type) and issubclass(cls, Driver)):
            raise DriverError(f"driver '{name}': {cls!r} must subclass admmcompress.drivers.Driver")
        existing = _REGISTRY.get(name)
        if existing is not None and (existing.cls.__module__, existing.cls.__qualname__) != (
            cls.__module__, cls.__qualname__
        ):  # the same class again (a reloaded plugin) may replace itself; another class may not
            raise DriverError(
                f"driver '{name}' is already registered by {existing.cls.__module__}.{existing.cls.__qualname__}; "
                "choose another name"
            )
        cls.name, cls.config_class = name, config_class
        _REGISTRY[name] = DriverSpec(name, cls, config_class, (cls.__doc__ or "").strip().split("\n")[0])
        return cls

    return decorate


def unregister_driver(name: str) -> DriverSpec | None:
    """Remove a registration (tests and plugin reloads)."""
    return _REGISTRY.pop(name, None)


def list_drivers() -> list[str]:
    """Registered method names (built-ins and plugins), sorted.

    >>> [m for m in list_drivers() if m in ("admm", "gradual", "magnitude", "reweighted")]
    ['admm', 'gradual', 'magnitude', 'reweighted']
    """
    return sorted(_REGISTRY)


def get_driver(name: str) -> DriverSpec:
    """The registry entry of method ``name``; an unknown name lists the registered ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise DriverError(
            f"method={name!r}; choose one of {sorted(_REGISTRY)} (or register your own with @register_driver "
            "and list its module under plugins:)"
        ) from None


__all__ = [
    "Driver", "DriverContext", "DriverError", "DriverSpec", "ModuleTransform",
    "get_driver", "list_drivers", "register_driver", "unregister_driver",
]
