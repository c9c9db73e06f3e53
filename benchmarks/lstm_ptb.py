"""LSTM language model on Penn Treebank: perplexity of the dense model and of its LSTM pruned 4x / 10x.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python benchmarks/lstm_ptb.py

Model: ``LSTMLanguageModel`` (embedding 200, 2 LSTM layers of 200, dropout 0.2, adaptive-softmax
decoder with cutoffs [2000, 6000] so that a CPU epoch fits the budget; perplexities are exact:
the adaptive softmax is a normalised distribution). Data: Mikolov's PTB (10k words), batch 20,
BPTT 35, Adam, gradient norm clipped at 1. Only the 8 LSTM gate matrices are pruned, each at the
rate (compression = LSTM weights / nonzero LSTM weights); embedding and decoder stay dense.

Methods (same step budget: ``--prune-epochs`` then ``--retrain-epochs`` of masked retraining):
``dense`` is the control: the same extra training with nothing pruned (the dense model is
short-trained, so it still improves). ``reweighted`` (``Block(block=(8, 1))``, 8-row block-columns;
reweighted group lasso, lambda ``--lam``),
``admm`` (same block structure, rho ``--rho`` x1.3), ``magnitude`` (unstructured, gradual cubic
schedule), each built by the driver registry. Training is the library's ``train_epoch`` with a custom
loss (``loss_fn``: next-token NLL through the adaptive softmax) and a model wrapper that carries the
LSTM state across BPTT windows. Not the Runner: it batches labelled splits and measures top-1
accuracy, not perplexity.
Results are appended as JSON lines to ``--out/results.jsonl``; ``--table`` prints them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from structured_common import read_jsonl
from torch import nn

from admmcompress.data.ptb import batchify, bptt_windows, load_ptb
from admmcompress.drivers import DriverContext, get_driver
from admmcompress.models import LSTMLanguageModel
from admmcompress.plan import Plan
from admmcompress.report.metrics import measure
from admmcompress.structures import Block, Unstructured
from admmcompress.train.loop import train_epoch

MALLOC = "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824"
BPTT, BATCH = 35, 20


def make_model() -> LSTMLanguageModel:
    return LSTMLanguageModel(10000, embed=200, hidden=200, num_layers=2, dropout=0.2, cutoffs=[2000, 6000])


def detach(state):
    return None if state is None else tuple(s.detach() for s in state)


class CarriedState(nn.Module):
    """``lm`` with its LSTM state carried (detached) from one BPTT window to the next.

    ``forward(tokens)`` returns the dropout-applied LSTM features; :func:`lm_loss` decodes them. The
    state starts empty at each pass of :class:`Windows` (truncated BPTT, as in Zaremba et al.).
    """

    def __init__(self, lm: LSTMLanguageModel):
        super().__init__()
        self.lm = lm
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, state = self.lm.features(tokens, self.state)
        self.state = detach(state)
        return out


def lm_loss(batch, features: torch.Tensor, model: CarriedState) -> torch.Tensor:
    """Mean next-token NLL: the ``loss_fn`` of ``train_epoch`` for ``(inputs, targets)`` windows."""
    flat, goal = features.reshape(-1, features.shape[-1]), batch[1].reshape(-1)
    decoder = model.lm.decoder
    if isinstance(decoder, nn.AdaptiveLogSoftmaxWithLoss):
        return decoder(flat, goal).loss
    return nn.functional.cross_entropy(decoder(flat), goal)


class Windows:
    """``steps`` BPTT windows over ``data``, cycling through it; each pass starts ``carrier``'s state afresh."""

    def __init__(self, data: torch.Tensor, steps: int, carrier: CarriedState):
        self.data, self.steps, self.carrier = data, steps, carrier

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        self.carrier.state = None
        step = 0
        while step < self.steps:
            for window in bptt_windows(self.data, BPTT):
                yield window
                step += 1
                if step >= self.steps:
                    return


def train_steps(
    model: LSTMLanguageModel,
    data: torch.Tensor,
    steps: int,
    lr: float,
    penalty: Callable[[], torch.Tensor] | None = None,
    every: int = 0,
    update: Callable[[], object] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> float:
    """``steps`` Adam steps of the library's ``train_epoch`` over BPTT windows (cycling), cosine LR,
    gradient norm clipped at 1; ``update()`` every ``every`` steps. Returns the training perplexity."""
    if steps < 1:
        return float("nan")
    carrier = CarriedState(model)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr)
    losses = train_epoch(
        carrier,
        Windows(data, steps, carrier),
        opt,
        lambda step: lr * 0.5 * (1 + math.cos(math.pi * step / steps)),
        0,
        penalty=penalty,
        after_step=(lambda step: update() if step % every == 0 else None) if update is not None and every else None,
        progress=False,
        loss_fn=lm_loss,
        max_grad_norm=1.0,
    )
    return math.exp(losses["loss"])


@torch.no_grad()
def perplexity(model: LSTMLanguageModel, data: torch.Tensor) -> float:
    model.eval()
    state, total, count = None, 0.0, 0
    for x, y in bptt_windows(data, BPTT):
        loss, state = model.nll(x, y, state)
        total += loss.item() * y.numel()
        count += y.numel()
    return math.exp(total / count)


def plan_for(method: str, rate: float) -> Plan:
    structure = (
        Unstructured(compression=rate) if method == "magnitude" else Block(compression=rate, block=(8, 1))
    )
    return Plan({"lstm": structure})


# Each method's registered driver and its options (the registry builds it: no branch per method).
DRIVERS = {
    "reweighted": ("reweighted", lambda args: {"penalty": args.lam}),
    "admm": ("admm", lambda args: {"rho": args.rho, "rho_growth": 1.3, "rho_max": 1.0}),
    "magnitude": ("gradual", lambda args: {}),
}


def compress(
    method: str, rate: float, dense: LSTMLanguageModel, train: torch.Tensor, valid: torch.Tensor, args
):
    """A pruned, mask-retrained copy of ``dense`` and its valid perplexity right after hard pruning."""
    model = copy.deepcopy(dense)
    prune_steps = int(args.prune_epochs * args.epoch_steps)
    retrain_steps = int(args.retrain_epochs * args.epoch_steps)
    if method == "dense":  # the control: the same extra training, nothing pruned
        train_steps(model, train, prune_steps, args.lr)
        midway = perplexity(model, valid)
        train_steps(model, train, retrain_steps, args.lr)
        return model, midway
    targets = plan_for(method, rate).resolve(model)
    every = max(1, args.epoch_steps // 4)
    name, options = DRIVERS[method]
    spec = get_driver(name)
    context = DriverContext(updates=max(1, prune_steps // every), steps_per_epoch=args.epoch_steps)
    driver = spec.cls.from_config(model, targets, spec.make_config(options(args)), context)
    opt = torch.optim.Adam(model.parameters(), args.lr)

    def update() -> None:
        held = driver.masks  # drivers that prune as they go (gradual) hand back new masks: re-attach them
        if held is not None:
            held.detach()
        driver.step()
        if driver.masks is not None:
            driver.masks.attach(model, opt)

    train_steps(model, train, prune_steps, args.lr, driver.penalty, every, update, optimizer=opt)
    if driver.masks is not None:
        driver.masks.detach()
    masks = driver.finalize()
    hard_pruned = perplexity(model, valid)
    opt = torch.optim.Adam(model.parameters(), args.lr)
    masks.attach(model, opt)
    train_steps(model, train, retrain_steps, args.lr, optimizer=opt)
    masks.detach()
    return model, hard_pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="*",
        default=["reweighted", "magnitude"],
        choices=["reweighted", "admm", "magnitude", "dense"],
    )
    parser.add_argument("--rates", type=float, nargs="+", default=[4, 10])
    parser.add_argument("--dense-epochs", type=float, default=1.5)
    parser.add_argument(
        "--more-dense-epochs", type=float, default=0.0, help="continue the cached dense model"
    )
    parser.add_argument("--prune-epochs", type=float, default=0.4)
    parser.add_argument("--retrain-epochs", type=float, default=0.4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lam", type=float, default=2e-5)
    parser.add_argument("--rho", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/lstm_ptb")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    results = Path(args.out) / "results.jsonl"
    if args.table:
        print_table(results)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    corpus = load_ptb()
    train, valid, test = batchify(corpus.train, BATCH), batchify(corpus.valid, 10), batchify(corpus.test, 10)
    args.epoch_steps = (train.shape[0] - 1 + BPTT - 1) // BPTT
    dense = make_model()
    path = Path(args.out) / "dense.safetensors"
    trained = Path(args.out) / "dense_epochs.txt"
    if path.is_file():
        dense.load_state_dict(load_file(path))
        if args.more_dense_epochs:  # a second run of <= 10 min continues training (cosine restarts)
            started = time.perf_counter()
            train_steps(dense, train, int(args.more_dense_epochs * args.epoch_steps), args.lr)
            save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, path)
            total = float(trained.read_text()) + args.more_dense_epochs
            trained.write_text(f"{total}")
            print(
                f"dense trained {args.more_dense_epochs} more epochs ({total} in all) in "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
    else:
        started = time.perf_counter()
        train_steps(dense, train, int(args.dense_epochs * args.epoch_steps), args.lr)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, path)
        trained.write_text(f"{args.dense_epochs}")
        print(
            f"dense trained {args.dense_epochs} epochs in {time.perf_counter() - started:.0f} s", flush=True
        )
    dense_ppl = {"valid": perplexity(dense, valid), "test": perplexity(dense, test)}
    print(f"dense perplexity: {dense_ppl}", flush=True)
    command = f"{MALLOC} python benchmarks/lstm_ptb.py {' '.join(sys.argv[1:])}"
    if not args.methods:  # dense only (e.g. to train and cache it in its own run)
        return
    for method in args.methods:
        for rate in [1] if method == "dense" else args.rates:
            started = time.perf_counter()
            model, hard_pruned = compress(method, rate, dense, train, valid, args)
            stats = measure(model, ["lstm"])
            record = {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                f"{args.threads} thread(s), load avg {os.getloadavg()[0]:.1f}",
                "method": method,
                "rate": rate,
                "compression": stats.overall_compression,
                "valid_ppl_hard_pruned": hard_pruned,
                "valid_ppl": perplexity(model, valid),
                "test_ppl": perplexity(model, test),
                "dense_valid_ppl": dense_ppl["valid"],
                "dense_test_ppl": dense_ppl["test"],
                "epochs": f"dense {trained.read_text()}, prune {args.prune_epochs}, "
                f"retrain {args.retrain_epochs}",
                "seconds": time.perf_counter() - started,
                "command": command,
            }
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    print_table(results)


def print_table(results: Path) -> None:
    rows = read_jsonl(results)
    print(
        "| method | target | LSTM compression | valid ppl hard-pruned | valid ppl | test ppl "
        "| dense valid / test | s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["method"], r["rate"])):
        print(
            f"| {r['method']} | {r['rate']:g}x | {r['compression']:.2f}x | {r['valid_ppl_hard_pruned']:.1f} "
            f"| {r['valid_ppl']:.1f} | {r['test_ppl']:.1f} "
            f"| {r['dense_valid_ppl']:.1f} / {r['dense_test_ppl']:.1f} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
