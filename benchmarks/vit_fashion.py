"""A small ViT trained here on Fashion-MNIST, then attention heads + FFN units pruned to about 2x fewer MACs.

    python benchmarks/vit_fashion.py dense   --out runs/vit_fashion        # the dense ViT every method starts from
    python benchmarks/vit_fashion.py admm    --seed 0 --out runs/vit_fashion
    python benchmarks/vit_fashion.py magnitude --seed 0 --out runs/vit_fashion
    python benchmarks/vit_fashion.py summary --out runs/vit_fashion
    (--quick: 2,000 training images, one epoch per phase: a smoke run)

The model is transformers' ``ViTForImageClassification`` built from a config (nothing downloaded): 28x28
images in 4x4 patches (49 tokens), ``--layers`` blocks of width ``--width`` with ``--heads`` heads and an FFN of
twice the width. Fashion-MNIST from ../shared/data: 5,000 training images held out (``Split.hold_out``, the same
draw for every run) for validation, which is what the runs report while training; the test set is evaluated
once per run at the end. Every method prunes the same structure, half the heads of every block
(``structure: heads`` on the query projection) and half of every FFN's hidden units (coupled ``filter`` on
``fc1``), so the compacted models have the same shapes and the same MACs:

- admm: ADMM for ``--admm-epochs`` (Z/U every quarter epoch, rho ``--rho`` growing x1.3 to 1), hard prune,
  ``--finetune-epochs`` of masked fine-tuning;
- magnitude: one-shot L2 magnitude pruning of the same coupled groups (heads and hidden units), then
  ``--admm-epochs + --finetune-epochs`` of masked fine-tuning: the same number of training steps.

All training is AdamW (lr 1e-3, weight decay 0.05, cosine; ADMM's phase constant) on the library's loop. Each
run compacts the pruned model (checked equal to the masked one) and times it against the dense model at batch
1 and 8 (interleaved, medians, same process). Torch-Pruning's own ViT head pruning is not run here yet.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from structured_common import command_line, ensure_malloc_env, fit, interleaved_ms, log_to, machine, macs, params
from torch import nn

from admmcompress.data import load_dataset
from admmcompress.drivers import ADMM, RhoSchedule
from admmcompress.executors.compact import compact
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Filter, Heads
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.loop import evaluate

VALIDATION = 5000


class ViT(nn.Module):
    """transformers' ViT classifier returning plain logits (what the library's loop trains)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        import transformers

        config = transformers.ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=width,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        intermediate_size=2 * width, num_labels=10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.vit = transformers.ViTForImageClassification(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x).logits


def data(args):
    train = load_dataset("fashion_mnist", "train", limit=2000 if args.quick else None)
    train, val = train.hold_out(500 if args.quick else VALIDATION)
    return train, val, load_dataset("fashion_mnist", "test")


def build(args) -> ViT:
    torch.manual_seed(0)
    return ViT(args.width, args.layers, args.heads)


def dense_path(args) -> Path:
    return Path(args.out) / "vit_dense.safetensors"


def plan() -> Plan:
    return Plan([Rule(Heads(sparsity=0.5), match="*attention.q_proj"), Rule(Filter(sparsity=0.5), match="*mlp.fc1")])


def train_opts(args, epochs: int, schedule: str = "cosine") -> dict:
    return {"epochs": epochs, "lr": 1e-3, "optimizer": "adamw", "batch_size": 128, "weight_decay": 0.05,
            "schedule": schedule, "seed": 1 + 1000 * args.seed, "fast": args.fast}


def run_dense(args, log) -> dict:
    train, val, test = data(args)
    model = build(args)
    opts = train_opts(args, args.dense_epochs)
    fit(model, train, opts.pop("epochs"), opts.pop("lr"), log=log, **opts)
    ckpt.save_tensors(dense_path(args), model.state_dict())
    return {"validation": evaluate(model, val), "accuracy": evaluate(model, test), "params": params(model),
            "macs": macs(model, test.x[:1])}


def load_dense(args) -> ViT:
    model = build(args)
    ckpt.load_weights(model, dense_path(args))
    return model.eval()


def run_method(args, log) -> dict:
    train, val, test = data(args)
    model = load_dense(args)
    x = test.x[:2]
    targets = plan().resolve_coupled(model, x)
    steps = (len(train.y) + 127) // 128
    if args.what == "admm":
        admm = ADMM(model, targets, rho=RhoSchedule(initial=args.rho, growth=1.3, maximum=1.0))
        opts = train_opts(args, args.admm_epochs, schedule="constant")
        fit(model, train, opts.pop("epochs"), opts.pop("lr"), penalty=admm.penalty, every=max(1, steps // 4),
            on_every=admm.step, log=log, **{**opts, "seed": 1000 * args.seed})
        before = evaluate(model, val)
        masks = admm.finalize()
        epochs = args.finetune_epochs
    else:
        before = evaluate(model, val)
        masks = hard_prune(model, targets)
        epochs = args.admm_epochs + args.finetune_epochs
    after = evaluate(model, val)
    log(f"{args.what}: validation {before:.2f}% -> {after:.2f}% at the hard prune")
    opts = train_opts(args, epochs)
    fit(model, train, opts.pop("epochs"), opts.pop("lr"), masks=masks, log=log, **opts)
    result = compact(model, x, masks)
    small = result.model.eval()
    dense = load_dense(args)
    timings = {}
    for batch in (1, 8):
        xb = test.x[:batch]
        ms = interleaved_ms({"dense": lambda xb=xb: dense(xb), "compact": lambda xb=xb: small(xb)}, rounds=args.rounds)
        timings[batch] = {"dense_ms": round(ms["dense"], 3), "compact_ms": round(ms["compact"], 3),
                          "speedup": round(ms["dense"] / ms["compact"], 3)}
    return {"validation_before_prune": before, "validation_after_prune": after, "validation": evaluate(model, val),
            "accuracy": evaluate(small, test), "params": params(small), "macs": macs(small, x),
            "heads": {k: list(v) for k, v in result.heads.items()}, "max_abs_diff": result.max_abs_diff,
            "latency": timings}


def summary(out: Path) -> str:
    dense_file = out / "dense.json"
    if not dense_file.is_file():
        return f"no dense run in {out}"
    dense = json.loads(dense_file.read_text())
    lines = [f"dense ViT: validation {dense['validation']:.2f}%, test {dense['accuracy']:.2f}%, "
             f"{dense['params']:,} params, {dense['macs'] / 1e6:.2f} M MACs", "",
             "| method | seeds | MACs (M) | params | val. after prune (%) | test top-1 (%) | speed-up b1 | b8 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method in ("admm", "magnitude"):
        runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"{method}_seed*.json"))]
        if not runs:
            continue
        acc = [r["accuracy"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else float("nan")
        speed = [statistics.median(r["latency"][b]["speedup"] for r in runs) for b in ("1", "8")]
        lines.append(f"| {method} | {len(runs)} | {runs[0]['macs'] / 1e6:.2f} | {runs[0]['params']:,} | "
                     f"{statistics.mean(r['validation_after_prune'] for r in runs):.2f} | "
                     f"{statistics.mean(acc):.2f} +- {sd:.2f} | {speed[0]:.2f}x | {speed[1]:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["dense", "admm", "magnitude", "summary"])
    parser.add_argument("--out", default="runs/vit_fashion")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--admm-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="bf16 autocast while training")
    args = parser.parse_args()
    if args.quick:
        args.dense_epochs = args.admm_epochs = args.finetune_epochs = 1
        args.rounds = 3
    out = Path(args.out)
    if args.what == "summary":
        print(summary(out))
        return
    ensure_malloc_env()
    torch.set_num_threads(args.threads)
    log = log_to(out)
    log(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} | {machine()}\n# {command_line()}")
    start = time.perf_counter()
    record = run_dense(args, log) if args.what == "dense" else run_method(args, log)
    record.update(seconds=round(time.perf_counter() - start), command=command_line(), date=str(datetime.date.today()),
                  args=vars(args))
    name = "dense.json" if args.what == "dense" else f"{args.what}_seed{args.seed}.json"
    (out / name).write_text(json.dumps(record, indent=1))
    log(json.dumps({k: v for k, v in record.items() if k != "args"}))


if __name__ == "__main__":
    main()
