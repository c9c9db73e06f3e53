"""CIFAR-10 ResNet-20 on modelled memristor crossbars and SOT-MRAM PIM (SPEC 12, 13; issue 23).

    python benchmarks/crossbar_cifar.py                   # the full run (see the command in the report)
    python benchmarks/crossbar_cifar.py --quick           # smoke test: a few hundred images, one epoch each
    python benchmarks/crossbar_cifar.py --seed 1 --out runs/crossbar_cifar/seed1   # one run per seed, then
    python benchmarks/crossbar_cifar.py --summarize runs/crossbar_cifar/seed*      # mean +- sd over the seeds

Starting from the shipped dense ResNet-20 (``checkpoints/resnet20_cifar10_dense.safetensors``):

1. Crossbar-structured + conductance-quantized compression: one ADMM phase with two targets per block conv,
   ``crossbar_tile`` (whole tile blocks of ``--tile`` cells, ``--tile-sparsity`` of them pruned) and
   ``conductance`` (``--bits-per-cell`` per cell, ``--cells`` cells per polarity: weights ``q*{+-1..+-(2^(b*c)-1)}``)
   on every Conv2d/Linear; hard prune + quantize; masked retraining on the level grid (``--retrain-update``:
   straight-through, or the weights held and only biases / BatchNorm trained).
2. The modelled mapping (``admmcompress.hardware.analyze``): tiles dense / masked / compacted, and area, power
   and energy ratios to the unpruned 16-bit mapping under the same constants (every figure *modelled*).
3. Accuracy under log-normal conductance variation (``--sigmas``, ``--draws`` seeded Monte-Carlo draws, mean
   and sd) without and with variation-aware retraining (``--vat-epochs`` with ``NoiseInjector`` at the same
   sigma, quantized weights trained straight-through so the levels stay on the grid).
4. Accuracy vs ADC resolution (``--adc-bits``; each tile's partial sum quantized, full scale calibrated on
   500 training images).
5. SOT-MRAM bit widths (``--pim-bits``): the compressed model's kept weights re-quantized to fixed point at
   each width (pruning masks kept), ``--pim-epochs`` of straight-through retraining, accuracy and the modelled
   SOT-MRAM sub-arrays / energy / latency ratios to the unpruned 16-bit mapping.

Results: ``--out``/results.json, hardware.md + hardware.png (the report section), variation.png.
Training uses the library's loop through ``structured_common.fit`` (SGD Nesterov, batch 128, augmentation,
bf16 autocast + channels_last). Subsets (``--train-limit``, ``--test-limit``) are seeded random draws: the
CIFAR-10 test file is sorted by class.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from structured_common import CIFAR_BATCH, cifar_sgd, command_line, log_to, machine

from admmcompress.data import load_dataset
from admmcompress.drivers import ADMM, RhoSchedule
from admmcompress.finalize import MaskSet, hard_prune
from admmcompress.hardware import CrossbarSpec, DeviceNoise, NoiseInjector, add_adc, add_variation, analyze
from admmcompress.hardware.analysis import VariationPoint
from admmcompress.hardware.noise import device_noise, monte_carlo
from admmcompress.hardware.pim import PIMSpec, pim_baseline, pim_cost
from admmcompress.models import create_model
from admmcompress.plan import Plan
from admmcompress.report.hardware import save_hardware
from admmcompress.run_hardware import sample
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.loop import evaluate

ROOT = Path(__file__).resolve().parents[1]
DENSE = ROOT / "checkpoints" / "resnet20_cifar10_dense.safetensors"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny data, one epoch per phase, 2 draws")
    p.add_argument("--dense", type=Path, default=DENSE)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "crossbar_cifar")
    p.add_argument("--train-limit", type=int, default=None, help="first N training images (default all)")
    p.add_argument("--test-limit", type=int, default=None, help="N test images, a seeded draw (default all)")
    p.add_argument("--mc-test-limit", type=int, default=1000,
                   help="test images (a seeded draw) for each Monte-Carlo draw and ADC setting (0: the whole test set)")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--bits-per-cell", type=int, default=2)
    p.add_argument("--cells", type=int, default=2, help="cells per polarity (bit slices) of a weight")
    p.add_argument("--tile-sparsity", type=float, default=0.5)
    p.add_argument("--admm-epochs", type=int, default=4)
    p.add_argument("--retrain-epochs", type=int, default=6)
    p.add_argument("--retrain-update", choices=("ste", "hold"), default="ste",
                   help="how the quantized weights retrain: ste (straight-through, they move between levels) or "
                        "hold (frozen; only biases and BatchNorm train: the runs of 2026-12-05 used it)")
    p.add_argument("--rho", type=float, default=1e-2)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--vat-epochs", type=int, default=2)
    p.add_argument("--adc-bits", type=int, nargs="+", default=[4, 5, 6, 7, 8])
    p.add_argument("--pim-bits", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--pim-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summarize", type=Path, nargs="+", help="run folders (one per seed): mean +- sd, no training")
    args = p.parse_args(argv)
    if args.quick:
        args.train_limit, args.test_limit = args.train_limit or 256, args.test_limit or 200
        args.admm_epochs, args.retrain_epochs, args.vat_epochs, args.pim_epochs = 1, 1, 1, 0
        args.draws, args.sigmas, args.adc_bits = 2, [0.1], [4, 8]
        args.out = args.out.with_name(args.out.name + "_quick")
    return args


def compression_plan(args, spec: CrossbarSpec) -> Plan:
    tile = {"tile": [spec.rows, spec.cols], "columns_per_weight": spec.columns_per_weight}
    levels = {"structure": "conductance", "bits": args.bits_per_cell, "cells": args.cells}
    return Plan.from_dict({"rules": [
        {"match": "layers.*.conv*", "structure": "crossbar_tile", "sparsity": args.tile_sparsity, **tile},
        {"type": "Conv2d", **levels},
        {"type": "Linear", **levels},
    ]})


def sgd(model, train, epochs, log, *, seed: int, schedule="cosine", **kw) -> None:
    """``cifar_sgd``; ``seed`` draws the data order and augmentation (each phase its own, per run seed)."""
    # fast: bf16 autocast + channels_last, as the run configs
    cifar_sgd(model, train, epochs, schedule=schedule, log=log, fast=True, seed=seed, **kw)


def compress(args, model, spec, train, log):
    targets = compression_plan(args, spec).resolve(model)
    admm = ADMM(model, targets, rho=RhoSchedule(args.rho, 1.3, 1.0))
    every = max(1, ((len(train.y) + CIFAR_BATCH - 1) // CIFAR_BATCH) // 4)
    log(f"ADMM: {args.admm_epochs} epochs, Z/U every {every} steps")
    sgd(model, train, args.admm_epochs, log, seed=1000 * args.seed + 1, schedule="constant", penalty=admm.penalty,
        every=every, on_every=admm.step)
    masks = admm.finalize()
    log(f"retrain: {args.retrain_epochs} epochs, quantized weights {args.retrain_update}")
    if args.retrain_update == "ste":
        masks = masks.with_update("ste")  # weights move between the levels; "hold" freezes them
    sgd(model, train, args.retrain_epochs, log, seed=1000 * args.seed + 2, masks=masks)
    return masks


def variation_aware(args, model, masks, spec, sigma, train, log):
    """A copy of ``model`` retrained with device noise at ``sigma`` (levels trained straight-through)."""
    vat = copy.deepcopy(model)
    injector = NoiseInjector(spec, DeviceNoise(sigma=sigma), seed=args.seed).install(vat)
    log(f"variation-aware retraining at sigma={sigma}: {args.vat_epochs} epochs")
    sgd(vat, train, args.vat_epochs, log, seed=1000 * args.seed + 3, masks=masks.with_update("ste"))
    injector.remove()
    return vat


def pim_width(args, model, masks, bits, train, log):
    """A copy of the compressed model with its kept weights on ``bits``-bit fixed point (masks kept)."""
    copy_ = copy.deepcopy(model)
    targets = Plan.from_dict({"rules": [
        {"type": "Conv2d", "structure": "fixed_point", "bits": bits},
        {"type": "Linear", "structure": "fixed_point", "bits": bits},
    ]}).resolve(copy_)
    held = hard_prune(copy_, targets, MaskSet(masks.masks))
    if args.pim_epochs:
        log(f"SOT-MRAM {bits}-bit: {args.pim_epochs} straight-through epochs")
        sgd(copy_, train, args.pim_epochs, log, seed=1000 * args.seed + 10 + bits, masks=held.with_update("ste"))
    return copy_


def plot_variation(path: Path, clean: dict, aware: dict, adc: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, points in (("no variation-aware retraining", clean), ("variation-aware retraining", aware)):
        sig = sorted(points)
        left.errorbar(sig, [points[s][0] for s in sig], yerr=[points[s][1] for s in sig], marker="o", capsize=3,
                      label=label)
    left.set_xlabel("log-normal sigma (modelled device)")
    left.set_ylabel("test accuracy (%)")
    left.legend()
    if adc:
        right.plot([b for b, _ in adc], [a for _, a in adc], marker="o")
    right.set_xlabel("ADC bits (modelled ADC)")
    right.set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary(path: Path, runs: list[dict]) -> Path:
    """The seeds in one figure: tiles per layer (modelled), accuracy vs sigma and vs ADC bits, SOT-MRAM widths;
    points are means over the seeds, bars their sample standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def spread(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    hw = [r["hardware"] for r in runs]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2), gridspec_kw={"width_ratios": [3, 1.3, 1.3, 1.3]})
    layers = hw[0]["layers"]
    for i, kind in enumerate(("dense", "masked", "compact")):
        axes[0].bar([p + (i - 1) * 0.27 for p in range(len(layers))], [layer[kind] for layer in layers], 0.27,
                    label=kind)
    axes[0].set_xticks(range(len(layers)))
    axes[0].set_xticklabels([layer["name"] for layer in layers], rotation=60, ha="right", fontsize=6)
    axes[0].set_ylabel("crossbar tiles (modelled)")
    axes[0].set_title(f"tiles per layer, seed {runs[0]['args']['seed']}")
    axes[0].legend()
    def series(label: str) -> str:  # each variation-aware point is labelled with its own training sigma
        return "variation-aware retraining" if "variation-aware" in label else label

    for name in sorted({series(v["label"]) for h in hw for v in h["variation"]}):
        sigmas = sorted({v["sigma"] for v in hw[0]["variation"] if series(v["label"]) == name})
        stats = [spread([v["mean"] for h in hw for v in h["variation"]
                         if series(v["label"]) == name and v["sigma"] == s]) for s in sigmas]
        axes[1].errorbar(sigmas, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", capsize=3,
                         label=name)
    axes[1].set_xlabel("log-normal sigma (modelled device)")
    axes[1].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=7)
    bits = [e["bits"] for e in hw[0]["adc"]]
    stats = [spread([h["adc"][i]["accuracy"] for h in hw]) for i in range(len(bits))]
    axes[2].errorbar(bits, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", capsize=3)
    axes[2].set_xlabel("ADC bits (modelled ADC)")
    widths = [e["bits"] for e in runs[0]["pim_accuracy"]]
    stats = [spread([r["pim_accuracy"][i]["accuracy"] for r in runs]) for i in range(len(widths))]
    axes[3].errorbar(widths, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", capsize=3)
    axes[3].set_xlabel("SOT-MRAM weight bits")
    axes[3].set_xticks(widths)
    for ax in axes[2:]:
        ax.set_ylabel("test accuracy (%)")
    fig.suptitle(f"ResNet-20 / CIFAR-10 on a modelled crossbar: {len(runs)} seeds, mean +- sd")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def summarize(folders: list[Path]) -> str:
    """Mean +- sd over the seeds' runs (one results.json per folder) of every accuracy the report gives."""
    runs = [json.loads((f / "results.json").read_text()) for f in folders]
    hw = [r["hardware"] for r in runs]
    lines = [f"{len(runs)} seeds: {', '.join(str(r['args']['seed']) for r in runs)}; "
             f"dense {runs[0]['dense_accuracy']:.2f}%",
             f"compressed (clean) {mean_sd([h['accuracy'] for h in hw])}%, mapped without noise "
             f"{mean_sd([h['mapped_accuracy'] for h in hw])}%",
             f"modelled ratios to the unpruned 16-bit mapping: {hw[0]['ratios']}"]
    points: dict[tuple[str, float], list[float]] = {}
    for h in hw:
        for v in h["variation"]:
            points.setdefault((v["label"], v["sigma"]), []).append(v["mean"])
    lines += [f"sigma {sigma} {label}: {mean_sd(acc)}% (mean over draws, then over seeds)"
              for (label, sigma), acc in sorted(points.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    lines.append(f"ADC reference (no ADC quantization) {mean_sd([r['adc_reference_accuracy'] for r in runs])}%")
    for i, entry in enumerate(hw[0]["adc"]):
        lines.append(f"ADC {entry['bits']} bits: {mean_sd([h['adc'][i]['accuracy'] for h in hw])}%")
    for i, entry in enumerate(runs[0]["pim_accuracy"]):
        ratios = {k: round(v, 2) for k, v in entry["ratios"].items()}
        lines.append(f"SOT-MRAM {entry['bits']}-bit: {mean_sd([r['pim_accuracy'][i]['accuracy'] for r in runs])}%, "
                     f"modelled ratios {ratios}")
    lines.append(f"figure: {plot_summary(folders[0].parent / 'summary.png', runs)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = log_to(args.out)
    started = time.perf_counter()
    log(f"{command_line()}\n{machine()}")
    # Seeded random subsets: the data files are sorted by class, so the first N would be one class.
    train = sample(load_dataset("cifar10", "train"), args.train_limit, args.seed)
    test = sample(load_dataset("cifar10", "test"), args.test_limit, args.seed)

    # Every variation draw and ADC setting is one evaluation: on a seeded subset, so a run fits the CPU budget.
    test_mc = sample(test, args.mc_test_limit or None, args.seed + 1)

    def acc(m) -> float:
        return evaluate(m, test, 500)

    def acc_mc(m) -> float:
        return evaluate(m, test_mc, 500)

    magnitude_bits = args.bits_per_cell * args.cells
    spec = CrossbarSpec(args.tile, args.tile, args.bits_per_cell, magnitude_bits + 1)
    log(f"crossbar: {spec.describe()}")
    model = create_model("resnet20")
    ckpt.load_weights(model, args.dense)
    model.eval()
    dense_accuracy = acc(model)
    log(f"dense accuracy {dense_accuracy:.2f}%")
    example = test.x[:1]
    dense_hw = analyze(model, spec, example, pim_bits=())

    masks = compress(args, model, spec, train, log)
    result = analyze(model, spec, example, pim_bits=())
    result.accuracy = acc(model)  # clean and noise-free mapped: the whole test set; Monte-Carlo draws: test_mc
    with device_noise(model, spec, DeviceNoise()):
        result.mapped_accuracy = acc(model)
    add_variation(result, model, acc_mc, [DeviceNoise(sigma=s) for s in args.sigmas], args.draws, args.seed,
                  label="compressed")
    log(f"compressed: {result.accuracy:.2f}%, mapped {result.mapped_accuracy:.2f}%, "
        f"tiles {result.mapping.total('dense')} -> {result.mapping.total('compact')} (modelled ratios "
        f"{ {k: round(v, 2) for k, v in result.ratios.items()} })")
    clean = {p.noise.sigma: (p.accuracy.mean, p.accuracy.sd) for p in result.variation}
    aware = {}
    for sigma in args.sigmas:
        vat = variation_aware(args, model, masks, spec, sigma, train, log)
        mc = monte_carlo(vat, acc_mc, spec, DeviceNoise(sigma=sigma), args.draws, args.seed)
        result.variation.append(VariationPoint(DeviceNoise(sigma=sigma), mc, f"variation-aware (trained at {sigma})"))
        aware[sigma] = (mc.mean, mc.sd)
        log(f"sigma {sigma}: {clean[sigma][0]:.2f} +- {clean[sigma][1]:.2f} -> variation-aware {mc}")
    adc_reference = acc_mc(model)  # no ADC quantization, the same images: what the sweep is compared with
    add_adc(result, model, acc_mc, args.adc_bits, train.x[:500])
    log(f"ADC sweep: {result.adc} (no ADC quantization: {adc_reference:.2f}% on the same {len(test_mc.y)} images)")

    reference = PIMSpec(weight_bits=min(args.pim_bits))
    pim_ref = pim_baseline(model, reference, 16, example)
    pim_rows = []
    result.pim, result.pim_baseline = [], pim_ref
    for bits in args.pim_bits:
        quantized = pim_width(args, model, masks, bits, train, log)
        cost = pim_cost(quantized, replace(reference, weight_bits=bits), example)
        result.pim.append(cost)
        pim_rows.append({"bits": bits, "accuracy": acc(quantized), **cost.to_dict(), "ratios": cost.ratios(pim_ref)})
        log(f"SOT-MRAM {bits}-bit: {pim_rows[-1]['accuracy']:.2f}%, modelled ratios {pim_rows[-1]['ratios']}")

    save_hardware(result, args.out, "Hardware: ResNet-20, CIFAR-10 (crossbar_tile + conductance)")
    with (args.out / "hardware.md").open("a") as md:
        md.write(f"\nClean, mapped and SOT-MRAM accuracies: {len(test.y):,} test images; each Monte-Carlo draw and ADC "
                 f"setting: a seeded draw of {len(test_mc.y):,} of them (no ADC quantization there: "
                 f"{adc_reference:.2f}%).\n")
    plot_variation(args.out / "variation.png", clean, aware, result.adc)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": command_line(), "machine": machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dense_accuracy": dense_accuracy, "dense_mapping_tiles": dense_hw.mapping.total("dense"),
        "test_images": len(test.y), "mc_test_images": len(test_mc.y), "adc_reference_accuracy": adc_reference,
        "hardware": result.to_dict(), "pim_accuracy": pim_rows, "wall_s": time.perf_counter() - started,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=1, default=str))
    log(f"done in {record['wall_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
