"""LeNet-5 / MNIST at 71.2x: admmcompress's ADMM beside ``torch.nn.utils.prune`` on the same budget, 3 seeds.

    python benchmarks/library_baselines.py --seeds 0 1 2 --out runs/library_baselines   # every contender
    python benchmarks/library_baselines.py --only torch_global --seeds 1                # one contender, one seed
    python benchmarks/library_baselines.py --summary --out runs/library_baselines       # the table
    python benchmarks/library_baselines.py --quick --out /tmp/lb                        # smoke: a few steps

The question a user asks before adopting admmcompress: would the pruning already in PyTorch do as well? Every
contender starts from the bundled dense checkpoint (99.39%), keeps the same 6,050 of 430,500 weights (71.2x),
trains 30 epochs in all (batch 64, Adam 1e-3, dropout off, one thread) and is scored once on the 10,000 test
images:

- ``admm``: ``admmcompress run configs/lenet5_admm_71x.yaml`` (20 ADMM epochs, hard prune at the published
  per-layer rates conv1 80%, conv2 92%, fc1 99.1%, fc2 93%, 10 masked retraining epochs).
- ``torch_layer``: ``torch.nn.utils.prune.l1_unstructured`` at the same per-layer rates, once, then 30 epochs of
  fine-tuning through the pruning reparametrization (cosine LR): the tutorial's recipe.
- ``torch_global``: ``torch.nn.utils.prune.global_unstructured`` (L1) over the four layers to the same total
  count, once, then 30 epochs as above: what a user without per-layer rates picks.
- ``torch_gradual``: ``l1_unstructured`` repeated on the cubic schedule of Zhu and Gupta (40 steps, one every
  469 optimizer steps over 20 epochs, constant LR), to the per-layer rates, then 10 epochs of fine-tuning with a
  fresh Adam (cosine): the gradual pruning ``torch.nn.utils.prune`` supports through its pruning containers.
- ``nni_admm``: NNI 2.10.1's ``ADMMPruner`` (fine-grained, the per-layer rates, NNI's default rho 1e-4; its
  update comes once per epoch, so 20 iterations of one epoch), then the same 10 epochs of masked fine-tuning
  (NNI's masks through ``prune.custom_from_mask``). NNI 3.0 dropped its ADMM pruner; 2.10.1 pins
  ``filelock<3.12`` and ``typeguard<3``, so it lives in its own environment that sees this one's packages:
  ``python -m venv --system-site-packages /tmp/nni && /tmp/nni/bin/pip install nni==2.10.1``, then
  ``/tmp/nni/bin/python benchmarks/library_baselines.py --only nni_admm``. NNI's ADMM penalty is
  ``rho/2 * sqrt(||W - Z + U||)`` (NNI 2.10.1, ``ADMMPruner.criterion_patch``), not the augmented Lagrangian's
  ``rho/2 * ||W - Z + U||^2``. It starts at Z = W, U = 0, where the square root's gradient is undefined: the
  first backward pass gives NaN gradients, and the weights are NaN after the first step. The run is recorded as
  it ends (``diverged``: where the loss stopped being finite); NNI's code is not patched here.

The pruning is PyTorch's own (this script only chooses amounts and trains); the training epochs are the
library's ``train_epoch`` (``structured_common.fit``), the data the bundled MNIST. Every run writes
``<contender>_s<seed>/result.json`` atomically; a finished run is skipped, so a killed run starts again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import yaml
from structured_common import fit, log_to, machine, mean_sd, write_json
from torch import nn
from torch.nn.utils import prune

from admmcompress.data import BatchLoader, Split, load_dataset
from admmcompress.models import create_model
from admmcompress.train import checkpoint as ckpt
from admmcompress.train.loop import TrainingDiverged, evaluate, train_epoch

ROOT = Path(__file__).resolve().parents[1]
ADMM_CONFIG = ROOT / "configs" / "lenet5_admm_71x.yaml"
DENSE = ROOT / "checkpoints" / "lenet5_mnist_dense.safetensors"
RATES = {"conv1": 0.80, "conv2": 0.92, "fc1": 0.991, "fc2": 0.93}  # the published per-layer rates (SPEC 1.6)
CONTENDERS = ("admm", "torch_layer", "torch_global", "torch_gradual", "nni_admm")
NNI_RHO = 1e-4  # ADMMPruner's default
EPOCHS, GRADUAL_EPOCHS, EVERY, LR, BATCH = 30, 20, 469, 1e-3, 64


def dense_model() -> nn.Module:
    model = create_model(name="lenet5", dropout=0.0)
    model.load_state_dict(ckpt.load_tensors(DENSE))
    return model


def layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: getattr(model, name) for name in RATES}


def kept_target(model: nn.Module) -> dict[str, int]:
    """Weights each layer keeps at the published rates (the rounding ``l1_unstructured`` applies to a fraction)."""
    return {name: m.weight.numel() - round(RATES[name] * m.weight.numel()) for name, m in layers(model).items()}


def cubic(step: int, steps: int, final: float) -> float:
    """Zhu and Gupta's gradual sparsity after ``step`` of ``steps`` pruning steps (from 0 to ``final``)."""
    return final * (1.0 - (1.0 - step / steps) ** 3)


def prune_to(module: nn.Module, sparsity: float) -> None:
    """Prune ``module.weight`` (L1) until ``sparsity`` of it is zero, on top of what is already pruned.

    ``torch.nn.utils.prune`` applies a second call's ``amount`` to the weights still kept, so the count is the
    difference; a call with nothing left to prune is skipped (it would add an empty step to the container).
    """
    total = module.weight.numel()
    pruned = int((module.weight_mask == 0).sum()) if hasattr(module, "weight_mask") else 0
    more = round(sparsity * total) - pruned
    if more > 0:
        prune.l1_unstructured(module, "weight", amount=more)


def train_torch(contender: str, seed: int, train: Split, log, quick: bool) -> nn.Module:
    """One ``torch.nn.utils.prune`` contender from the dense checkpoint; the pruning made permanent at the end."""
    torch.manual_seed(seed)
    model = dense_model()
    named = layers(model)
    epochs, gradual_epochs, every = (1, 1, 4) if quick else (EPOCHS, GRADUAL_EPOCHS, EVERY)
    if contender == "torch_layer":
        for name, module in named.items():
            prune.l1_unstructured(module, "weight", amount=RATES[name])
        fit(model, train, epochs, LR, batch_size=BATCH, seed=seed, log=log)
    elif contender == "torch_global":
        keep = sum(kept_target(model).values())
        total = sum(m.weight.numel() for m in named.values())
        prune.global_unstructured([(m, "weight") for m in named.values()], prune.L1Unstructured,
                                  amount=total - keep)
        fit(model, train, epochs, LR, batch_size=BATCH, seed=seed, log=log)
    else:  # torch_gradual
        steps = 4 if quick else GRADUAL_EPOCHS * -(-len(train) // BATCH) // every
        done = [0]

        def step() -> None:
            done[0] += 1
            for name, module in named.items():
                prune_to(module, cubic(min(done[0], steps), steps, RATES[name]))

        fit(model, train, gradual_epochs, LR, batch_size=BATCH, seed=seed, log=log, every=every, on_every=step,
            schedule="constant")
        for name, module in named.items():  # the last step, where the schedule's rounding fell short of it
            prune_to(module, RATES[name])
        fit(model, train, epochs - gradual_epochs, LR, batch_size=BATCH, seed=seed, log=log)
    for module in named.values():
        prune.remove(module, "weight")
    return model


def train_nni_admm(seed: int, train: Split, log, quick: bool) -> nn.Module:
    """NNI's ``ADMMPruner`` (legacy trainer API of NNI 2.10.1), then masked fine-tuning as the torch contenders."""
    import nni  # NNI 2.10.1 in its own environment (module docstring)
    from nni.algorithms.compression.v2.pytorch.pruning import ADMMPruner

    torch.manual_seed(seed)
    model = dense_model()
    loader = BatchLoader(train, BATCH, shuffle=True, seed=seed)
    epoch = [0]

    def trainer(model: nn.Module, optimizer: torch.optim.Optimizer, criterion) -> None:
        """NNI's trainer callback: one epoch of the library's loop on NNI's criterion (cross-entropy + its
        penalty), at NNI's optimizer's own learning rate; a non-finite loss raises TrainingDiverged."""
        started = time.perf_counter()
        train_epoch(model, loader, optimizer, lambda step: LR, epoch[0] * len(loader), progress=False,
                    desc=f"NNI ADMM epoch {epoch[0] + 1}", loss_fn=lambda batch, out, m: criterion(out, batch[1]))
        epoch[0] += 1
        log(f"  NNI ADMM epoch {epoch[0]} ({time.perf_counter() - started:.0f} s)")

    config = [{"op_names": [name], "sparsity_per_layer": rate, "rho": NNI_RHO} for name, rate in RATES.items()]
    optimizer = nni.trace(torch.optim.Adam)(model.parameters(), lr=LR)
    pruner = ADMMPruner(model, config, trainer=trainer, traced_optimizer=optimizer,
                        criterion=nn.functional.cross_entropy, iterations=1 if quick else GRADUAL_EPOCHS,
                        training_epochs=1)
    _, masks = pruner.compress()
    pruner._unwrap_model()  # NNI's documented step before using the model on its own
    for name, module in layers(model).items():
        prune.custom_from_mask(module, "weight", masks[name]["weight"].bool())
    fit(model, train, 1 if quick else EPOCHS - GRADUAL_EPOCHS, LR, batch_size=BATCH, seed=seed, log=log)
    for module in layers(model).values():
        prune.remove(module, "weight")
    return model


def run_admm(seed: int, out: Path, quick: bool) -> dict:
    """``admmcompress run`` of the ADMM config in its own process (as a user runs it); its metrics."""
    config = ADMM_CONFIG
    if quick:  # the same config cut to one short epoch per phase, written beside the run
        cfg = yaml.safe_load(ADMM_CONFIG.read_text())
        cfg["pretrained"] = str(DENSE)
        cfg["data"].update(train_limit=256, test_limit=500)
        cfg["stages"][0]["admm"].update(epochs=1, update_every_steps=2)
        cfg["stages"][0]["retrain"]["epochs"] = 1
        config = out / "quick.yaml"
        config.write_text(yaml.safe_dump(cfg))
    finished = out / "run" / "metrics.json"
    if not finished.is_file():  # a run folder with metrics.json is a finished run: read, not rerun
        resume = ["--resume"] if (out / "run" / "checkpoint.pt").is_file() else ["--overwrite"]
        command = [sys.executable, "-m", "admmcompress", "run", str(config), "--seed", str(seed), "--threads", "1",
                   "--out", str(out / "run"), "--no-progress", *resume]
        subprocess.run(command, check=True)
    metrics = json.loads(finished.read_text())["metrics"]
    return {"accuracy": metrics["accuracy_after"], "minutes": metrics["wall_seconds"] / 60}


def kept_weights(model: nn.Module) -> dict[str, int]:
    return {name: int(m.weight.count_nonzero()) for name, m in layers(model).items()}


def one_run(contender: str, seed: int, root: Path, quick: bool) -> dict:
    out = root / f"{contender}_s{seed}"
    done = out / "result.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("quick", False) != quick:  # a smoke result is never taken for a real one, or the reverse
            raise SystemExit(f"{out} holds a {'--quick smoke' if record.get('quick') else 'full'} result; "
                             "pass another --out, or remove that folder to rerun it")
        print(f"{out.name}: finished before", flush=True)
        return record
    log = log_to(out)
    where = machine()  # read once, at the start: its load average is the one other runs left
    log(f"{contender} seed {seed}: {where}")
    started = time.perf_counter()
    if contender == "admm":
        record = run_admm(seed, out, quick)
        model = create_model(name="lenet5", dropout=0.0)
        model.load_state_dict(ckpt.load_tensors(out / "run" / "model.safetensors"))
    else:
        torch.set_num_threads(1)
        test = load_dataset("mnist", "test")
        train = load_dataset("mnist", "train", limit=256 if quick else None)
        trainer = train_nni_admm if contender == "nni_admm" else partial(train_torch, contender)
        try:
            model = trainer(seed, train, log, quick)
            record = {"accuracy": evaluate(model, test)}
        except TrainingDiverged as error:  # recorded as the contender's result, not retried
            model, record = None, {"accuracy": None, "diverged": str(error)}
    kept = kept_weights(model) if model is not None else {}
    record.setdefault("minutes", (time.perf_counter() - started) / 60)  # (ADMM: the run's own wall time)
    record.update(contender=contender, seed=seed, kept=kept,
                  compression=430500 / sum(kept.values()) if kept else None, machine=where, quick=quick)
    if model is None:
        log(f"{contender} seed {seed}: diverged: {record['diverged']}")
    else:
        log(f"{contender} seed {seed}: {record['accuracy']:.2f}%, {record['compression']:.1f}x, kept {kept}")
    write_json(done, record)
    return record


def summarize(root: Path) -> str:
    records = [json.loads(p.read_text()) for p in sorted(root.glob("*_s*/result.json"))]
    full = [r for r in records if not r.get("quick", False)]
    note = [] if full or not records else ["smoke runs (--quick): not results", ""]
    records = full or records
    lines = note + ["| contender | accuracy %, mean +- sd (seeds) | drop vs 99.39 | compression | "
                    "kept conv1/conv2/fc1/fc2 | minutes per run |", "|---|---:|---:|---:|---|---:|"]
    for contender in CONTENDERS:
        rows = [r for r in records if r["contender"] == contender]
        diverged = [r for r in rows if r["accuracy"] is None]
        if diverged:
            lines.append(f"| {contender} | diverged in {len(diverged)} of {len(rows)} seeds: "
                         f"{diverged[0]['diverged']} | | | | {statistics.mean(r['minutes'] for r in rows):.1f} |")
        rows = [r for r in rows if r["accuracy"] is not None]
        if not rows:
            continue
        acc = [r["accuracy"] for r in rows]
        kept = "/".join(str(v) for v in rows[0]["kept"].values())
        lines.append(f"| {contender} | {mean_sd(acc)} | {99.39 - statistics.mean(acc):+.2f} | "
                     f"{statistics.mean(r['compression'] for r in rows):.1f}x | {kept} | "
                     f"{statistics.mean(r['minutes'] for r in rows):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "library_baselines")
    parser.add_argument("--quick", action="store_true", help="smoke: a few steps per phase, 256 training images")
    parser.add_argument("--summary", action="store_true", help="only the table from finished runs")
    args = parser.parse_args()
    if not args.summary:
        for seed in args.seeds:
            for contender in args.only:
                one_run(contender, seed, args.out, args.quick)
    print(summarize(args.out))


if __name__ == "__main__":
    main()
