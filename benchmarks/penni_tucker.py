"""CIFAR-10 ResNet-20: PENNI shared kernels, and Tucker-2 by ADMM with latency-driven vs FLOP-driven ranks.

    python benchmarks/penni_tucker.py penni  --out runs/penni_tucker      # PENNI: params/MACs removed vs accuracy
    python benchmarks/penni_tucker.py tucker --out runs/penni_tucker      # Tucker-2: latency- vs FLOP-driven ranks
    python benchmarks/penni_tucker.py peer   --out runs/penni_tucker      # TensorLy half-rank Tucker-2 (no training)
    python benchmarks/penni_tucker.py summary --out runs/penni_tucker
    (add --quick to any of them for a smoke run on a few hundred images, one epoch per phase)

All start from ``checkpoints/resnet20_cifar10_dense.safetensors`` and train on the library's loop
(``train.loop.train_epoch`` through ``structured_common.fit``), bf16 autocast + channels_last with ``--fast``.

- penni: every 3x3 conv (``*conv*``: the 1x1 shortcuts are skipped, as PENNI does) is decomposed into
  ``--bases`` basis kernels by PCA without the mean (method ``penni``), trained ``--train-epochs`` with
  ``--l1`` on the coefficients, swapping coefficients/bases every ``--alternate-epochs``, pruned at
  ``|c| < --prune-std * std``, fine-tuned ``--finetune-epochs`` with masks, then shrunk across layers and
  converted to the two-stage executor (checked equal). Reported: accuracy, parameters and MACs (stage 2 at
  its nonzeros), latency (median of interleaved runs) and peak memory (torch.profiler's memory profile:
  the highest running total of its allocation/free events) of dense vs two-stage at batch 1 and 64, and the
  ONNX export of the two-stage model run by onnxruntime.
- tucker: per-layer latency of the 1x1 -> 3x3 -> 1x1 block at candidate ranks (``executors.rank_search``,
  cached per machine and shape) at ``--batch``; ranks meeting ``--budget`` x the dense convs' summed latency
  with the least reconstruction loss, versus ranks meeting the same fraction of the dense MACs; each plan
  trained by ADMM toward the Tucker-2 ranks (``--admm-epochs``, Z/U every quarter epoch), factorized,
  fine-tuned ``--finetune-epochs``. Reported: accuracy and measured model latency (batch 1 and 64) of both, so
  "same latency budget -> accuracy" and "same accuracy -> speedup" can be read off (run several ``--budget``).
- peer: TensorLy ``partial_tucker`` (HOOI) at half rank on every 3x3 conv of the dense model, no training:
  latency vs dense at batch 1 and 64 (the anchor: ResNet-18 ran 1.55x / 1.71x faster here).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch
from structured_common import cifar_sgd, command_line, ensure_malloc_env, interleaved_ms, log_to, machine
from torch import nn

from admmcompress.data import load_dataset
from admmcompress.drivers import ADMM, Penni, PenniConfig, RhoSchedule
from admmcompress.executors import rank_search as rs
from admmcompress.executors.compact_run import count_macs
from admmcompress.executors.penni import TwoStageConv, shared_layers, shrink
from admmcompress.executors.tucker import factorize_tucker2
from admmcompress.models import create_model
from admmcompress.plan import Plan, Rule
from admmcompress.structures import SharedKernels, Tucker2
from admmcompress.timing import LatencyCache
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.loop import evaluate

ROOT = Path(__file__).resolve().parents[1]
DENSE = ROOT / "checkpoints" / "resnet20_cifar10_dense.safetensors"


def data(args):
    limit = 512 if args.quick else (args.train_limit or None)
    train = load_dataset("cifar10", "train", limit=limit)
    test = load_dataset("cifar10", "test", limit=500 if args.quick else None)
    return train, test


def dense_model() -> nn.Module:
    model = create_model("resnet20")
    ckpt.load_weights(model, DENSE)
    return model.eval()


def conv3x3(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sparse_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs for one sample with two-stage convs counted at their stage-2 nonzeros (SPEC 10.3)."""
    total = count_macs(model, x[:1])
    sizes: dict[str, tuple[int, int]] = {}
    handles = [
        m.register_forward_hook(lambda mod, _i, out, n=n: sizes.__setitem__(n, tuple(out.shape[-2:])))
        for n, m in model.named_modules()
        if isinstance(m, TwoStageConv)
    ]
    with torch.no_grad():
        model.eval()(x[:1])
    for handle in handles:
        handle.remove()
    for name, hw in sizes.items():
        module = model.get_submodule(name)
        dense_stage2 = math.prod(hw) * module.stage2.weight.numel()
        total += math.prod(hw) * int(module.stage2.weight.count_nonzero()) - dense_stage2
    return total


def peak_memory_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Highest running total of allocations during one forward (torch.profiler memory profile, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    # Each op event carries what it allocated itself; "[memory]" events carry frees (negative), in time order.
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def speed_and_memory(models: dict[str, nn.Module], rounds: int) -> dict:
    out = {}
    for batch in (1, 64):
        x = torch.randn(batch, 3, 32, 32)
        ms = interleaved_ms({k: (lambda m=m, x=x: m(x)) for k, m in models.items()}, rounds=rounds, warmup=3)
        out[f"batch{batch}"] = {k: {"ms": ms[k], "peak_bytes": peak_memory_bytes(m, x)} for k, m in models.items()}
    return out


def onnx_check(model: nn.Module, path: Path) -> float:
    from admmcompress.executors.onnx_export import export_onnx, run_onnx

    x = torch.randn(4, 3, 32, 32)
    export_onnx(model.eval(), (x,), path)
    with torch.no_grad():
        return float((torch.from_numpy(run_onnx(path, x)[0]) - model(x)).abs().max())


def sgd(model: nn.Module, train, epochs: int, args, log, *, weight_decay: float, phase: int, **kw) -> None:
    """``fit`` with the runs' shared SGD settings; ``phase`` gives each training phase of a seed its own data order."""
    cifar_sgd(model, train, epochs, weight_decay=weight_decay, log=log, fast=args.fast,
              seed=phase + 1000 * args.seed, **kw)


# --- PENNI ---------------------------------------------------------------------------------------------------


def penni_decomposed(bases: int) -> tuple[nn.Module, list]:
    """The dense model with every 3x3 conv decomposed into ``bases`` kernels (PCA without the mean), its targets."""
    model = dense_model()
    targets = Plan([Rule(SharedKernels(bases=bases), match="*conv*")]).resolve(model)
    Penni(model, targets).finalize().apply(model)
    return model, targets


def penni_two_stage(state: Path, bases: int) -> nn.Module:
    """A saved PENNI run (the fine-tuned shared-kernel model) rebuilt, shrunk and in its two-stage form."""
    model, _ = penni_decomposed(bases)
    ckpt.load_weights(model, state)
    return shrink(model.eval(), torch.randn(8, 3, 32, 32)).eval()


def run_penni(args, log) -> dict:
    train, test = data(args)
    dense = dense_model()
    model, targets = penni_decomposed(args.bases)
    acc_decomposed = evaluate(model, test)
    log(f"decomposed (d={args.bases}): {acc_decomposed:.2f}% (dense {evaluate(dense, test):.2f}%)")
    driver = Penni(model, targets, PenniConfig(l1=args.l1, prune_std=args.prune_std))
    driver.prepare(model)
    steps = math.ceil(len(train) / 128)
    sgd(
        model,
        train,
        args.train_epochs,
        args,
        log,
        weight_decay=1e-4,
        phase=1,
        penalty=driver.penalty,
        every=steps * args.alternate_epochs,
        on_every=driver.step,
    )
    driver.close()
    masks = driver.finalize()
    acc_pruned = evaluate(model, test)
    sgd(model, train, args.finetune_epochs, args, log, weight_decay=1e-4, phase=2, masks=masks)
    acc = evaluate(model, test)
    # The fine-tuned model, so `time` can rebuild the two-stage form on a quiet machine (no pickle).
    ckpt.save_tensors(
        Path(args.out) / f"penni_seed{args.seed}.safetensors",
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
    )
    x = torch.randn(8, 3, 32, 32)
    fast = shrink(model.eval(), x).eval()
    kept = sum(int(model.get_submodule(n).coefs.count_nonzero()) for n in shared_layers(model))
    result = {
        "bases": args.bases,
        "l1": args.l1,
        "prune_std": args.prune_std,
        "accuracy": {
            "dense": evaluate(dense, test),
            "decomposed": acc_decomposed,
            "pruned": acc_pruned,
            "finetuned": acc,
            "two_stage": evaluate(fast, test),
        },
        "coefs_kept": kept,
        "params": {
            "dense": params(dense),
            "two_stage": params(fast),
            "two_stage_nonzero": sum(int(p.count_nonzero()) for p in fast.parameters()),
        },
        "macs": {
            "dense": count_macs(dense, x),
            "two_stage_dense_stage2": count_macs(fast, x),
            "two_stage_sparse_stage2": sparse_macs(fast, x),
        },
        "onnx_max_diff": onnx_check(fast, Path(args.out) / "penni_two_stage.onnx"),
    }
    if not args.no_timing:
        result["speed_memory"] = speed_and_memory({"dense": dense, "two_stage": fast}, args.rounds)
    log(json.dumps(result, indent=1))
    return result


# --- Tucker-2 ------------------------------------------------------------------------------------------------


def tucker_plan(chosen: dict) -> Plan | None:
    rules = [Rule(Tucker2(ranks=r), match=name) for name, r in chosen.items() if r is not None]
    return Plan(rules) if rules else None


def train_tucker(chosen: dict, train, test, args, log) -> nn.Module:
    model = dense_model()
    plan = tucker_plan(chosen)
    if plan is None:
        return model
    admm = ADMM(model, plan, rho=RhoSchedule(args.rho, 1.3, 1.0))
    steps = math.ceil(len(train) / 128)
    sgd(
        model,
        train,
        args.admm_epochs,
        args,
        log,
        weight_decay=5e-4,
        phase=1,
        penalty=admm.penalty,
        every=max(1, steps // 4),
        on_every=admm.step,
        schedule="constant",
    )
    outcome = admm.finalize()
    outcome.apply(model)
    sgd(model, train, args.finetune_epochs, args, log, weight_decay=5e-4, phase=2)
    return model.eval()


def run_tucker(args, log) -> dict:
    train, test = data(args)
    dense = dense_model()
    layers = [n for n in conv3x3(dense) if n != "conv1"]  # the 3-channel stem stays dense
    shapes = rs.layer_shapes(dense, torch.randn(args.batch, 3, 32, 32), layers)
    fractions = (0.25, 0.5, 0.75) if args.quick else rs.FRACTIONS
    started = time.perf_counter()
    # A smoke run's timings on a busy machine must not land in the per-machine cache a real search reuses.
    cache = LatencyCache("tucker2", folder=Path(args.out) / "latency_cache") if args.quick else None
    # The table is keyed by thread count: search at the threads the model will run with, train at --threads.
    torch.set_num_threads(args.search_threads or args.threads)
    latency = rs.latency_table(shapes, args.batch, fractions, cache=cache, rounds=3 if args.quick else 9)
    torch.set_num_threads(args.threads)
    log(
        f"latency table: {len(layers)} layers x {len(fractions) + 1} candidates in "
        f"{time.perf_counter() - started:.0f} s (cached per machine and shape)"
    )
    flops = rs.flop_table(shapes, fractions)
    losses = rs.reconstruction_losses(dense, latency)
    dense_ms = sum(t[None] for t in latency.values())
    dense_macs = sum(t[None] for t in flops.values())
    results = {"batch": args.batch, "budgets": {}}
    for budget in args.budget:
        plans = {
            "latency": lambda b=budget: rs.choose_ranks(latency, losses, b * dense_ms),
            "flops": lambda b=budget: rs.choose_ranks(flops, losses, b * dense_macs),
        }
        entry = {}
        for label in args.plans:
            chosen = plans[label]()
            log(f"budget {budget}: {label}-driven ranks {chosen}")
            model = train_tucker(chosen, train, test, args, log)
            entry[label] = {
                "ranks": {k: v for k, v in chosen.items()},
                "table_ms": rs.total(latency, chosen),
                "table_macs": rs.total(flops, chosen),
                "accuracy": evaluate(model, test),
                "params": params(model),
                "model": model,
            }
        models = {"dense": dense, **{k: v.pop("model") for k, v in entry.items()}}
        if not args.no_timing:
            entry["speed_memory"] = speed_and_memory(models, args.rounds)
        entry["onnx_max_diff"] = onnx_check(models[args.plans[0]], Path(args.out) / f"tucker_{args.plans[0]}.onnx")
        results["budgets"][str(budget)] = entry
        log(json.dumps(entry, indent=1, default=str))
    results["accuracy_dense"] = evaluate(dense, test)
    return results


def run_peer(args, log) -> dict:
    """TensorLy's own half-rank Tucker-2 (HOOI) of every 3x3 conv, no training: the anchor measurement."""
    import tensorly
    from tensorly.decomposition import partial_tucker

    from admmcompress.executors.tucker import Tucker2Conv  # noqa: I001

    _, test = data(args)
    dense = dense_model()
    model = copy.deepcopy(dense)
    for name in [n for n in conv3x3(model) if n != "conv1"]:
        conv = model.get_submodule(name)
        ranks = (max(1, conv.out_channels // 2), max(1, conv.in_channels // 2))
        block = Tucker2Conv(conv, ranks)
        with torch.no_grad(), tensorly.backend_context("pytorch"):
            (core, (u_out, u_in)), _ = partial_tucker(conv.weight.detach(), rank=list(ranks), modes=[0, 1])
            block.first.weight.copy_(u_in.t()[:, :, None, None])
            block.core.weight.copy_(core)
            block.last.weight.copy_(u_out[:, :, None, None])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, block)
    result = {
        "accuracy": {"dense": evaluate(dense, test), "half_rank": evaluate(model.eval(), test)},
        "speed_memory": speed_and_memory({"dense": dense, "half_rank": model.eval()}, args.rounds),
    }
    log(json.dumps(result, indent=1))
    return result


def labels_of(entry: dict) -> list[str]:
    """The rank choices a Tucker budget entry holds ("latency", "flops" or both, see --plans)."""
    return [k for k in ("latency", "flops") if k in entry]


def tucker_model(ranks: dict) -> nn.Module:
    """The factorized ResNet-20 at ``ranks`` (random factors: latency depends on the shapes, not the values)."""
    chosen = {name: tuple(r) for name, r in ranks.items() if r is not None}
    return factorize_tucker2(dense_model(), chosen, weights=False).eval()


def run_time(args, log) -> dict:
    """Latency and peak memory of the saved runs' models, all timed in this one process (run it on a quiet machine)."""
    out = Path(args.out)
    result: dict = {}
    states = sorted(out.glob("penni_seed*.safetensors"))
    if states:
        bases = {json.loads(p.with_suffix(".json").read_text())["bases"] for p in states}
        if len(bases) != 1:
            raise SystemExit(f"time: the PENNI runs in {out} use different --bases {sorted(bases)}; one per folder")
        models = {
            "dense": dense_model(),
            **{p.stem.removeprefix("penni_"): penni_two_stage(p, next(iter(bases))) for p in states},
        }
        result["penni"] = speed_and_memory(models, args.rounds)
    tucker = {}  # every Tucker plan of this folder and of --also folders, timed together with dense
    for folder in [out, *map(Path, args.also)]:
        runs = [json.loads(p.read_text()) for p in sorted(folder.glob("tucker_seed*.json"))]
        for budget, entry in runs[0]["budgets"].items() if runs else ():
            for label in labels_of(entry):
                if any(r["budgets"][budget][label]["ranks"] != entry[label]["ranks"] for r in runs):
                    raise SystemExit(
                        f"time: the Tucker runs in {folder} chose different {label}-driven ranks at budget {budget} "
                        "(latency tables from other machines?); one machine's runs per folder"
                    )
                tucker[f"{label}@{budget}"] = tucker_model(entry[label]["ranks"])
    if tucker:
        result["tucker"] = speed_and_memory({"dense": dense_model(), **tucker}, args.rounds)
    if not result:
        raise SystemExit(f"time: no penni_seed*.safetensors or tucker_seed*.json in {out}; run penni/tucker first")
    log(json.dumps(result, indent=1))
    return result


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f} ({len(values)} seeds)"


def log_speed(log, label: str, speed: dict) -> None:
    for batch, value in speed.items():
        dense = value["dense"]["ms"]
        log(
            f"{label} {batch}: "
            + ", ".join(
                f"{k} {v['ms']:.2f} ms ({dense / v['ms']:.2f}x) / {v['peak_bytes'] / 2**20:.1f} MiB"
                for k, v in value.items()
            )
        )


def summary(args, log) -> None:
    out = Path(args.out)
    penni = [json.loads(p.read_text()) for p in sorted(out.glob("penni_seed*.json"))]
    if penni:
        for stage in ("decomposed", "pruned", "finetuned", "two_stage"):
            log(f"penni accuracy {stage}: {mean_sd([r['accuracy'][stage] for r in penni])}")
        log(f"penni dense accuracy: {penni[0]['accuracy']['dense']:.2f}%")
        for key in ("params", "macs"):
            dense = penni[0][key]["dense"]
            for kind in [k for k in penni[0][key] if k != "dense"]:
                ratios = [r[key]["dense"] / r[key][kind] for r in penni]
                log(f"penni {key} {kind}: dense/{kind} {mean_sd(ratios)} x (dense {dense:,})")
    tucker = [json.loads(p.read_text()) for p in sorted(out.glob("tucker_seed*.json"))]
    for budget in tucker[0]["budgets"] if tucker else []:
        for label in labels_of(tucker[0]["budgets"][budget]):
            entries = [r["budgets"][budget][label] for r in tucker]
            log(
                f"tucker budget {budget} {label}-driven: accuracy {mean_sd([e['accuracy'] for e in entries])}, "
                f"table {entries[0]['table_ms']:.3f} ms / {entries[0]['table_macs'] / 1e6:.2f} M MACs, "
                f"params {entries[0]['params']:,}, ranks {entries[0]['ranks']}"
            )
    if tucker:
        log(f"tucker dense accuracy: {tucker[0]['accuracy_dense']:.2f}%")
    timing = out / "time.json"
    if timing.is_file():
        found = json.loads(timing.read_text())
        if "penni" in found:
            log_speed(log, "penni", found["penni"])
        if "tucker" in found:
            log_speed(log, "tucker", found["tucker"])
    peer = out / "peer.json"
    if peer.is_file():
        found = json.loads(peer.read_text())
        log(f"peer accuracy {found['accuracy']}")
        log_speed(log, "peer", found["speed_memory"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("penni", "tucker", "peer", "time", "summary"))
    parser.add_argument("--out", default="runs/penni_tucker")
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 training images, 1 epoch per phase")
    parser.add_argument("--train-limit", type=int, default=0, help="training images (0: all 50,000)")
    parser.add_argument("--fast", action="store_true", help="bf16 autocast + channels_last while training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="data order and augmentation of penni/tucker")
    parser.add_argument(
        "--no-timing",
        action="store_true",
        help="skip latency/memory in penni/tucker (time them later with `time` on a quiet machine)",
    )
    parser.add_argument("--rounds", type=int, default=25, help="interleaved timing rounds")
    parser.add_argument("--bases", type=int, default=5)
    parser.add_argument("--l1", type=float, default=1e-4)
    parser.add_argument("--prune-std", type=float, default=1.0)
    parser.add_argument("--alternate-epochs", type=int, default=2)
    parser.add_argument("--train-epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--admm-epochs", type=int, default=4)
    parser.add_argument("--rho", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=1, help="batch size the rank search times at")
    parser.add_argument(
        "--plans",
        nargs="+",
        choices=("latency", "flops"),
        default=["latency", "flops"],
        help="which rank choices tucker trains (e.g. only latency-driven at a looser budget)",
    )
    parser.add_argument("--also", nargs="+", default=[], help="time: Tucker runs of other folders, timed in one group")
    parser.add_argument("--search-threads", type=int, default=0, help="threads the rank search times at (0: --threads)")
    parser.add_argument("--budget", type=float, nargs="+", default=[0.6], help="fractions of the dense convs' cost")
    args = parser.parse_args()
    if args.quick:
        args.train_epochs = args.finetune_epochs = args.admm_epochs = args.alternate_epochs = 1
        args.rounds = 3
    ensure_malloc_env()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = log_to(Path(args.out))
    log(f"{command_line()}\n{machine()}")
    if args.what == "summary":
        summary(args, log)
        return
    result = {"penni": run_penni, "tucker": run_tucker, "peer": run_peer, "time": run_time}[args.what](args, log)
    result["command"], result["machine"], result["seed"] = command_line(), machine(), args.seed
    name = f"{args.what}_seed{args.seed}" if args.what in ("penni", "tucker") else args.what
    (Path(args.out) / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
