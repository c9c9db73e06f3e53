"""Command line: ``admmcompress run CONFIG.yaml [--resume] [--out DIR]``, ``report DIR`` and ``export``."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shlex
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from admmcompress.atomic import WriteError
from admmcompress.data.datasets import load_dataset
from admmcompress.data.imported import describe, load_data
from admmcompress.models import create_model
from admmcompress.plugins import TRUST_FLAG, TRUST_HELP
from admmcompress.report.metrics import measure
from admmcompress.report.render import load_report, save_report
from admmcompress.report.storage import storage
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.config import MAX_THREADS, RunConfig
from admmcompress.train.distributed import Distributed
from admmcompress.train.lock import LOCK_FILE, RunLock, check_unlocked
from admmcompress.train.loop import TrainingDiverged, evaluate
from admmcompress.train.run_folder import RUN_OUTPUTS, RUN_SUBFOLDERS, commit, plan_folder
from admmcompress.train.runner import STATE_FILE, Runner, rebuild_transforms, run_phases
from admmcompress.train.training_state import read_progress

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TrainingDiverged, WriteError)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (the usage block stays behind --help); subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="admmcompress", description=__doc__)
    from admmcompress import __version__

    version = f"admmcompress {__version__} (torch {torch.__version__})"
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train/compress as a YAML config says; prints the report")
    run.add_argument("config", help="YAML run configuration (see configs/)")
    run.add_argument("--out", help="output folder (default: runs/<name>-<time>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--threads", type=int, help="torch threads (overrides the config's 'threads')")
    run.add_argument(
        "--seed", type=int, help="random seed (overrides the config's 'seed'; kept in the run's config.yaml)"
    )
    run.add_argument("--overwrite", action="store_true", help="replace the run outputs already in --out")
    run.add_argument(
        "--allow-config-change",
        action="store_true",
        help="--resume with an edited config: accept the safe changes (epochs of unfinished phases, threads, ...)",
    )
    run.add_argument(
        "--dry-run", action="store_true", help="check the config, plan, data and checkpoints, print the plan, exit"
    )
    report = sub.add_parser(
        "report", help="recompute and print the report of a finished run folder, or --compare several runs"
    )
    report.add_argument("dir", nargs="?", help="run folder (the --out of `admmcompress run`)")
    report.add_argument(
        "--compare", nargs="+", metavar="RUN_DIR", help="one markdown table (and one PNG) across these run folders"
    )
    report.add_argument("--out", help="--compare: write the table to this .md file, its plot beside it (.png)")
    report.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    report.add_argument(
        "--rehash",
        action="store_true",
        help="the run's files were changed on purpose: skip their checksums, record new ones (masks still checked; "
        "every output the run wrote must still be there; one run folder, not with --compare)",
    )
    export = sub.add_parser(
        "export", help="write a finished run's model with an executor: packed file, ONNX, compacted, or a plugin's"
    )
    from admmcompress.run_export import add_export_arguments  # flags from the executor registry, plugins first

    add_export_arguments(export, argv)
    from admmcompress.run_hardware import add_arguments as add_hardware_arguments

    add_hardware_arguments(sub.add_parser("hardware", help="modelled crossbar / SOT-MRAM mapping of a finished run"))
    args = parser.parse_args(argv)
    shown = warnings.formatwarning
    warnings.formatwarning = functools.partial(_format_warning, other=shown)  # the library's warnings: one line
    terminate = _on_sigterm()
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "export":
            return _export(args)
        if args.command == "hardware":
            return _hardware(args)
        return _report_command(args)
    except USER_ERRORS as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"admmcompress: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # a name too long, no permission, a full disk: the file and the system's words
        where = f"cannot use '{err.filename}'" if err.filename else "a file operation failed"
        print(f"admmcompress: error: {where}: {err.strerror or err}; check the path and its folder", file=sys.stderr)
        return 2
    except Terminated:  # `kill`, `timeout`, a scheduler's stop: the same line as Ctrl-C (it said nothing before)
        print(f"admmcompress: terminated (SIGTERM){_how_to_continue(args)}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:  # Ctrl-C: one line saying how to go on, not a traceback
        print(f"admmcompress: interrupted{_how_to_continue(args)}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = shown
        terminate()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so it ends as Ctrl-C does (files written atomically, a resume hint)."""


def _on_sigterm() -> Callable[[], None]:
    """Make SIGTERM raise :class:`Terminated` while a command runs; returns what puts the old handler back (a
    no-op where signals cannot be set: not the main thread, or no SIGTERM)."""
    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(_signum: int, _frame: Any) -> None:
        raise Terminated

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # an embedding that does not allow it
        return lambda: None
    # a handler installed from C reads back as None: the default is what can be put back then
    return lambda: signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


_PACKAGE = Path(__file__).resolve().parent


def _format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None,
    other: Callable[..., str] = warnings.formatwarning,
) -> str:
    """A warning this library raises, as the command prints it: ``admmcompress: warning: ...`` on one line (no
    source file, line and code: they say nothing to a user of the command). Others get ``other``'s format."""
    try:
        ours = Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        ours = False
    if not ours:
        return other(message, category, filename, lineno, line)
    return f"admmcompress: warning: {message}\n"


def _how_to_continue(args: argparse.Namespace) -> str:
    """After Ctrl-C: the command that continues an interrupted run from its last checkpoint, if it wrote one."""
    out = getattr(args, "run_folder", None)
    if args.command != "run" or out is None or getattr(args, "rank", 0) != 0:  # under torchrun rank 0 says it once
        return ""
    if not (out / STATE_FILE).is_file():
        return f" before the run's first checkpoint; nothing to resume in {out}"
    flags = _same_run_flags(args) + (["--allow-config-change"] if args.allow_config_change else [])
    launcher = getattr(args, "launcher", "admmcompress")  # under torchrun: every rank is launched again
    return (f"; continue from the last checkpoint: {launcher} run {shlex.quote(args.config)} "
            f"--out {shlex.quote(str(out))}{_joined(flags)} --resume")


def _same_run_flags(args: argparse.Namespace) -> list[str]:
    """The flags of ``args`` that a command continuing or repeating this run must repeat: the overrides that change
    the run's config or its result (``--seed``: the run's config.yaml, which --resume compares; ``--threads``: the
    float sums' order, so a bit-identical resume), and ``--no-progress``."""
    flags = []
    if args.seed is not None:
        flags += ["--seed", str(args.seed)]
    if args.threads is not None:
        flags += ["--threads", str(args.threads)]
    if args.no_progress:
        flags.append("--no-progress")
    return flags


def _joined(flags: list[str]) -> str:
    return "".join(f" {shlex.quote(flag)}" for flag in flags)


def _run(args: argparse.Namespace) -> int:
    """Check the flags and the config, then run in the locked --out folder (or only check: --dry-run)."""
    _check_run_flags(args)
    config = RunConfig.from_yaml(args.config)
    if args.seed is not None:
        config.seed = args.seed
    out = Path(args.out) if args.out else Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    ckpt.check_output_folder(out)  # a file or a read-only folder: one line now, not a traceback after loading
    args.run_folder = out  # for the line a Ctrl-C prints (main)
    if args.dry_run:
        return _dry_run(args, config, out)
    threads = args.threads or config.threads
    if threads:
        torch.set_num_threads(threads)
    said = Distributed.announced()  # for the command that continues it (_how_to_continue), even while joining
    args.launcher, args.rank = said.launcher, said.rank
    ctx = Distributed.from_env()  # under torchrun: rank 0 locks, checks and writes --out; the other ranks follow
    try:
        if not ctx.is_main:
            return _follow(config, out, ctx)
        created, stale = not out.exists(), (out / LOCK_FILE).exists()  # a lock file left behind: a killed run
        lock = RunLock(out).acquire()
        try:
            return _run_locked(args, config, out, stale, ctx)
        finally:
            lock.release()
            if created and out.is_dir() and not any(out.iterdir()):  # the run failed before writing anything
                with contextlib.suppress(OSError):  # another run took the folder since the lock was released
                    out.rmdir()
    except BaseException as err:
        ctx.abort(err)  # a refusal before training reaches the other ranks as the same one line
        raise
    finally:
        ctx.close()


def _follow(config: RunConfig, out: Path, ctx: Distributed) -> int:
    """A rank > 0 under torchrun: trains in step with rank 0, which decided start or resume and writes --out."""
    resume = ctx.proceed()  # rank 0's folder checks passed: build the runner beside it (its collectives meet rank 0's)
    runner = _build_runner(config, out, progress=False, dist=ctx, resume=resume)
    ctx.share()  # the folder is ready
    runner.run(resume=resume)
    return 0


def _check_run_flags(args: argparse.Namespace) -> None:
    """The run flags, checked like config values: one line naming the flag and the fix."""
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed {args.seed} must be an integer in [0, 2**63), e.g. --seed 1")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise ValueError(f"--threads {args.threads} must be an integer in [1, {MAX_THREADS}] (torch's threads; this "
                         f"machine has {os.cpu_count()} CPUs), e.g. --threads 4")
    if args.out is not None and not args.out.strip():
        raise ValueError("--out is empty; give a folder name, or leave --out out for runs/<name>-<time>")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if args.allow_config_change and not args.resume:
        raise ValueError("--allow-config-change goes with --resume (it accepts safe edits of a run's config)")
    for flag, given in (("--resume", args.resume), ("--overwrite", args.overwrite)):
        if given and not args.out:
            raise ValueError(f"{flag} needs --out DIR: the folder of the run to {flag[2:]}")


def _build_runner(config: RunConfig, out: Path | None, progress: bool, dist: Distributed | None = None,
                  resume: bool = False) -> Runner:
    """Model (pretrained weights loaded), data and the Runner: every check that needs no training.

    ``resume``: the weights come from the folder's checkpoint, so the ``pretrained`` file is not read (a run
    whose dense file was moved since still resumes).
    """
    torch.manual_seed(config.seed)  # the initial weights of a model trained from scratch follow the seed too
    model = create_model(config.model["name"], **{k: v for k, v in config.model.items() if k != "name"})
    if config.pretrained and not resume:
        ckpt.load_weights(model, config.pretrained)
    load = load_dataset if isinstance(config.data.dataset, str) else load_data  # bundled, or a Dataset by import path
    train = load(config.data.dataset, "train", config.data.data_dir, config.data.train_limit)
    test = load(config.data.dataset, "test", config.data.data_dir, config.data.test_limit)
    final_test = None
    if config.data.validation:  # the run measures on held-out training data; the test set once, at the end
        train, held = train.hold_out(config.data.validation)
        test, final_test = held, test
    runner = Runner(config, model, train, test, out_dir=out, progress=progress, dist=dist)
    runner.final_test = final_test
    runner.from_cli = True
    return runner


def _dry_run(args: argparse.Namespace, config: RunConfig, out: Path) -> int:
    """--dry-run: every check of a run (flags, config, plan against the model, data, checkpoints, --out), no writes."""
    folder = "(no --out: a new folder under runs/)"
    resume = False
    if args.out:
        check_unlocked(out)  # a folder another run is writing: refused now, as the real run would be
        progress = read_progress(out) if args.resume else None
        plan = plan_folder(
            out, config, run_phases(config), progress, resume=args.resume, overwrite=args.overwrite,
            allow_config_change=args.allow_config_change, stale_lock=(out / LOCK_FILE).exists(),
        )
        folder = plan.describe()
        resume = plan.resume
    runner = _build_runner(config, out if resume else None, progress=False, resume=resume)
    if resume:
        runner.check_checkpoint()  # another model's checkpoint, a damaged one: refused now, as the run would
    else:
        runner.preflight()
    model = runner.model
    phases = ", ".join(f"{p.label} {p.cfg.epochs} epoch(s)" for p in runner.phases) or "none"
    print(f"admmcompress: dry run of '{config.name}': config, plan, data and checkpoints check out; nothing written")
    print(f"  model: {config.model['name']}, {sum(p.numel() for p in model.parameters()):,} parameters"
          + (", from the run's checkpoint" if args.resume
             else f", from '{config.pretrained}'" if config.pretrained else ", trained from scratch"))
    print(f"  data: {describe(config.data.dataset)}, {len(runner.train)} train / {len(runner.test)} test samples, "
          f"{len(runner.loader)} steps per epoch")
    print(f"  phases: {phases}")
    print(f"  pruned layers: {', '.join(runner.layers()) or 'none'}")
    print(f"  out: {folder}")
    return 0


def _run_locked(
    args: argparse.Namespace, config: RunConfig, out: Path, stale_lock: bool, ctx: Distributed | None = None
) -> int:
    """The run proper, holding --out's lock: decide start/resume, prepare the folder, train, write the outputs."""
    progress = read_progress(out) if args.resume else None
    plan = plan_folder(
        out, config, run_phases(config), progress, resume=args.resume, overwrite=args.overwrite,
        allow_config_change=args.allow_config_change, stale_lock=stale_lock, config_path=Path(args.config),
    )
    if ctx is not None:
        ctx.proceed(plan.resume)  # every rank builds its runner now: building can hold collectives (_follow)
    runner = _build_runner(config, out, progress=not args.no_progress and sys.stderr.isatty(), dist=ctx,
                           resume=plan.resume)
    if not plan.resume:
        runner.preflight()  # NaN weights or data, teacher files: refused before the folder changes
    from admmcompress.command_locks import clean_leftovers, say_removed

    say_removed(clean_leftovers(out, below=RUN_SUBFOLDERS), out)  # writes a kill cut short; we hold the lock
    if plan.restart:
        print(f"admmcompress: no checkpoint in '{out}' yet (the run stopped before its first one): "
              "starting from the beginning", file=sys.stderr)
    if plan.accepted:
        print(f"admmcompress: {plan.describe()}; config.yaml updated", file=sys.stderr)
    commit(plan, config)
    if ctx is not None:
        ctx.share()  # the folder is ready: the other ranks start (or resume) with rank 0
    model = runner.model
    print(f"admmcompress: run '{config.name}' -> {out}", file=sys.stderr)
    metrics = runner.run(resume=plan.resume)
    if runner.final_test is not None:
        metrics["evaluated_on"] = f"validation: {config.data.validation} held-out training samples"
        metrics["test_accuracy"] = evaluate(model, runner.final_test, config.data.eval_batch_size)
    source = getattr(runner.train, "source", None)  # which copy of the dataset was read (or the import path)
    metrics["data_file"] = str(Path(source).absolute()) if source is not None else describe(config.data.dataset)
    from admmcompress.report.integrity import KEY, pending_record, record_output_checksums  # report/export verify

    ckpt.save_tensors(out / "model.safetensors", model.state_dict(), {"config": config.to_dict()})
    ckpt.save_tensors(out / "masks.safetensors", runner.masks.state_dict())
    metrics[KEY] = pending_record()  # a kill before the record below leaves an unfinished run, not a legacy one
    print(save_report(out, metrics, runner.history, f"admmcompress: {config.name}"))

    record_output_checksums(out)  # SHA-256 of the outputs into metrics.json, once they are all written
    print(f"(report, metrics.json and plots in {out}; rerun: admmcompress run {shlex.quote(args.config)} "
          f"--out {shlex.quote(f'{out}-again')}{_joined(_same_run_flags(args))})")
    return 0


def _report_command(args: argparse.Namespace) -> int:
    if args.compare and args.dir:
        raise ValueError(f"report: give either a run folder or --compare RUN_DIR..., not both ('{args.dir}')")
    if args.compare and args.rehash:  # --compare only reads runs: re-recording checksums there would be unseen
        raise ValueError("report: --rehash re-records one run's checksums and --compare only reads runs; first "
                         "`admmcompress report --rehash DIR` for each run changed on purpose, then --compare")
    if args.compare:
        for folder in args.compare:  # a run still writing its outputs would read as a damaged one
            check_unlocked(folder, "--compare reads its final outputs, so compare it once it has ended")
        return _compare(args.compare, args.out)
    if not args.dir:
        raise ValueError("report: give a run folder, or --compare RUN_DIR... to tabulate several")
    if args.out:
        raise ValueError("report: --out goes with --compare; a single run's report is written into its own folder")
    return _report(Path(args.dir), rehash=args.rehash, trust_plugins=args.trust_plugins)


def _compare(runs: list[str], out: str | None) -> int:
    """``report --compare``: print the table; write it to ``out`` with its plot beside it, or the plot alone to
    ``compare.png`` here (``compare-2.png``, ... when taken).

    What a killed earlier --compare left of these files is removed first, holding their lock (``hold_target``) so
    that a --compare writing them now is refused rather than cleaned away.
    """
    from admmcompress.command_locks import clean_leftovers, hold_target, say_removed
    from admmcompress.report.compare import DEFAULT_PLOT, compare_runs, default_plot_targets

    md = Path(out) if out is not None else None
    advice = "wait for it to end, or " + ("give --out NEW.md" if md is None else "choose another --out")
    with hold_target(md if md is not None else Path(DEFAULT_PLOT), advice):
        if md is None:
            say_removed(clean_leftovers(".", targets=default_plot_targets(".")), DEFAULT_PLOT)
        elif md.suffix == ".md":  # (another name is refused by compare_runs, with nothing cleaned)
            say_removed(clean_leftovers(md.parent, targets=[md.name, md.with_suffix(".png").name]), md)
        print(compare_runs(runs, out))
    return 0


def _report(out: Path, rehash: bool = False, trust_plugins: bool = False) -> int:
    """Recompute per-layer figures from the saved weights; accuracy and times come from metrics.json.

    The run's outputs are verified first (recorded checksums, weights against masks); a read-only run
    folder gets the report printed, and a note that it could not be saved there. The folder's lock is held
    throughout (with --rehash too): a run, or another report, writing it at the same time is refused.
    """
    from admmcompress.command_locks import hold_run_folder

    consequence = "report rewrites its metrics.json and report.md, so run it once it has ended"
    with hold_run_folder(out, consequence, elsewhere="report a copy of the folder"):
        return _report_locked(out, rehash, trust_plugins)


def _report_locked(out: Path, rehash: bool, trust_plugins: bool) -> int:
    """``_report``'s work, holding the run folder's lock (or in a folder it cannot write)."""
    from admmcompress.command_locks import clean_leftovers, say_removed
    from admmcompress.report.integrity import record_output_checksums, seal, verify_run
    from admmcompress.report.render import render_markdown

    # what a killed report (or run) left of the run's files; an export writing into the folder holds only its own
    # file's lock, so temporary files of other names are not ours to remove
    say_removed(clean_leftovers(out, targets=RUN_OUTPUTS), out)
    for note in verify_run(out, files=not rehash):
        print(f"admmcompress: note: {note}", file=sys.stderr)
    metrics, history = load_report(out)
    from admmcompress.run_export import read_run_config

    config = read_run_config(out, trust_plugins)  # a mistake in the run's config.yaml names that file
    model = create_model(config.model["name"], **{k: v for k, v in config.model.items() if k != "name"})
    rebuild_transforms(model, metrics.get("transforms", []))  # modules a driver rewrote (ModuleTransform)
    ckpt.load_weights(model, out / "model.safetensors")
    layers = _measured_layers(model, metrics["stats"]["layers"], out / "metrics.json")
    metrics["stats"] = measure(model, layers).to_dict()
    metrics["storage"] = storage(model, layers).to_dict()
    seal(metrics, history)  # the figures were recomputed: metrics.json's content checksum follows them
    title = f"admmcompress: {config.name}"
    try:  # load_report checked the entries it knows; anything else it holds is still one line naming the file
        render_markdown(metrics, title)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as err:
        raise ValueError(f"'{out / 'metrics.json'}' holds an entry the report cannot show ({type(err).__name__}: "
                         f"{err}); restore the file as the run wrote it") from None
    try:
        text = save_report(out, metrics, history, title)
        if rehash:
            record_output_checksums(out)
    except OSError as err:  # a read-only run folder (or a full disk): the report is still worth printing
        print(render_markdown(metrics, title))
        print(f"admmcompress: note: could not save the report into '{out}' ({err}); printed only", file=sys.stderr)
        return 0
    print(text)
    return 0


def _measured_layers(model: torch.nn.Module, rows: list[dict], path: Path) -> list[str]:
    """The pruned layers' module names from the report's rows (a GRU/LSTM's rows are '<layer>.<weight>')."""
    from admmcompress.structures.groups import gemm_params

    modules = dict(model.named_modules())
    names, unknown = [], []
    for row in rows:
        name = row["name"]
        layer, _, param = name.rpartition(".")
        if name not in modules and layer in modules and param in gemm_params(modules[layer]):
            name = layer
        (names if name in modules else unknown).append(name)
    if unknown:
        raise ValueError(f"'{path}': metrics.stats.layers names {unknown[:4]}, which the model built from the run's "
                         "config.yaml does not have; restore the file as the run wrote it")
    return list(dict.fromkeys(names))


def _export(args: argparse.Namespace) -> int:
    from admmcompress.run_export import export_from_args

    print(export_from_args(args))
    return 0


def _hardware(args: argparse.Namespace) -> int:
    """Load the run and its test data; the analysis itself is admmcompress.run_hardware."""
    from admmcompress.data.imported import first_inputs
    from admmcompress.run_export import load_run_model
    from admmcompress.run_hardware import ADC_CALIBRATION, layout_of_run, run_command, sample
    from admmcompress.train.loop import evaluate

    model, config = load_run_model(args.dir, args.trust_plugins)
    # the run's own test split: a bundled dataset, or its Dataset by import path (as export reads it)
    test = sample(load_data(config.data.dataset, "test", config.data.data_dir), args.samples, args.seed)
    batch = config.data.eval_batch_size
    # ADC full scales are set on training inputs, enough of them that the evaluated ones rarely clip (8 test
    # inputs clipped even a 24-bit ADC, a review's finding)
    calibration = first_inputs(load_data(config.data.dataset, "train", config.data.data_dir, ADC_CALIBRATION),
                               ADC_CALIBRATION)
    print(run_command(args, model, calibration, lambda m: evaluate(m, test, batch), f"Hardware: {config.name}",
                      layout_of_run(config.stages)))
    return 0


def entry() -> NoReturn:
    """The ``admmcompress`` script and ``python -m admmcompress``: :func:`main`'s status is the exit status.

    A process torchrun started ends with ``os._exit`` once its output is flushed: its process group is closed by
    then (:meth:`Distributed.close`), and skipping the interpreter's finalization keeps torch's gloo threads from
    touching a half torn-down interpreter, which now and then aborted a finished run ("terminate called without an
    active exception", SIGABRT) and made torchrun stop the other ranks before rank 0 had written its outputs.
    """
    code = main()
    if Distributed.announced().active:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing left to keep
                stream.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
