"""CIFAR-10 ResNet-20 filter pruning: coupled-filter ADMM vs Torch-Pruning's L1 MagnitudePruner, same widths.

    python benchmarks/structured_cifar.py dense                 # the dense model all runs start from
    python benchmarks/structured_cifar.py admm --keep 0.5       # one run (each well under 10 min)
    python benchmarks/structured_cifar.py magnitude --keep 0.5
    python benchmarks/structured_cifar.py summary

From the shipped dense model on all 50,000 images (issue 18), three seeds per method, fewer MACs x4:

    python benchmarks/structured_cifar.py admm --dense-from checkpoints/resnet20_cifar10_dense.safetensors \
        --train-limit 0 --fast --label-smoothing 0.1 --admm-epochs 3 --finetune-epochs 3 --rho 0.1 \
        --rho-growth 1.3 --rho-max 1 --keep 0.5 --seed 0 --out runs/cifar_filter_full
    (then magnitude and taylor with the same flags, seeds 0 1 2, and `summary --out runs/cifar_filter_full`)

Data: the first ``--train-limit`` (10,000) images of ``cifar10_jpeg.npz`` (JPEG q75, see
../shared/data/README.md: a few points below real CIFAR-10), the library's augmentation
(``Augment(shift=4, hflip=True)``: each image shifted by up to 4 pixels, border replicated, and mirrored
with probability 1/2), and all 10,000 test images; training runs on ``admmcompress.train.loop.train_epoch``.
CPU is scarce, so the schedules are short and the absolute accuracies low; compare the two methods,
which share everything but how they choose the filters:

- dense: SGD (Nesterov, momentum 0.9, wd 5e-4), lr 0.1 cosine, batch 128, ``--dense-epochs`` epochs.
- admm: one coupled filter target per channel group on every Conv2d at sparsity ``1 - keep``
  (``Plan.resolve_coupled``: residual stream, inner block and BN channels decided together),
  ADMM for ``--admm-epochs`` (SGD lr 0.01 constant, Z/U update every quarter epoch = 19 steps,
  rho 1.0 constant), hard prune, ``compact`` (checked equal to the masked model), then
  ``--finetune-epochs`` of the compacted model (SGD lr 0.01 cosine). With so few steps per update the
  W-step must nearly reach Z - U (lr * rho * steps / (1 - momentum) ~ 2); rho 1e-2 x1.5 (the usual
  small-rho recipe for long schedules) left ||W - Z|| / ||W|| above 1 and hard pruning at 15%.
- taylor: Torch-Pruning's first-order Taylor group importance (|w * dL/dw| summed over each coupled group,
  gradients of ``--taylor-batches`` training batches), otherwise as magnitude.
- magnitude: ``tp.pruner.MagnitudePruner`` (L1 group importance, same ratio, classifier ignored) on
  the dense model, which gives exactly the same layer widths (checked), then
  ``--admm-epochs + --finetune-epochs`` epochs of fine-tuning with the same optimizer: the same
  number of training steps as the ADMM run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
from structured_common import (
    CIFAR_AUGMENT,
    accumulate_gradients,
    cifar_sgd,
    command_line,
    ensure_malloc_env,
    log_to,
    machine,
    macs,
    params,
)

from admmcompress.data import load_dataset
from admmcompress.drivers import ADMM, RhoSchedule
from admmcompress.executors.compact import compact
from admmcompress.models import create_model
from admmcompress.plan import Plan, Rule
from admmcompress.report.compare import RunSummary, compare_table, plot_compare
from admmcompress.structures import Filter
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.loop import evaluate

ROOT = Path(__file__).resolve().parents[1]


def data(args):
    train = load_dataset("cifar10", "train", limit=args.train_limit or None)
    test = load_dataset("cifar10", "test")
    return train, test




def dense_path(args) -> Path:
    return Path(args.dense_from) if args.dense_from else Path(args.out) / "resnet20_dense.safetensors"


def training(args) -> dict:
    """The fit() options every method shares (seeded loader order, label smoothing, bf16 + channels_last)."""
    return {"seed": 1 + 1000 * args.seed, "label_smoothing": args.label_smoothing, "fast": args.fast}


def finetune(model, train, epochs: int, args, log) -> None:
    """The fine-tuning every method ends with: SGD 0.01 (Nesterov), weight decay 5e-4, cosine, augmented."""
    cifar_sgd(model, train, epochs, log=log, **training(args))


def run_dense(args, log) -> dict:
    train, test = data(args)
    if args.dense_from:  # the shipped model: record its figures, train nothing
        model = load_dense(args)
        return {"accuracy": evaluate(model, test), "params": params(model), "macs": macs(model, test.x[:1])}
    torch.manual_seed(0)
    model = create_model("resnet20")
    cifar_sgd(model, train, args.dense_epochs, 0.1, log=log)
    ckpt.save_tensors(dense_path(args), model.state_dict())
    return {"accuracy": evaluate(model, test), "params": params(model), "macs": macs(model, test.x[:1])}


def load_dense(args):
    model = create_model("resnet20").eval()
    ckpt.load_weights(model, dense_path(args))
    return model


def run_admm(args, log) -> dict:
    train, test = data(args)
    model = load_dense(args)
    x = test.x[:2]
    targets = Plan([Rule(Filter(sparsity=1 - args.keep), type="Conv2d")]).resolve_coupled(model, x)
    steps = (len(train.y) + 127) // 128
    rho = RhoSchedule(initial=args.rho, growth=args.rho_growth, maximum=args.rho_max)
    admm = ADMM(model, targets, rho=rho)
    log(f"ADMM: {len(targets)} coupled filter targets, keep {args.keep}")
    cifar_sgd(
        model,
        train,
        args.admm_epochs,
        penalty=admm.penalty,
        every=max(1, steps // 4),
        on_every=admm.step,
        schedule="constant",  # ADMM needs W to keep tracking Z - U: no decay to 0 inside the phase (P9)
        log=log,
        **{**training(args), "seed": 1000 * args.seed},
    )
    before_prune = evaluate(model, test)
    masks = admm.finalize()
    hard = evaluate(model, test)
    result = compact(model, x, masks)
    small = result.model
    log(f"hard prune: {before_prune:.2f}% -> {hard:.2f}%; {result.summary().splitlines()[0]}")
    finetune(small, train, args.finetune_epochs, args, log)
    return {
        "accuracy_before_hard_prune": before_prune,
        "accuracy_after_hard_prune": hard,
        "accuracy": evaluate(small, test),
        "params": params(small),
        "macs": macs(small, x),
        "widths": widths(small),
        "residuals": {k: round(v, 4) for k, v in admm.residuals().items()},
    }


def run_magnitude(args, log) -> dict:
    import torch_pruning as tp

    return run_torch_pruning(args, log, tp.importance.MagnitudeImportance(p=1), "L1 magnitude")


def run_taylor(args, log) -> dict:
    import torch_pruning as tp

    return run_torch_pruning(args, log, tp.importance.GroupTaylorImportance(), "Taylor")


def run_torch_pruning(args, log, importance, label: str) -> dict:
    import torch_pruning as tp

    train, test = data(args)
    model = load_dense(args)
    x = test.x[:2]
    if args.what == "taylor":
        accumulate_gradients(model, train, args.taylor_batches, seed=1000 * args.seed, augment=CIFAR_AUGMENT)
    pruner = tp.pruner.MetaPruner(
        model, x, importance=importance, pruning_ratio=1 - args.keep, ignored_layers=[model.linear]
    )
    pruner.step()
    model.zero_grad(set_to_none=True)
    ideal = create_model("resnet20", width_mult=args.keep)
    same = {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in ideal.state_dict().items()
    }
    pruned = evaluate(model, test)
    log(f"Torch-Pruning {label}: {params(model):,} params, same widths as ideal: {same}, {pruned:.2f}%")
    finetune(model, train, args.admm_epochs + args.finetune_epochs, args, log)
    return {
        "accuracy_after_hard_prune": pruned,
        "accuracy": evaluate(model, test),
        "params": params(model),
        "macs": macs(model, x),
        "widths": widths(model),
        "same_widths_as_ideal": same,
    }


def widths(model) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def summary(out: Path) -> str:
    """Seed-0 ``admmcompress report --compare`` table (and ``out/compare.png``), then mean +- sd over seeds."""
    dense_file = out / "dense.json"
    if not dense_file.is_file():
        return f"no dense run in {out}"
    dense = json.loads(dense_file.read_text())
    rows = [RunSummary("dense", "dense", "dense (SGD)", 1.0, None, dense["accuracy"], params_after=dense["params"],
                       macs_after=dense.get("macs"), wall_seconds=dense.get("seconds"))]
    methods = {"admm": ("ADMM", "admm, coupled filters"), "magnitude": ("L1", "L1 magnitude (Torch-Pruning)"),
               "taylor": ("Taylor", "Taylor (Torch-Pruning)")}
    seed0 = [p for p in out.glob("admm_keep*.json") if "_seed" not in p.stem]
    for path in sorted(seed0, key=lambda p: -float(p.stem.removeprefix("admm_keep"))):
        for what, (label, method) in methods.items():
            run = out / path.name.replace("admm", what)
            if not run.is_file():
                continue
            r = json.loads(run.read_text())
            rows.append(RunSummary(
                f"{label} keep {r['keep']}", run.stem, method, dense["params"] / r["params"], dense["accuracy"],
                r["accuracy"], r["accuracy_after_hard_prune"], params_after=r["params"], macs_after=r.get("macs"),
                wall_seconds=r.get("seconds"),
            ))
    plot_compare(rows, out / "compare.png")
    return (f"{compare_table(rows)}\n\n(compression = dense / pruned parameters; 'accuracy before' is the dense "
            f"model's; plot in {out / 'compare.png'})\n\n{seed_table(out, dense, methods)}")


def seed_table(out: Path, dense: dict, methods: dict) -> str:
    """Mean and sample standard deviation of test accuracy over the seeds found, per method and keep."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for what in methods:
        for run in out.glob(f"{what}_keep*.json"):
            r = json.loads(run.read_text())
            groups.setdefault((what, r["keep"]), []).append(r)
    lines = ["| method | keep | MACs (M) | params | seeds | after prune (%) | final accuracy (%) | drop vs dense |",
             "|---|---|---|---|---|---|---|---|"]
    for (what, keep), runs in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        acc = [r["accuracy"] for r in runs]
        pruned = [r["accuracy_after_hard_prune"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else float("nan")
        lines.append(
            f"| {methods[what][1]} | {keep} | {runs[0]['macs'] / 1e6:.1f} | {runs[0]['params']:,} | {len(runs)} | "
            f"{statistics.mean(pruned):.2f} | {statistics.mean(acc):.2f} +- {sd:.2f} | "
            f"{dense['accuracy'] - statistics.mean(acc):.2f} |"
        )
    return "\n".join(lines) + f"\n\n(dense: {dense['accuracy']:.2f}%, {dense['macs'] / 1e6:.1f} M MACs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["dense", "admm", "magnitude", "taylor", "summary"])
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of channels kept in every group")
    parser.add_argument("--train-limit", type=int, default=10000, help="first N training images (0: all)")
    parser.add_argument("--dense-from", help="start from this dense checkpoint instead of training one")
    parser.add_argument("--seed", type=int, default=0, help="data order, augmentation and Taylor batches")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--fast", action="store_true", help="bf16 autocast + channels_last training")
    parser.add_argument("--taylor-batches", type=int, default=8)
    parser.add_argument("--dense-epochs", type=int, default=7)
    parser.add_argument("--admm-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--rho", type=float, default=1.0)
    parser.add_argument("--rho-growth", type=float, default=1.0, help="rho factor per ADMM update")
    parser.add_argument("--rho-max", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "runs" / "structured_cifar"))
    args = parser.parse_args()
    out = Path(args.out)
    if args.what == "summary":
        print(summary(out))
        return
    ensure_malloc_env()
    torch.set_num_threads(args.threads)
    log = log_to(out)
    log(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} | {machine()}\n# {command_line()}")
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    runner = {"dense": run_dense, "admm": run_admm, "magnitude": run_magnitude, "taylor": run_taylor}[args.what]
    record = runner(args, log)
    record.update(
        keep=args.keep,
        seconds=round(time.perf_counter() - start),
        command=command_line(),
        date=str(datetime.date.today()),
        args=vars(args),
    )
    seed = f"_seed{args.seed}" if args.seed else ""
    name = "dense.json" if args.what == "dense" else f"{args.what}_keep{args.keep}{seed}.json"
    (out / name).write_text(json.dumps(record, indent=1))
    log(json.dumps({k: v for k, v in record.items() if k != "args"}))


if __name__ == "__main__":
    main()
