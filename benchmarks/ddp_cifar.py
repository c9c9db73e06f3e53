"""ADMM under DistributedDataParallel on this machine: ResNet-20 on CIFAR-10, 2 processes x 1 thread vs 1 x 2.

    python benchmarks/ddp_cifar.py                 # full: one epoch of 50,000 images per layout (~15 min, 2 cores)
    python benchmarks/ddp_cifar.py --quick         # smoke run: 512 images, a few steps

The launcher starts the workers itself (malloc settings of BENCHMARKING.md set before each interpreter):
one process with 2 threads, and ``torchrun --standalone --nproc-per-node 2`` with 1 thread each (gloo). Each
layout trains the shipped dense ResNet-20 with the ADMM penalty of a filter plan (50% of every conv's filters,
rho 1e-2) at global batch 128, as configs/resnet20_cifar_filter_admm.yaml does, and reports:

* the wall time of one ADMM epoch (W-steps with the penalty, then the epoch's Z/U update);
* per-step medians, interleaved round by round (admmcompress.timing.time_interleaved): a DDP step with the
  ADMM penalty, a DDP step without it (plain DDP), and a step under ``no_sync()`` (no gradient all-reduce);
  the communication share of a step is ``1 - no_sync / plain`` (the all-reduce and the wait for the other
  rank), and the ADMM cost ratio is ``admm / plain`` (target <= 1.10x, as in one process).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from admmcompress.data.datasets import BatchLoader, load_dataset
from admmcompress.drivers.admm import ADMM
from admmcompress.models import create_model
from admmcompress.plan import Plan
from admmcompress.timing import machine_key, median_ms, time_interleaved
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.distributed import Distributed, ShardedLoader, wrap
from admmcompress.train.loop import train_epoch

ROOT = Path(__file__).resolve().parents[1]
DENSE = ROOT / "checkpoints" / "resnet20_cifar10_dense.safetensors"
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
BATCH = 128


def worker(args: argparse.Namespace) -> None:
    """One rank: time an ADMM epoch and the three kinds of step; rank 0 prints one JSON line."""
    torch.set_num_threads(args.threads)
    ctx = Distributed.from_env()
    torch.manual_seed(0)
    model = create_model("resnet20")
    if DENSE.is_file():
        ckpt.load_weights(model, DENSE)
    train = load_dataset("cifar10", "train", limit=args.limit)
    plan = Plan.from_dict({"rules": [{"type": "Conv2d", "structure": "filter", "sparsity": 0.5}]})
    loader = BatchLoader(train, BATCH, seed=0)
    batches = ShardedLoader(loader, ctx) if ctx.active else loader
    net = wrap(model, ctx)
    admm = ADMM(model, plan, rho=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = next(iter(batches))

    def step(penalty: bool, sync: bool = True) -> None:
        with torch.enable_grad():  # time_interleaved times under no_grad; a training step needs autograd
            context = net.no_sync() if (not sync and ctx.active) else contextlib.nullcontext()
            with context:
                loss = nn.functional.cross_entropy(net(x), y)
                if penalty:
                    loss = loss + admm.penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()

    calls = {"admm": lambda: step(True), "plain": lambda: step(False)}
    if ctx.active:
        calls["no_sync"] = lambda: step(False, sync=False)
    steps = time_interleaved(calls, rounds=args.rounds, warmup=2)

    def epoch() -> None:  # one ADMM epoch through the library's loop, on the DDP-wrapped model
        with torch.enable_grad():
            train_epoch(net, batches, opt, lambda step: 1e-3, 0, penalty=admm.penalty, progress=False)
        admm.step()

    epoch_s = median_ms(epoch, rounds=1, warmup=0) / 1e3
    if ctx.is_main:
        print(json.dumps({
            "world_size": ctx.world_size, "threads": args.threads, "images": len(train), "epoch_s": epoch_s,
            "steps_ms": steps, "machine": machine_key(),
        }))
    ctx.close()


def launch(args: argparse.Namespace) -> None:
    """Run both layouts as fresh processes and print the comparison."""
    env = {**os.environ, **MALLOC, "OMP_NUM_THREADS": "1"}
    common = [str(Path(__file__).resolve()), "--worker", "--rounds", str(args.rounds)]
    if args.limit is not None:
        common += ["--limit", str(args.limit)]
    torchrun = shutil.which("torchrun")
    runs = {
        "1 process x 2 threads": [sys.executable, *common, "--threads", "2"],
        "2 processes x 1 thread": [*([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]),
                                   "--standalone", "--nproc-per-node", "2", *common, "--threads", "1"],
    }
    results = {}
    for name, command in runs.items():
        done = subprocess.run(command, env={**env, "OMP_NUM_THREADS": command[command.index("--threads") + 1]},
                              capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        results[name] = json.loads(lines[-1])
    one, two = results["1 process x 2 threads"], results["2 processes x 1 thread"]
    print(f"machine: {one['machine']}; ResNet-20, CIFAR-10 {one['images']} images, global batch {BATCH}, "
          f"ADMM filter plan 50%, {args.rounds} interleaved rounds per step kind")
    print("| layout | ADMM epoch (s) | step ADMM (ms) | step plain (ms) | ADMM / plain | communication share |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        s = r["steps_ms"]
        share = f"{100 * (1 - s['no_sync'] / s['plain']):.0f}%" if "no_sync" in s else "-"
        print(f"| {name} | {r['epoch_s']:.1f} | {s['admm']:.1f} | {s['plain']:.1f} | "
              f"{s['admm'] / s['plain']:.3f}x | {share} |")
    print(f"epoch wall time, 2 processes / 1 process: {two['epoch_s'] / one['epoch_s']:.2f}x")
    print("command: python benchmarks/ddp_cifar.py" + (" --quick" if args.quick else "")
          + (f" --limit {args.limit}" if args.limit is not None and not args.quick else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 images, 3 rounds")
    parser.add_argument("--limit", type=int, help="train on the first N images (default: all 50,000)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds per step kind")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.limit, args.rounds = args.limit or 512, 3
    (worker if args.worker else launch)(args)


if __name__ == "__main__":
    main()
