"""``admmcompress export --<executor> RUN_DIR --out ...``: a finished run's model through a registered executor.

Run-folder glue for the CLI, kept out of ``executors/`` so that the executors never depend on the
training package or the report: ``open_run`` verifies a run folder (the output checksums recorded in
``metrics.json``, the weights against ``masks.safetensors``: ``report.integrity``) and reads it
(``config.yaml``, ``model.safetensors``) into an :class:`~admmcompress.executors.FinishedRun` (the model,
its config, test inputs, its storage report), and ``export_run`` hands it to ``get_executor(name).export``.
The command never replaces what the user has: ``--out`` must not exist (``--compact``: or be an empty folder).

The command's flags come from the registry: one ``--<name>`` per registered executor that can
``export`` (built-ins ``--compact``, ``--onnx``, ``--packed``) and each executor's own options
(``--scheme``, ``--index-bits`` for ``--packed``). Plugins are imported before the parser is built, so
their executors get flags too: ``--plugin MODULE_OR_FILE`` (repeatable; a .py path is taken from the
current folder) and the run config's ``plugins:`` list (``config.yaml`` in the run folder; a .py path is
taken from that folder).

>>> summary = export_run("packed", "runs/lenet5", "lenet5.admmpk")              # doctest: +SKIP
>>> print(summary.splitlines()[-1])                                            # doctest: +SKIP
round trip: state dict bit-identical, outputs identical: True
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from typing_extensions import deprecated

from admmcompress.atomic import TMP_PATTERN, nearest_existing
from admmcompress.command_locks import (
    TARGET_LOCK_SUFFIX,
    clean_leftovers,
    clean_stale_target_locks,
    hold_target,
    say_removed,
)
from admmcompress.executors.base import FinishedRun, get_executor, list_executors
from admmcompress.executors.packed import packed_size_lines  # noqa: F401  (its old home; tests import it here)
from admmcompress.models import create_model
from admmcompress.plugins import TRUST_FLAG, TRUST_HELP, PluginError, entries_inside, load_plugins
from admmcompress.report.storage import storage
from admmcompress.strict_yaml import safe_load_unique
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.config import ConfigError, RunConfig, written_by_the_library

EXPORT_ADVICE = "wait for it to end, or choose another --out"  # the end of the line refusing a second export


def _require_model(run_dir: Path) -> None:
    if not run_dir.exists():
        raise FileNotFoundError(f"'{run_dir}' does not exist; give the --out folder of a finished `admmcompress run`")
    if not (run_dir / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"'{run_dir}' has no model.safetensors; give the --out folder of a finished `admmcompress run`"
        )


def read_run_config(run_dir: str | Path, trust_plugins: bool = False) -> RunConfig:
    """A run folder's ``config.yaml``; a mistake in it is one line naming that file.

    The config's own messages say ``config: ...`` (right for ``admmcompress run CONFIG``, where the user named
    the file); here the file is the run folder's copy, so its path replaces that prefix. Plugins it names from
    inside the folder are refused unless ``trust_plugins`` (:func:`check_run_plugins`).
    """
    check_run_plugins(run_dir, trust_plugins)
    path = Path(run_dir) / "config.yaml"
    try:
        with written_by_the_library():  # the run folder's copy: old versions wrote rho* for every method
            return RunConfig.from_yaml(path)
    except ValueError as err:
        text = str(err)
        if str(path) in text:  # already names the file (missing, not YAML, not a mapping)
            raise
        kind = ConfigError if isinstance(err, ConfigError) else ValueError
        raise kind(f"'{path}': {text.removeprefix('config: ')}") from None


def load_run_model(run_dir: str | Path, trust_plugins: bool = False) -> tuple[torch.nn.Module, RunConfig]:
    """The model of a finished run folder (its ``config.yaml`` and ``model.safetensors``)."""
    run_dir = Path(run_dir)
    _require_model(run_dir)
    config = read_run_config(run_dir, trust_plugins)
    model = create_model(config.model["name"], **{k: v for k, v in config.model.items() if k != "name"})
    transforms = _recorded_transforms(run_dir)
    if transforms:  # modules a driver rewrote (ModuleTransform): rebuild them before loading the weights
        from admmcompress.train.runner import rebuild_transforms

        rebuild_transforms(model, transforms)
    ckpt.load_weights(model, run_dir / "model.safetensors")
    return model.eval(), config


def _recorded_transforms(run_dir: Path) -> list[dict]:
    from admmcompress.report.integrity import read_metrics, read_nonfinite

    if not (run_dir / "metrics.json").is_file():
        return []
    # `hardware` reads a run without verifying it first: a damaged file is still one line. A spec's infinity
    # (spelled "inf" in the file) comes back as the float the driver recorded, as `report`'s load_report does
    return read_nonfinite(read_metrics(run_dir, require_history=False)["metrics"].get("transforms", []))


def example_input(config: RunConfig, count: int = 8) -> torch.Tensor:
    """The first ``count`` test inputs of the run's dataset (a bundled one, or the run's own by import path)."""
    from admmcompress.data.imported import first_inputs, load_data

    # load_data, as the run did: `data.dataset` may be an {import: ...} mapping, not a bundled name. These inputs
    # only give shapes and dtypes, so the warning that a limit keeps few classes says nothing here
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*samples hold only classes", category=RuntimeWarning)
        return first_inputs(load_data(config.data.dataset, "test", config.data.data_dir, count), count)


def open_run(run_dir: str | Path, trust_plugins: bool = False) -> FinishedRun:
    """A finished run folder, opened for an executor's ``export`` (model loaded, in eval mode); ``trust_plugins``:
    import plugins its config names from inside the folder (:func:`check_run_plugins`).

    >>> run = open_run("runs/lenet5")                                              # doctest: +SKIP
    >>> get_executor("onnx").export(run, "lenet5.onnx")                             # doctest: +SKIP
    """
    verify_run_folder(run_dir)
    model, config = load_run_model(run_dir, trust_plugins)
    return FinishedRun(
        folder=Path(run_dir),
        model=model,
        model_config=dict(config.model),
        settings=config.to_dict(),
        examples=lambda count: example_input(config, count),
        storage_report=lambda **options: storage(model, **options),
    )


def verify_run_folder(run_dir: str | Path) -> None:
    """Refuse a run folder whose outputs changed since the run (recorded checksums, weights against masks).

    The same check as ``admmcompress report``: one ``RunIntegrityError`` line naming the file on a mismatch;
    a run written before checksums were recorded gets a note on stderr. A folder without metrics.json is
    refused: nothing in it says which weights the run wrote (a tampered model would be exported as is).
    """
    from admmcompress.report.integrity import verify_run

    run_dir = Path(run_dir)
    _require_model(run_dir)  # an empty or missing folder: the usual "no model.safetensors" line
    if not (run_dir / "metrics.json").is_file():
        raise FileNotFoundError(
            f"'{run_dir}' has no metrics.json, so its outputs cannot be verified; give a finished run folder"
        )
    for note in verify_run(run_dir):
        print(f"admmcompress: note: {note}", file=sys.stderr)


def export_run(
    name: str, run_dir: str | Path, out: str | Path, overwrite: bool = False, trust_plugins: bool = False,
    **options: Any,
) -> str:
    """``get_executor(name).export(open_run(run_dir), out, **options)``: the summary to print.

    The executor is looked up first, so an unknown name fails before the run is read. An existing ``out``
    is refused as on the command line (``check_export_out``) unless ``overwrite=True``; plugins the run's config
    names from inside its folder unless ``trust_plugins=True`` (``check_run_plugins``).
    """
    executor = get_executor(name)
    with hold_target(out, EXPORT_ADVICE):
        clean_export_leftovers(out)
        check_export_out(name, out, overwrite=overwrite)
        return executor.export(open_run(run_dir, trust_plugins), out, **options)


# --- the command line -----------------------------------------------------------------------


class _Probe(argparse.ArgumentParser):
    """A parser that raises instead of exiting: the pre-parse leaves errors to the real parser."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise argparse.ArgumentError(None, message)


def _export_args(argv: Sequence[str] | None) -> list[str] | None:
    """The arguments after ``export`` when ``argv`` is an export command, else None."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            return argv[i + 1 :] if arg == "export" else None
    return None


def config_plugins(run_dir: str | Path) -> list[str] | None:
    """The ``plugins:`` list of a run folder's ``config.yaml`` (None when there is none to read)."""
    path = Path(run_dir) / "config.yaml"
    try:
        spec = safe_load_unique(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # a missing, binary or broken config is reported when the run is opened
    return spec.get("plugins") if isinstance(spec, dict) else None


def check_run_plugins(run_dir: str | Path, trusted: bool = False) -> None:
    """Refuse a run folder whose ``config.yaml`` names plugins from inside the folder, unless ``trusted``.

    ``report``, ``export`` and ``hardware`` import a run's plugins to rebuild its model; a run folder may come from
    someone else, and its ``evil.py`` would run here. The user's own runs name plugins outside the folder (their
    ``.py`` paths are made absolute from the config the run was started with), so they pass.
    """
    inside = [] if trusted else entries_inside(config_plugins(run_dir), run_dir)
    if inside:
        raise PluginError(
            f"'{Path(run_dir) / 'config.yaml'}' names plugins {inside} from inside the run folder: reading the run "
            f"would run their code; pass {TRUST_FLAG} if you trust this folder (API: trust_plugins=True)"
        )


def load_export_plugins(args: Sequence[str]) -> None:
    """Import the plugins an ``export`` command names: ``--plugin`` entries, then the run config's list."""
    pre = _Probe(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    pre.add_argument(TRUST_FLAG, action="store_true")
    known, _ = pre.parse_known_args(args)
    load_plugins(known.plugin, Path.cwd())
    trusted = known.trust_plugins
    probe = _Probe(add_help=False)
    _add_arguments(probe, required=False)
    try:
        known, _ = probe.parse_known_args(args)
    except argparse.ArgumentError:
        return  # the real parser will say what is wrong
    if known.dir:
        check_run_plugins(known.dir, trusted)
        load_plugins(config_plugins(known.dir), Path(known.dir))


def add_export_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> None:
    """Fill the ``export`` sub-parser from the registry, after importing the plugins ``argv`` names.

    ``argv`` is the whole command line (default ``sys.argv[1:]``); plugins are imported only when it is
    an ``export`` command. A plugin that fails to import ends the command like a usage error: exit status
    2 and one line naming the plugin and the fix (its flags cannot be parsed without it).
    """
    args = _export_args(argv)
    if args is not None:
        try:
            load_export_plugins(args)
        except PluginError as err:
            parser.exit(2, f"admmcompress: error: {err}\n")
    _add_arguments(parser, required=True)


def _add_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    names = list_executors("export")
    formats = parser.add_mutually_exclusive_group(required=required)
    for name in names:
        cls = type(get_executor(name))
        doc = (cls.__doc__ or "").strip().splitlines()
        formats.add_argument(
            f"--{name.replace('_', '-')}",
            dest="executor",
            action="store_const",
            const=name,
            help=cls.summary or (doc[0] if doc else f"the '{name}' executor"),
        )
    parser.add_argument("dir", nargs=None if required else "?", help="run folder (the --out of `admmcompress run`)")
    parser.add_argument("--out", required=required, help="file to write (--compact: folder)")
    seen = set()
    for name in names:
        for option, keywords in type(get_executor(name)).export_options.items():
            if option in seen:
                continue  # an option two executors share is added once
            seen.add(option)
            keywords = dict(keywords)
            default = keywords.pop("default", None)
            text = keywords.pop("help", f"{name} option")
            if default is not None:
                text += f" (default: {default})"
            parser.add_argument(
                f"--{option.replace('_', '-')}", dest=option, default=argparse.SUPPRESS, help=text, **keywords
            )
    parser.add_argument(
        "--plugin",
        action="append",
        metavar="MODULE_OR_FILE",
        help="import this module or .py file first (registers its executors; repeatable); "
        "the run config's `plugins:` are imported too",
    )
    parser.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)


def export_from_args(args: argparse.Namespace) -> str:
    """Run the parsed ``admmcompress export`` command; returns the summary to print."""
    executor = get_executor(args.executor)
    owners: dict[str, list[str]] = {}
    for name in list_executors("export"):
        for option in type(get_executor(name)).export_options:
            owners.setdefault(option, []).append(name)
    given = {option: getattr(args, option) for option in owners if hasattr(args, option)}
    wrong = sorted(option for option in given if option not in executor.export_options)
    if wrong:
        flag = wrong[0].replace("_", "-")
        raise ValueError(
            f"--{flag} is an option of --{' / --'.join(owners[wrong[0]])}, not of --{args.executor}; drop it"
        )
    with hold_target(args.out, EXPORT_ADVICE):  # a second export to this --out is refused: it would clean ours
        say_removed(clean_export_leftovers(args.out), args.out)
        check_export_out(args.executor, args.out)
        return executor.export(open_run(args.dir, getattr(args, "trust_plugins", False)), args.out, **given)


def clean_export_leftovers(out: str | Path) -> list[Path]:
    """Remove what an export to ``out`` killed mid-write left (its temporary files; returns them).

    Only this library's temporary names (``atomic.TMP_PATTERN``) of writes to ``out`` itself: ``.<name>.*.tmp``
    files (or the private folders of a folder being written whole) beside it, and, when ``out`` is a folder that
    holds nothing else, the temporary files in it (and the lock files of killed exports into it, while no live
    export holds one). Other exports may write beside ``out`` at the same time, so
    the temporary files of other names are left alone; a user's file is never touched, nor is the temporary file
    of an export to ``out`` running now, as long as the caller holds :func:`hold_target` (the commands do). A
    folder that cannot be cleaned (read-only) is left as it is: the export then says what is wrong with ``out``.
    """
    if not str(out):
        return []
    path = Path(out)
    removed = clean_leftovers(path.parent, targets=[path.name])
    try:  # what killed writes into the folder left: their temporary files and their exports' lock files
        only_temporary = path.is_dir() and not path.is_symlink() and all(
            TMP_PATTERN.match(entry.name) or entry.name.endswith(TARGET_LOCK_SUFFIX) for entry in path.iterdir())
    except OSError:  # unreadable: left as it is
        only_temporary = False
    if only_temporary:
        with contextlib.suppress(OSError):
            removed += clean_stale_target_locks(path)
        if not any(path.glob(f".*{TARGET_LOCK_SUFFIX}")):  # a lock still there: a live export writes in it
            removed += clean_leftovers(path)
    return removed


def check_export_out(name: str, out: str | Path, overwrite: bool = False) -> None:
    """Refuse an ``--out`` that export would write over or into, before the run is read.

    Export never replaces what the user has: an existing file (or a folder where a file goes) is refused, and
    ``--compact`` (a folder) takes a new or empty folder only. ``""`` would mean the current folder.
    ``overwrite=True`` (the API's choice) lets an existing file or a folder with files be replaced; the kind
    of ``out`` (file or folder) must still fit.
    """
    flag = f"--{name.replace('_', '-')}"
    folder = get_executor(name).writes_folder
    if not str(out):
        raise ValueError(f"--out is empty; give a {'folder' if folder else 'file'} name")
    path = Path(out)
    exists = path.exists() or path.is_symlink()  # a dangling link would be written through too
    if folder and exists and not path.is_dir():
        raise ValueError(f"--out '{out}' is a file; {flag} writes a folder, choose another --out")
    if folder and path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"--out '{out}' is a folder with files in it; {flag} writes a new folder: choose another "
                         "--out or remove it")
    if not folder and path.is_dir():
        raise ValueError(f"--out '{out}' is a folder; {flag} writes a file, give a file name")
    if not folder and exists and not overwrite:
        raise ValueError(f"--out '{out}' exists; export does not overwrite: choose another name or remove it")
    _check_out_location(path if folder else path.parent, out)


def _check_out_location(where: Path, out: str | Path) -> None:
    """Refuse, before the export's work, a folder for ``out`` that cannot be made or written (missing ones are
    created at the write): judged by its nearest existing parent, as ``admmcompress run`` judges its --out."""
    existing = nearest_existing(where)
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"--out '{out}' cannot be written: '{existing}' is a file, not a folder; choose another --out")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"--out '{out}' cannot be written: '{existing}' is read-only for this user; make it writable or choose "
            "another --out"
        )


# --- deprecated names (one release) ---------------------------------------------------------


@deprecated(
    "export_packed_run(run_dir, out, ...) is deprecated; use export_run('packed', run_dir, out, ...) "
    "(add overwrite=True to replace an existing out, as this did)"
)
def export_packed_run(
    run_dir: str | Path, out: str | Path, scheme: str = "best", index_bits: int | str = "best"
) -> str:
    """Deprecated: ``export_run("packed", run_dir, out, scheme=..., index_bits=...)``."""
    return export_run("packed", run_dir, out, overwrite=True, scheme=scheme, index_bits=index_bits)


@deprecated(
    "export_onnx_run(run_dir, out) is deprecated; use export_run('onnx', run_dir, out) "
    "(add overwrite=True to replace an existing out, as this did)"
)
def export_onnx_run(run_dir: str | Path, out: str | Path) -> str:
    """Deprecated: ``export_run("onnx", run_dir, out)``."""
    return export_run("onnx", run_dir, out, overwrite=True)


@deprecated(
    "export_compact_run(run_dir, out, ...) is deprecated; "
    "use export_run('compact', run_dir, out, atol=..., samples=...)"
)
def export_compact_run(run_dir: str | Path, out: str | Path, atol: float = 1e-4, samples: int = 8) -> str:
    """Deprecated: ``export_run("compact", run_dir, out)`` (the run config's ``compact: atol`` wins, as before)."""
    run = open_run(run_dir)
    if run.settings.get("compact"):
        atol = run.settings["compact"].get("atol", atol)
    return get_executor("compact").export(run, out, atol=atol, samples=samples)


__all__ = [
    "add_export_arguments",
    "check_export_out",
    "check_run_plugins",
    "clean_export_leftovers",
    "config_plugins",
    "example_input",
    "export_compact_run",
    "export_from_args",
    "export_onnx_run",
    "export_packed_run",
    "export_run",
    "load_export_plugins",
    "load_run_model",
    "open_run",
    "read_run_config",
    "verify_run_folder",
]
