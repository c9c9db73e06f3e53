"""One interface for every executor, and the registry ``admmcompress export`` builds its flags from.

An executor is what turns a structure into speed or savings. It has one verb per act:

=====================================================  ==============================================
``convert(model, masks=None, example=None, **opts)``   the fast or small model (a new ``nn.Module``;
                                                       the input model is left unchanged)
``save(model, path, **opts)``                          write a model in the executor's format
``load(path, skeleton=None, **opts)``                  read it back as an ``nn.Module``
``export(run, out, **opts) -> str``                    a finished run's model to ``out``, checked; the
                                                       returned summary is what ``admmcompress export``
                                                       prints
=====================================================  ==============================================

An act an executor does not have raises :class:`UnsupportedAct` (a ``NotImplementedError``) naming the
executor, the act and what it does support. Built-ins: ``compact`` (physical compaction, manifest +
safetensors), ``blocksparse`` (block-sparse CPU layers), ``packed`` (bit-packed storage), ``onnx``
(integer weights + DequantizeLinear), ``penni`` and ``tucker`` (decomposed convs). A plugin adds its own
with ``@register_executor("name")``; every registered executor that can ``export`` gets an
``admmcompress export --name`` flag.

``export`` takes an opened run (:class:`FinishedRun`: the model, its config, test inputs, its storage
report) rather than a folder: opening a run folder needs the training package, which sits above the
executors (``admmcompress.run_export.open_run`` opens one; ``run_export.export_run(name, dir, out)``
does both).

>>> list_executors()
['blocksparse', 'compact', 'onnx', 'packed', 'penni', 'tucker']
>>> get_executor("packed").supports("convert"), get_executor("packed").supports("save")
(False, True)
>>> get_executor("blocksparse").load("model.bin")
Traceback (most recent call last):
...
admmcompress.executors.base.UnsupportedAct: executor 'blocksparse' cannot load; it can: convert (load the masked
model, then convert it)
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

ACTS = ("convert", "save", "load", "export")
# Modules defining the built-in executors; imported before any lookup so the registry is complete.
BUILTIN_MODULES = (
    "admmcompress.executors.blocksparse",
    "admmcompress.executors.compact_run",
    "admmcompress.executors.onnx_export",
    "admmcompress.executors.packed",
    "admmcompress.executors.penni",
    "admmcompress.executors.tucker",
)
# Names the `admmcompress export` command uses itself; an executor flag may not take them.
RESERVED = frozenset({"out", "plugin", "help", "dir"})
# export_run's own keywords (run_export.py): an executor option of that name could not be passed through it.
EXPORT_RUN_KEYWORDS = frozenset({"name", "run_dir", "overwrite", "trust_plugins"})


class UnsupportedAct(NotImplementedError):
    """An executor asked for an act it does not have (e.g. ``load`` of a block-sparse conversion)."""


class ExecutorError(ValueError):
    """An unknown executor name, a bad registration or options that do not fit an executor."""


@dataclass
class FinishedRun:
    """A finished run, opened for an executor's ``export``.

    Attributes:
        folder: the run folder (``--out`` of ``admmcompress run``).
        model: the run's final model, weights loaded, in eval mode.
        model_config: the run config's ``model:`` mapping, ``{"name": ..., **constructor kwargs}``.
        settings: the whole run config as plain data (what ``config.yaml`` holds), e.g. ``settings["compact"]``.
        examples: ``count -> inputs`` from the run's test set (shapes and dtypes the model expects).
        storage_report: ``(**options) -> StorageReport`` of ``model`` (``report.storage.storage``), given
            by whoever opened the run so that executors never import the report package.

    >>> run = FinishedRun(Path("."), nn.Linear(3, 2), {"name": "toy"}, examples=lambda n: torch.zeros(n, 3))
    >>> run.example(4).shape
    torch.Size([4, 3])
    """

    folder: Path
    model: nn.Module
    model_config: dict[str, Any]
    settings: Mapping[str, Any] = field(default_factory=dict)
    examples: Callable[[int], torch.Tensor] | None = None
    storage_report: Callable[..., Any] | None = None

    def example(self, count: int = 8) -> torch.Tensor:
        """``count`` test inputs of the run's dataset."""
        if self.examples is None:
            raise ExecutorError(
                f"run '{self.folder}' was opened without example inputs; open it with "
                "admmcompress.run_export.open_run(folder) or pass examples=<count -> inputs>"
            )
        return self.examples(count)

    def storage(self, **options: Any) -> Any:
        """The storage report of the run's model (``report.storage.storage(model, **options)``)."""
        if self.storage_report is None:
            raise ExecutorError(
                f"run '{self.folder}' was opened without a storage report; open it with "
                "admmcompress.run_export.open_run(folder)"
            )
        return self.storage_report(**options)


class Executor:
    """Base class of executors: override the acts the executor has; the others raise ``UnsupportedAct``.

    Class attributes:
        name: the registered name (set by ``@register_executor``); also the ``admmcompress export`` flag.
        summary: one line for that flag's help.
        export_options: extra ``admmcompress export`` options of this executor, ``{name: argparse keywords}``
            (``index_bits`` becomes ``--index-bits``); given values reach ``export(**options)`` as strings,
            options left out are not passed (the executor's own defaults apply).
        hints: per act an executor lacks, where to go instead (shown in the ``UnsupportedAct`` message).
        writes_folder: ``export`` writes a folder at ``--out`` (not one file): the command then takes a new or
            empty folder there.

    >>> class Identity(Executor):
    ...     def convert(self, model, masks=None, example=None, **options):
    ...         return model
    >>> Identity().acts()
    ('convert',)
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    export_options: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    hints: ClassVar[Mapping[str, str]] = {}
    writes_folder: ClassVar[bool] = False

    def convert(
        self, model: nn.Module, masks: Any = None, example: Any = None, **options: Any
    ) -> nn.Module:
        """The fast/small model made from ``model`` (masks applied first when given); ``model`` is unchanged."""
        raise self._unsupported("convert")

    def save(self, model: nn.Module, path: str | Path, **options: Any) -> Any:
        """Write ``model`` to ``path`` in this executor's format; returns what was written (a summary or path)."""
        raise self._unsupported("save")

    def load(self, path: str | Path, skeleton: nn.Module | None = None, **options: Any) -> nn.Module:
        """Read a model written by ``save`` (``skeleton``: an instance of its architecture, when needed)."""
        raise self._unsupported("load")

    def export(self, run: FinishedRun, out: str | Path, **options: Any) -> str:
        """Write the finished ``run``'s model to ``out``, check it, and return the summary to print."""
        raise self._unsupported("export")

    @classmethod
    def acts(cls) -> tuple[str, ...]:
        """The acts this executor has (those it overrides)."""
        return tuple(act for act in ACTS if getattr(cls, act) is not getattr(Executor, act))

    def supports(self, act: str) -> bool:
        """Whether ``act`` (one of convert, save, load, export) is available."""
        if act not in ACTS:
            raise ExecutorError(f"unknown act '{act}'; acts are {', '.join(ACTS)}")
        return act in self.acts()

    def _unsupported(self, act: str) -> UnsupportedAct:
        label = self.name or type(self).__name__
        hint = self.hints.get(act)
        return UnsupportedAct(
            f"executor '{label}' cannot {act}; it can: {', '.join(self.acts()) or 'nothing'}"
            + (f" ({hint})" if hint else "")
        )

    def __repr__(self) -> str:
        return f"<executor '{self.name or type(self).__name__}': {', '.join(self.acts())}>"


# The registry: name -> class. Read it through get_executor / list_executors (they import the built-ins).
_EXECUTORS: dict[str, type[Executor]] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")

E = TypeVar("E", bound=type[Executor])


def image_batch(x: torch.Tensor, who: str, in_channels: int) -> tuple[torch.Tensor, bool]:
    """``(x as a 4-D batch, whether it came batched)`` for a conv replacement, checked as ``nn.Conv2d`` checks its
    input: 3-D or 4-D, ``in_channels`` channels (a replacement's own product would fail later, or not at all).

    >>> image_batch(torch.zeros(3, 4, 4), "conv", 3)[0].shape
    torch.Size([1, 3, 4, 4])
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"{who}: expected a 3-D (channels, height, width) or 4-D (batch, channels, height, width) "
                         f"input, got shape {tuple(x.shape)}")
    batched = x.dim() == 4
    x = x if batched else x.unsqueeze(0)
    if x.shape[1] != in_channels:
        raise ValueError(f"{who}: input has {x.shape[1]} channels, expected in_channels={in_channels}")
    return x, batched


def _same_class(a: type, b: type) -> bool:
    # A re-imported module (a reloaded plugin) defines a new class object with the same name.
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register_executor(name: str) -> Callable[[E], E]:
    """Class decorator: register an :class:`Executor` subclass under ``name`` (its ``export`` flag too).

    >>> @register_executor("doc_identity")
    ... class DocIdentity(Executor):
    ...     def convert(self, model, masks=None, example=None, **options):
    ...         return model
    >>> get_executor("doc_identity").acts()
    ('convert',)
    >>> unregister_executor("doc_identity")
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED:
        raise ExecutorError(
            f"register_executor: name={name!r} must be lowercase letters, digits and '_', starting with a "
            f"letter, and not one of {sorted(RESERVED)} (it becomes the `admmcompress export --<name>` flag)"
        )

    def decorate(cls: E) -> E:
        if not (isinstance(cls, type) and issubclass(cls, Executor)):
            raise TypeError(
                f"register_executor('{name}'): {cls!r} is not an Executor; derive it from "
                "admmcompress.executors.Executor"
            )
        if cls.__module__ not in BUILTIN_MODULES:
            _load_builtins()  # a plugin taking a built-in's name fails here, not when the built-in loads
        holder = _EXECUTORS.get(name)
        if holder is not None and not _same_class(holder, cls):
            raise ExecutorError(
                f"register_executor: '{name}' already names {holder.__module__}.{holder.__qualname__}; "
                "choose another name"
            )
        _check_flags(name, cls)
        cls.name = name
        _EXECUTORS[name] = cls
        return cls

    return decorate


def _check_flags(name: str, cls: type[Executor]) -> None:
    """Flags and options of `admmcompress export` must not collide (executors may share an option)."""
    options = set(cls.export_options)
    others = {n: c for n, c in _EXECUTORS.items() if n != name}
    shared = {o: n for n, c in others.items() for o in c.export_options}
    bad = sorted(o for o in options if not isinstance(o, str) or not _NAME.fullmatch(o))
    clash = sorted(o for o in options - set(bad) if o in RESERVED | EXPORT_RUN_KEYWORDS or o in others or o == name)
    if bad or clash or name in shared:
        problem = (
            f"export option names {bad} are not lowercase identifiers" if bad
            else f"export option(s) {clash} clash with `admmcompress export` arguments, export_run's keywords or "
            "executor flags" if clash
            else f"its flag --{name} is already an export option of '{shared[name]}'"
        )
        raise ExecutorError(f"register_executor('{name}'): {problem}; rename them")


def unregister_executor(name: str) -> None:
    """Remove ``name`` from the registry (for tests and reloaded plugins)."""
    if name not in _EXECUTORS:
        raise ExecutorError(f"unregister_executor: no executor is registered as '{name}'")
    del _EXECUTORS[name]


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)  # each registers its executor when it first runs


def list_executors(act: str | None = None) -> list[str]:
    """Registered executor names, sorted; ``act`` keeps those that have it (e.g. ``"export"``).

    >>> list_executors("load")
    ['compact', 'packed']
    """
    _load_builtins()
    if act is not None and act not in ACTS:
        raise ExecutorError(f"list_executors: unknown act '{act}'; acts are {', '.join(ACTS)}")
    return sorted(n for n, cls in _EXECUTORS.items() if act is None or act in cls.acts())


def get_executor(name: str) -> Executor:
    """The executor registered as ``name`` (a new instance; executors keep no state).

    >>> get_executor("compact")
    <executor 'compact': convert, save, load, export>
    """
    _load_builtins()
    cls = _EXECUTORS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ExecutorError(
            f"unknown executor {name!r}; registered: {', '.join(list_executors())} "
            "(load a plugin's executor with `--plugin MODULE_OR_FILE` or the run config's `plugins:`)"
        )
    return cls()


def reject_unknown(executor: str, act: str, options: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """One clear line when ``options`` holds keywords ``act`` does not take."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ExecutorError(
            f"{executor}.{act}: unknown option(s) {unknown}; it takes {', '.join(allowed) or 'none'}"
        )


__all__ = [
    "ACTS",
    "Executor",
    "ExecutorError",
    "FinishedRun",
    "UnsupportedAct",
    "get_executor",
    "list_executors",
    "register_executor",
    "reject_unknown",
    "unregister_executor",
]
