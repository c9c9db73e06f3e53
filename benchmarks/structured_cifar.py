"""CIFAR-10 ResNet-20 filter pruning: coupled-filter ADMM vs Torch-Pruning's L1 MagnitudePruner, same widths.

    python benchmarks/structured_cifar.py dense                 # the dense model all runs start from
    python benchmarks/structured_cifar.py admm --keep 0.5       # one run (each well under 10 min)
    python benchmarks/structured_cifar.py magnitude --keep 0.5
    python benchmarks/structured_cifar.py summary

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
- magnitude: ``tp.pruner.MagnitudePruner`` (L1 group importance, same ratio, classifier ignored) on
  the dense model, which gives exactly the same layer widths (checked), then
  ``--admm-epochs + --finetune-epochs`` epochs of fine-tuning with the same optimizer: the same
  number of training steps as the ADMM run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from structured_common import CIFAR_AUGMENT, command_line, ensure_malloc_env, fit, log_to, machine, macs, params

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
    train = load_dataset("cifar10", "train", limit=args.train_limit)
    test = load_dataset("cifar10", "test")
    return train, test




def dense_path(args) -> Path:
    return Path(args.out) / "resnet20_dense.safetensors"


def run_dense(args, log) -> dict:
    train, test = data(args)
    torch.manual_seed(0)
    model = create_model("resnet20")
    fit(
        model,
        train,
        args.dense_epochs,
        0.1,
        optimizer="sgd",
        batch_size=128,
        weight_decay=5e-4,
        augment=CIFAR_AUGMENT,
        log=log,
    )
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
    fit(
        model,
        train,
        args.admm_epochs,
        0.01,
        optimizer="sgd",
        batch_size=128,
        weight_decay=5e-4,
        penalty=admm.penalty,
        every=max(1, steps // 4),
        on_every=admm.step,
        augment=CIFAR_AUGMENT,
        schedule="constant",  # ADMM needs W to keep tracking Z - U: no decay to 0 inside the phase (P9)
        log=log,
    )
    before_prune = evaluate(model, test)
    masks = admm.finalize()
    hard = evaluate(model, test)
    result = compact(model, x, masks)
    small = result.model
    log(f"hard prune: {before_prune:.2f}% -> {hard:.2f}%; {result.summary().splitlines()[0]}")
    fit(
        small,
        train,
        args.finetune_epochs,
        0.01,
        optimizer="sgd",
        batch_size=128,
        weight_decay=5e-4,
        augment=CIFAR_AUGMENT,
        seed=1,
        log=log,
    )
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

    train, test = data(args)
    model = load_dense(args)
    x = test.x[:2]
    pruner = tp.pruner.MagnitudePruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=1 - args.keep,
        ignored_layers=[model.linear],
    )
    pruner.step()
    ideal = create_model("resnet20", width_mult=args.keep)
    same = {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in ideal.state_dict().items()
    }
    pruned = evaluate(model, test)
    log(f"Torch-Pruning L1 magnitude: {params(model):,} params, same widths as ideal: {same}, {pruned:.2f}%")
    fit(
        model,
        train,
        args.admm_epochs + args.finetune_epochs,
        0.01,
        optimizer="sgd",
        batch_size=128,
        weight_decay=5e-4,
        augment=CIFAR_AUGMENT,
        seed=1,
        log=log,
    )
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
    """The ``admmcompress report --compare`` table of the runs recorded in ``out`` (and ``out/compare.png``)."""
    dense_file = out / "dense.json"
    if not dense_file.is_file():
        return f"no dense run in {out}"
    dense = json.loads(dense_file.read_text())
    rows = [RunSummary("dense", "dense", "dense (SGD)", 1.0, None, dense["accuracy"], params_after=dense["params"],
                       macs_after=dense.get("macs"), wall_seconds=dense.get("seconds"))]
    methods = {"admm": ("ADMM", "admm, coupled filters"), "magnitude": ("L1", "L1 magnitude (Torch-Pruning)")}
    for path in sorted(out.glob("admm_keep*.json"), key=lambda p: -float(p.stem.removeprefix("admm_keep"))):
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
            f"model's; plot in {out / 'compare.png'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["dense", "admm", "magnitude", "summary"])
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of channels kept in every group")
    parser.add_argument("--train-limit", type=int, default=10000)
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
    runner = {"dense": run_dense, "admm": run_admm, "magnitude": run_magnitude}[args.what]
    record = runner(args, log)
    record.update(
        keep=args.keep,
        seconds=round(time.perf_counter() - start),
        command=command_line(),
        date=str(datetime.date.today()),
        args=vars(args),
    )
    name = "dense.json" if args.what == "dense" else f"{args.what}_keep{args.keep}.json"
    (out / name).write_text(json.dumps(record, indent=1))
    log(json.dumps({k: v for k, v in record.items() if k != "args"}))


if __name__ == "__main__":
    main()
