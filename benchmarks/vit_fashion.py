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
- auto: SS-Auto (method ``soft``): the same driving schedule as admm (rho ``--rho`` x1.3 to 1, Z/U every quarter
  epoch), but the rates are not given: one group-lasso strength, adapted at every update to meet a MAC budget
  equal to the uniform plan's, picks how many heads and FFN units each block keeps (bounds: at most 3 of 4
  heads and 90% of the units per block), then the same fine-tuning; the compacted shapes differ per block,
  the MACs match the others';
- magnitude: one-shot L2 magnitude pruning of the same coupled groups (heads and hidden units), then
  ``--admm-epochs + --finetune-epochs`` of masked fine-tuning: the same number of training steps;
- tp_magnitude / tp_taylor: Torch-Pruning's ``MetaPruner`` with its group L2 magnitude or group Taylor
  importance (Taylor from the gradients of ``--taylor-batches`` training batches), whole heads
  (``prune_num_heads``, ``head_pruning_ratio`` 0.5, head dimensions kept) and half of every FFN's hidden units;
  the hidden size is held (patch embedding, ``o_proj``, ``fc2`` and the classifier are ignored as output
  layers), so the pruned model has exactly the shapes of the others; then the same fine-tuning as magnitude.

All training is AdamW (lr 1e-3, weight decay 0.05, cosine; ADMM's phase constant) on the library's loop. Each
run compacts the pruned model (checked equal to the masked one) and times it against the dense model at batch
1 and 8 (interleaved, medians, same process); Torch-Pruning's models are already physically small and are timed
the same way.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from structured_common import (
    accumulate_gradients,
    command_line,
    ensure_malloc_env,
    fit,
    interleaved_ms,
    log_to,
    machine,
    macs,
    params,
)
from torch import nn

from admmcompress.data import load_dataset
from admmcompress.drivers import ADMM, RhoSchedule
from admmcompress.drivers.allocation import cost_at_rates
from admmcompress.drivers.budget import gemm_shapes
from admmcompress.drivers.soft import SoftConfig, SoftThreshold
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


def auto_bounds() -> Plan:
    """What SS-Auto may prune: at most 3 of 4 heads and 90% of the FFN units of each block."""
    return Plan([Rule(Heads(sparsity=0.75), match="*attention.q_proj"), Rule(Filter(sparsity=0.9), match="*mlp.fc1")])


def uniform_macs(model: nn.Module, targets, x: torch.Tensor) -> float:
    """The uniform plan's Linear/Conv MACs as SS-Auto's budget counts them (half the heads and units pruned)."""
    rates = {t.key: t.structure.target_sparsity for t in targets}
    return cost_at_rates(model, targets, rates, gemm_shapes(model, x), "macs")


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
    elif args.what == "auto":
        budget = {"kind": "macs", "value": uniform_macs(model, targets, x)}
        soft = SoftThreshold(model, auto_bounds().resolve_coupled(model, x),
                             SoftConfig(budget=budget, rho=args.rho, rho_growth=1.3, rho_max=1.0), example=x,
                             updates=4 * args.admm_epochs)
        opts = train_opts(args, args.admm_epochs, schedule="constant")
        fit(model, train, opts.pop("epochs"), opts.pop("lr"), penalty=soft.penalty, every=max(1, steps // 4),
            on_every=soft.step, log=log, **{**opts, "seed": 1000 * args.seed})
        before = evaluate(model, val)
        masks = soft.finalize()
        found = {k: soft.outcome[k] for k in ("zeroed_by_soft_threshold", "cut_by_final_topk", "share_soft_threshold")}
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
    timings = None if args.no_timing else latency(args, load_dense(args), small, test)
    ffn = {n: m.out_features for n, m in small.named_modules() if n.endswith("mlp.fc1")}
    record = {"validation_before_prune": before, "validation_after_prune": after, "validation": evaluate(model, val),
              "accuracy": evaluate(small, test), "params": params(small), "macs": macs(small, x),
              "heads": {k: list(v) for k, v in result.heads.items()}, "ffn_units": ffn,
              "max_abs_diff": result.max_abs_diff, "latency": timings}
    if args.what == "auto":
        record["soft"] = found
    return record


def torch_pruning_prune(args, model: ViT, train, x: torch.Tensor, taylor: bool) -> None:
    """Torch-Pruning (its dependency graph and importance; not this library's code) to the plan's shapes."""
    import torch_pruning as tp

    vit = model.vit.vit
    ignored = [vit.embeddings.patch_embeddings.projection, model.vit.classifier]  # the hidden size stays
    num_heads = {}
    for layer in vit.layers:
        ignored += [layer.attention.o_proj, layer.mlp.fc2]
        for proj in (layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj):
            num_heads[proj] = args.heads
    if taylor:
        accumulate_gradients(model, train, args.taylor_batches, seed=1000 * args.seed)
        importance = tp.importance.GroupTaylorImportance()
    else:
        importance = tp.importance.GroupMagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(model, x, importance=importance, pruning_ratio=0.5, ignored_layers=ignored,
                                  num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
                                  head_pruning_ratio=0.5)
    pruner.step()
    model.zero_grad(set_to_none=True)


def run_torch_pruning(args, log) -> dict:
    train, val, test = data(args)
    model = load_dense(args)
    x = test.x[:2]
    before = evaluate(model, val)
    torch_pruning_prune(args, model, train, x, taylor=args.what == "tp_taylor")
    after = evaluate(model, val)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    log(f"{args.what}: validation {before:.2f}% -> {after:.2f}% at the prune; {params(model):,} params")
    opts = train_opts(args, args.admm_epochs + args.finetune_epochs)
    fit(model, train, opts.pop("epochs"), opts.pop("lr"), log=log, **opts)
    model.eval()
    dense = None if args.no_timing else load_dense(args)
    heads = {name: int(m.weight.shape[0] // (args.width // args.heads))
             for name, m in model.named_modules() if name.endswith("attention.q_proj")}
    return {"validation_before_prune": before, "validation_after_prune": after, "validation": evaluate(model, val),
            "accuracy": evaluate(model, test), "params": params(model), "macs": macs(model, x),
            "heads_kept": heads, "fc1_kept": [s[0] for k, s in shapes.items() if k.endswith("fc1.weight")],
            "latency": None if args.no_timing else latency(args, dense, model, test)}


def latency(args, dense: nn.Module, small: nn.Module, test) -> dict:
    """Dense vs pruned model, batch 1 and 8, interleaved medians in this process."""
    timings = {}
    for batch in (1, 8):
        xb = test.x[:batch]
        ms = interleaved_ms({"dense": lambda xb=xb: dense(xb), "compact": lambda xb=xb: small(xb)}, rounds=args.rounds)
        timings[batch] = {"dense_ms": round(ms["dense"], 3), "compact_ms": round(ms["compact"], 3),
                          "speedup": round(ms["dense"] / ms["compact"], 3)}
    return timings


def run_time(args, log) -> dict:
    """Dense vs the pruned shapes (this library's compaction and Torch-Pruning's), one process, interleaved.

    Every method prunes to the same shapes, so one pruned model per implementation stands for all of them:
    weights do not change the time. Run on an idle machine; ``--repeats`` whole passes, the median reported.
    """
    _, _, test = data(args)
    x = test.x[:2]
    dense = load_dense(args)
    ours = copy.deepcopy(dense)
    ours = compact(ours, x, hard_prune(ours, plan().resolve_coupled(ours, x))).model.eval()
    theirs = copy.deepcopy(dense)
    torch_pruning_prune(args, theirs, None, x, taylor=False)  # magnitude: no gradients needed to time it
    contenders = {"dense": dense, "admmcompress": ours, "torch_pruning": theirs.eval()}
    record = {"threads": args.threads, "rounds": args.rounds, "repeats": args.repeats, "macs": {}, "ms": {}}
    for name, model in contenders.items():
        record["macs"][name] = macs(model, x)
    for batch in (1, 8):
        xb = test.x[:batch]
        passes = [interleaved_ms({n: (lambda m=m, xb=xb: m(xb)) for n, m in contenders.items()}, rounds=args.rounds)
                  for _ in range(args.repeats)]
        record["ms"][batch] = {n: round(statistics.median(p[n] for p in passes), 3) for n in contenders}
        log(f"batch {batch}: " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in record["ms"][batch].items()))
    return record


def summary(out: Path) -> str:
    dense_file = out / "dense.json"
    if not dense_file.is_file():
        return f"no dense run in {out}"
    dense = json.loads(dense_file.read_text())
    lines = [f"dense ViT: validation {dense['validation']:.2f}%, test {dense['accuracy']:.2f}%, "
             f"{dense['params']:,} params, {dense['macs'] / 1e6:.2f} M MACs", "",
             "| method | seeds | MACs (M) | params | val. after prune (%) | test top-1 (%) | speed-up b1 | b8 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method in ("admm", "auto", "magnitude", "tp_magnitude", "tp_taylor"):
        runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"{method}_seed*.json"))]
        if not runs:
            continue
        acc = [r["accuracy"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else float("nan")
        timed = [r for r in runs if r.get("latency")]
        speed = [statistics.median(r["latency"][b]["speedup"] for r in timed) if timed else float("nan")
                 for b in ("1", "8")]
        lines.append(f"| {method} | {len(runs)} | {statistics.mean(r['macs'] for r in runs) / 1e6:.2f} | "
                     f"{round(statistics.mean(r['params'] for r in runs)):,} | "
                     f"{statistics.mean(r['validation_after_prune'] for r in runs):.2f} | "
                     f"{statistics.mean(acc):.2f} +- {sd:.2f} | {speed[0]:.2f}x | {speed[1]:.2f}x |")
    for timing in sorted(out.glob("time_t*.json")):
        t = json.loads(timing.read_text())
        lines += ["", f"Latency ({t['threads']} thread(s), median of {t['repeats']} interleaved passes of "
                  f"{t['rounds']} rounds, ms; speed-up = dense / pruned):", "",
                  "| batch | dense | admmcompress compacted | speed-up | Torch-Pruning | speed-up |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for batch, ms in t["ms"].items():
            lines.append(f"| {batch} | {ms['dense']:.3f} | {ms['admmcompress']:.3f} | "
                         f"{ms['dense'] / ms['admmcompress']:.2f}x | {ms['torch_pruning']:.3f} | "
                         f"{ms['dense'] / ms['torch_pruning']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["dense", "admm", "auto", "magnitude", "tp_magnitude", "tp_taylor", "time",
                                         "summary"])
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
    parser.add_argument("--repeats", type=int, default=3, help="time: whole interleaved passes")
    parser.add_argument("--no-timing", action="store_true", help="method runs: skip the latency (use `time`)")
    parser.add_argument("--taylor-batches", type=int, default=10, help="tp_taylor: batches of gradients")
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
    runners = {"dense": run_dense, "time": run_time, "tp_magnitude": run_torch_pruning, "tp_taylor": run_torch_pruning}
    runner = runners.get(args.what, run_method)
    record = runner(args, log)
    record.update(seconds=round(time.perf_counter() - start), command=command_line(), date=str(datetime.date.today()),
                  args=vars(args))
    fixed = {"dense": "dense.json", "time": f"time_t{args.threads}.json"}
    name = fixed.get(args.what, f"{args.what}_seed{args.seed}.json")
    (out / name).write_text(json.dumps(record, indent=1))
    log(json.dumps({k: v for k, v in record.items() if k != "args"}))


if __name__ == "__main__":
    main()
