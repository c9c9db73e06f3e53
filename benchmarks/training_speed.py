"""Training-step speed of a CIFAR model on this CPU: float32 vs channels_last batches vs bf16 autocast.

Times one SGD step (forward, backward, update) of ResNet-20 on a 128-image batch under each setting,
interleaved over several rounds (median of rounds; ratios against float32 NCHW from the same run), and
prints the table with the command that reproduces it. The run config keys are ``channels_last: true`` and
``autocast: bf16`` (configs/resnet20_cifar_dense.yaml).

    python benchmarks/training_speed.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from admmcompress.models import create_model

SETTINGS = [("float32, NCHW", False, False), ("float32, channels_last", True, False),
            ("bf16 autocast, NCHW", False, True), ("bf16 autocast, channels_last", True, True)]


def step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, channels_last: bool, bf16: bool,
                 steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)  # batches only: weights stay contiguous
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    results: dict[str, list[float]] = {name: [] for name, *_ in SETTINGS}
    for _ in range(args.rounds):  # interleaved, so drift in machine load hits every setting alike
        for name, channels_last, bf16 in SETTINGS:
            results[name].append(step_seconds(model, x, y, channels_last, bf16, args.steps))
    base = statistics.median(results[SETTINGS[0][0]])
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s), {platform.processor() or platform.machine()}")
    print("| setting | ms / step (median of rounds) | speed-up vs float32 NCHW | epoch of 50k images |")
    print("|---|---|---|---|")
    for name, *_ in SETTINGS:
        t = statistics.median(results[name])
        print(f"| {name} | {t * 1e3:.0f} | {base / t:.2f}x | {t * 50000 / args.batch / 60:.1f} min |")
    print(f"rerun: python benchmarks/training_speed.py --model {args.model} --batch {args.batch} "
          f"--threads {args.threads} --rounds {args.rounds}")


if __name__ == "__main__":
    main()
