"""CIFAR-10 ResNet-20: ADMM quantization at 4 bits, 2 bits and binary, with and without pruning first.

    python benchmarks/quantization_cifar.py                     # all six settings, one after the other
    python benchmarks/quantization_cifar.py --only fp4 prune70_binary
    python benchmarks/quantization_cifar.py --summary           # the markdown table, no training

Every setting starts from ``--dense`` (default: the shipped 88.39% ResNet-20,
``checkpoints/resnet20_cifar10_dense.safetensors``) and uses the same data: the first ``--train-limit``
training images of ``cifar10_jpeg.npz`` (0: all 50,000) with the library's augmentation
(``Augment(shift=4, hflip=True)``, per image), all 10,000 test images; training runs on
``admmcompress.train.loop.train_epoch`` (``--fast``: bf16 autocast + channels_last; ``--label-smoothing``).
CPU is scarce: the schedules are short; read the accuracies relative to the dense model. ``--seed`` sets every
phase's data order (one run per seed; ``--summary`` gives mean +- sd over seeds). ``--equal-budget`` gives the
unpruned settings the pruning stage's epochs too (plain training of the dense model, cached per seed), so every
setting trains as long.

    python benchmarks/quantization_cifar.py --train-limit 0 --fast --label-smoothing 0.1 --equal-budget \
        --seed 0 --out runs/quantization_cifar_full     # the issue-18 protocol, one seed

Settings: {``fp4`` fixed point 4 bits, ``fp2`` fixed point 2 bits, ``binary``} x {no pruning,
``prune70_``: unstructured pruning first}. **Every** Conv2d and Linear weight is quantized, the first
conv (``conv1``) and the classifier (``linear``) included (binary = fully binarized); biases and
BatchNorm parameters stay float32 (counted apart, as the papers do).

- Pruning (``prune70_*`` only; run once and cached in ``--out``, shared by the three bit widths):
  ADMM ``unstructured`` at 70% sparsity on every Conv2d under ``layers.*`` (all but the first conv;
  the classifier is not pruned), ``--prune-admm-epochs`` epochs, hard prune, then
  ``--prune-retrain-epochs`` of masked retraining. Its masks stay attached in every later phase.
- Quantization (the same budget in every setting): ADMM with the quantization structure on every
  Conv2d/Linear (``admmcompress.drivers.ADMM``; Z = exact projection onto the level set, pruned zeros
  skipped) for ``--admm-epochs``, hard quantization (``ADMM.finalize`` -> ``hard_quantize``), then
  ``--retrain-epochs`` with the quantized values held (``QuantizedMaskSet.attach``: only biases and
  BatchNorm train).
- Optimizer everywhere: SGD (Nesterov, momentum 0.9, wd 5e-4), batch 128, lr 0.01: constant during
  ADMM (W must keep tracking Z - U), cosine during retraining. Z/U updates every quarter epoch
  (19 steps); rho ``--rho`` constant (1.0: with so few steps per update the W-step must nearly reach
  Z - U; the per-update residual ``||W - Z|| / ||W||`` is logged and stored).

Per run (JSON line appended to ``runs/quantization_cifar/results.jsonl``): dense accuracy, accuracy
before / after hard quantization and after retraining, weight reduction, paper-style storage
(32 N / sum nnz*b, no index or codebook) and honest storage (``report.storage``: each layer's
cheapest SPEC 4.2 scheme, indices and codebooks counted; Conv2d/Linear weights only, biases and BatchNorm
reported apart), the residual log, wall time. The final model (weights + masks + held levels) is
saved as ``<setting>.safetensors`` next to it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch
from structured_common import (
    CIFAR_BATCH,
    cifar_sgd,
    command_line,
    ensure_malloc_env,
    log_to,
    machine,
    read_jsonl,
    write_json,
)

from admmcompress.data import load_dataset
from admmcompress.drivers import ADMM, RhoSchedule
from admmcompress.finalize import MaskSet
from admmcompress.models import create_model
from admmcompress.plan import Plan, Rule
from admmcompress.report.storage import storage
from admmcompress.structures import Unstructured
from admmcompress.structures.quantization import Binary, FixedPoint
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.loop import evaluate

ROOT = Path(__file__).resolve().parents[1]
DENSE = ROOT / "checkpoints" / "resnet20_cifar10_dense.safetensors"  # the shipped 88.39% model
QUANTIZERS = {"fp4": lambda: FixedPoint(bits=4), "fp2": lambda: FixedPoint(bits=2), "binary": Binary}
PRUNE_PREFIX = "prune70_"
SETTINGS = [*QUANTIZERS, *(PRUNE_PREFIX + q for q in QUANTIZERS)]


def sgd_epochs(model, train, epochs, *, log, admm=None, masks=None, seed=0, args=None, schedule=None) -> None:
    """The one optimizer recipe of this benchmark (see the module docstring).

    ``seed`` picks the phase's data order; the run's ``--seed`` shifts every phase's (``args.seed * 100``).
    """
    steps = (len(train.y) + CIFAR_BATCH - 1) // CIFAR_BATCH
    cifar_sgd(
        model,
        train,
        epochs,
        penalty=admm.penalty if admm is not None else None,
        every=max(1, steps // 4) if admm is not None else None,
        on_every=(lambda: _log_residual(admm, log)) if admm is not None else None,
        masks=masks,
        schedule=schedule or ("constant" if admm is not None else "cosine"),
        seed=seed + 100 * getattr(args, "seed", 0),
        log=log,
        fast=getattr(args, "fast", False),
        label_smoothing=getattr(args, "label_smoothing", 0.0),
    )


def _log_residual(admm: ADMM, log) -> None:
    entry = admm.step()
    res = list(entry["residual"].values())
    log(f"    ADMM update {entry['iteration']}: rho {next(iter(entry['rho'].values())):g}, "
        f"||W-Z||/||W|| mean {sum(res) / len(res):.4f} max {max(res):.4f}")


def quant_plan(kind: str) -> Plan:
    """Every Conv2d and Linear weight, first conv and classifier included."""
    return Plan([Rule(QUANTIZERS[kind](), type="Conv2d"), Rule(QUANTIZERS[kind](), type="Linear")])


def prune_plan(sparsity: float) -> Plan:
    """Every Conv2d inside the residual stages (shortcuts too): not the first conv, not the classifier."""
    return Plan([Rule(Unstructured(sparsity=sparsity), match="layers.*", type="Conv2d")])


def load_dense(path: Path = DENSE):
    model = create_model("resnet20").eval()
    ckpt.load_weights(model, path)
    return model


def residual_summary(history: list[dict]) -> dict:
    def mean(entry):
        values = list(entry["residual"].values())
        return round(sum(values) / len(values), 4)

    if not history:
        return {}
    first, last = history[0]["residual"], history[-1]["residual"]
    return {
        "updates": len(history),
        "mean_first": mean(history[0]),
        "mean_last": mean(history[-1]),
        "max_last": round(max(last.values()), 4),
        "not_decreasing": sorted(k for k in last if last[k] >= first[k] and first[k] > 1e-6),
    }


PROTOCOL_KEYS = ("train_limit", "fast", "label_smoothing", "rho", "admm_epochs", "retrain_epochs", "prune_sparsity",
                 "prune_admm_epochs", "prune_retrain_epochs", "equal_budget")


def protocol(args) -> dict:
    """What makes two runs comparable: the dense model's bytes and every training argument (not the seed)."""
    spec = {k: getattr(args, k, None) for k in PROTOCOL_KEYS}
    spec["dense_sha256"] = hashlib.sha256(Path(args.dense).read_bytes()).hexdigest()[:12]
    spec["tag"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return spec


def prune(args, train, test, log, spec: dict) -> tuple[torch.nn.Module, MaskSet, dict]:
    """The shared pruning stage (cached in ``--out``): ADMM unstructured, hard prune, masked retrain."""
    out = Path(args.out)
    # keyed by the protocol (``spec``): another dense model, data or schedule never reuses a stale pruned model
    tag = f"pruned{args.prune_sparsity}_{spec['tag']}_seed{getattr(args, 'seed', 0)}"
    weights, mask_file, info_file = (out / f"{tag}{s}" for s in (".safetensors", "_masks.safetensors", ".json"))
    model = load_dense(Path(args.dense))
    if weights.is_file() and mask_file.is_file() and info_file.is_file():
        ckpt.load_weights(model, weights)
        log(f"pruning stage: cached {weights.name}")
        return model, MaskSet.from_state_dict(ckpt.load_tensors(mask_file)), json.loads(info_file.read_text())
    start = time.perf_counter()
    targets = prune_plan(args.prune_sparsity).resolve(model)
    admm = ADMM(model, targets, rho=RhoSchedule(initial=args.rho, growth=1.0, maximum=args.rho))
    log(f"pruning stage: ADMM unstructured {args.prune_sparsity} on {len(targets)} convs")
    sgd_epochs(model, train, args.prune_admm_epochs, log=log, admm=admm, args=args)
    info = {"accuracy_before_hard_prune": evaluate(model, test)}
    masks = admm.finalize()
    info["accuracy_after_hard_prune"] = evaluate(model, test)
    sgd_epochs(model, train, args.prune_retrain_epochs, log=log, masks=masks, seed=1, args=args)
    info.update(
        accuracy=evaluate(model, test),
        residuals=residual_summary(admm.history),
        seconds=round(time.perf_counter() - start),
        admm_epochs=args.prune_admm_epochs,
        retrain_epochs=args.prune_retrain_epochs,
    )
    log(f"pruning stage: {info}")
    if not args.no_cache:
        ckpt.save_tensors(weights, model.state_dict())
        ckpt.save_tensors(mask_file, masks.state_dict())
        write_json(info_file, info)
    return model, masks, info


def continued_dense(args, train, test, log, spec: dict) -> tuple[torch.nn.Module, dict]:
    """``--equal-budget``: the dense model trained as long as the pruning stage, on its schedule, without pruning.

    The unpruned settings start from it, so pruned and unpruned settings get the same number of training steps
    (without it, the pruned settings had three more epochs: worth about a point on an under-trained model).
    Cached in ``--out`` per seed, like the pruning stage.
    """
    path = Path(args.out) / f"continued_dense_{spec['tag']}_seed{args.seed}.safetensors"
    info_file = path.with_suffix(".json")
    model = load_dense(Path(args.dense))
    if path.is_file() and info_file.is_file():
        ckpt.load_weights(model, path)
        log(f"continued dense: cached {path.name}")
        return model, json.loads(info_file.read_text())
    start = time.perf_counter()
    sgd_epochs(model, train, args.prune_admm_epochs, log=log, args=args, schedule="constant")
    sgd_epochs(model, train, args.prune_retrain_epochs, log=log, seed=1, args=args)
    info = {"accuracy": evaluate(model, test), "seconds": round(time.perf_counter() - start),
            "epochs": args.prune_admm_epochs + args.prune_retrain_epochs}
    log(f"continued dense: {info}")
    if not args.no_cache:
        ckpt.save_tensors(path, model.state_dict())
        write_json(info_file, info)
    return model, info


def run_setting(name: str, args, train, test, dense_accuracy: float, log) -> dict:
    """One setting end to end; returns its record."""
    kind = name.removeprefix(PRUNE_PREFIX)
    start = time.perf_counter()
    record: dict = {"setting": name, "quantizer": kind, "dense_accuracy": dense_accuracy}
    masks = None
    spec = record["protocol"] = protocol(args)
    if name.startswith(PRUNE_PREFIX):
        model, masks, record["pruning"] = prune(args, train, test, log, spec)
    elif getattr(args, "equal_budget", False):
        model, record["continued_dense"] = continued_dense(args, train, test, log, spec)
    else:
        model = load_dense(Path(args.dense))
    record["seed"] = getattr(args, "seed", 0)
    quant_start = time.perf_counter()
    targets = quant_plan(kind).resolve(model)
    admm = ADMM(
        model, targets, rho=RhoSchedule(initial=args.rho, growth=1.0, maximum=args.rho), frozen=masks
    )
    log(f"{name}: ADMM {kind} on {len(targets)} weights (first conv and classifier included)")
    sgd_epochs(model, train, args.admm_epochs, log=log, admm=admm, masks=masks, args=args)
    record["accuracy_before_hard_quantize"] = evaluate(model, test)
    held = admm.finalize()  # hard prune (pruning masks kept) + hard quantize -> QuantizedMaskSet
    record["accuracy_after_hard_quantize"] = evaluate(model, test)
    snapshot = {n: model.get_parameter(n).detach().clone() for n in held.held}
    sgd_epochs(model, train, args.retrain_epochs, log=log, masks=held, seed=1, args=args)
    record["accuracy"] = evaluate(model, test)
    record["held_unchanged"] = all(torch.equal(model.get_parameter(n), w) for n, w in snapshot.items())
    suffix = f"_{record['protocol']['tag']}_seed{record['seed']}"
    ckpt.save_tensors(Path(args.out) / f"{name}{suffix}.safetensors", {**model.state_dict(), **held.state_dict()})
    report = storage(model)  # conv/linear weights; BatchNorm scales go to 'other' by default
    record.update(
        quant_seconds=round(time.perf_counter() - quant_start),
        seconds=round(time.perf_counter() - start),
        residuals=residual_summary(admm.history),
        levels={layer.name: layer.value.levels for layer in report.layers},
        weight_reduction=report.weight_reduction,
        paper_storage=report.paper_reduction,
        honest_storage=report.storage_reduction("best"),
        best_schemes=sorted({layer.best for layer in report.layers}),
        other_params=report.other_params,
        storage=report.to_dict(),
    )
    log(
        f"{name}: {record['accuracy_before_hard_quantize']:.2f}% -> hard {record['accuracy_after_hard_quantize']:.2f}%"
        f" -> retrained {record['accuracy']:.2f}% (dense {dense_accuracy:.2f}%);"
        f" weights {report.weight_reduction:.1f}x, paper {report.paper_reduction:.1f}x,"
        f" honest {record['honest_storage']:.1f}x; {record['seconds']} s"
    )
    return record


def summary(out: Path) -> str:
    """One table per protocol (``protocol``: dense model and training arguments), mean +- sd over seeds."""
    path = out / "results.jsonl"
    if not path.is_file():
        return f"no results in {path}"
    groups: dict[str, dict[tuple[str, int], dict]] = {}
    for r in read_jsonl(path):
        tag = r.get("protocol", {}).get("tag", "untagged")
        groups.setdefault(tag, {})[r["setting"], r.get("seed", 0)] = r  # the last run of each setting and seed
    return "\n\n".join(protocol_table(tag, latest) for tag, latest in groups.items())


def protocol_table(tag: str, latest: dict[tuple[str, int], dict]) -> str:
    spec = next(iter(latest.values())).get("protocol", {})
    lines = [
        f"Protocol {tag}: " + ", ".join(f"{k} {v}" for k, v in spec.items() if k != "tag"),
        "",
        "| setting | dense | start of quantization | after hard quantization | after retrain (held), mean +- sd "
        "(seeds) | drop | weight reduction | paper-style storage | honest storage (best per layer) | "
        "ADMM residual first -> last (mean) | wall time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in SETTINGS:
        rs = [r for (n, _), r in sorted(latest.items()) if n == name]
        if not rs:
            continue
        r = rs[-1]
        acc = [x["accuracy"] for x in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        start = [x.get("pruning", x.get("continued_dense", {})).get("accuracy", x["dense_accuracy"]) for x in rs]
        pre = sum(x.get("pruning", x.get("continued_dense", {})).get("seconds", 0) for x in rs) / len(rs)
        wall = f"{sum(x['quant_seconds'] for x in rs) / len(rs):.0f} s" + (f" (+ {pre:.0f} s)" if pre else "")
        mean = statistics.mean(acc)
        lines.append(
            f"| {name} | {r['dense_accuracy']:.2f}% | {statistics.mean(start):.2f}% | "
            f"{statistics.mean(x['accuracy_after_hard_quantize'] for x in rs):.2f}% | "
            f"**{mean:.2f} +- {sd:.2f}%** ({len(rs)}) | {mean - r['dense_accuracy']:+.2f} | "
            f"{r['weight_reduction']:.2f}x | {r['paper_storage']:.1f}x | **{r['honest_storage']:.1f}x** | "
            f"{r['residuals']['mean_first']:.3f} -> {r['residuals']['mean_last']:.3f} | {wall} |"
        )
    pruned = [r["pruning"] for (n, _), r in sorted(latest.items()) if "pruning" in r]
    if pruned:
        p = pruned[0]
        lines += ["", f"Pruning stage (first seed): {p['accuracy_before_hard_prune']:.2f}% -> hard prune "
                  f"{p['accuracy_after_hard_prune']:.2f}% -> masked retrain {p['accuracy']:.2f}%; residual "
                  f"{p['residuals']['mean_first']:.3f} -> {p['residuals']['mean_last']:.3f}; {p['seconds']} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SETTINGS, default=SETTINGS)
    parser.add_argument("--summary", action="store_true", help="print the markdown table and exit")
    parser.add_argument("--dense", default=str(DENSE))
    parser.add_argument("--train-limit", type=int, default=10000, help="first N training images (0: all)")
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--admm-epochs", type=int, default=2)
    parser.add_argument("--retrain-epochs", type=int, default=1)
    parser.add_argument("--prune-sparsity", type=float, default=0.7)
    parser.add_argument("--prune-admm-epochs", type=int, default=2)
    parser.add_argument("--prune-retrain-epochs", type=int, default=1)
    parser.add_argument("--rho", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-cache", action="store_true", help="do not store the pruned model")
    parser.add_argument("--seed", type=int, default=0, help="data order and augmentation of every phase")
    parser.add_argument("--fast", action="store_true", help="bf16 autocast + channels_last training")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--equal-budget", action="store_true",
                        help="unpruned settings first train the dense model as long as the pruning stage")
    parser.add_argument("--out", default=str(ROOT / "runs" / "quantization_cifar"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.summary:
        print(summary(out))
        return
    if argv is None:
        ensure_malloc_env()
    torch.set_num_threads(args.threads)
    log = log_to(out)

    command = "nice -n 5 " + command_line()
    log(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} | {machine()}\n# {command}")
    train = load_dataset("cifar10", "train", limit=args.train_limit or None)
    test = load_dataset("cifar10", "test", limit=args.test_limit)
    dense_accuracy = evaluate(load_dense(Path(args.dense)), test)
    log(f"dense ResNet-20: {dense_accuracy:.2f}%")
    for name in args.only:
        record = run_setting(name, args, train, test, dense_accuracy, log)
        record.update(command=command, date=str(datetime.date.today()), machine=machine(), args=vars(args))
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    print(f"\nrerun: {command}\n")
    print(summary(out))


if __name__ == "__main__":
    main()
