"""Run configuration: typed, validated dataclasses read from YAML (no pickle, unknown keys rejected).

A run is: a dense model (loaded from ``pretrained`` or trained by ``pretrain``), then one or
more *stages*; each stage drives the model toward its plan (ADMM, or a magnitude baseline),
hard-prunes and retrains with masks. Several stages make progressive (multi-step) pruning:
each starts from the previous stage's retrained, masked model.

Example (``configs/lenet5_admm_71x.yaml``)::

    model: {name: lenet5}
    data: {dataset: mnist, batch_size: 64}
    pretrained: ../checkpoints/lenet5_mnist_dense.safetensors
    stages:
      - plan: {rules: [{match: conv1, structure: unstructured, sparsity: 0.8}, ...]}
        method: admm
        admm: {epochs: 10, rho: 1.0e-3}
        retrain: {epochs: 5}
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import torch
import yaml

from admmcompress.data.augment import Augment
from admmcompress.data.imported import DatasetSpec
from admmcompress.drivers.base import DriverError, get_driver, list_drivers
from admmcompress.finalize import FIXED_LEVEL_UPDATES
from admmcompress.messages import short_repr as _short  # a user's value in a message, bounded
from admmcompress.plan import Plan, PlanError
from admmcompress.plugins import load_plugins
from admmcompress.strict_yaml import safe_load_unique, yaml_problem
from admmcompress.structures.scalars import plain_number

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "admm_reset")
QUANTIZED_WEIGHTS = FIXED_LEVEL_UPDATES
# Driver options that configs written before the driver registry gave inside the ``admm:`` phase mapping
# (for every method: run folders' config.yaml carried them even for gradual stages). They are method admm's
# options; for other methods they are ignored, as they always were.
LEGACY_ADMM_OPTIONS = ("rho", "rho_growth", "rho_max")
# How a stage's filter/channel targets are tied across layers (see Plan.resolve_coupled):
# "none" resolves the plan per layer; "strict"/"extend" make one coupled target per channel group.
COUPLINGS = ("none", "strict", "extend")
COLUMN_MODES = ("off", "auto", "on")
AUTOCAST_DTYPES = {None: None, "bf16": torch.bfloat16}
# What to write for a required key that is missing (the one-line error shows it).
REQUIRED_EXAMPLES = {
    "plan": "plan: {rules: [{match: 'conv*', structure: unstructured, sparsity: 0.8}]}",
    "model": "model: {name: lenet5}",
}
# A run's name names its folder under runs/ (when --out is not given): subfolders are fine ('ablations/seed0'),
# a path that leaves runs/ (absolute, '..') or control characters are not.
CONTROL = re.compile(r"[\x00-\x1f]")


class ConfigError(ValueError):
    """A configuration mistake; the message names the key, the value and the fix."""


def _build(cls, spec: Any, where: str):
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(spec).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in spec]
    if missing:
        example = REQUIRED_EXAMPLES.get(missing[0], "")
        raise ConfigError(f"{where}: missing '{missing[0]}:'{f'; add {example}' if example else ''}")
    try:
        return cls(**spec)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def _section(value: Any, cls: type, where: str, example: str) -> None:
    """A section that is neither a mapping nor already built (e.g. ``data: 5``): one line, not a later traceback."""
    if not isinstance(value, cls):
        raise ValueError(f"{where}: expected a mapping such as {example}, got {type(value).__name__} {_short(value)}")


def _yaml_hint(value: Any, integer: bool = False) -> str:
    """Why a number arrived as text, and the fix: YAML 1.1 reads 1e-3 (no dot) as a string; quotes make any
    number a string (an integer field's fix is to drop them, not to add a dot)."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    if integer:
        whole = value.strip().lstrip("+-").isdigit()
        if whole or (math.isfinite(number) and number == int(number)):
            fix = "drop the quotes" if whole else f"write a whole number, e.g. {int(number)}"
            return f" (YAML read {value!r} as text: {fix})"
        return ""
    if "." not in value and "e" in value.lower():  # the YAML 1.1 case: an exponent without a dot
        return f" (YAML read {value!r} as text: write it with a dot, e.g. 1.0e-3)"
    return f" (YAML read {value!r} as text: drop the quotes)"


# The largest float32: a learning rate or other float hyperparameter above it overflows the first optimizer
# step ("value cannot be converted to type float without overflow"), so it is refused with the config.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# torch's threads: beyond this OpenMP aborts the process (100000 did), and no CPU of today has as many
MAX_THREADS = 1024


def _plain_fields(config: Any) -> None:
    """Numpy and 0-d torch scalars in a config's fields become the Python numbers they hold.

    So ``lr=np.float32(1e-3)`` passes the checks below and is written to config.yaml as 0.001; booleans are
    left alone (and still refused where a number belongs).
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        plain = plain_number(value)
        if plain is not value:
            setattr(config, f.name, plain)


def _finite(value: int | float) -> bool:
    # math.isfinite converts an int to float: a 400-digit YAML integer would raise OverflowError there
    return isinstance(value, int) or math.isfinite(value)


def _number(value: Any, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not _finite(value):
        raise ValueError(f"{name}={_short(value)} must be a finite number{_yaml_hint(value)}")


def _positive(value: Any, name: str, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not value > 0 or not _finite(value):
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name}={_short(value)} must be {kind}{_yaml_hint(value, integer)}")
    if not integer and value > FLOAT32_MAX:
        raise ValueError(f"{name}={_short(value)} is beyond float32's range (about 3.4e38): training would overflow at "
                         "the first step; give a realistic value, e.g. 1.0e-3 for a learning rate")



class IgnoredSetting(UserWarning):
    """A config setting the chosen method does not read (said when a user's config is read)."""


@contextlib.contextmanager
def written_by_the_library() -> Iterator[None]:
    """Read a config the library wrote (a run folder's config.yaml, a checkpoint's): versions before the driver
    registry wrote ``rho*`` and a ``reweighted:`` block for every method, which :class:`IgnoredSetting` would
    then blame on the user at every resume or report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredSetting)
        yield

@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        _plain_fields(self)
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer name={_short(self.name)}; choose one of {OPTIMIZERS}")
        _positive(self.lr, "lr")
        _number(self.momentum, "momentum")
        if not 0 <= self.momentum <= 1:  # torch refuses < 0; above 1 the steps grow without bound
            raise ValueError(f"momentum={_short(self.momentum)} must be in [0, 1], e.g. 0.9")
        _number(self.weight_decay, "weight_decay")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay={_short(self.weight_decay)} must be in [0, 1)")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov={_short(self.nesterov)} must be true or false")
        if self.nesterov and self.name == "sgd" and self.momentum == 0:  # torch's SGD would refuse it at step one
            raise ValueError("nesterov: true needs momentum > 0; give momentum: 0.9, or drop nesterov")
        if self.nesterov and self.name != "sgd":  # a warning: run folders written before this check still read
            warnings.warn(f"optimizer {self.name}: nesterov applies to sgd only and is ignored", UserWarning,
                          stacklevel=2)
        if self.momentum != 0.9 and self.name != "sgd":  # 0.9 is the default every saved config holds
            warnings.warn(f"optimizer {self.name}: momentum={_short(self.momentum)} applies to sgd only and is "
                          "ignored (Adam's betas are torch's defaults)", UserWarning, stacklevel=2)


@dataclass
class DistillConfig:
    """Knowledge distillation from the run's starting model (the teacher) during a phase.

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)).
    The teacher is the run's ``teacher`` checkpoint if it names one (e.g. the dense model when
    ``pretrained`` is an already pruned one), else the model as it was when the first stage began.
    """

    alpha: float = 0.5
    temperature: float = 4.0

    def __post_init__(self) -> None:
        _plain_fields(self)
        _number(self.alpha, "alpha")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha={_short(self.alpha)} must be in (0, 1] (the weight of the teacher's soft targets)")
        _positive(self.temperature, "temperature")


@dataclass
class PhaseConfig:
    """Epoch budget, optimizer and learning-rate schedule of one training phase."""

    epochs: int = 1
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: str = "cosine"
    # Optional distillation from the run's starting model (e.g. {alpha: 0.5, temperature: 4.0}).
    distill: DistillConfig | None = None
    # Dropout probability of every dropout layer during this phase (None: the model's own). The TF
    # LeNet-5 reference turns dropout off for ADMM and back on for retraining (SPEC P12).
    dropout: float | None = None
    # How weights quantized by an earlier hard quantization train in this phase: "hold" keeps them
    # on their values (only biases and other layers adapt); "ste" trains them with a straight-through
    # estimator on the same levels (quantization-aware retraining). Clustered layers always update
    # their centroids.
    quantized_weights: str = "hold"
    # End the phase on the mean of the weights at the end of each epoch from this one (1-based) on:
    # stochastic weight averaging. Masked weights stay zero in the mean; BatchNorm statistics are
    # re-estimated on the training data. None: end on the last weights.
    average_from_epoch: int | None = None
    # Cross-entropy label smoothing of this phase's data loss (0: plain cross-entropy).
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _plain_fields(self)
        _number(self.label_smoothing, "label_smoothing")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing={_short(self.label_smoothing)} must be in [0, 1), e.g. 0.1")
        if self.quantized_weights not in QUANTIZED_WEIGHTS:
            raise ValueError(
                f"quantized_weights={_short(self.quantized_weights)}; choose one of {QUANTIZED_WEIGHTS} "
                "('ste' retrains quantized weights on their levels)"
            )
        if self.dropout is not None:
            _number(self.dropout, "dropout")
            if not 0 <= self.dropout < 1:
                raise ValueError(f"dropout={_short(self.dropout)} must be in [0, 1) (0 turns dropout off)")
        if isinstance(self.optimizer, dict):
            self.optimizer = _build(OptimizerConfig, self.optimizer, "optimizer")
        _section(self.optimizer, OptimizerConfig, "optimizer", "{name: sgd, lr: 0.01}")
        if isinstance(self.distill, dict):
            self.distill = _build(DistillConfig, self.distill, "distill")
        elif self.distill is not None and not isinstance(self.distill, DistillConfig):
            raise ValueError("distill: give a mapping such as {alpha: 0.5, temperature: 4.0}, or leave it out")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 0:
            raise ValueError(f"epochs={_short(self.epochs)} must be an integer >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={_short(self.lr_schedule)}; choose one of {LR_SCHEDULES}")
        if self.average_from_epoch is not None:
            _positive(self.average_from_epoch, "average_from_epoch", integer=True)
            if self.average_from_epoch > self.epochs:
                raise ValueError(
                    f"average_from_epoch={self.average_from_epoch} is past the phase's last epoch "
                    f"(epochs={self.epochs}); give an epoch in 1..{self.epochs}"
                )
            if self.quantized_weights == "ste":
                raise ValueError(
                    "average_from_epoch with quantized_weights: ste would average weights off their levels; "
                    "use one of them"
                )


@dataclass
class ADMMPhaseConfig(PhaseConfig):
    """The driving phase of a stage (``admm:`` in a config, whatever the method): its epochs, optimizer,
    learning-rate schedule and the cadence of the driver's updates (see :class:`admmcompress.train.cadence.Cadence`).
    The driver's own options (ADMM's rho schedule, the reweighted penalty, ...) are the stage's ``options:``."""

    update_every_epochs: int | None = None
    update_every_steps: int | None = None
    lr_schedule: str = "admm_reset"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.average_from_epoch is not None:
            raise ValueError(
                "average_from_epoch applies to retrain and pretrain phases (a prune phase ends on its own "
                "hard prune); move it to the stage's retrain phase"
            )
        if self.update_every_epochs is not None and self.update_every_steps is not None:
            raise ValueError("give update_every_epochs or update_every_steps, not both")
        if self.update_every_epochs is None and self.update_every_steps is None:
            self.update_every_epochs = 1
        if self.update_every_epochs is not None:
            _positive(self.update_every_epochs, "update_every_epochs", integer=True)
        if self.update_every_steps is not None:
            _positive(self.update_every_steps, "update_every_steps", integer=True)


@dataclass
class StageConfig:
    """One pruning step: a plan, the method (a registered driver) with its ``options``, the driving phase
    (``admm:``, named so for history: it is every method's phase) and the masked ``retrain`` phase.

    ``options`` is the driver's typed config (``admmcompress.drivers.get_driver(method).config_class``),
    from a mapping: ``{rho: 1.0e-3}`` for admm, ``{penalty: 1.0e-4}`` for reweighted. Older spellings
    still read: rho/rho_growth/rho_max inside ``admm:``, and a ``reweighted:`` mapping.
    """

    plan: Plan
    method: str = "admm"
    admm: ADMMPhaseConfig = field(default_factory=ADMMPhaseConfig)
    retrain: PhaseConfig = field(default_factory=PhaseConfig)
    options: Any = None
    # "strict"/"extend": filter/channel targets on tied channels (residual adds, concat, depthwise, BN)
    # become one coupled target per channel group, as Plan.resolve_coupled does; "none": per layer.
    coupling: str = "none"
    # Older spelling of method reweighted's options (configs and run folders written before the registry).
    reweighted: Any = None

    def __post_init__(self) -> None:
        try:
            driver = get_driver(self.method)
        except DriverError as err:
            raise ValueError(str(err)) from None
        legacy: dict[str, Any] = {}
        if isinstance(self.admm, dict):
            phase = dict(self.admm)
            legacy = {k: phase.pop(k) for k in LEGACY_ADMM_OPTIONS if k in phase}
            try:
                self.admm = _build(ADMMPhaseConfig, phase, "admm")
            except ConfigError as err:
                if "unknown key" not in str(err) or self.method != "admm":
                    raise
                # the older spelling the shipped configs use is read too: say so beside the phase's own keys
                raise ConfigError(f"{err} (and {list(LEGACY_ADMM_OPTIONS)}, the older spelling of options: "
                                  "{rho: ..., rho_growth: ..., rho_max: ...})") from None
        if self.method != "admm" and legacy:  # ignored for other methods, as before the registry: said so now
            warnings.warn(f"method {self.method}: {sorted(legacy)} inside admm: apply to method admm only and are "
                          f"ignored; give {self.method}'s own settings under options:", IgnoredSetting, stacklevel=2)
            legacy = {}
        if self.reweighted is not None and self.method != "reweighted":
            warnings.warn(f"method {self.method}: the reweighted: block applies to method reweighted only and is "
                          "ignored; drop it, or set method: reweighted", IgnoredSetting, stacklevel=2)
        if self.method == "reweighted" and self.reweighted is not None:
            legacy = self.reweighted
        self.reweighted = None
        if legacy and self.options is not None:
            raise ValueError(
                f"method {self.method}: options given twice (in options: and in the older spelling "
                f"{sorted(legacy) if isinstance(legacy, dict) else 'reweighted:'}); keep only options:"
            )
        try:
            self.options = driver.make_config(self.options if self.options is not None else legacy or None)
        except DriverError as err:
            raise ValueError(str(err)) from None
        if self.coupling not in COUPLINGS:
            raise ValueError(f"coupling={_short(self.coupling)}; choose one of {COUPLINGS}")
        if self.coupling != "none" and not driver.cls.supports_coupling:
            coupled = [m for m in list_drivers() if get_driver(m).cls.supports_coupling]
            raise ValueError(
                f"coupling needs a method that drives coupled targets, one of {coupled} ({self.method} drives one "
                "parameter per target); change the method, or set coupling: none"
            )
        if not isinstance(self.plan, Plan):
            try:
                self.plan = Plan.from_dict(self.plan)
            except PlanError as err:
                raise ValueError(str(err)) from None
        if isinstance(self.retrain, dict):
            self.retrain = _build(PhaseConfig, self.retrain, "retrain")
        _section(self.admm, ADMMPhaseConfig, "admm", "{epochs: 10}")
        _section(self.retrain, PhaseConfig, "retrain", "{epochs: 5}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "method": self.method,
            "admm": dataclasses.asdict(self.admm),
            "retrain": dataclasses.asdict(self.retrain),
            "options": dataclasses.asdict(self.options),
            "coupling": self.coupling,
        }


@dataclass
class DataConfig:
    # A bundled dataset's name, or {import: "package.module:ClassOrFactory", args: {...}} for any torch Dataset
    # (admmcompress.data.imported).
    dataset: str | dict[str, Any] = "mnist"
    batch_size: int = 64
    eval_batch_size: int = 1000
    train_limit: int | None = None
    test_limit: int | None = None
    # Hold out this many training samples (a fixed seeded draw) as the validation set: every accuracy during the
    # run (per epoch, per stage) is measured on it, and the test set is evaluated once, at the end.
    validation: int | None = None
    data_dir: str | None = None
    # Training-batch augmentation, e.g. {shift: 2} for digits or {shift: 4, hflip: true} for CIFAR-10.
    augment: Augment | None = None

    def __post_init__(self) -> None:
        _plain_fields(self)
        if isinstance(self.augment, dict):
            self.augment = _build(Augment, self.augment, "augment")
        elif self.augment is not None and not isinstance(self.augment, Augment):
            raise ValueError("augment: give a mapping such as {shift: 2, hflip: false}, or leave it out")
        if isinstance(self.dataset, dict):
            DatasetSpec.from_config(self.dataset)  # validates
            if self.augment is not None:
                raise ValueError("augment: applies to the bundled datasets; put the transforms of an imported "
                                 "dataset into the dataset itself, and drop augment")
        elif not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(
                f"dataset={_short(self.dataset)} must be a dataset name, e.g. mnist, or "
                "{import: 'package.module:Name'}"
            )
        _positive(self.batch_size, "batch_size", integer=True)
        _positive(self.eval_batch_size, "eval_batch_size", integer=True)
        if isinstance(self.data_dir, PurePath):  # from Python: kept as text, as config.yaml writes it
            self.data_dir = str(self.data_dir)
        if self.data_dir is not None and (not isinstance(self.data_dir, str) or not self.data_dir):
            raise ValueError(f"data_dir={_short(self.data_dir)} must be a folder's path (text), e.g. "
                             "data_dir: /data/mnist, or leave it out")
        for name in ("train_limit", "test_limit", "validation"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), name, integer=True)
        if self.validation is not None and isinstance(self.dataset, dict):
            raise ValueError("validation: holds out part of a bundled dataset; give an imported dataset its own "
                             "validation split (test_args) instead")


def _flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={_short(value)} must be true or false")


@dataclass
class DistributedConfig:
    """``distributed:`` of a run: what matters only under ``torchrun`` (see admmcompress.train.distributed).

    ``sync_batchnorm`` trains BatchNorm on global batch statistics (torch's SyncBatchNorm: CUDA only);
    ``check_ranks`` asserts after every driver update that driver state, masks and weights are equal on
    every rank (a debug mode; also switched on by ADMMCOMPRESS_CHECK_RANKS=1).
    """

    sync_batchnorm: bool = False
    check_ranks: bool = False

    def __post_init__(self) -> None:
        _flag(self.sync_batchnorm, "distributed.sync_batchnorm")
        _flag(self.check_ranks, "distributed.check_ranks")


@dataclass
class LoggingConfig:
    """``logging:`` of a run: per-epoch loss, penalty, rho, per-layer residual and sparsity as ``log.csv`` and/or
    TensorBoard events under ``tensorboard/`` (pip install tensorboard) in the run folder."""

    csv: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        _flag(self.csv, "logging.csv")
        _flag(self.tensorboard, "logging.tensorboard")

    @property
    def active(self) -> bool:
        return self.csv or self.tensorboard


@dataclass
class CompactRunConfig:
    """``compact:`` of a run: after the last stage, build the physically smaller model and check it.

    ``atol`` bounds ``max |compacted - masked|`` on ``samples`` random inputs (the run fails otherwise);
    ``columns`` puts in the kept-column executor ("off", "auto": where measured faster, "on").
    """

    atol: float = 1e-4
    samples: int = 8
    columns: str = "off"

    def __post_init__(self) -> None:
        if isinstance(self.columns, bool):  # YAML 1.1 reads an unquoted off / on as false / true
            self.columns = "on" if self.columns else "off"
        _plain_fields(self)
        _number(self.atol, "atol")
        if not self.atol >= 0:
            raise ValueError(f"atol={_short(self.atol)} must be >= 0, e.g. 1.0e-4")
        _positive(self.samples, "samples", integer=True)
        if self.columns not in COLUMN_MODES:
            raise ValueError(f"columns={_short(self.columns)}; choose one of {COLUMN_MODES}")


def _relative_to(path: str | None, base_dir: Path) -> str | None:
    """A checkpoint path written in a config is relative to the config's folder (unless it exists as given)."""
    if not path or Path(path).is_absolute():
        return path
    candidate = (base_dir / path).resolve()
    return str(candidate) if candidate.exists() or not Path(path).exists() else path


def _plugin_path(entry: Any, base_dir: Path) -> Any:
    if isinstance(entry, str) and entry.endswith(".py") and not Path(entry).is_absolute():
        return str((base_dir / entry).resolve())
    return entry


@dataclass
class RunConfig:
    model: dict[str, Any]
    data: DataConfig = field(default_factory=DataConfig)
    name: str = "run"
    seed: int = 0
    threads: int | None = None
    pretrained: str | None = None
    pretrain: PhaseConfig | None = None
    stages: list[StageConfig] = field(default_factory=list)
    checkpoint_every_epochs: int = 1
    # Continue from an already pruned checkpoint: its zeros in the plan's layers stay zero (progressive).
    freeze_pretrained_zeros: bool = False
    # true (or a mapping of CompactRunConfig options): compact the model after the last stage.
    compact: CompactRunConfig | None = None
    # Keep every stage's result, not only the last: each stage of a progressive run is a model at its own rate
    # (stages/stage<N>.safetensors + stage<N>_masks.safetensors in the run folder).
    save_stages: bool = False
    # Distillation teacher (same architecture): one checkpoint, or a list of them for an ensemble teacher
    # (mean of the members' logits); default: the model the first stage starts from.
    teacher: str | list[str] | None = None
    # Training speed on CPU (measured in benchmarks/RESULTS.md): feed batches in channels_last layout
    # (weights stay contiguous, so projections and masks see the usual layout), and run forward passes
    # under bf16 autocast (master weights, optimizer and evaluation stay float32).
    channels_last: bool = False
    autocast: str | None = None
    # Modules (names, or .py files relative to the config) whose import registers drivers, structures and
    # executors of your own; loaded before the stages are read (admmcompress.plugins).
    plugins: list[str] | None = None
    # Under torchrun: SyncBatchNorm and the equal-state debug check (admmcompress.train.distributed).
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # Per-epoch CSV / TensorBoard logs in the run folder (admmcompress.train.logging).
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _plain_fields(self)
        if isinstance(self.distributed, dict) or self.distributed is None:
            self.distributed = _build(DistributedConfig, self.distributed, "distributed")
        if isinstance(self.logging, dict) or self.logging is None:
            self.logging = _build(LoggingConfig, self.logging, "logging")
        _section(self.distributed, DistributedConfig, "distributed", "{sync_batchnorm: false}")
        _section(self.logging, LoggingConfig, "logging", "{csv: true}")
        try:
            load_plugins(self.plugins)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last={_short(self.channels_last)} must be true or false")
        if not isinstance(self.autocast, (str, type(None))) or self.autocast not in AUTOCAST_DTYPES:
            choices = [k for k in AUTOCAST_DTYPES if k]  # a list or mapping is not hashable: checked as a type first
            raise ValueError(f"autocast={_short(self.autocast)}; choose one of {choices} or leave it out")
        if not isinstance(self.model, dict) or "name" not in self.model:
            raise ValueError("model: give a mapping with 'name' (e.g. {name: lenet5}) and optional arguments")
        if not isinstance(self.model.get("name"), str) or not self.model["name"]:
            raise ValueError(f"model: name={_short(self.model.get('name'))} must be a model name, e.g. "
                             "{name: lenet5}")
        odd = [k for k in self.model if not isinstance(k, str)]  # `5: 1` would fail as Python keywords later
        if odd:
            raise ValueError(f"model: argument name {odd[0]!r} must be text (a keyword argument of the model), e.g. "
                             "{name: lenet5, dropout: 0.5}")
        if isinstance(self.data, dict):
            self.data = _build(DataConfig, self.data, "data")
        if isinstance(self.pretrain, dict):
            self.pretrain = _build(PhaseConfig, self.pretrain, "pretrain")
        _section(self.data, DataConfig, "data", "{dataset: mnist}")
        if self.pretrain is not None:
            _section(self.pretrain, PhaseConfig, "pretrain", "{epochs: 10}")
        if self.pretrained is None and self.pretrain is None:
            raise ValueError("give 'pretrained' (a dense checkpoint) or 'pretrain' (epochs to train one)")
        if self.pretrained is not None and self.pretrain is not None:  # a warning: older run folders hold both
            warnings.warn("both 'pretrained' and 'pretrain' are given: the run starts from 'pretrained' and the "
                          "pretrain phase does not run; drop one of them", UserWarning, stacklevel=2)
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained):
            raise ValueError(f"pretrained={_short(self.pretrained)} must be a checkpoint file's path")
        if self.pretrain is not None and self.pretrain.distill is not None:
            raise ValueError("pretrain: 'distill' needs a teacher, and the teacher is the pretrained model; "
                             "use distill in a stage's admm/retrain phase")
        if not isinstance(self.stages, list):
            raise ValueError("stages must be a list (one entry per pruning step)")
        self.stages = [
            s if isinstance(s, StageConfig) else _build(StageConfig, s, f"stages[{i}]")
            for i, s in enumerate(self.stages)
        ]
        _positive(self.checkpoint_every_epochs, "checkpoint_every_epochs", integer=True)
        if not isinstance(self.freeze_pretrained_zeros, bool):
            raise ValueError(f"freeze_pretrained_zeros={_short(self.freeze_pretrained_zeros)} must be true or false")
        if not isinstance(self.save_stages, bool):
            raise ValueError(f"save_stages={_short(self.save_stages)} must be true or false")
        if self.freeze_pretrained_zeros and self.pretrained is None:
            raise ValueError("freeze_pretrained_zeros needs 'pretrained' (the pruned checkpoint to continue from)")
        distills = any(p.distill is not None for s in self.stages for p in (s.admm, s.retrain))
        if distills and self.freeze_pretrained_zeros and self.teacher is None:
            warnings.warn(
                "distillation without 'teacher:' while continuing from a pruned checkpoint: the teacher is that "
                "pruned model; set teacher: to the dense model's file to distill from it",
                UserWarning,
                stacklevel=2,
            )
        if isinstance(self.teacher, list):
            if not self.teacher or not all(isinstance(f, str) and f for f in self.teacher):
                raise ValueError(
                    f"teacher={_short(self.teacher)}: give one checkpoint file, or a non-empty list of files "
                    "(an ensemble)"
                )
        elif self.teacher is not None and not isinstance(self.teacher, str):
            raise ValueError(f"teacher={_short(self.teacher)} must be a checkpoint file or a list of them")
        if self.teacher is not None and not distills:
            raise ValueError("teacher is set but no phase distills; add distill: {alpha: 0.5} to a phase, or drop it")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={_short(self.seed)} must be an integer in [0, 2**63), e.g. 1")
        if isinstance(self.name, int) and not isinstance(self.name, bool):
            self.name = str(self.name)  # `name: 2024` in YAML
        if (not isinstance(self.name, str) or not self.name.strip() or CONTROL.search(self.name)
                or Path(self.name).is_absolute() or ".." in Path(self.name.replace("\\", "/")).parts):
            raise ValueError(f"name={_short(self.name)} must be a name inside runs/ (no absolute path, no '..'): "
                             "it names the run's folder there when --out is not given")
        if self.threads is not None:
            _positive(self.threads, "threads", integer=True)
            if self.threads > MAX_THREADS:
                raise ValueError(f"threads={self.threads} is more than {MAX_THREADS} (OpenMP cannot start that many; "
                                 f"this machine has {os.cpu_count()} CPUs), e.g. threads: {os.cpu_count()}")
        if self.compact is True:
            self.compact = CompactRunConfig()
        elif self.compact is False:
            self.compact = None
        elif isinstance(self.compact, dict):
            self.compact = _build(CompactRunConfig, self.compact, "compact")
        elif self.compact is not None and not isinstance(self.compact, CompactRunConfig):
            raise ValueError(
                f"compact={_short(self.compact)} must be true, false or a mapping like {{atol: 1.0e-4, samples: 8}}"
            )
        if self.compact is not None and not self.stages:
            raise ValueError("compact: true needs at least one stage (there is nothing pruned to compact)")

    @classmethod
    def from_dict(cls, spec: dict[str, Any], base_dir: Path | None = None) -> RunConfig:
        plugins = spec.get("plugins") if isinstance(spec, dict) else None
        if base_dir is not None and isinstance(plugins, list):  # .py plugins are relative to the config
            spec = {**spec, "plugins": [_plugin_path(p, base_dir) for p in plugins]}
        config = _build(cls, spec, "config")
        if base_dir is not None:
            config.pretrained = _relative_to(config.pretrained, base_dir)
            if isinstance(config.teacher, list):
                config.teacher = [_relative_to(f, base_dir) for f in config.teacher]
            else:
                config.teacher = _relative_to(config.teacher, base_dir)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        """Read a run config; an unreadable, empty, binary or non-mapping file is a ConfigError naming it."""
        path = Path(path)
        if not path.is_file():
            if path.is_dir():
                raise ConfigError(f"config file '{path}' is a folder; give a YAML run configuration (see configs/)")
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as err:
            raise ConfigError(
                f"config file '{path}' cannot be read ({err.strerror or err}); check its permissions"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(
                f"config file '{path}' is not text (a binary file?); give a YAML run configuration (see configs/)"
            ) from None
        try:
            spec = safe_load_unique(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
        if spec is None:
            raise ConfigError(
                f"config file '{path}' is empty; a run config needs at least 'model:' and 'pretrained:' or "
                "'pretrain:' (e.g. copy configs/lenet5_demo.yaml)"
            )
        if not isinstance(spec, dict):
            kind = "a list" if isinstance(spec, list) else f"the single value {spec!r:.40}"
            raise ConfigError(
                f"config: expected a mapping, got {type(spec).__name__}: '{path}' holds {kind}; write 'key: value' "
                "lines such as 'model: {name: lenet5}' (see configs/)"
            )
        try:
            return cls.from_dict(spec, base_dir=path.parent)
        except (TypeError, AttributeError) as err:  # a section of a wrong kind that the checks above let through
            raise ConfigError(
                f"config '{path}': a value has the wrong type or shape ({err}); compare it with a ready config "
                "in configs/"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["stages"] = [s.to_dict() for s in self.stages]
        return out


def config_dict(config: RunConfig) -> dict[str, Any]:
    """The config as plain YAML-able data (what a run folder's config.yaml and a checkpoint's ``config`` hold)."""
    return json.loads(json.dumps(config.to_dict()))
