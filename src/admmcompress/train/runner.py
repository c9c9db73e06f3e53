"""The reference pipeline: dense model -> (drive toward plan -> hard prune -> masked retrain) per stage.

Everything the run carries (model, optimizer, driver state, masks, data order, RNG, history)
is saved at each epoch end, atomically, so a run killed at any point resumes with the same
result as an uninterrupted one. Phases are a flat list so the checkpoint only needs
``(phase, epoch)`` counters.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from admmcompress.atomic import WriteError
from admmcompress.data.datasets import BatchLoader, Split
from admmcompress.data.imported import DatasetLoader, batch_rows, check_dataset, first_inputs
from admmcompress.drivers.base import Driver, DriverContext, ModuleTransform, get_driver
from admmcompress.finalize import (
    MaskSet,
    QuantizedMaskSet,
    mask_set_from_state,
    masks_from_model,
    masks_of,
    release_holds,
)
from admmcompress.messages import short_repr as _short  # a value read from a file, bounded
from admmcompress.plan import CoupledTarget, PlanError, Target
from admmcompress.report.metrics import measure
from admmcompress.report.storage import storage
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.averaging import WeightAverage
from admmcompress.train.cadence import Cadence
from admmcompress.train.config import (
    AUTOCAST_DTYPES,
    ConfigError,
    PhaseConfig,
    RunConfig,
    StageConfig,
    config_dict,
)
from admmcompress.train.distributed import (
    Distributed,
    ShardedLoader,
    check_batch,
    sync_batchnorm,
    wrap,
)
from admmcompress.train.distributed import evaluate as evaluate_sharded
from admmcompress.train.logging import EpochLogger, layer_sparsity
from admmcompress.train.loop import (
    TrainingDiverged,
    dropout_rates,
    evaluate,
    learning_rate,
    make_optimizer,
    set_dropout,
    train_epoch,
)
from admmcompress.train.precision import warn_if_emulated_bf16
from admmcompress.train.run_folder import config_diff, describe_changes, normalized_config, unsafe_changes
from admmcompress.train.teacher import load_teacher
from admmcompress.train.training_state import (
    STAGES_DIR,
    STATE_FILE,
    load_training_state,
    read_progress,
    restoring,
)
from admmcompress.train.trial_forward import check_model_reads, share_needs


class NonFiniteError(ValueError):
    """NaN/inf in the starting weights or the data, found before training (the message names the tensor)."""


_GEMM_KINDS = (nn.modules.conv._ConvNd, nn.Linear)


def _gemm_members(t: CoupledTarget, model: nn.Module) -> list[str]:
    """A coupled target's Conv/Linear member layers (BatchNorm entries go with them but are not reported)."""
    modules = dict(model.named_modules())
    return [m for m in t.members if isinstance(modules.get(m), _GEMM_KINDS)]


@dataclass(frozen=True)
class Phase:
    kind: str  # "pretrain" | "prune" | "retrain"
    stage: int  # stage index (-1 for pretrain)
    cfg: PhaseConfig

    @property
    def label(self) -> str:
        return "pretrain" if self.kind == "pretrain" else f"stage{self.stage + 1}/{self.kind}"

    @property
    def config_key(self) -> str:
        """Where the phase's settings sit in the run's config (``stages.0.admm``), as config diffs name them."""
        if self.kind == "pretrain":
            return "pretrain"
        return f"stages.{self.stage}.{'admm' if self.kind == 'prune' else 'retrain'}"


def _as_pruned_by(model: nn.Module, earlier: list[Target], driver: type[Driver]) -> nn.Module:
    """The model a stage's preflight checks: as the stages before could leave it at the most (every rule at its
    sparsity, on a copy), so a budget that only their pruning makes feasible is not refused before training,
    while one that even this cannot meet still is. The stage checks its budget again on the real model when it
    starts. The model itself when no stage before prunes, or the driver checks nothing (no copy)."""
    if not earlier or getattr(driver.preflight, "__func__", None) is Driver.preflight.__func__:
        return model
    pruned = copy.deepcopy(model)
    masks_of(dict(pruned.named_parameters()), earlier).apply(pruned)
    return pruned


class Runner:
    """Runs a ``RunConfig`` on a model and in-memory data (or torch Datasets); writes its state into ``out_dir``.

    ``dist``: this process's place under torchrun (:mod:`admmcompress.train.distributed`): the model trains as
    DistributedDataParallel on this rank's share of each global batch, and only rank 0 writes ``out_dir``.
    """

    def __init__(
        self,
        config: RunConfig,
        model: nn.Module,
        train: Split,
        test: Split,
        out_dir: str | Path | None = None,
        progress: bool = True,
        train_dense: bool = True,
        loss_fn: Callable[[Any, torch.Tensor, nn.Module], torch.Tensor] | None = None,
        dist: Distributed | None = None,
        epoch_lines: bool = True,
    ):
        # Under torchrun: this process's rank; one process otherwise (admmcompress.train.distributed).
        self.dist = dist if dist is not None else Distributed()
        self.dist.check = self.dist.check or config.distributed.check_ranks
        if config.distributed.sync_batchnorm:
            model = sync_batchnorm(model, self.dist)
        check_dataset(train, "train")
        check_dataset(test, "test")
        self.config, self.model, self.train, self.test = config, model, train, test
        self._net: nn.Module = model  # what the training step calls: the model, or its DDP wrapper
        self.loss_fn = loss_fn  # replaces cross-entropy in every phase (train.loop.train_epoch's hook)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.epoch_lines = epoch_lines  # no progress bars: one line per epoch on stderr (compress() may silence it)
        # Advice after a failure names the CLI's flags (--resume, --overwrite), or compress()'s arguments
        self.from_cli = False
        self.example = first_inputs(train)  # traces the channel coupling and gives compaction its input shape
        output_layers = check_model_reads(model, self.example, train, config, classifies=loss_fn is None)
        # The fewest samples each rank's share of a batch needs (2 for BatchNorm that sees one value per channel
        # from each sample), checked against data.batch_size before any training; one process is a rank too
        min_rows, why = share_needs(model, self.example, config)
        self._min_rows = min_rows
        self.loader: BatchLoader | ShardedLoader | DatasetLoader
        if isinstance(train, Split):
            self.loader = BatchLoader(
                train, config.data.batch_size, shuffle=True, seed=config.seed, augment=config.data.augment
            )
            # this rank's share of each global batch, in one process's order; in one process, a last batch of a
            # single sample that such a BatchNorm cannot train on is skipped (torch would stop at the epoch's end)
            if self.dist.active or min_rows > 1:
                self.loader = ShardedLoader(self.loader, self.dist, min_rows, why)
        else:  # a torch Dataset by import path: read batch by batch (DistributedSampler under torchrun)
            if self.dist.active or min_rows > 1:
                check_batch(config.data.batch_size, self.dist, min_rows, why)
            self.loader = DatasetLoader(train, config.data.batch_size, config.seed, self.dist.rank,
                                        self.dist.world_size, all_ranks=self.dist.all_true, least=self.dist.least,
                                        min_rows=min_rows, why=why)
        self.stage_targets: list[list[Target]] = [self._resolve(s) for s in config.stages]
        _warn_pruned_outputs(self.stage_targets, output_layers, classifies=loss_fn is None)
        earlier: list[Target] = []  # what the stages before may prune (their budget checks count it)
        for i, (stage, targets) in enumerate(zip(config.stages, self.stage_targets, strict=True)):
            try:  # fail before any training, not at the stage
                driver = get_driver(stage.method).cls
                if self.dist.active and not driver.supports_distributed:
                    raise ValueError(f"method '{stage.method}' cannot run under torchrun (it changes which parameters "
                                     "train during its phase); run this stage in one process")
                driver.accept_targets(targets)
                driver.preflight(_as_pruned_by(model, earlier, driver), targets, stage.options, self.example)
                cadence = Cadence.of(stage.admm, len(self.loader))
                if driver.needs_updates and stage.admm.epochs > 0 and not cadence.fires:
                    # a warning, not a refusal: a smoke run of a real config on a few samples is legitimate
                    warnings.warn(
                        f"stages[{i}]: admm: one update every {cadence.period} steps never comes in the phase's "
                        f"{cadence.total_steps} steps ({stage.admm.epochs} epoch(s) of {len(self.loader)}), so "
                        f"'{stage.method}' will not update; give update_every_steps <= {cadence.total_steps}, "
                        "or more epochs",
                        UserWarning,
                        stacklevel=2,
                    )
            except PlanError as err:
                raise PlanError(f"stages[{i}]: {err}") from None
            except ValueError as err:
                raise ValueError(f"stages[{i}]: {err}") from None
            earlier += [t for t in targets if not t.structure.quantizes]
        self.compacted: nn.Module | None = None
        if config.compact is not None:
            self._preflight_compaction()
        self.phases: list[Phase] = run_phases(config, train_dense)
        self.phase_index = 0
        self.epoch = 0
        self.masks = MaskSet()
        self._model_dropout = dropout_rates(model)  # restored wherever a phase sets no dropout of its own
        if config.freeze_pretrained_zeros:
            names = dict.fromkeys(n for targets in self.stage_targets for t in targets for n in t.param_names)
            self.masks = masks_from_model(model, list(names))
        self.history: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] = {"stages": [{} for _ in config.stages], "phase_seconds": {}}
        self._driver: Driver | None = None
        self._cadence: Cadence | None = None  # when the prune phase's driver updates (set with the driver)
        # Module rewrites made by drivers that end in a ModuleTransform, in order (rebuilt on --resume).
        self.transforms: list[dict[str, Any]] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None
        self._resumed_phase = False  # the next phase entered is the one a resume continues
        self._average: WeightAverage | None = None  # the phase's weight average, if its config asks for one
        # Distillation teacher: the model as the first stage found it (saved with the checkpoint).
        self.teacher: nn.Module | None = None
        self.logger: EpochLogger | None = None  # log.csv / TensorBoard, when the config asks (rank 0 only)
        if self.dist.is_main:  # notes last, once every check above has passed
            _note_choices(config)

    # --- public -------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        torch.manual_seed(self.config.seed)
        self._clock = time.perf_counter()
        # Whether the folder's checkpoint belongs to this run (the NaN-loss advice points only to such a one).
        self._saved, self._resumed = False, resume
        if resume:
            self._load()
        else:
            self.check_finite()
        self.metrics["world_size"] = self.dist.world_size  # of this invocation (a resume may use another)
        if self.config.logging.active and self.out_dir is not None and self.dist.is_main:
            self.logger = EpochLogger(self.out_dir, self.config.logging, len(self.history))
        try:
            self._train_phases()
        except TrainingDiverged as err:
            raise TrainingDiverged(f"{err}{self._diverged_advice()}") from None
        finally:
            self._net = self.model  # drop the DDP wrapper (its reducer must not outlive the process group)
            if self.logger is not None:
                self.logger.close()
            self._release_model()
        self.metrics["accuracy_after"] = self._evaluate()
        layers = self.layers()
        self.metrics["stats"] = measure(self.model, layers).to_dict()
        self.metrics["storage"] = storage(self.model, layers).to_dict()
        if self.config.compact is not None:
            self.metrics["compaction"] = self._compact()
        self._tick_clock()
        return self.metrics

    def _release_model(self) -> None:
        """Take off the model what the phases put on it, however the run ends (an exception or Ctrl-C in a
        notebook too, so the caller's model object carries no mask hooks, no frozen parameters, no phase's dropout):
        the masks' gradient and optimizer hooks, the driver's own (``close``), the model's dropout rates. Module
        rewrites of finished stages stay (they are the result so far); ``compress(resume=True)`` refuses such a
        model."""
        self.masks.detach()
        if self._driver is not None:
            self._driver.close()  # e.g. PENNI's frozen coefficients or bases trainable again
        set_dropout(self.model, self._model_dropout)

    def check_finite(self) -> None:
        """Refuse NaN/inf in the starting weights or the data before any training; the message names the tensor."""
        source = f"pretrained '{self.config.pretrained}'" if self.config.pretrained else "the model's initial weights"
        for name, tensor in self.model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise NonFiniteError(
                    f"weight tensor '{name}' holds {bad} NaN/inf value(s) ({source}); training would diverge at once: "
                    "use a checkpoint without them"
                )
        for split, data in (("train", self.train), ("test", self.test)):
            x = getattr(data, "x", None)  # a Dataset by import path is read in batches: not checked whole
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
                rows = (~torch.isfinite(x.reshape(len(x), -1))).any(dim=1).nonzero().flatten()
                raise NonFiniteError(
                    f"the {split} inputs of dataset '{self.config.data.dataset}' hold NaN/inf in {len(rows)} sample(s) "
                    f"(first: sample {int(rows[0])}); repair or replace the dataset file"
                )

    def preflight(self) -> None:
        """Every check a run makes before it trains, without training: finite weights and data, teacher files."""
        self.check_finite()
        if self.config.teacher is not None:
            self._frozen_copy()

    def check_checkpoint(self) -> None:
        """--dry-run --resume: the folder's checkpoint loads into this model (in memory only; nothing is written)."""
        self._load()

    def _restart_advice(self) -> str:
        """How to start over from a checkpoint this run cannot resume (the end of a CheckpointError)."""
        return ckpt.RESTART_CLI if self.from_cli else ckpt.RESTART_API

    def _diverged_advice(self) -> str:
        """Where to go on after a NaN loss: only a checkpoint that exists is pointed to."""
        path = None if self.out_dir is None else self.out_dir / STATE_FILE
        if path is None:
            return ", then run again (no output folder, so no checkpoint was saved)"
        if not self.from_cli:
            saved = path.is_file() and (self._saved or self._resumed)
            return (", then call compress again with resume=True (it continues from the last checkpoint) or "
                    "overwrite=True" if saved else ", then call compress again with overwrite=True")
        if not path.is_file() or not (self._saved or self._resumed):
            return f", then run again with --overwrite --out {self.out_dir} (no checkpoint was saved yet)"
        phase, epoch = read_progress(self.out_dir)
        where = (f"{self.phases[phase].label} after epoch {epoch}" if phase < len(self.phases)
                 else "after the last phase")
        return (f", then continue from the last checkpoint '{path}' ({where}) with --resume --allow-config-change "
                f"--out {self.out_dir}{self.dist.relaunch_note()}")

    def _train_phases(self) -> None:
        if self.teacher is None and self.config.teacher is not None:
            self.teacher = self._frozen_copy()  # load (and so check) the teacher file now, not after pretraining
        if "accuracy_before" not in self.metrics and not (self.phases and self.phases[0].kind == "pretrain"):
            self.metrics["accuracy_before"] = self._evaluate()
        while self.phase_index < len(self.phases):
            phase = self.phases[self.phase_index]
            self._enter(phase)
            steps = len(self.loader)
            while self.epoch < phase.cfg.epochs:
                started = time.perf_counter()
                losses = self._train_one_epoch(phase, steps)
                self.epoch += 1
                if self._average is not None and self.epoch >= phase.cfg.average_from_epoch:
                    self._average.update(self.model)
                seconds = time.perf_counter() - started
                spent = self.metrics["phase_seconds"]
                spent[phase.label] = spent.get(phase.label, 0.0) + seconds
                self._record(phase, losses, seconds)
                if self.epoch % self.config.checkpoint_every_epochs == 0 or self.epoch == phase.cfg.epochs:
                    self._save()
            self._finish(phase)
            self.phase_index += 1
            self.epoch = 0
            self._driver = self._optimizer = self._average = None
            self._save()

    def _tick_clock(self) -> None:
        """Wall time adds up across resumed invocations."""
        now = time.perf_counter()
        self.metrics["wall_seconds"] = self.metrics.get("wall_seconds", 0.0) + now - self._clock
        self._clock = now

    def layers(self) -> list[str]:
        """Every layer some stage prunes, in model order (a coupled target: its Conv/Linear members), and every
        Conv/Linear whose weight carries a mask though no target names it (PENNI's 1x1 convs with ``pointwise``;
        not the BatchNorms of a coupled target, nor a layer inside a target, as a Tucker-2 layer's factors)."""
        wanted: set[str] = set()
        for targets in self.stage_targets:
            for t in targets:
                wanted |= set(_gemm_members(t, self.model)) if isinstance(t, CoupledTarget) else {t.layer}
        modules = dict(self.model.named_modules())
        for key, _ in self.masks.items():
            name, _, param = key.rpartition(".")
            if param != "weight" or name in wanted or not isinstance(modules.get(name), _GEMM_KINDS):
                continue
            if not any(name.startswith(f"{w}.") or not w for w in wanted):  # not inside a target
                wanted.add(name)
        return [n for n in modules if n in wanted]

    # --- coupling and compaction ---------------------------------------------------------
    def _resolve(self, stage: StageConfig) -> list[Target]:
        """The stage's targets: per layer, or coupled over channel groups (``coupling: strict|extend``)."""
        if stage.coupling == "none":
            return stage.plan.resolve(self.model)
        return stage.plan.resolve_coupled(self.model, self.example, stage.coupling)

    def _preflight_compaction(self) -> None:
        """Fail before training if the plans prune channels that compaction could not remove; warn when they
        remove no width (``compact_run.preflight_compaction``)."""
        from admmcompress.executors.compact import CompactionError
        from admmcompress.executors.compact_run import preflight_compaction
        try:
            note = preflight_compaction(self.model, self.stage_targets, self.example, self.config.compact.columns,
                                        keep_zero_filters=self.config.freeze_pretrained_zeros)
        except CompactionError as err:
            reasons = [line.strip().removeprefix("- ") for line in str(err).splitlines()[1:] if line.strip()]
            reason = reasons[0] if reasons else str(err)
            more = f" (and {len(reasons) - 1} more group(s) like it)" if len(reasons) > 1 else ""
            coupled = any(stage.coupling != "none" for stage in self.config.stages)
            fix = ("leave those layers out of the stage's rules" if coupled else
                   "set 'coupling: strict' or 'coupling: extend' on the stage to prune tied layers together")
            # the fix first: one reason per channel group made a line of thousands of characters
            raise ConfigError(
                f"compact: the plan prunes channels that compaction cannot remove; {fix}, or drop 'compact'. "
                f"First: {reason}{more}"
            ) from None
        if note:
            warnings.warn(f"compact: {note}", UserWarning, stacklevel=2)

    def _strict_compaction(self) -> bool:
        """Whether compaction at the end must remove every zero filter (``compact_run.strict_compaction``;
        export agrees): only when every rule prunes channels on purpose."""
        from admmcompress.executors.compact_run import strict_compaction

        return strict_compaction([stage.to_dict() for stage in self.config.stages])

    def _compact(self) -> dict[str, Any]:
        """Compact the final masked model, check it on random inputs, save it under ``out_dir/compact``."""
        from admmcompress.executors import get_executor
        from admmcompress.executors.compact_run import COMPACT_DIR, compact_checked, model_spec

        options = self.config.compact
        result, figures = compact_checked(
            self.model, self.example, self.masks, options.atol, options.samples, options.columns, self.config.seed,
            strict=self._strict_compaction(),
        )
        self.compacted = result.model
        if self.out_dir is not None and self.dist.is_main:
            get_executor("compact").save(result.model, self.out_dir / COMPACT_DIR, model_spec(self.config.model))
            figures["folder"] = COMPACT_DIR
        return figures

    # --- phases -------------------------------------------------------------------------
    def _enter(self, phase: Phase) -> None:
        """Build the phase's optimizer/driver and masks; restore them if resuming mid-phase."""
        # the first phase after a resume is built on the checkpoint's model and masks (mid-phase: its state too)
        resumed, self._resumed_phase = self._resumed_phase, False
        self.masks.detach()
        set_dropout(self.model, self._model_dropout if phase.cfg.dropout is None else phase.cfg.dropout)
        if phase.kind != "pretrain" and self.teacher is None and self._uses_distillation():
            self.teacher = self._frozen_copy()
        self._optimizer = make_optimizer(self.model, phase.cfg.optimizer)
        self._driver = None
        self._average = WeightAverage() if phase.cfg.average_from_epoch is not None else None
        if phase.kind == "prune":
            stage = self.config.stages[phase.stage]
            targets = self.stage_targets[phase.stage]
            if len(self.masks):  # masks carry; values this stage quantizes again are released
                self.masks = release_holds(self.masks, targets)
            self._cadence = Cadence.of(phase.cfg, len(self.loader))
            context = DriverContext(
                frozen=self.masks if len(self.masks) else None,
                updates=self._cadence.updates,
                steps_per_epoch=len(self.loader),
                example=self.example,
                resuming=self._pending is not None,
            )
            # resumed: the driver is built on the restored model and masks; a checkpoint that does not fit them
            # (another method's, written before checkpoints held their config) is one line naming the file, not
            # a KeyError from inside the driver
            with self._restoring("driver", resumed):
                self._driver = get_driver(stage.method).cls.from_config(self.model, targets, stage.options, context)
        if self._pending is not None:
            path, advice = self._state_path(), self._restart_advice()
            with restoring(path, "optimizer", advice):
                self._optimizer.load_state_dict(self._pending["optimizer"])
            if self._driver is not None and self._pending.get("driver") is not None:
                with restoring(path, "driver", advice):
                    self._driver.load_state_dict(self._pending["driver"])
            if self._average is not None and self._pending.get("average") is not None:
                with restoring(path, "average", advice):
                    self._average.load_state_dict(self._pending["average"])
            self._pending = None
        if self._driver is not None:
            with self._restoring("driver", resumed):
                self._driver.prepare(self.model)
            if self._driver.masks is not None:
                # The driver's masks are the phase's current ones (with any values it holds); release_holds
                # above would otherwise drop holds this phase itself made.
                self.masks = self._driver.masks
        if isinstance(self.masks, QuantizedMaskSet):  # held values train as this phase says
            # except those the phase's own driver holds (iterative quantization's rounds, restored on a resume):
            # it manages them, and an uninterrupted run does not switch them mid-phase either
            own = ({n for t in self.stage_targets[phase.stage] if t.structure.quantizes for n in t.param_names}
                   if self._driver is not None else set())
            self.masks = self.masks.with_update(phase.cfg.quantized_weights, leave=own)
        if len(self.masks):
            self.masks.attach(self.model, self._optimizer)
        self._net = wrap(self.model, self.dist)  # anew per phase: transforms and masks may change parameters
        self._check_ranks(f"{phase.label} start")

    def _state_path(self) -> Path:
        return self.out_dir / STATE_FILE if self.out_dir is not None else Path(STATE_FILE)

    def _restoring(self, key: str, resumed: bool) -> contextlib.AbstractContextManager[None]:
        """While a phase is restored from the checkpoint (``resumed``): an error is one line naming the file and
        ``key`` (:func:`restoring`); otherwise the code's own errors pass as they are."""
        if not resumed:
            return contextlib.nullcontext()
        return restoring(self._state_path(), key, self._restart_advice())

    def _past_first_stage(self) -> bool:
        first = next((i for i, p in enumerate(self.phases) if p.kind != "pretrain"), len(self.phases))
        return self.phase_index > first or (self.phase_index == first and self.epoch > 0)

    def _uses_distillation(self) -> bool:
        return any(p.cfg.distill is not None for p in self.phases if p.kind != "pretrain")

    def _frozen_copy(self, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        try:
            return load_teacher(self.model, self.config.teacher, state)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _train_one_epoch(self, phase: Phase, steps: int) -> dict[str, float]:
        cfg = phase.cfg
        after_step = None
        if self._driver is not None:

            def after_step(step: int) -> None:
                if self._cadence.due(step):
                    self._driver_update()

        losses = train_epoch(
            self._net,
            self.loader,
            self._optimizer,
            lambda step: learning_rate(cfg, step, steps),
            first_step=self.epoch * steps,
            penalty=self._driver.penalty if self._driver is not None else None,
            after_step=after_step,
            desc=f"{phase.label} epoch {self.epoch + 1}/{cfg.epochs}",
            progress=self.progress,
            teacher=self.teacher if cfg.distill is not None else None,
            distill=cfg.distill,
            label_smoothing=cfg.label_smoothing,
            autocast=AUTOCAST_DTYPES[self.config.autocast],
            channels_last=self.config.channels_last,
            loss_fn=self.loss_fn,
            loss_weight=self.loader.weight if isinstance(self.loader, ShardedLoader) else None,
            all_ranks=self.dist.all_true if self.dist.active else None,  # a NaN on one rank stops them all
        )
        if self.dist.active:  # every rank's mean: the global batch's mean where the shares are equal
            keys = sorted(losses)
            losses = dict(zip(keys, self.dist.mean([losses[k] for k in keys]), strict=True))
        return losses

    def _check_ranks(self, where: str, attached: bool = True) -> None:
        """Under torchrun: driver state and masks equal on every rank (else rank 0's, broadcast).

        Debug mode (``check_ranks``): weights included, and a difference is an error instead. ``attached``:
        whether the masks are on the model now (not between a hard prune and the next phase).
        """
        if not self.dist.active:
            return
        state = {"masks": self.masks.state_dict()}
        if self._driver is not None:
            state["driver"] = self._driver.state_dict()
        if self.dist.check:
            state["model"] = dict(self.model.named_parameters())
            self.dist.assert_same(state, f"{where}: driver state, masks and weights")
            return
        differing = self.dist.differing(state)
        if not differing:
            return
        if self.dist.is_main:
            warnings.warn(f"{where}: {differing} differed between ranks; rank 0's is used on every rank "
                          "(a driver deciding from measured latency or its own random draws)",
                          RuntimeWarning, stacklevel=2)
        state = self.dist.broadcast_object(state)
        if "driver" in differing:
            self._driver.load_state_dict(state["driver"])
            if self._driver.masks is not None and self._driver.masks is not self.masks:
                self.masks.detach()
                self.masks = self._driver.masks
                self.masks.attach(self.model, self._optimizer)
        elif "masks" in differing:
            self.masks.detach()
            self.masks = mask_set_from_state(state["masks"])
            if attached:
                self.masks.attach(self.model, self._optimizer)

    def _driver_update(self) -> None:
        """The driver's update at its cadence; masks it replaced are re-attached."""
        self._driver.step()
        self._check_ranks(f"driver update {getattr(self._driver, 'iteration', '')}".strip())
        masks = self._driver.masks
        if masks is not None and masks is not self.masks:
            self.masks.detach()  # the old masks' hooks would otherwise stay on the model for good
            self.masks = masks
            self.masks.attach(self.model, self._optimizer)

    def _finish(self, phase: Phase) -> None:
        if self._average is not None and self._average.count:
            self._end_on_average(phase)
        if phase.kind == "pretrain":
            self.metrics["accuracy_before"] = self._evaluate()
            return
        record = self.metrics["stages"][phase.stage]
        if phase.kind == "prune":
            record["accuracy_before_hard_prune"] = self._evaluate()
            self._driver.close()
            self.masks.detach()
            outcome = self._driver.finalize()
            if isinstance(outcome, ModuleTransform):  # a reparametrizing driver rewrites modules in place
                outcome.apply(self.model)
                self.transforms.append({"method": self.config.stages[phase.stage].method, "spec": outcome.spec()})
                self.metrics["transforms"] = list(self.transforms)
                outcome = outcome.masks
            self.masks = outcome
            self._check_ranks(f"{phase.label} hard prune", attached=False)
            record["accuracy_after_hard_prune"] = self._evaluate()
            record.update(self._driver.summary())
        else:
            if isinstance(self.masks, QuantizedMaskSet):  # the phase's float shadows are done with
                self.masks.detach()
                self.masks = self.masks.with_update("hold")
            record["accuracy_after_retrain"] = self._evaluate()
            stats = measure(self.model, self.layers())
            record["overall_compression"] = stats.overall_compression
            record["layers"] = {layer.name: layer.compression for layer in stats.layers}
            if self.config.save_stages:
                self._save_stage(phase.stage)

    def _save_stage(self, stage: int) -> None:
        """``save_stages``: the stage's weights and masks, beside the run's checkpoint (rank 0 writes)."""
        if self.out_dir is None or not self.dist.is_main:
            return
        folder = self.out_dir / STAGES_DIR
        folder.mkdir(exist_ok=True)
        # the module rewrites so far: a stage file of a reparametrizing driver loads into the rewritten model
        meta = {"config": self.config.to_dict(), "stage": stage + 1, "transforms": list(self.transforms)}
        ckpt.save_tensors(folder / f"stage{stage + 1}.safetensors", self.model.state_dict(), meta)
        ckpt.save_tensors(folder / f"stage{stage + 1}_masks.safetensors", self.masks.state_dict())

    def _end_on_average(self, phase: Phase) -> None:
        """Load the phase's weight average (masks hold: pruned weights are zero in every snapshot).

        Held values on fixed levels are the same in every snapshot, so their mean is on the levels; clustered
        layers keep their codes while their centroids train, so the mean has one value per cluster, the mean
        centroid, which becomes the layer's level. BatchNorm statistics are re-estimated on all the training
        data: one process's global batches on every rank (bundled datasets), or each rank's own batches merged
        over the ranks (a dataset by import path).
        """
        last = self._evaluate()
        self.masks.detach()
        loader = self.loader.inner if isinstance(self.loader, ShardedLoader) else self.loader
        if self._min_rows > 1:  # the statistics pass trains BatchNorm too: a one-sample last batch would stop it
            loader = (b for b in loader if (batch_rows(b) or self._min_rows) >= self._min_rows)
        self._average.apply(self.model, loader)
        if not isinstance(self.loader, ShardedLoader):
            self.dist.merge_batchnorm(self.model)  # each rank saw its own share: merge (one process: nothing)
        if isinstance(self.masks, QuantizedMaskSet):
            self.masks.refit_centroids(self.model)  # else apply would write the last step's centroids back
        self.masks.apply(self.model)  # pruned weights are zero in every snapshot; this only guards it
        key = "pretrain" if phase.kind == "pretrain" else phase.label
        self.metrics.setdefault("weight_average", {})[key] = {
            "snapshots": self._average.count,
            "accuracy_last_weights": last,
            "accuracy_averaged": self._evaluate(),
        }

    def _evaluate(self) -> float:
        if self.dist.active or not isinstance(self.test, Split):  # each test sample counted once, over all ranks
            return evaluate_sharded(self.model, self.test, self.config.data.eval_batch_size, self.dist)
        return evaluate(self.model, self.test, self.config.data.eval_batch_size)

    def _record(self, phase: Phase, losses: dict[str, float], seconds: float) -> None:
        entry = {"phase": phase.label, "epoch": self.epoch, "seconds": seconds, **losses,
                 "accuracy": self._evaluate()}
        if self._driver is not None:
            entry.update(self._driver.progress())
        if self.config.logging.active:
            entry["sparsity"] = layer_sparsity(self.model, self.layers())
        self.history.append(entry)
        if self.logger is not None:
            self.logger.log(self.history)
        if not self.progress and self.epoch_lines:  # one line per epoch where there are no bars (logs, background)
            print(f"{phase.label} epoch {self.epoch}/{phase.cfg.epochs}: loss {losses['loss']:.4f}, "
                  f"accuracy {entry['accuracy']:.2f}%, {seconds:.0f} s", file=sys.stderr, flush=True)

    # --- checkpointing -------------------------------------------------------------------
    def _save(self) -> None:
        self._tick_clock()
        # Every rank's random state: where a batch splits unevenly, the ranks draw different counts of dropout
        # numbers, so their states part. Gathered on every rank (a collective), whoever writes.
        rng_ranks = self.dist.gather(torch.get_rng_state())
        if self.out_dir is None or not self.dist.is_main:  # one writer: rank 0
            return
        state = {
            "phase_index": self.phase_index,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self._optimizer.state_dict() if self._optimizer is not None else None,
            "driver": self._driver.state_dict() if self._driver is not None else None,
            "average": self._average.state_dict() if self._average is not None else None,
            "masks": self.masks.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng_ranks[0],  # rank 0's (what a checkpoint before per-rank states held)
            "rng_ranks": torch.stack(rng_ranks),  # one row per rank of the processes that wrote it
            "threads": torch.get_num_threads(),
            "history": self.history,
            "metrics": self.metrics,
            "transforms": self.transforms,
            "config": config_dict(self.config),  # what compress(resume=True) checks its arguments against
        }
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        try:
            ckpt.save_state(self.out_dir / STATE_FILE, state)
        except WriteError as err:
            if self.from_cli:
                how = f"continue the run with --resume --out {self.out_dir}{self.dist.relaunch_note()}"
            elif self._saved or self._resumed:
                how = "call compress again with resume=True (it continues from the last checkpoint)"
            else:
                how = "call compress again (no checkpoint was saved yet)"
            raise WriteError(err.errno, f"{err}; then {how}") from None
        self._saved = True

    def _restore_rank_rng(self, state: dict[str, Any], path: Path, advice: str) -> None:
        """This rank's own random state when the checkpoint's processes were as many as now; rank 0's (set by
        the caller) otherwise, with a note on rank 0. Checkpoints before per-rank states: rank 0's, silently."""
        ranks = state.get("rng_ranks")
        if ranks is None:
            return
        with restoring(path, "rng_ranks", advice):
            if not (isinstance(ranks, torch.Tensor) and ranks.dtype == torch.uint8 and ranks.dim() == 2
                    and len(ranks) >= 1):
                raise ValueError("expected a uint8 tensor of one random state per rank")
            if len(ranks) == self.dist.world_size:
                torch.set_rng_state(ranks[self.dist.rank].clone())
        if len(ranks) != self.dist.world_size and self.dist.is_main:
            warnings.warn(_world_note(len(ranks), self.dist.world_size), RuntimeWarning, stacklevel=3)

    def _load(self) -> None:
        path = None if self.out_dir is None else self.out_dir / STATE_FILE
        if path is None or not path.is_file():
            if self.from_cli:
                raise FileNotFoundError(
                    f"--resume: no checkpoint at {path}; run without --resume to start, or pass the run's --out folder"
                )
            # the Python API (Runner(out_dir=...).run(resume=True), compress(out_dir=..., resume=True)): its names
            if path is None:
                raise FileNotFoundError("resume=True needs out_dir=, the folder the interrupted run checkpointed to; "
                                        "run without resume=True to start")
            raise FileNotFoundError(
                f"resume=True: no checkpoint at {path}; run without resume=True to start, or pass out_dir= the "
                "folder the interrupted run checkpointed to"
            )
        advice = self._restart_advice()
        state = load_training_state(path, advice)
        self._check_same_run(state, path, advice)
        self._resumed_phase = True
        self.transforms = list(state.get("transforms", []))
        with restoring(path, "transforms", advice):
            rebuild_transforms(self.model, self.transforms, "checkpoint")  # the structure the saved weights need
        ckpt.check_state_fits(self.model, state, path, advice)  # another model's checkpoint: one line, not a traceback
        self.model.load_state_dict(state["model"])
        self.phase_index, self.epoch = state["phase_index"], state["epoch"]
        with restoring(path, "masks", advice):
            self.masks = mask_set_from_state(state["masks"])
            params = dict(self.model.named_parameters())
            for name, mask in self.masks.items():  # else a shape error when the phase attaches them
                if name not in params or params[name].shape != mask.shape:
                    raise ValueError(f"mask '{name}' {tuple(mask.shape)} fits no parameter of the model")
        with restoring(path, "loader", advice):
            self.loader.load_state_dict(state["loader"])
        with restoring(path, "rng", advice):
            torch.set_rng_state(state["rng"])
        self._restore_rank_rng(state, path, advice)
        saved_threads = state.get("threads")  # checkpoints before 2026-12-06 did not record it
        if isinstance(saved_threads, int) and saved_threads != torch.get_num_threads():
            warnings.warn(
                f"resuming with {torch.get_num_threads()} threads; the run so far used {saved_threads}: float sums "
                "run in another order, so the result differs in its last bits from an uninterrupted run "
                f"(set threads: {saved_threads} or --threads {saved_threads} for a bit-identical resume)",
                RuntimeWarning,
                stacklevel=2,
            )
        self.history, self.metrics = list(state["history"]), dict(state["metrics"])
        if state.get("teacher") is not None:
            self.teacher = self._frozen_copy(state["teacher"])
        elif self._uses_distillation() and self._past_first_stage():
            warnings.warn(
                "the checkpoint holds no distillation teacher (written before teachers were saved); the teacher "
                "will be the run's 'teacher:' file or, without one, the current (partly pruned) model",
                RuntimeWarning,
                stacklevel=2,
            )
        if state["optimizer"] is not None:
            self._pending = {"optimizer": state["optimizer"], "driver": state["driver"],
                             "average": state.get("average")}

    def _check_same_run(self, state: dict[str, Any], path: Path, advice: str) -> None:
        """Refuse a checkpoint written by another run (another method, seed, plan, ... : one copied into the
        folder) in one line naming the keys that differ: its config against this run's, accepting what a resume
        may change (``run_folder.unsafe_changes``: speed keys, moved files, phases not started yet). Checkpoints
        written before they held their config are not checked."""
        saved = state.get("config")
        if saved is None:
            return
        diff = config_diff(normalized_config(saved, self.config.plugins), config_dict(self.config))
        refused = unsafe_changes(diff, self.phases, (state["phase_index"], state["epoch"]),
                                 teacher_saved=state.get("teacher") is not None)
        if refused:
            problem = (f"checkpoint '{path}' is not this run's: its config differs in "
                       f"{describe_changes({k: diff[k] for k in refused}, refused)}")
            raise ckpt.CheckpointError(f"{problem}; restore this run's own {STATE_FILE}, or {advice}", problem)


def _world_note(saved: int, now: int) -> str:
    return (f"resuming with {now} process(es) a checkpoint written by {saved}: every rank continues from rank "
            "0's random state and the batches split another way, so the result is close to, not bit-identical "
            f"with, an uninterrupted run (resume with {saved} process(es) for that)")


def _note_choices(config: RunConfig) -> None:
    """Warnings about legitimate but probably unintended settings (not refusals)."""
    warn_if_emulated_bf16(AUTOCAST_DTYPES[config.autocast])  # 10-16x slower where bf16 is emulated
    if config.pretrained is None and config.pretrain is not None and config.pretrain.epochs == 0:
        warnings.warn("pretrain: {epochs: 0} prunes the randomly initialised model (pruning at initialisation); "
                      "give pretrain epochs or 'pretrained' (a dense checkpoint) to prune a trained one",
                      UserWarning, stacklevel=3)


def run_phases(config: RunConfig, train_dense: bool = True) -> list[Phase]:
    """The run's phases in order: pretrain (when it trains the dense model), then each stage's prune and retrain."""
    phases: list[Phase] = []
    if train_dense and config.pretrain is not None and config.pretrained is None:
        phases.append(Phase("pretrain", -1, config.pretrain))
    for i, stage in enumerate(config.stages):
        phases += [Phase("prune", i, stage.admm), Phase("retrain", i, stage.retrain)]
    return phases


def _warn_pruned_outputs(stage_targets: list[list[Target]], output_layers: list[str], classifies: bool) -> None:
    """Warn when a rule prunes rows (filters) of a layer whose outputs the model returns: for a classifier those
    are its classes, which would always score the bias alone (compaction keeps them: they are outputs)."""
    for i, targets in enumerate(stage_targets):
        for t in targets:
            if getattr(t, "layer", None) in output_layers and t.structure.kind == "filter":
                what = "classes" if classifies else "outputs"
                warnings.warn(
                    f"stages[{i}] prunes rows (filters) of '{t.layer}', whose outputs are the model's: up to "
                    f"{t.structure.target_sparsity:.0%} of its {what} would be cut off; leave it out of the rule "
                    f"(exclude: ['{t.layer}'])",
                    UserWarning,
                    stacklevel=3,
                )


def rebuild_transforms(model: nn.Module, transforms: list[dict[str, Any]], source: str = "metrics.json") -> None:
    """Re-apply recorded module transforms (``metrics["transforms"]``) to a freshly built model, in order.

    The entries come from a file (``source``: metrics.json, or the checkpoint): each is checked to be
    ``{method: <driver>, spec: {...}}``.
    """
    if not isinstance(transforms, list):
        raise ValueError(f"{source}: 'transforms' is {_short(transforms)}, not a list of module rewrites; restore "
                         f"the run's {source}")
    for i, entry in enumerate(transforms):
        if not (isinstance(entry, dict) and isinstance(entry.get("method"), str) and isinstance(entry.get("spec"),
                                                                                                dict)):
            raise ValueError(f"{source}: transforms entry {i} is {_short(entry)}, not {{method, spec}}; restore the "
                             f"run's {source}")
        get_driver(entry["method"]).cls.rebuild(model, entry["spec"])
