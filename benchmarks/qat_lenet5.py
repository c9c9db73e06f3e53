"""LeNet-5 / MNIST: ADMM quantization vs PyTorch's own quantization-aware training, same bits, same budget.

Both start from the same dense checkpoint, quantize the weights of every layer (first and last
included) to ``b`` bits per tensor, and get the same number of epochs on the same data:

- **torch.ao QAT**: a ``torch.ao.quantization.FakeQuantize`` (per-tensor symmetric, ``2^b`` integer
  levels ``-2^(b-1) .. 2^(b-1)-1``, moving-average min/max observer) attached to each weight as a
  parametrization, trained with the straight-through estimator; evaluated with the fake-quantized
  weights (activations stay float, as in ours).
- **ADMM** (admmcompress): ``fixed_point`` with ``b`` bits (``2^b`` levels ``q*{+-1..+-2^(b-1)}``,
  interval chosen exactly), ADMM for all but the last epoch, hard quantization, one epoch of retraining
  with the values held, or (third column) with the quantized weights trained by the straight-through
  estimator on their levels (``quantized_weights: ste``).

    python benchmarks/qat_lenet5.py --pretrained checkpoints/lenet5_mnist_dense.safetensors --bits 4 2
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parents[1]


def fake_quant(bits: int) -> nn.Module:
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    return FakeQuantize(
        observer=MovingAverageMinMaxObserver,
        quant_min=-(2 ** (bits - 1)),
        quant_max=2 ** (bits - 1) - 1,
        dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric,
    )


def torch_qat(model: nn.Module, bits: int, train, test, epochs: int, seed: int) -> tuple[float, float]:
    from admmcompress.data.datasets import BatchLoader
    from admmcompress.train.loop import evaluate, train_epoch

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(module, "weight", fake_quant(bits))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = BatchLoader(train, 64, shuffle=True, seed=seed)
    steps = epochs * len(loader)

    def lr_at(step: int) -> float:  # cosine, as our retraining phases (float32 cosine: as measured before)
        return 1e-3 * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi)).item())

    started = time.perf_counter()
    for epoch in range(epochs):
        train_epoch(model, loader, optimizer, lr_at, epoch * len(loader), progress=False)
    return evaluate(model, test), time.perf_counter() - started


def admm_quant(
    model: nn.Module, bits: int, train, test, epochs: int, seed: int, quantized_weights: str = "hold"
) -> tuple[float, float]:
    from admmcompress import Plan, compress

    rules = [{"type": t, "structure": "fixed_point", "bits": bits} for t in ("Conv2d", "Linear")]
    plan = Plan.from_dict(rules)
    started = time.perf_counter()
    admm = {"epochs": epochs - 1, "update_every_steps": 80, "rho": 1e-3, "lr_schedule": "admm_reset"}
    retrain = {"epochs": 1, "quantized_weights": quantized_weights}
    result = compress(model, plan, train, test, admm=admm, retrain=retrain, seed=seed, progress="epochs")
    return result.metrics["accuracy_after"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrained", default=str(ROOT / "checkpoints" / "lenet5_mnist_dense.safetensors"))
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=15000)
    parser.add_argument("--test-limit", type=int, default=None)
    args = parser.parse_args()
    from admmcompress.data import load_dataset
    from admmcompress.models import create_model
    from admmcompress.train import checkpoint as ckpt
    from admmcompress.train.loop import evaluate

    torch.set_num_threads(2)
    train = load_dataset("mnist", "train", limit=args.train_limit)
    test = load_dataset("mnist", "test", limit=args.test_limit)

    def dense() -> nn.Module:
        model = create_model("lenet5", dropout=0.5)
        ckpt.load_weights(model, args.pretrained)
        return model

    print(f"dense top-1: {evaluate(dense(), test):.2f}%  ({args.epochs} epochs on {len(train)} images each)")
    print("| bits | torch.ao QAT (fake-quant, STE) | ADMM fixed_point | ADMM + STE retrain | "
          "time QAT / ADMM / ADMM + STE |")
    print("|---:|---:|---:|---:|---:|")
    for bits in args.bits:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qat, t_qat = torch_qat(dense(), bits, train, test, args.epochs, seed=0)
            torch.manual_seed(0)
            ours, t_ours = admm_quant(dense(), bits, train, test, args.epochs, seed=0)
            torch.manual_seed(0)
            ste, t_ste = admm_quant(dense(), bits, train, test, args.epochs, seed=0, quantized_weights="ste")
        print(f"| {bits} | {qat:.2f}% | {ours:.2f}% | {ste:.2f}% | {t_qat:.0f} s / {t_ours:.0f} s / {t_ste:.0f} s |",
              flush=True)


if __name__ == "__main__":
    main()
