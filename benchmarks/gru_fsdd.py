"""GRU on FSDD: accuracy vs compression; block-reweighted vs unstructured magnitude vs ADMM block.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
        python benchmarks/gru_fsdd.py --methods reweighted

In the spirit of RTMobile's PER-vs-compression table (SPEC 8.2), which is on TIMIT; TIMIT is not
available here, so this is spoken-digit accuracy on the Free Spoken Digit Dataset (2,700 train /
300 test recordings, 39 MFCC features x 64 frames). Model: ``GRUClassifier`` (2 GRU layers,
``--hidden`` units, linear head). Only the GRU gate matrices are pruned, each at the given rate
(overall compression = GRU weights / nonzero GRU weights); the head stays dense.

Methods, all with the same epoch budget (``--prune-epochs`` then ``--retrain-epochs`` of masked
retraining, Adam):
- ``reweighted``: ``Block(block=(16, 1))`` (16-row block-columns), reweighted group lasso
  (power 1, eps 1e-3, lambda ``--lam`` = 1e-3, reweighting twice per epoch), then hard pruning;
- ``admm``: the same block structure driven by ADMM (rho ``--rho`` x1.3 per update, twice per epoch);
- ``magnitude``: unstructured, gradual magnitude pruning on the cubic schedule (twice per epoch);
- ``magnitude_block``: the block structure with that gradual magnitude schedule (separates the
  driver's effect from the structure's).
The dense model is trained once (``--dense-epochs``) and cached in ``--out``; each (method, rate) is a run
folder ``--out/<method>_<rate>x`` (as ``admmcompress run`` writes) and one JSON line in
``--out/results.jsonl``; ``--table`` prints ``admmcompress report --compare`` over the folders.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from bench_runs import run_in_folder, table
from safetensors.torch import load_file, save_file

from admmcompress.data import load_dataset
from admmcompress.models import GRUClassifier
from admmcompress.train.config import RunConfig
from admmcompress.train.loop import evaluate
from admmcompress.train.runner import Runner

MALLOC = "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824"
STRUCTURE = {"reweighted": "block", "admm": "block", "magnitude": "unstructured", "magnitude_block": "block"}


def stage(method: str, rate: float, args: argparse.Namespace, steps_per_epoch: int) -> dict:
    rule = {"match": "gru", "structure": STRUCTURE[method], "compression": rate}
    if STRUCTURE[method] == "block":
        rule["block"] = [16, 1]
    every = max(1, steps_per_epoch // 2)
    prune = {
        "epochs": args.prune_epochs,
        "update_every_steps": every,
        "optimizer": {"name": "adam", "lr": 1e-3},
    }
    if method == "reweighted":
        prune["lr_schedule"] = "cosine"
    if method == "admm":
        prune.update({"rho": args.rho, "rho_growth": 1.3, "rho_max": 1.0, "lr_schedule": args.admm_lr_schedule})
    out = {
        "plan": {"rules": [rule]},
        "method": "gradual" if method.startswith("magnitude") else method,
        "admm": prune,
        "retrain": {"epochs": args.retrain_epochs, "optimizer": {"name": "adam", "lr": 1e-3}},
    }
    if method == "reweighted":
        out["reweighted"] = {"penalty": args.lam, "power": 1, "eps": 1e-3}
    return out


def dense_model(args, train, test) -> GRUClassifier:
    path = Path(args.out) / f"dense_h{args.hidden}.safetensors"
    torch.manual_seed(args.seed)
    model = GRUClassifier(hidden=args.hidden)
    if path.is_file():
        model.load_state_dict(load_file(path))
        return model
    config = RunConfig.from_dict(
        {
            "model": {"name": "gru_fsdd"},
            "seed": args.seed,
            "data": {"batch_size": args.batch_size},
            "pretrain": {"epochs": args.dense_epochs, "optimizer": {"name": "adam", "lr": 2e-3}},
        }
    )
    started = time.perf_counter()
    metrics = Runner(config, model, train, test, progress=False).run()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    print(
        f"dense: {metrics['accuracy_after']:.2f}% after {args.dense_epochs} epochs, "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", default=["reweighted", "magnitude", "admm"], choices=list(STRUCTURE)
    )
    parser.add_argument("--rates", type=float, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--dense-epochs", type=int, default=15)
    parser.add_argument("--prune-epochs", type=int, default=4)
    parser.add_argument("--retrain-epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lam", type=float, default=1e-3, help="reweighted penalty lambda")
    parser.add_argument("--rho", type=float, default=1e-2, help="initial ADMM rho")
    parser.add_argument(
        "--admm-lr-schedule", default="admm_reset", choices=["admm_reset", "constant", "cosine"],
        help="LR inside the ADMM phase (admm_reset: /10 at each third of an update period, SPEC 1.4)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/gru_fsdd")
    parser.add_argument(
        "--table", action="store_true", help="print the table of the run folders in --out so far and exit"
    )
    args = parser.parse_args()
    results = Path(args.out) / "results.jsonl"
    if args.table:
        print_table(Path(args.out))
        return
    torch.set_num_threads(args.threads)
    train, test = load_dataset("fsdd", "train"), load_dataset("fsdd", "test")
    dense = dense_model(args, train, test)
    dense_acc = evaluate(dense, test)
    steps = (len(train) + args.batch_size - 1) // args.batch_size
    command = f"{MALLOC} python benchmarks/gru_fsdd.py {' '.join(sys.argv[1:])}"
    for method in args.methods:
        for rate in args.rates:
            rate = int(rate) if float(rate).is_integer() else rate
            knobs = {
                "epochs": f"{args.prune_epochs}+{args.retrain_epochs}",
                "lam": args.lam if method == "reweighted" else None,
                "rho": args.rho if method == "admm" else None,
                "admm_lr_schedule": args.admm_lr_schedule if method == "admm" else None,
            }
            config = RunConfig.from_dict(
                {
                    "name": f"{method} {rate}x, {setting(knobs)}",
                    "model": {"name": "gru_fsdd"},
                    "seed": args.seed,
                    "pretrained": "<in-memory>",
                    "data": {"batch_size": args.batch_size},
                    "stages": [stage(method, rate, args, steps)],
                }
            )
            started = time.perf_counter()
            folder = Path(args.out) / f"{method}_{rate}x"
            metrics = run_in_folder(config, copy.deepcopy(dense), train, test, folder)
            record = {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                f"{args.threads} thread(s), load avg {os.getloadavg()[0]:.1f}",
                "method": method,
                "rate": rate,
                "hidden": args.hidden,
                "dense_accuracy": dense_acc,
                "accuracy_after_hard_prune": metrics["stages"][0]["accuracy_after_hard_prune"],
                "accuracy": metrics["accuracy_after"],
                "compression": metrics["stages"][0]["overall_compression"],
                "seconds": time.perf_counter() - started,
                **knobs,
                "command": command,
            }
            results.parent.mkdir(parents=True, exist_ok=True)
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    print_table(Path(args.out), command)


def _lr_note(record: dict) -> str:
    schedule = record.get("admm_lr_schedule") or "admm_reset"
    return "" if schedule == "admm_reset" else f" lr {schedule}"


def setting(record: dict) -> str:
    if record["lam"]:
        return f"lambda {record['lam']:g}, {record['epochs']} ep"
    if record["rho"]:
        return f"rho {record['rho']:g}{_lr_note(record)}, {record['epochs']} ep"
    return f"cubic, {record['epochs']} ep"


def print_table(out: Path, command: str | None = None) -> None:
    """The ``admmcompress report --compare`` table of every finished run folder in ``out``."""
    folders = sorted(p.parent for p in out.glob("*/metrics.json"))
    print(f"\n{table(folders, out / 'compare.png')}\n", flush=True)
    print(f"(run folders in {out}; the same table: admmcompress report --compare {out}/*/"
          + (f"; rerun: {command})" if command else ")"))

if __name__ == "__main__":
    main()
