"""Command line: ``admmcompress run CONFIG.yaml [--resume] [--out DIR]``, ``report DIR`` and ``export``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from admmcompress.data.datasets import load_dataset
from admmcompress.models import create_model
from admmcompress.report.metrics import measure
from admmcompress.report.render import load_report, save_report
from admmcompress.report.storage import storage
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.config import RunConfig
from admmcompress.train.loop import TrainingDiverged
from admmcompress.train.runner import STATE_FILE, Runner, rebuild_transforms

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TrainingDiverged)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="admmcompress", description=__doc__)
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
    report = sub.add_parser(
        "report", help="recompute and print the report of a finished run folder, or --compare several runs"
    )
    report.add_argument("dir", nargs="?", help="run folder (the --out of `admmcompress run`)")
    report.add_argument(
        "--compare", nargs="+", metavar="RUN_DIR", help="one markdown table (and one PNG) across these run folders"
    )
    report.add_argument("--out", help="--compare: write the table to this .md file, its plot beside it (.png)")
    export = sub.add_parser(
        "export", help="write a finished run's model with an executor: packed file, ONNX, compacted, or a plugin's"
    )
    from admmcompress.run_export import add_export_arguments  # flags from the executor registry, plugins first

    add_export_arguments(export, argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "export":
            return _export(args)
        return _report_command(args)
    except USER_ERRORS as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"admmcompress: error: {message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    config = RunConfig.from_yaml(args.config)
    if args.seed is not None:
        config.seed = args.seed
    threads = args.threads or config.threads
    if threads:
        torch.set_num_threads(threads)
    if args.resume and not args.out:
        raise ValueError("--resume needs --out DIR: the folder of the run to continue")
    out = Path(args.out) if args.out else Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / STATE_FILE).exists() and not args.resume:
        raise ValueError(f"'{out}' already holds a run; add --resume to continue it, or choose another --out")
    torch.manual_seed(config.seed)  # the initial weights of a model trained from scratch follow the seed too
    model = create_model(config.model["name"], **{k: v for k, v in config.model.items() if k != "name"})
    if config.pretrained:
        ckpt.load_weights(model, config.pretrained)
    train = load_dataset(config.data.dataset, "train", config.data.data_dir, config.data.train_limit)
    test = load_dataset(config.data.dataset, "test", config.data.data_dir, config.data.test_limit)
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out, config)
    runner = Runner(config, model, train, test, out_dir=out, progress=not args.no_progress and sys.stderr.isatty())
    print(f"admmcompress: run '{config.name}' -> {out}", file=sys.stderr)
    metrics = runner.run(resume=args.resume)
    ckpt.save_tensors(out / "model.safetensors", model.state_dict(), {"config": config.to_dict()})
    ckpt.save_tensors(out / "masks.safetensors", runner.masks.state_dict())
    print(save_report(out, metrics, runner.history, f"admmcompress: {config.name}"))
    print(f"(report, metrics.json and plots in {out}; rerun: admmcompress run {args.config} --out {out}-again)")
    return 0


def _write_config(out: Path, config: RunConfig) -> None:
    text = yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False)
    ckpt.atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(text))


def _report_command(args: argparse.Namespace) -> int:
    if args.compare and args.dir:
        raise ValueError(f"report: give either a run folder or --compare RUN_DIR..., not both ('{args.dir}')")
    if args.compare:
        from admmcompress.report.compare import compare_runs

        print(compare_runs(args.compare, args.out))
        return 0
    if not args.dir:
        raise ValueError("report: give a run folder, or --compare RUN_DIR... to tabulate several")
    if args.out:
        raise ValueError("report: --out goes with --compare; a single run's report is written into its own folder")
    return _report(Path(args.dir))


def _report(out: Path) -> int:
    """Recompute per-layer figures from the saved weights; accuracy and times come from metrics.json."""
    metrics, history = load_report(out)
    config = RunConfig.from_yaml(out / "config.yaml")
    model = create_model(config.model["name"], **{k: v for k, v in config.model.items() if k != "name"})
    rebuild_transforms(model, metrics.get("transforms", []))  # modules a driver rewrote (ModuleTransform)
    ckpt.load_weights(model, out / "model.safetensors")
    layers = [row["name"] for row in metrics["stats"]["layers"]]
    metrics["stats"] = measure(model, layers).to_dict()
    metrics["storage"] = storage(model, layers).to_dict()
    print(save_report(out, metrics, history, f"admmcompress: {config.name}"))
    return 0


def _export(args: argparse.Namespace) -> int:
    from admmcompress.run_export import export_from_args

    print(export_from_args(args))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
