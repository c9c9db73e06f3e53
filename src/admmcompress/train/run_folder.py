"""What ``admmcompress run`` may do with its ``--out`` folder: start, resume, or refuse, and why.

A folder holding run outputs is never written over by accident: a new run there needs ``--overwrite``
(which removes the old run's outputs, and only those, once the new run is ready to train), and
``--resume`` continues from ``checkpoint.pt``, or from the start when the run was killed before its first
checkpoint. The folder's ``config.yaml`` is the run's config: a resume with a config that differs from it
is refused with the keys that changed, and ``--allow-config-change`` accepts the changes that cannot
contradict what was already trained:

* at any time: ``threads``, ``checkpoint_every_epochs``, ``data.eval_batch_size``, ``distributed.check_ranks``,
  ``logging.*`` (speed and bookkeeping); the number of processes is no config key (any may resume);
* a phase not started yet (pretrain, or a stage's ``admm``/``retrain``): any of its settings but ``distill``
  (the teacher is chosen when the first stage starts); a stage whose driving phase has not started: its
  ``options`` (rho, ...);
* the phase in progress: ``epochs`` (not below the epochs it has done) and ``optimizer.lr`` (the advice after
  a NaN loss);
* where files are (``LOCATION_KEYS``, so a moved run folder can be pointed at its files): ``data.data_dir`` and
  ``plugins``; ``pretrained`` from one file to another (the weights come from the checkpoint; none <-> a file
  would add or drop the pretrain phase); ``teacher`` from one file (or list of files, as many) to another where
  the checkpoint holds the teacher (every checkpoint of a run with ``teacher:`` does, but those written before
  teachers were saved);
* before the first checkpoint: anything (the run starts from the beginning with the new config).

Everything else (model, data, plan, method, seed, ...) changes what the checkpoint was trained for: start a new
run instead (``--overwrite``, or another ``--out``). The run checks the checkpoint's own config (in
``checkpoint.pt`` since 2026-12-06) the same way, so another run's checkpoint copied into the folder is refused.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from admmcompress.atomic import TMP_PATTERN, atomic_write
from admmcompress.config_keys import LOCATION_KEYS, SPEED_KEYS
from admmcompress.strict_yaml import safe_load_unique, yaml_problem
from admmcompress.train.config import RunConfig, config_dict, written_by_the_library
from admmcompress.train.training_state import STAGES_DIR, STATE_FILE


class Phase(Protocol):
    """What the checks here read of a run's phase (``admmcompress.train.runner.Phase``, which the runner imports
    this module to check its checkpoint with; typed here so the two modules do not import each other)."""

    kind: str  # "pretrain" | "prune" | "retrain"
    stage: int

    @property
    def config_key(self) -> str: ...


CONFIG_FILE = "config.yaml"
# Files and folders a run writes into its --out folder (what --overwrite removes, nothing else).
RUN_OUTPUTS = (
    STATE_FILE,
    CONFIG_FILE,
    "model.safetensors",
    "masks.safetensors",
    "metrics.json",
    "report.md",
    "sparsity.png",
    "training.png",
    "rates.png",
    "hardware.md",
    "hardware.png",
    "compact",
    "log.csv",
    "tensorboard",
    STAGES_DIR,
)
# The run's own subfolders (where its writes may leave temporary files); others may hold other runs.
RUN_SUBFOLDERS = tuple(name for name in RUN_OUTPUTS if "." not in name)
# What a run writes inside those subfolders: --overwrite removes these (and temporary files of cut-short writes),
# then the folder once it is empty, so a file the user put there is kept.
SUBFOLDER_FILES = {
    "compact": re.compile(r"(manifest\.json|model\.safetensors)$"),
    STAGES_DIR: re.compile(r"stage\d+(_masks)?\.safetensors$"),
    "tensorboard": re.compile(r"events\.out\.tfevents\..+$"),
}
FINAL_OUTPUTS = ("model.safetensors", "masks.safetensors", "metrics.json", "report.md")
# Files only a run writes: a folder holding one of them holds a run (a report.md or a plot alone may be anyone's).
RUN_MARKERS = (STATE_FILE, CONFIG_FILE, "model.safetensors", "masks.safetensors", "metrics.json")
IN_PROGRESS_SAFE = ("epochs", "optimizer.lr")
SHOWN_CHANGES = 8  # a config diff names at most this many keys in its one line


class RunFolderError(ValueError):
    """The --out folder cannot be used as asked (one line naming the folder and the fix)."""


@dataclass
class FolderPlan:
    """What the run does with its folder: resume from the checkpoint or start, and what to change first."""

    folder: Path
    resume: bool = False  # load checkpoint.pt
    restart: bool = False  # --resume of a run killed before its first checkpoint
    remove: list[str] = field(default_factory=list)  # old outputs to remove (--overwrite)
    write_config: bool = True
    accepted: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # --allow-config-change

    def describe(self) -> str:
        """One line for --dry-run and the log."""
        if self.resume:
            what = f"resume the run in '{self.folder}' from its checkpoint"
        elif self.restart:
            what = f"start the run in '{self.folder}' again from the beginning (it saved no checkpoint)"
        elif self.remove:
            what = f"replace the run in '{self.folder}' (removing {', '.join(self.remove)})"
        else:
            what = f"write a new run into '{self.folder}'"
        if self.accepted:
            what += f", with config changes {describe_changes(self.accepted)}"
        return what


def outputs_in(folder: Path) -> list[str]:
    """The run outputs present in ``folder``."""
    return [name for name in RUN_OUTPUTS if (folder / name).exists()]


def plan_folder(
    folder: Path,
    config: RunConfig,
    phases: list[Phase],
    progress: tuple[int, int] | None,
    *,
    resume: bool,
    overwrite: bool,
    allow_config_change: bool,
    stale_lock: bool = False,
    config_path: Path | None = None,
) -> FolderPlan:
    """Decide (without writing anything) how a run of ``config`` uses ``folder``; refuse with one line.

    ``progress`` is the folder checkpoint's ``(phase_index, epoch)`` (None without a checkpoint),
    ``phases`` the run's phases as the Runner lists them, ``stale_lock`` whether the folder held a lock file
    before this run locked it (left by a run killed there, perhaps before it wrote anything), ``config_path``
    the YAML file the run was started from (``--overwrite`` must not delete it).
    """
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out '{folder}' is a file, not a folder; choose a folder for the run's outputs")
    present = outputs_in(folder) if folder.is_dir() else []
    if overwrite:
        own = folder / CONFIG_FILE
        if config_path is not None and own.is_file() and Path(config_path).resolve() == own.resolve():
            raise RunFolderError(
                f"--overwrite would replace '{own}', the config this run reads (with its comments); copy it out "
                f"first (cp {own} run.yaml) and run that"
            )
        _check_inputs_survive(folder, present, config)
        return FolderPlan(folder, remove=present)
    if not resume:
        if present and not any(name in RUN_MARKERS for name in present):  # report.md, plots, logs: maybe not a run's
            raise RunFolderError(
                f"'{folder}' holds {', '.join(present)}, which a run writes: move them, choose another --out, or add "
                "--overwrite to replace them"
            )
        if present:
            raise RunFolderError(
                f"'{folder}' already holds a run; add --resume to continue it, --overwrite to replace it "
                f"({', '.join(present)}), or choose another --out"
            )
        return FolderPlan(folder)
    started = CONFIG_FILE in present or stale_lock
    if STATE_FILE not in present:
        finished = [name for name in FINAL_OUTPUTS if name in present]
        if finished:
            raise RunFolderError(
                f"--resume: '{folder}' holds a finished run's outputs ({', '.join(finished)}) but no {STATE_FILE} to "
                "continue from; add --overwrite (instead of --resume) to run it again from the start"
            )
        if not started:
            raise FileNotFoundError(
                f"--resume: no checkpoint at {folder / STATE_FILE}; run without --resume to start, or pass the run's "
                "--out folder"
            )
    if STATE_FILE in present and CONFIG_FILE not in present and not allow_config_change:
        # older versions wrote no config.yaml: resuming stays possible, knowingly (a compress() folder has none
        # either, but its checkpoint holds its config, which the runner checks: `run` cannot continue it)
        raise RunFolderError(
            f"--resume: '{folder / CONFIG_FILE}' is missing, so the config cannot be checked against the checkpoint; "
            "restore it, add --allow-config-change to resume with this config anyway, or start again with --overwrite"
        )
    plan = FolderPlan(folder, resume=STATE_FILE in present, restart=STATE_FILE not in present)
    if CONFIG_FILE in present:
        diff = config_diff(_saved_config(folder / CONFIG_FILE, config), config_dict(config))
        if diff:
            refused = diff if not allow_config_change else unsafe_changes(diff, phases, progress)
            if refused:
                raise RunFolderError(_refusal(folder, diff, refused, allow_config_change))
            plan.accepted = diff
        plan.write_config = bool(diff)
    return plan


def _read_files(config: RunConfig) -> list[tuple[str, str]]:
    """``(config key, path)`` of every checkpoint file the run reads while it trains."""
    teachers = config.teacher if isinstance(config.teacher, list) else [config.teacher]
    named = [("pretrained", config.pretrained)] + [("teacher", t) for t in teachers]
    return [(key, path) for key, path in named if isinstance(path, str) and path]


def _check_inputs_survive(folder: Path, present: list[str], config: RunConfig) -> None:
    """--overwrite deletes ``present``: refuse when the new run reads one of them (its pretrained or teacher file
    is the old run's output), before anything is deleted; the run would fail after deleting it."""
    def deleted(target: Path) -> bool:
        for name in present:
            place = (folder / name).resolve()
            if target == place:
                return True
            own = SUBFOLDER_FILES.get(name)  # in a subfolder only the run's own files go (stages/stage0...)
            if target.parent == place and own is not None and own.match(target.name):
                return True
        return False

    for key, path in _read_files(config):
        if deleted(Path(path).resolve()):
            raise RunFolderError(
                f"--overwrite would delete '{path}', the {key} file this run reads (an output of the run in "
                f"'{folder}'); copy it out first (cp {path} dense.safetensors), point {key}: at the copy, and run again"
            )


def commit(plan: FolderPlan, config: RunConfig) -> None:
    """Carry out the plan's changes to the folder (call it holding the folder's lock, right before training)."""
    for name in plan.remove:
        target = plan.folder / name
        if target.is_dir() and not target.is_symlink():
            _remove_run_files(target, SUBFOLDER_FILES.get(name))
        else:
            target.unlink(missing_ok=True)
    if plan.write_config:
        text = yaml.safe_dump(config_dict(config), sort_keys=False)
        atomic_write(plan.folder / CONFIG_FILE, lambda tmp: tmp.write_text(text))


def _remove_run_files(folder: Path, own: re.Pattern[str] | None) -> None:
    """Remove the files a run wrote in one of its subfolders (``own``), then the folder if nothing else is left."""
    for path in folder.iterdir():
        if (path.is_file() or path.is_symlink()) and (
            (own is not None and own.match(path.name)) or TMP_PATTERN.match(path.name)
        ):
            path.unlink()
    with contextlib.suppress(OSError):  # a file of the user's keeps the folder
        folder.rmdir()


def _saved_config(path: Path, config: RunConfig) -> dict[str, Any]:
    """A run folder's config.yaml, with the defaults of keys added since it was written (so they are no change)."""
    try:
        raw = safe_load_unique(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RunFolderError(
            f"--resume: '{path}' is not valid YAML ({yaml_problem(err)}); restore it, or start again with --overwrite"
        ) from None
    except OSError as err:
        raise RunFolderError(
            f"--resume: cannot read '{path}' ({err.strerror or err}); restore it, or start again with --overwrite"
        ) from None
    except UnicodeDecodeError:  # a ValueError: without this, its text alone (no file name) would reach the user
        raise RunFolderError(
            f"--resume: '{path}' is not text (damaged or replaced by a binary file); restore the run's config.yaml, "
            "or start again with --overwrite"
        ) from None
    if not isinstance(raw, dict):
        raise RunFolderError(f"--resume: '{path}' is not a run config; restore it, or start again with --overwrite")
    return normalized_config(raw, config.plugins)


def normalized_config(raw: dict[str, Any], plugins: list[str] | None = None) -> dict[str, Any]:
    """A saved config (config.yaml, or the one a checkpoint holds) with the defaults of keys added since it was
    written, so they are no change; as written where this version cannot read it.

    Reading it as a config imports its plugins: only when they are ``plugins``, the ones the running config
    already imported. Other plugins named in a run folder (someone else's folder, an edited file) are compared
    as written, never run (``report``/``export`` ask for --trust-plugins for the same reason).
    """
    saved_plugins = raw.get("plugins")
    foreign = list(saved_plugins or []) != list(plugins or [])
    try:  # with foreign plugins: read with the running config's (already imported), the saved list put back
        with written_by_the_library():  # settings older versions wrote for every method are not the user's doing
            normalized = config_dict(RunConfig.from_dict({**raw, "plugins": list(plugins or [])} if foreign else raw))
    except (ValueError, TypeError, KeyError):  # another version's config, or a method only its plugins register
        return json.loads(json.dumps(raw))
    if foreign:
        normalized["plugins"] = json.loads(json.dumps(saved_plugins))
    return normalized


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists as dotted keys (``stages.0.admm.epochs``); leaves keep their values."""
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list) and value:
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, sub in items:
        out.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


MISSING = "(absent)"
IN_MEMORY = "<in-memory model>"  # a compress() call's pretrained: its model comes as an object, no file


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every key whose value differs."""
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    return {k: (a.get(k, MISSING), b.get(k, MISSING)) for k in keys if (k in a) != (k in b) or a.get(k) != b.get(k)}


def unsafe_changes(
    diff: dict[str, tuple[Any, Any]], phases: list[Phase], progress: tuple[int, int] | None,
    teacher_saved: bool = True,
) -> dict[str, str]:
    """The changed keys ``--allow-config-change`` cannot accept, each with the reason (see the module doc).

    ``teacher_saved``: whether the checkpoint holds the distillation teacher (then its file may have moved).
    """
    if progress is None:
        return {}  # nothing was saved: the run starts from the beginning with the new config
    phase_index, epoch = progress
    by_key = {p.config_key: i for i, p in enumerate(phases)}
    prune_of_stage = {p.stage: i for i, p in enumerate(phases) if p.kind == "prune"}
    refused: dict[str, str] = {}
    for key, (old, new) in diff.items():
        if key in SPEED_KEYS:
            continue
        location = _location_key(key)
        if location is not None:
            reason = _moved_file_refusal(location, old, new, teacher_saved)
            if reason:
                refused[key] = reason
            continue
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "stages" and parts[2] == "options" and parts[1].isdigit():
            index = prune_of_stage.get(int(parts[1]))
            started = index is None or index < phase_index or (index == phase_index and epoch > 0)
            if started:
                refused[key] = "its stage has started"
            continue
        prefix, rest = _phase_key(key, by_key)
        if prefix is None:
            refused[key] = "it changes what the checkpoint was trained for"
            continue
        index = by_key[prefix]
        if index < phase_index:
            refused[key] = "its phase is finished"
        elif index > phase_index or epoch == 0:
            if rest.split(".")[0] == "distill":
                refused[key] = "the teacher is chosen when the first stage starts"
        elif rest not in IN_PROGRESS_SAFE:
            refused[key] = "its phase is in progress (only epochs and optimizer.lr may change)"
        elif rest == "epochs" and not (isinstance(new, int) and new >= epoch):
            refused[key] = f"the phase has done {epoch} epochs already"
    return refused


def _location_key(key: str) -> str | None:
    """The entry of ``LOCATION_KEYS`` that the dotted ``key`` is, or is inside (``teacher.1``: ``teacher``)."""
    return next((loc for loc in LOCATION_KEYS if key == loc or key.startswith(loc + ".")), None)


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and value not in (MISSING, IN_MEMORY) and bool(value.strip())


def _moved_file_refusal(location: str, old: Any, new: Any, teacher_saved: bool) -> str:
    """Why a changed location key cannot be accepted once a checkpoint exists; empty when it can (a moved file)."""
    if location in ("data.data_dir", "plugins"):
        return ""  # where the data or the plugins' code is: the model, data and method names are checked apart
    if not (_is_path(old) and _is_path(new)):  # a file added or dropped, not moved
        if location == "pretrained":
            return "it decides whether the run pretrains (a file may move, not come or go)"
        return "it decides which teacher distills (a file may move, not come or go)"
    if location == "teacher" and not teacher_saved:
        return "the checkpoint holds no copy of the teacher (written before teachers were saved)"
    return ""  # the weights (and the teacher) come from the checkpoint now


def _phase_key(key: str, by_key: dict[str, int]) -> tuple[str | None, str]:
    for prefix in by_key:
        if key.startswith(prefix + "."):
            return prefix, key[len(prefix) + 1 :]
    return None, ""


def _short(value: Any) -> str:
    text = value if value is MISSING else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def describe_changes(diff: dict[str, Any], reasons: dict[str, str] | None = None) -> str:
    """``key (old -> new: reason), ...`` for one line (at most ``SHOWN_CHANGES`` keys, then a count)."""
    keys = list(diff)
    shown = [
        f"{k} ({_short(diff[k][0])} -> {_short(diff[k][1])}{': ' + reasons[k] if reasons else ''})"
        for k in keys[:SHOWN_CHANGES]
    ]
    more = f" and {len(keys) - SHOWN_CHANGES} more" if len(keys) > SHOWN_CHANGES else ""
    return ", ".join(shown) + more


def _refusal(folder: Path, diff: dict[str, Any], refused: dict[str, str], allowed: bool) -> str:
    saved = folder / CONFIG_FILE
    if allowed:
        return (
            "--resume --allow-config-change: cannot accept "
            f"{describe_changes({k: diff[k] for k in refused}, refused)}; "
            f"resume with the run's own config ('{saved}') or those keys as they were, or start again with --overwrite"
        )
    return (
        f"--resume: the config differs from the run's '{saved}' in {describe_changes(diff)}; resume with the run's "
        "own config, add --allow-config-change to accept safe changes (epochs of unfinished phases, threads, moved "
        "files' paths, ...), or start again with --overwrite"
    )


__all__ = [
    "CONFIG_FILE",
    "FolderPlan",
    "RUN_OUTPUTS",
    "RunFolderError",
    "commit",
    "config_diff",
    "describe_changes",
    "normalized_config",
    "outputs_in",
    "plan_folder",
    "unsafe_changes",
]
