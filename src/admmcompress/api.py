"""One call for users without their own loop: ``compress(model, plan, train, test, ...)``."""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from admmcompress.atomic import nearest_existing
from admmcompress.command_locks import clean_leftovers
from admmcompress.config_keys import SPEED_KEYS
from admmcompress.data.datasets import Split
from admmcompress.finalize import MaskSet
from admmcompress.messages import short_repr
from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.report.render import render_markdown, save_report
from admmcompress.train.checkpoint import RESTART_API, CheckpointError
from admmcompress.train.config import (
    ADMMPhaseConfig,
    CompactRunConfig,
    PhaseConfig,
    RunConfig,
    StageConfig,
    config_dict,
)
from admmcompress.train.lock import RunLock
from admmcompress.train.run_folder import IN_MEMORY, MISSING, RUN_SUBFOLDERS, config_diff
from admmcompress.train.runner import STATE_FILE, Runner
from admmcompress.train.training_state import load_training_state

# What CompressionResult.save writes (report.render.save_report and plot_run): the files it would replace.
SAVED_FILES = ("metrics.json", "report.md", "sparsity.png", "training.png", "rates.png")


class OutputFolderError(ValueError):
    """An ``out_dir`` that ``compress`` or ``CompressionResult.save`` cannot use (one line naming it and the fix)."""


def usable_folder(out_dir: str | Path, who: str) -> Path:
    """``out_dir`` as a Path, after checking that it is (or can be made as) a folder this process can write into.

    Checked up front so that a file or a read-only folder is refused before anything trains or is written;
    a missing folder is not created here (its nearest existing parent is probed instead).
    """
    if not str(out_dir).strip():
        raise OutputFolderError(f"{who}: out_dir is empty; give a folder name")
    folder = Path(out_dir)
    existing = nearest_existing(folder)
    if not existing.is_dir():
        what = "is a file" if existing == folder else f"cannot be made: '{existing}' on its path is a file"
        raise OutputFolderError(f"{who}: out_dir '{folder}' {what}; choose a folder for the outputs")
    try:
        with tempfile.TemporaryFile(dir=existing):  # a probe: permission bits miss read-only mounts and ACLs
            pass
    except OSError as err:
        raise OutputFolderError(
            f"{who}: cannot write into out_dir '{folder}' ({err.strerror or err}); choose a folder you can write to"
        ) from None
    return folder


@dataclass
class CompressionResult:
    """The compressed (masked) model, its masks, the measured metrics and per-epoch history.

    With ``compact=...``, ``compacted`` is the physically smaller model (checked against ``model``) and
    ``metrics["compaction"]`` its figures (parameters and MACs before/after, max |diff|).
    """

    model: nn.Module
    masks: MaskSet
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    compacted: nn.Module | None = field(default=None)

    @property
    def report(self) -> str:
        return render_markdown(self.metrics)

    def save(self, out_dir: str | Path, title: str = "admmcompress report", overwrite: bool = False) -> str:
        """Write report.md, metrics.json and the plots (``SAVED_FILES``) into ``out_dir``; return the markdown.

        As on the command line, nothing is written over by accident: ``out_dir`` may be new, empty or hold
        other files (the checkpoint of ``compress(out_dir=...)``), but files it would replace are refused
        (``OutputFolderError``) unless ``overwrite=True``. Each file is written atomically.
        """
        folder = Path(out_dir)
        present = [name for name in SAVED_FILES if (folder / name).exists() or (folder / name).is_symlink()]
        taken = [name for name in present if (folder / name).is_dir()]
        if taken:  # overwrite or not, a file cannot replace a folder
            raise OutputFolderError(
                f"save: '{folder / taken[0]}' is a folder where save writes a file; choose another out_dir or move it"
            )
        if present and not overwrite:
            raise OutputFolderError(
                f"save: '{folder}' already holds {', '.join(present)}; save does not overwrite: choose another "
                "out_dir, remove them, or pass overwrite=True"
            )
        return save_report(usable_folder(folder, "save"), self.metrics, self.history, title)


def compress(
    model: nn.Module,
    plan: Plan | list[Plan],
    train: Split,
    test: Split,
    *,
    method: str = "admm",
    admm: ADMMPhaseConfig | dict[str, Any] | None = None,
    retrain: PhaseConfig | dict[str, Any] | None = None,
    options: Any = None,
    coupling: str = "none",
    compact: bool | dict[str, Any] | CompactRunConfig | None = None,
    batch_size: int = 64,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool | str = False,
    loss_fn: Callable[[Any, torch.Tensor, nn.Module], torch.Tensor] | None = None,
    reweighted: Any = None,
    overwrite: bool = False,
    resume: bool = False,
) -> CompressionResult:
    """Compress a trained ``model`` toward ``plan`` with the reference loop.

    ``train`` and ``test`` are each an ``admmcompress.data.Split`` (``load_dataset``) or a torch ``Dataset`` (e.g.
    ``TensorDataset(x, y)``), batched by ``batch_size`` and ``seed`` (a ``DataLoader`` or a tuple of tensors is
    refused in one line naming the fix). A list of plans runs progressive (multi-step) pruning, each step starting
    from the last (a list of rules is one plan). ``method`` is any registered driver
    (``admmcompress.drivers.list_drivers()``): "admm", "gradual" (iterative magnitude) or "magnitude" (one-shot),
    all with the same epoch budget; "reweighted" is reweighted group lasso; "iterative_quantization" freezes a
    growing share of each quantized layer on its levels at every update of the ``admm`` phase (plans with
    quantization rules only; prune first with a run config's earlier stage); plugins add their own. ``admm`` is the
    driving phase of every method (epochs, optimizer, update cadence); ``options`` the method's own config, a
    mapping or its dataclass (``{"rho": 1e-3}`` for admm, ``{"penalty": 1e-4}`` for reweighted; ``reweighted=`` is
    its deprecated spelling). ``loss_fn(batch, output, model)`` replaces cross-entropy in every phase. With
    ``out_dir``, state is checkpointed there every epoch (a file or a folder this process cannot write into is
    refused, ``OutputFolderError``, before training, and so is one holding an earlier run's checkpoint unless
    ``overwrite=True``). ``resume=True`` continues a call that was interrupted from its last checkpoint in
    ``out_dir``: pass the same model (as it was before that call), data and arguments; arguments that differ
    from the interrupted call's are refused in one line naming them (the data and ``loss_fn`` cannot be
    checked). An interrupted call (an exception, or Ctrl-C in a notebook) takes its mask hooks and dropout
    changes off the model object it was given, but the layers a finished stage rewrote (PENNI's
    ``SharedKernelConv``, Tucker-2) stay rewritten: ``resume=True`` with a model carrying such layers, or this
    library's mask hooks, is refused in one line (the weights themselves come from the checkpoint). While a call
    runs, ``out_dir`` is locked against a second one. An empty list of plans is a ``PlanError``. ``progress``:
    False (quiet), True (progress bars) or ``"epochs"`` (one line per epoch on stderr, as ``admmcompress run
    --no-progress`` prints).

    ``coupling`` ("none", "strict" or "extend") is a run config stage's ``coupling``: filter/channel
    targets on tied channels become one coupled target per channel group (``Plan.resolve_coupled``).
    ``compact`` is the run-level ``compact:`` of a run config: ``True`` or a mapping such as
    ``{"atol": 1e-4, "samples": 8, "columns": "off"}`` (or a ``CompactRunConfig``). The plan is checked
    before training (``ConfigError`` if compaction could not remove what it prunes); after the last stage
    the model is compacted, checked against the masked model on random inputs (``CompactionError`` if
    ``max |diff| > atol``), returned as ``result.compacted`` and, with ``out_dir``, saved to
    ``out_dir/compact`` (``manifest.json`` + ``model.safetensors``; reload with
    ``load_compacted(folder, skeleton)``).

    >>> from admmcompress import Plan, Unstructured, compress  # doctest: +SKIP
    >>> result = compress(model, Plan({"fc1": Unstructured(compression=50)}), train, test,
    ...                   admm={"epochs": 4}, retrain={"epochs": 2})  # doctest: +SKIP
    >>> print(result.report)  # doctest: +SKIP

    Structured pruning that runs faster (50% coupled filters, then a smaller dense model):

    >>> from admmcompress import Filter, Rule  # doctest: +SKIP
    >>> plan = Plan([Rule(Filter(sparsity=0.5), type="Conv2d")])  # doctest: +SKIP
    >>> result = compress(model, plan, train, test, coupling="strict", compact=True,
    ...                   admm={"epochs": 4}, retrain={"epochs": 2})  # doctest: +SKIP
    >>> result.compacted, result.metrics["compaction"]["params_after"]  # doctest: +SKIP
    """
    if reweighted is not None:
        warnings.warn("compress(reweighted=...) is deprecated: pass options=... (the method's own config)",
                      DeprecationWarning, stacklevel=2)
        options = reweighted if options is None else options
    if isinstance(plan, list) and plan and all(isinstance(r, Rule) for r in plan):  # one plan's rules, not steps
        plan = Plan(plan)
    plans = plan if isinstance(plan, list) else [plan]
    if not plans:  # no stage would run: the model would come back untouched
        raise PlanError("compress: the plan list is empty; give a Plan, or a list of Plans (one per pruning step)")
    stages = [
        StageConfig(plan=p, method=method, admm=admm or ADMMPhaseConfig(), retrain=retrain or PhaseConfig(),
                    options=options, coupling=coupling)
        for p in plans
    ]
    config = RunConfig(model={"name": type(model).__name__}, data={"batch_size": batch_size}, seed=seed,
                       pretrained=IN_MEMORY, stages=stages, compact=compact)
    if resume and overwrite:
        raise ValueError("compress: resume=True continues the earlier call and overwrite=True replaces it; pass one")
    if out_dir is None:
        if resume:
            raise ValueError("compress: resume=True needs out_dir=, the folder the interrupted call checkpointed to")
        return _compress(config, model, train, test, None, progress, loss_fn, resume)
    out_dir = usable_folder(out_dir, "compress")  # refused now, not after the first epoch's checkpoint
    lock = RunLock(out_dir, "choose another out_dir").acquire()  # a second call on this folder is refused meanwhile
    try:
        clean_leftovers(out_dir, below=RUN_SUBFOLDERS)  # temp files of writes a kill cut short; we hold the lock
        saved = _check_resume(out_dir, config, resume, overwrite)
        if saved is not None:
            _check_model_untouched(model, saved)
        return _compress(config, model, train, test, out_dir, progress, loss_fn, resume)
    finally:
        lock.release()


def _check_resume(out_dir: Path, config: RunConfig, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Refuse to replace an earlier call's checkpoint by accident, or to resume one made with other arguments;
    the checkpoint's training state when resuming."""
    state_file = out_dir / STATE_FILE
    if not resume:
        if state_file.exists() and not overwrite:  # an earlier run's state: not replaced by accident
            raise OutputFolderError(
                f"compress: out_dir '{out_dir}' already holds {STATE_FILE} of an earlier run; pass resume=True to "
                "continue it, overwrite=True to replace it, or choose another out_dir"
            )
        return
    if not state_file.is_file():
        raise OutputFolderError(
            f"compress: resume=True, but out_dir '{out_dir}' holds no {STATE_FILE} (the call stopped before its "
            "first checkpoint, or this is another folder); call without resume=True to start"
        )
    try:
        state = load_training_state(state_file)
    except CheckpointError as err:  # the problem alone, with compress's advice
        raise OutputFolderError(f"compress: {err.problem}; {RESTART_API}") from None
    saved = state.get("config")
    if not isinstance(saved, dict) or saved.get("pretrained") != IN_MEMORY:
        raise OutputFolderError(
            f"compress: '{state_file}' does not record the arguments of its call (written by `admmcompress run`, or "
            "before compress could resume), so they cannot be checked; continue it with `admmcompress run --resume`, "
            "or pass overwrite=True to start over"
        )
    diff = {k: v for k, v in config_diff(_sections(saved), _sections(config_dict(config))).items()
            if k not in SPEED_KEYS}
    if diff:
        shown = "; ".join(f"{k}: {_short(old)} -> {_short(new)}" for k, (old, new) in list(diff.items())[:3])
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise ValueError(
            f"compress: resume=True, but the arguments differ from the interrupted call's: {shown}{more}; pass the "
            "same arguments, or overwrite=True to start over"
        )
    return state


# The modules a recorded module transform (``Runner.transforms``) puts in place of a layer: found at a layer the
# checkpoint's transforms name, they were put there by the interrupted call itself.
def _rewritten_types() -> tuple[type[nn.Module], ...]:
    from admmcompress.executors.penni import SharedKernelConv
    from admmcompress.executors.tucker import Tucker2Conv

    return SharedKernelConv, Tucker2Conv


def _library_hook(hook: Any) -> bool:
    """Whether a tensor hook is one this library's masks register (``MaskSet.attach`` and its subclasses)."""
    return hook is torch.zeros_like or str(getattr(hook, "__module__", "")).startswith("admmcompress.")


def _check_model_untouched(model: nn.Module, state: dict[str, Any]) -> None:
    """resume=True: refuse, in one line, a model that still carries what a call of this library put on it
    (mask gradient hooks; layers the checkpoint's module transforms rewrote, e.g. into ``SharedKernelConv``): the
    checkpoint is restored onto the model as it was before the interrupted call, and onto anything else it gives
    other weights than an uninterrupted call (or does not load)."""
    # torch keeps a tensor's gradient hooks in the private `_backward_hooks` (unchanged since torch 1.0; there is no
    # public list). A torch without it skips this check rather than failing: the transforms' check below still runs.
    hooked = [name for name, param in model.named_parameters()
              if any(_library_hook(h) for h in (getattr(param, "_backward_hooks", None) or {}).values())]
    modules = dict(model.named_modules())
    rewritten = [f"'{layer}' ({type(modules[layer]).__name__})"
                 for entry in state.get("transforms") or [] if isinstance(entry, dict)
                 for layer in ((entry.get("spec") or {}).get("factorized") or {})
                 if isinstance(modules.get(layer), _rewritten_types())]
    if not (hooked or rewritten):
        return
    found = (f"mask gradient hooks on {', '.join(repr(n) for n in hooked[:3])}{' ...' if len(hooked) > 3 else ''}"
             if hooked else f"layers {', '.join(rewritten[:3])}{' ...' if len(rewritten) > 3 else ''} already "
             "rewritten by the interrupted call")
    raise ValueError(
        f"compress: resume=True, but the model carries {found}; pass the model as it was before the interrupted "
        "call (a fresh copy, e.g. built and loaded again; masks attached with MaskSet.attach: detach() them first)"
    )


def _sections(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with its ``compact`` section as one value ("off" when absent), so turning it on or changing it is
    one change, not one per key."""
    compact = spec.get("compact")
    return {**spec, "compact": json.dumps(compact, sort_keys=True) if compact else "off"}


def _short(value: Any) -> str:
    return "(absent)" if value is MISSING else short_repr(value, 40)


def _compress(config: RunConfig, model: nn.Module, train, test, out_dir: Path | None, progress: bool, loss_fn,
              resume: bool) -> CompressionResult:
    if progress not in (True, False, "epochs"):
        raise ValueError(f"compress: progress={progress!r}; give False (quiet), True (bars) or 'epochs' (a line each)")
    runner = Runner(config, model, train, test, out_dir=out_dir, progress=progress is True, train_dense=False,
                    loss_fn=loss_fn, epoch_lines=progress == "epochs")
    metrics = runner.run(resume=resume)  # its refusals advise compress's arguments (runner.from_cli is False)
    if getattr(train, "source", None) is not None:  # data from load_dataset: name the file, as a CLI run does
        metrics["data_file"] = str(Path(train.source).absolute())
    return CompressionResult(model, runner.masks, metrics, runner.history, runner.compacted)
