"""SS-Auto (automatic per-layer rates) against rate baselines at equal MACs: LeNet-5 / MNIST and ResNet-20 / CIFAR-10.

    python benchmarks/ss_auto.py --model lenet5                       # 2x/4x/8x fewer MACs, seeds 0 1 2
    python benchmarks/ss_auto.py --model resnet20 --reductions 2 4    # from checkpoints/resnet20_cifar10_dense
    python benchmarks/ss_auto.py --model lenet5 --quick               # smoke: a fraction of an epoch, one seed
    python benchmarks/ss_auto.py --summarize --out runs/ss_auto       # the tables from results.jsonl
    python benchmarks/ss_auto.py --model resnet20 --fp32 ...          # float32 where bf16 is emulated (AVX2)

Rerunning a command resumes it: a run already in ``results.jsonl`` is skipped, and one trained but not yet timed
(in ``runs_partial.jsonl`` with its saved model) is only timed; a run cut off mid-training starts again.

Methods, all on the same plan (rows = coupled filters, columns) and the same MAC budget, counted as
``admmcompress.drivers.budget`` counts it, then checked on the compacted model (``count_macs``):

- ``auto``: method ``soft`` (one run: the strength adapts to the budget; the rates emerge), then masked retraining;
- ``uniform``: one sparsity for every filter and column target (bisected to the budget), ADMM, retraining;
- ``handset``: the hand-set ADMM recipe's per-layer pattern scaled to the budget (LeNet-5: the relative rates
  of ``benchmarks/structured_lenet5.py``; ResNet-20: filters only, uniform, as
  ``configs/resnet20_cifar_filter_admm.yaml``), ADMM, retraining;
- ``sensitivity``: each target pruned alone over a grid (accuracy on a held-out slice of the training set), the
  rates picked from the curves for the budget, ADMM, retraining;
- ``tp_global``: Torch-Pruning's global magnitude ranking gives the filter rates; one-shot magnitude pruning and
  retraining for the driving + retraining epochs.

Every model is compacted (channels removed; the column executor on counts the MACs; ResNet-20 is timed with the
column executor only where it measured faster) and its batch-1 latency timed with the others, interleaved
(``admmcompress.timing``). Per run: accuracy, MACs, parameters, latency, the wall time of the allocation +
training, and for ``auto`` the share of pruned groups zeroed by the soft threshold vs cut by the
final top-k, the rates plot and the rates as a plan YAML (reruns with any driver).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from structured_common import (
    CIFAR_AUGMENT,
    command_line,
    ensure_malloc_env,
    fit,
    log_to,
    machine,
    mean_sd,
    read_jsonl,
)

from admmcompress.data import Split, load_dataset
from admmcompress.drivers import ADMM, RhoSchedule
from admmcompress.drivers.allocation import (
    plan_from_rates,
    rates_plan,
    sensitivity_curves,
    sensitivity_plan,
    torch_pruning_plan,
    uniform_plan,
    write_rates_plan,
)
from admmcompress.drivers.budget import Budget, drop_unread_channels, gemm_shapes, structured_cost
from admmcompress.drivers.soft import SoftConfig, SoftThreshold
from admmcompress.executors.compact import CompactConfig, compact
from admmcompress.executors.compact_run import count_macs
from admmcompress.finalize import MaskSet, hard_prune
from admmcompress.models import create_model
from admmcompress.plan import Plan, Rule
from admmcompress.report.rates import plot_rates
from admmcompress.structures import Column, Filter
from admmcompress.timing import time_interleaved
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.loop import evaluate

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("auto", "uniform", "handset", "sensitivity", "tp_global")
SENSITIVITY_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)

SETUPS = {
    "lenet5": {
        "dataset": "mnist", "checkpoint": "lenet5_mnist_dense.safetensors", "model": {"dropout": 0.0},
        "input": (1, 28, 28),
        "rules": [Rule(Filter(sparsity=0.9), match="conv*"), Rule(Filter(sparsity=0.95), match="fc1"),
                  Rule(Column(sparsity=0.95), match="conv2"), Rule(Column(sparsity=0.95), match="fc*")],
        "optimizer": "adam", "lr": 1e-3, "batch": 64, "drive": 6, "retrain": 4, "every": 235, "rho": 1e-2,
        "augment": None,
        # hand-set relative rates (filter, column) per layer, from benchmarks/structured_lenet5.py's last stage
        "handset": {"conv1.weight:filter": 0.6, "conv2.weight:filter": 0.8, "fc1.weight:filter": 0.96,
                    "conv2.weight:column": 0.9, "fc1.weight:column": 0.97},
    },
    "resnet20": {
        "dataset": "cifar10", "checkpoint": "resnet20_cifar10_dense.safetensors", "model": {}, "input": (3, 32, 32),
        "rules": [Rule(Filter(sparsity=0.8), type="Conv2d"), Rule(Column(sparsity=0.8), match="layers.*.conv*")],
        # 3 + 3 epochs in bf16 / channels_last with label smoothing 0.1: the budget of the issue-18 coupled-filter
        # table (benchmarks/records/cifar_filter_full), so one seed of five methods fits about an hour here
        "optimizer": "sgd", "lr": 0.01, "batch": 128, "drive": 3, "retrain": 3, "every": 88, "rho": 1e-2,
        "augment": CIFAR_AUGMENT, "handset": None, "fast": True, "label_smoothing": 0.1,
        # 30 targets: five rates scored on 2,000 held-out images keep the scan to minutes
        "sensitivity_grid": (0.2, 0.4, 0.6, 0.8, 0.9), "sensitivity_images": 2000,
        # timed with the column executor only where it measured faster (on every pruned conv: 4x slower, quick run)
        "timed_columns": "auto",
    },
}


# Each setup's training precision as the protocols fixed it (before --fp32 changes a setup in place): runs in
# another precision are rows of their own.
DEFAULT_PRECISION = {name: "bf16" if setup.get("fast") is True else "fp32" for name, setup in SETUPS.items()}


def precision_of(setup: dict) -> str:
    """bf16 autocast + channels_last (``fast: True``) or float32 (``"channels_last"`` or plain)."""
    return "bf16" if setup.get("fast") is True else "fp32"


def shuffled(data: Split, limit: int | None) -> Split:
    """A seeded random order (and the first ``limit`` of it): subsets and held-out slices cover every class."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1234))[:limit]
    return Split(data.x[order], data.y[order], data.source)


def load(setup: dict, name: str) -> torch.nn.Module:
    model = create_model(name, **setup["model"]).eval()
    ckpt.load_weights(model, ROOT / "checkpoints" / setup["checkpoint"])
    return model


def train_kwargs(setup: dict, seed: int, log) -> dict:
    return {"optimizer": setup["optimizer"], "batch_size": setup["batch"], "augment": setup["augment"],
            "seed": seed, "log": log, "weight_decay": 5e-4 if setup["optimizer"] == "sgd" else 0.0,
            "fast": setup.get("fast", False), "label_smoothing": setup.get("label_smoothing", 0.0)}


def drive_admm(model, targets, train, setup, epochs, every, seed, log) -> None:
    """The ADMM phase only: the caller hard-prunes (at rates found again on the trained weights)."""
    admm = ADMM(model, targets, rho=RhoSchedule(setup["rho"], 1.3, 1.0))
    fit(model, train, epochs, setup["lr"], penalty=admm.penalty, every=every, on_every=admm.step,
        schedule="constant", **train_kwargs(setup, seed, log))


def handset_plan(model, targets, setup, budget, x) -> Plan:
    """The hand-set pattern scaled by one factor (bisected) until the budget is met."""
    shapes = gemm_shapes(model, x)
    goal = budget.resolve(structured_cost(shapes, {}, "macs"))
    pattern = setup["handset"] or {t.key: 1.0 for t in targets if t.structure.kind == "filter"}
    base = {}  # by target key; a coupled target takes the rate of the layer rule it came from
    for t in targets:
        found = [pattern[k] for k in (t.key, *getattr(t, "sources", ())) if k in pattern]
        if found:
            base[t.key] = found[0]
    kept = [t for t in targets if t.key in base]

    def plan_at(scale: float) -> Plan:
        return plan_from_rates(kept, {t.key: min(0.99, base[t.key] * scale) for t in kept}, model)

    def cost(scale: float) -> float:
        trial = copy.deepcopy(model)
        staged = plan_at(scale).resolve_coupled(trial, x, "strict")
        hard_prune(trial, staged)
        patterns = {n: p != 0 for n, p in trial.named_parameters()}
        return structured_cost(shapes, drop_unread_channels(staged, patterns), "macs")

    lo, hi = 0.0, 1.0 / min(base.values())
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(mid) <= goal else (mid, hi)
    return plan_at(hi)


def one_run(name, method, reduction, seed, data, out, log, quick, weighting="sqrt", soft_rho_growth=1.0) -> dict:
    setup = SETUPS[name]
    train, test, held = data
    torch.manual_seed(seed)
    model = load(setup, name)
    x = train.x[:2]
    plan = Plan(setup["rules"])
    targets = plan.resolve_coupled(model, x, "strict")
    budget = Budget(kind="macs", reduction=reduction)
    drive, retrain = epochs_of(setup, quick)
    every = every_of(setup, quick)
    # part of what makes a run the same run (resume)
    protocol = {"epochs": [drive, retrain], "every": every, "precision": precision_of(setup)}
    started = time.perf_counter()
    extra: dict = {}
    if method == "auto":
        updates = max(1, drive * ((len(train) + setup["batch"] - 1) // setup["batch"]) // every)
        cfg = SoftConfig(rho=setup["rho"], rho_growth=soft_rho_growth, budget=budget.to_dict(), weighting=weighting)
        soft = SoftThreshold(model, targets, cfg, example=x, updates=updates)
        fit(model, train, drive, setup["lr"], penalty=soft.penalty, every=every, on_every=soft.step,
            schedule="constant", **train_kwargs(setup, seed, log))
        masks = soft.finalize()
        record = soft.summary()["soft"]
        extra = {k: record[k] for k in ("zeroed_by_soft_threshold", "cut_by_final_topk", "restored_by_fill",
                                        "share_soft_threshold", "strength")}
        # how many targets' rates their rule's bound set (records written since 2026-12-07, stop 45)
        extra.update({k: record[k] for k in ("targets", "targets_at_bound", "zeroed_at_bound") if k in record})
        extra["rates"] = record["rates"]
        growth = f"_rho_x{soft_rho_growth:g}" if soft_rho_growth != 1.0 else ""  # another recipe: its own files
        precision = precision_of(setup)
        other = "" if precision == DEFAULT_PRECISION[name] else f"_{precision}"  # and another precision
        tag = f"{name}_{reduction:g}x{growth}{other}_seed{seed}"
        write_rates_plan(out / f"rates_{tag}.yaml", rates_plan(model, targets),
                         comment=f"SS-Auto rates for {name} at {reduction:g}x fewer MACs (seed {seed}); "
                                 "rerun with any driver (coupling: strict)")
        plot_rates(record, out / f"rates_{tag}.png")
    elif method == "tp_global":
        found = torch_pruning_plan(model, plan, budget, x)
        masks = hard_prune(model, found.resolve_coupled(model, x, "strict"))
        retrain, drive, extra = retrain + drive, 0, {"plan": found.to_dict()}  # the same epochs, all retraining
    else:
        if method == "uniform":
            def planner(m):
                return uniform_plan(m, targets, budget, x)
        elif method == "handset":
            def planner(m):
                return handset_plan(m, targets, setup, budget, x)
        else:
            grid = (0.25, 0.5, 0.75) if quick else setup.get("sensitivity_grid", SENSITIVITY_GRID)
            scored = held if quick else Split(*(t[: setup.get("sensitivity_images")] for t in (held.x, held.y)),
                                              held.source)
            curves = sensitivity_curves(model, targets, lambda m: evaluate(m, scored), grid)

            def planner(m):
                return sensitivity_plan(m, targets, budget, curves, x)
        found = planner(model)
        drive_admm(model, found.resolve_coupled(model, x, "strict"), train, setup, drive, every, seed, log)
        # Which channels end up unread (and so removed with their producers) depends on the weights: rates
        # that meet the budget on the dense weights kept 1.72-1.80x of 2x after ADMM (2026-12-05). So the
        # rates are found again on the ADMM-trained weights and the hard prune uses those: every method
        # meets the same budget as compacted.
        final = planner(model)
        masks = hard_prune(model, final.resolve_coupled(model, x, "strict"))
        extra = {"plan": final.to_dict(), "plan_before_admm": found.to_dict()}
    accuracy_hard = evaluate(model, test)
    fit(model, train, retrain, setup["lr"], masks=masks, **train_kwargs(setup, seed, log))
    wall = time.perf_counter() - started
    small = compact(model, x, masks, CompactConfig(columns="on")).model.eval()  # counts the columns' MACs
    timed = small if setup.get("timed_columns", "on") == "on" else compact(
        model, x, masks, CompactConfig(columns=setup["timed_columns"])).model.eval()
    shapes = gemm_shapes(model, x)
    patterns = {n: p != 0 for n, p in model.named_parameters()}
    return {
        "model": name, "method": method, "reduction": reduction, "seed": seed, "quick": quick, "weighting": weighting,
        "soft_rho_growth": soft_rho_growth if method == "auto" else None,
        "accuracy": evaluate(model, test), "accuracy_after_hard_prune": accuracy_hard,
        "macs_budget_count": structured_cost(shapes, drop_unread_channels(targets, patterns), "macs"),
        "macs_compacted": count_macs(small, x), "macs_dense": count_macs(load(setup, name), x),
        "params_compacted": sum(p.numel() for p in small.parameters()), "wall_seconds": wall, **extra,
        "timed_columns": setup.get("timed_columns", "on"), **protocol, "_compacted": timed,
        "_trained": ({k: v.detach().clone() for k, v in model.state_dict().items()}, masks.state_dict()),
    }


def label(record: dict) -> str:
    """The method as the tables name it: ``auto`` with a growing rho is its own row (another recipe)."""
    growth = record.get("soft_rho_growth")
    name = f"auto_rho_x{growth:g}" if record["method"] == "auto" and growth not in (None, 1.0) else record["method"]
    default = DEFAULT_PRECISION[record["model"]]
    precision = record.get("precision") or default  # records written before it was kept ran the default
    return name if precision == default else f"{name}_{precision}"


def method_order(row_label: str) -> tuple[int, str]:
    """Table order: the methods' order, each one's recipes and precisions after it."""
    return next(i for i, m in enumerate(METHODS) if row_label.startswith(m)), row_label


def model_files(out: Path, record: dict) -> tuple[Path, Path]:
    """Where a run's trained (masked, not compacted) weights and masks are kept for ``--retime``."""
    quick = "_quick" if record.get("quick") else ""  # a smoke run never overwrites a full run's model
    weighting = record.get("weighting", "sqrt") if record["method"] == "auto" else "sqrt"
    weighted = "" if weighting == "sqrt" else f"_{weighting}"  # another weighting: its own files
    setup = SETUPS[record["model"]]
    epochs = recorded_epochs(record)
    longer = "" if record.get("quick") or epochs == (setup["drive"], setup["retrain"]) else "_ep{}-{}".format(*epochs)
    stem = f"{record['model']}_{record['reduction']:g}x_seed{record['seed']}_{label(record)}{weighted}{longer}{quick}"
    return out / "models" / f"{stem}.safetensors", out / "models" / f"{stem}_masks.safetensors"


def epochs_of(setup: dict, quick: bool) -> tuple[int, int]:
    """The (driving, retraining) epochs of a run: the setup's, ``--epochs``' override, or 1 + 1 for a smoke run."""
    return (1, 1) if quick else tuple(setup.get("epochs", (setup["drive"], setup["retrain"])))


def every_of(setup: dict, quick: bool) -> int:
    """Optimizer steps between the drivers' updates: the setup's, or 3 for a smoke run."""
    return 3 if quick else setup["every"]


def recorded_epochs(record: dict) -> tuple[int, int]:
    """A record's epochs; records written before they were kept ran the setup's defaults (no --epochs then)."""
    setup = SETUPS[record["model"]]
    default = (1, 1) if record.get("quick") else (setup["drive"], setup["retrain"])
    return tuple(record.get("epochs") or default)


def run_key(record: dict) -> tuple:
    """What makes two runs the same run: model, method as tabled, reduction, seed, smoke or not, auto's weighting,
    epochs and update cadence (records written before these were kept ran the setup's defaults)."""
    weighting = record.get("weighting", "sqrt") if record["method"] == "auto" else None
    quick = bool(record.get("quick"))
    setup = SETUPS[record["model"]]
    every = record.get("every") or every_of(setup, quick)
    epochs = recorded_epochs(record)
    return record["model"], label(record), float(record["reduction"]), record["seed"], quick, weighting, epochs, every


def earlier_runs(root: Path, out: Path) -> tuple[set[tuple], dict[tuple, dict]]:
    """The runs finished before: those timed (``results.jsonl``) and those trained with their model saved but not
    yet timed (``runs_partial.jsonl``, e.g. a seed cut short), so a rerun of the same command resumes."""
    timed_file, partial_file = root / "results.jsonl", out / "runs_partial.jsonl"
    timed = {run_key(r) for r in read_jsonl(timed_file)} if timed_file.is_file() else set()
    partial = {run_key(r): r for r in (read_jsonl(partial_file) if partial_file.is_file() else [])
               if all(f.is_file() for f in model_files(out, r))}
    return timed, partial


def reload_run(out: Path, record: dict, x: torch.Tensor) -> dict:
    """A run trained before, from its saved model: its record with the compacted model to time."""
    weights_file, masks_file = model_files(out, record)
    masks = MaskSet.from_state_dict(ckpt.load_tensors(masks_file))
    return {**record, "_compacted": compacted(record["model"], ckpt.load_tensors(weights_file), masks, x)}


def compacted(name: str, weights: dict, masks: MaskSet, x: torch.Tensor) -> torch.nn.Module:
    """The model compacted as the run's was (with ``timed_columns: auto`` the column executor's per-layer choice
    is measured again, so it may differ from the run's)."""
    model = create_model(name, **SETUPS[name]["model"]).eval()
    model.load_state_dict(weights)
    return compact(model, x, masks, CompactConfig(columns=SETUPS[name].get("timed_columns", "on"))).model.eval()


def retime(out: Path, rounds: int) -> None:
    """Time every saved run again (batch 1, interleaved with the dense model per reduction and seed)."""
    rows = read_jsonl(out / "results.jsonl")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r.get("quick") and all(f.is_file() for f in model_files(out / r["model"], r)):
            groups.setdefault((r["model"], r["reduction"], r["seed"]), []).append(r)
    for (name, reduction, seed), rs in sorted(groups.items()):
        x = torch.randn(1, *SETUPS[name]["input"])
        models = {}
        for r in rs:
            weights_file, masks_file = model_files(out / name, r)
            masks = MaskSet.from_state_dict(ckpt.load_tensors(masks_file))
            models[label(r)] = compacted(name, ckpt.load_tensors(weights_file), masks, x)
        models["dense"] = load(SETUPS[name], name)
        latency = time_models(models, x, rounds=rounds)
        with open(out / "retimed.jsonl", "a") as handle:
            for r in rs:
                handle.write(json.dumps({
                    "model": name, "reduction": reduction, "seed": seed, "method": label(r),
                    "latency_ms": latency[label(r)], "dense_latency_ms": latency["dense"],
                    "machine": machine(), "command": command_line(), "date": time.strftime("%Y-%m-%d %H:%M"),
                }) + "\n")
        print(f"{name} {reduction:g}x seed {seed}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in latency.items()))


def time_models(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    calls = {k: (lambda m=m: m(x)) for k, m in models.items()}
    return time_interleaved(calls, rounds=rounds, warmup=3)


def summarize(out: Path) -> str:
    rows = read_jsonl(out / "results.jsonl")
    retimed_file = out / "retimed.jsonl"
    # the last --retime of each run
    quiet = {(q["model"], q["reduction"], q["seed"], q["method"]): q
             for q in (read_jsonl(retimed_file) if retimed_file.is_file() else [])}
    lines = []
    for name in sorted({r["model"] for r in rows}):
        lines += [f"### {name}", "", "| fewer MACs | method | accuracy (mean +- sd, seeds) | MAC reduction (compacted) "
                  "| latency ms (batch 1) | quiet latency ms (dense) | soft-threshold share | wall s |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for reduction in sorted({r["reduction"] for r in rows if r["model"] == name}):
            here = [r for r in rows if (r["model"], r["reduction"]) == (name, reduction)]
            labels = sorted({label(r) for r in here}, key=method_order)
            for method in labels:
                rs = [r for r in here if label(r) == method]
                acc = [r["accuracy"] for r in rs]
                red = statistics.mean(r["macs_dense"] / r["macs_compacted"] for r in rs)
                lat = statistics.mean(r.get("latency_ms", float("nan")) for r in rs)
                share = statistics.mean(r["share_soft_threshold"] for r in rs) if method.startswith("auto") else None
                bound = [f"{r['targets_at_bound']}/{r['targets']}" for r in rs if "targets_at_bound" in r]
                shown = "-" if share is None else f"{100 * share:.0f}%" + (
                    f" ({', '.join(bound)} targets at their bound)" if bound else "")
                qs = [q for r in rs if (q := quiet.get((name, reduction, r["seed"], method)))]
                retimed = (f"{statistics.mean(q['latency_ms'] for q in qs):.3f} "
                           f"({statistics.mean(q['dense_latency_ms'] for q in qs):.3f})" if qs else "-")
                lines.append(
                    f"| {reduction:g}x | {method} | {mean_sd(acc)} | {red:.2f}x | "
                    f"{lat:.3f} | {retimed} | {shown} | "
                    f"{statistics.mean(r['wall_seconds'] for r in rs):.0f} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SETUPS), default="lenet5")
    parser.add_argument("--reductions", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,000 training images, 1 epoch per phase")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ss_auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, nargs=2, metavar=("DRIVE", "RETRAIN"), help="override the epochs")
    parser.add_argument("--weighting", choices=("sqrt", "cost", "none"), default="sqrt", help="method soft's")
    parser.add_argument("--soft-rho-growth", type=float, default=1.0,
                        help="method auto's rho factor per update (1: constant, the LeNet-5 protocol; the ADMM "
                             "baselines grow theirs x1.3)")
    parser.add_argument("--fp32", action="store_true",
                        help="train in fp32 instead of the setup's bf16 autocast: on a CPU without native bf16 "
                             "(AVX2 only) bf16 is emulated (a ResNet-20 step measured 16x slower); rows of their own")
    parser.add_argument("--summarize", action="store_true")
    parser.add_argument("--retime", action="store_true",
                        help="time the saved runs of --out again (on a quiet machine), then summarize")
    args = parser.parse_args()
    if args.retime:
        torch.set_num_threads(args.threads)
        retime(args.out, rounds=31)
    if args.summarize or args.retime:
        print(summarize(args.out))
        return
    ensure_malloc_env()
    torch.set_num_threads(args.threads)
    out = args.out / args.model
    log = log_to(out)
    setup = SETUPS[args.model]
    if args.epochs:
        setup["epochs"] = tuple(args.epochs)
    if args.fp32:  # channels_last batches stay: 1.25x faster in float32 as well on the AVX2 machine
        setup["fast"] = "channels_last" if setup.get("fast") else False
    log(f"# {command_line()}\n# {machine()}")
    # Shuffled once (seeded) before any split or subset: the dataset files may be sorted by class.
    everything = shuffled(load_dataset(setup["dataset"], "train"), 1000 if args.quick else None)
    held_size = 200 if args.quick else 5000  # the sensitivity scan's accuracy: training images held out of training
    full = Split(everything.x[:-held_size], everything.y[:-held_size], everything.source)
    held = Split(everything.x[-held_size:], everything.y[-held_size:], everything.source)
    test = shuffled(load_dataset(setup["dataset"], "test"), 500 if args.quick else None)
    for reduction in args.reductions:
        for seed in args.seeds if not args.quick else args.seeds[:1]:
            results = {}
            for method in args.methods:
                wanted = {"model": args.model, "method": method, "reduction": reduction, "seed": seed,
                          "quick": args.quick, "weighting": args.weighting,
                          "soft_rho_growth": args.soft_rho_growth if method == "auto" else None,
                          "epochs": list(epochs_of(setup, args.quick)),
                          "every": every_of(setup, args.quick), "precision": precision_of(setup)}
                timed, partial = earlier_runs(args.out, out)
                if run_key(wanted) in timed:
                    log(f"== {args.model} {reduction:g}x seed {seed}: {label(wanted)} finished before, skipped")
                    continue
                if run_key(wanted) in partial:
                    log(f"== {args.model} {reduction:g}x seed {seed}: {label(wanted)} trained before, timed only")
                    results[method] = reload_run(out, partial[run_key(wanted)], full.x[:1])
                    continue
                log(f"== {args.model} {reduction:g}x seed {seed}: {method}")
                results[method] = one_run(args.model, method, reduction, seed, (full, test, held), out, log,
                                          args.quick, args.weighting, args.soft_rho_growth)
                # each run as it ends (no latency yet): a seed cut short still leaves its finished runs, and their
                # models are kept (not committed) so a quiet machine can time them again (--retime)
                weights, masks = results[method].pop("_trained")
                weights_file, masks_file = model_files(out, results[method])
                weights_file.parent.mkdir(parents=True, exist_ok=True)
                ckpt.save_tensors(weights_file, weights)
                ckpt.save_tensors(masks_file, masks)
                with open(out / "runs_partial.jsonl", "a") as handle:
                    handle.write(json.dumps({k: v for k, v in results[method].items() if not k.startswith("_")}) + "\n")
                log(f"   accuracy {results[method]['accuracy']:.2f}%, compacted MACs "
                    f"{results[method]['macs_compacted']:,} (dense {results[method]['macs_dense']:,}), "
                    f"{results[method]['wall_seconds']:.0f} s")
            if not results:
                continue
            x = full.x[:1]
            models = {m: r.pop("_compacted") for m, r in results.items()}
            models["dense"] = load(setup, args.model)
            latency = time_models(models, x, rounds=5 if args.quick else 31)
            with open(args.out / "results.jsonl", "a") as handle:
                for method, r in results.items():
                    r.update(latency_ms=latency[method], dense_latency_ms=latency["dense"])
                    handle.write(json.dumps(r) + "\n")
    print(summarize(args.out))


if __name__ == "__main__":
    main()
