"""LeNet-5 / MNIST: filter + column ADMM (StructADMM) with purification and unused-path removal (P-RM).

    python benchmarks/structured_lenet5.py                 # all stages, about 15 min on 2 busy cores
    python benchmarks/structured_lenet5.py --summarize     # the table from finished stages

Starts from ``checkpoints/lenet5_mnist_dense.safetensors``. Progressive: each stage raises the
per-layer filter and column sparsities, starting from the previous stage's retrained model (earlier
masks stay frozen). A stage is: ADMM (coupled filter targets, so a filter's group also holds the next
layer's columns for it; column targets beside them on the same layers; Adam, Z/U update every quarter
epoch, rho x1.5 per update, dropout off) -> hard prune -> purification (kept filters/columns below
``--threshold`` x the layer's mean kept norm) -> unused-path removal -> masked retraining (fresh Adam,
dropout 0.5) -> unused-path removal again -> compaction (channels removed, column executors where
measured faster at batch 1 / 64). Each stage is saved (``runs/structured_lenet5/stageN``) so a killed
run resumes at the next stage. The published P-RM figure is 232x with no accuracy loss.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from structured_common import command_line, ensure_malloc_env, fit, interleaved_ms, machine, macs, write_json

from admmcompress.data import load_dataset
from admmcompress.drivers import ADMM, RhoSchedule
from admmcompress.executors.compact import CompactConfig, compact
from admmcompress.executors.purify import purify, remove_unused_paths
from admmcompress.finalize import MaskSet
from admmcompress.models import create_model
from admmcompress.plan import Plan, Rule
from admmcompress.report import measure
from admmcompress.structures import Column, Filter
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.loop import evaluate

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["conv1", "conv2", "fc1", "fc2"]
# (filter, column) sparsity per layer for each stage; fc2's rows are the outputs (its columns follow fc1).
STAGES = [
    {"conv1": (0.3, 0.2), "conv2": (0.4, 0.5), "fc1": (0.7, 0.7)},
    {"conv1": (0.4, 0.3), "conv2": (0.6, 0.7), "fc1": (0.85, 0.85)},
    {"conv1": (0.5, 0.4), "conv2": (0.7, 0.8), "fc1": (0.92, 0.92)},
    {"conv1": (0.55, 0.4), "conv2": (0.76, 0.85), "fc1": (0.95, 0.95)},
    {"conv1": (0.6, 0.44), "conv2": (0.8, 0.9), "fc1": (0.96, 0.97)},
]


def plan_for(stage: dict) -> Plan:
    rules = []
    for layer, (f, c) in stage.items():
        rules += [Rule(Filter(sparsity=f), match=layer), Rule(Column(sparsity=c), match=layer)]
    return Plan(rules)


def stage_dir(out: Path, i: int) -> Path:
    return out / f"stage{i + 1}"


def run_stage(i, model, masks, train, test, x, args, log) -> tuple[MaskSet, dict]:
    targets = plan_for(STAGES[i]).resolve_coupled(model, x)
    model.dropout.p = 0.0  # SPEC P12: dropout off while ADMM pulls toward the structure
    steps = (len(train.y) + 63) // 64
    admm = ADMM(model, targets, rho=RhoSchedule(initial=args.rho, growth=1.5, maximum=1.0), frozen=masks)
    log(f"stage {i + 1}: ADMM {args.admm_epochs} epochs, {len(targets)} targets")
    fit(
        model,
        train,
        args.admm_epochs,
        1e-3,
        penalty=admm.penalty,
        every=max(1, steps // 4),
        on_every=admm.step,
        masks=masks if len(masks) else None,
        seed=i + 1000 * args.seed,
        log=log,
    )
    residual = {k: round(v, 4) for k, v in admm.residuals().items()}
    masks = admm.finalize()
    hard = evaluate(model, test)
    report = purify(model, x, masks, threshold=args.threshold)
    masks = report.masks
    after_purify = evaluate(model, test)
    log(f"  hard prune {hard:.2f}%, after purification/removal {after_purify:.2f}%\n" + report.describe())
    model.dropout.p = 0.5
    fit(model, train, args.retrain_epochs, 1e-3, masks=masks, seed=100 + i + 1000 * args.seed, log=log)
    model.dropout.p = 0.0
    final = remove_unused_paths(model, x, masks)
    masks = final.masks
    return masks, {
        "residual": residual,
        "acc_hard_prune": hard,
        "acc_after_purify": after_purify,
        "purify": report.describe(),
        "removal_after_retrain": final.describe(),
    }


def analyse(model, masks, test, x, args) -> dict:
    stats = measure(model, LAYERS)
    result = compact(model, x, masks, CompactConfig(columns="on"))  # storage: only kept columns
    small = result.model.eval()
    timed = {}
    for batch in (1, 64):
        xb = test.x[:batch]
        fast = compact(model, xb, masks, CompactConfig(columns="auto")).model.eval()
        dense = create_model("lenet5").eval()
        ms = interleaved_ms(
            {"dense": lambda d=dense, xb=xb: d(xb), "compacted": lambda s=fast, xb=xb: s(xb)},
            rounds=args.rounds,
        )
        timed[batch] = {
            "ms": ms,
            "speedup": ms["dense"] / ms["compacted"],
            "column_layers": [type(m).__name__ for m in fast.modules()].count("ColumnConv2d")
            + [type(m).__name__ for m in fast.modules()].count("ColumnLinear"),
        }
    weights = sum(m.weight.numel() for n, m in small.named_modules() if n in LAYERS)
    return {
        "overall_compression": stats.overall_compression,
        "kept_weights": stats.kept_weights,
        "compacted_params": result.params_after,
        "compacted_layer_weights": weights,
        "compacted_macs": macs(small, x),
        "dense_macs": macs(create_model("lenet5"), x),
        "widths": [small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features],
        "latency": timed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=len(STAGES))
    parser.add_argument("--admm-epochs", type=int, default=2)
    parser.add_argument("--retrain-epochs", type=int, default=2)
    parser.add_argument("--rho", type=float, default=2e-3)
    parser.add_argument("--threshold", type=float, default=0.02, help="purification: share of the mean kept norm")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="data order of every phase (0: the recorded runs)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "runs" / "structured_lenet5"))
    parser.add_argument("--summarize", action="store_true")
    parser.add_argument("--reanalyse", action="store_true", help="redo compaction + timing of finished stages")
    args = parser.parse_args()
    ensure_malloc_env()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.reanalyse:
        reanalyse(out, args)
    elif not args.summarize:
        out.mkdir(parents=True, exist_ok=True)
        log_file = open(out / "log.txt", "a")  # noqa: SIM115 - kept open for the whole run

        def log(msg: str) -> None:
            print(msg, flush=True)
            log_file.write(msg + "\n")
            log_file.flush()

        log(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} | {machine()}\n# {command_line()}")
        torch.manual_seed(args.seed)
        train = load_dataset("mnist", "train", limit=args.train_limit)
        test = load_dataset("mnist", "test")
        x = test.x[:2]
        model = create_model("lenet5").eval()
        ckpt.load_weights(model, ROOT / "checkpoints" / "lenet5_mnist_dense.safetensors")
        dense_acc = evaluate(model, test)
        log(f"dense LeNet-5: {dense_acc:.2f}%")
        masks = MaskSet()
        for i in range(args.stages):
            folder = stage_dir(out, i)
            if (folder / "result.json").is_file():
                recorded = json.loads((folder / "result.json").read_text()).get("seed", 0)
                if recorded != args.seed:
                    raise SystemExit(f"{folder} holds a stage of seed {recorded}, not {args.seed}: give each seed its "
                                     "own --out")
                ckpt.load_weights(model, folder / "model.safetensors")
                masks = MaskSet(ckpt.load_tensors(folder / "masks.safetensors"))
                log(f"stage {i + 1}: done before, loaded")
                continue
            masks, info = run_stage(i, model, masks, train, test, x, args, log)
            info.update(stage=i + 1, plan=STAGES[i], dense_accuracy=dense_acc, accuracy=evaluate(model, test),
                        seed=args.seed)
            info.update(analyse(model, masks, test, x, args))
            info["drop"] = dense_acc - info["accuracy"]
            log(json.dumps({k: v for k, v in info.items() if k not in ("purify", "removal_after_retrain")}))
            folder.mkdir(parents=True, exist_ok=True)
            ckpt.save_tensors(folder / "model.safetensors", model.state_dict())
            ckpt.save_tensors(folder / "masks.safetensors", masks.state_dict())
            write_json(folder / "result.json", info)
    print(summarize(out))


def reanalyse(out: Path, args) -> None:
    """Recompute compaction, MACs and latency of every finished stage from its saved model and masks."""
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} | {machine()}\n# {command_line()}", flush=True)
    test = load_dataset("mnist", "test")
    for path in sorted(out.glob("stage*/result.json")):
        info = json.loads(path.read_text())
        model = create_model("lenet5").eval()
        ckpt.load_weights(model, path.parent / "model.safetensors")
        masks = MaskSet(ckpt.load_tensors(path.parent / "masks.safetensors"))
        info.update(analyse(model, masks, test, test.x[:2], args))
        write_json(path, info)
        print(f"{path.parent.name}: reanalysed", flush=True)


def summarize(out: Path) -> str:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("stage*/result.json"))]
    if not results:
        return f"no finished stages in {out}"
    dense = results[0]["dense_accuracy"]
    lines = [
        f"Dense LeNet-5: {dense:.2f}% (430,500 weights in conv1/conv2/fc1/fc2, 2.29 MMACs)",
        "",
        "| stage | compression (pruned layers) | kept weights | compacted params | widths conv1/conv2/fc1 | "
        "MMACs | acc. hard prune | acc. after retrain | vs dense (points) | speedup b1 | speedup b64 |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        speed = {int(k): v["speedup"] for k, v in r["latency"].items()}
        lines.append(
            f"| {r['stage']} | {r['overall_compression']:.1f}x | {r['kept_weights']:,} | "
            f"{r['compacted_params']:,} | {'/'.join(map(str, r['widths']))} | {r['compacted_macs'] / 1e6:.3f} | "
            f"{r['acc_hard_prune']:.2f}% | {r['accuracy']:.2f}% | {-r['drop']:+.2f} | {speed[1]:.2f}x | "
            f"{speed[64]:.2f}x |"
        )
    lines.append("")
    for limit in (0.1, 0.5):
        ok = [r for r in results if r["drop"] <= limit + 1e-9]
        best = max(ok, key=lambda r: r["overall_compression"]) if ok else None
        found = (
            f"{best['overall_compression']:.1f}x (stage {best['stage']}, {best['accuracy']:.2f}%)" if best else "none"
        )
        lines.append(f"Highest rate with drop <= {limit} points: {found}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
