"""``admmcompress hardware RUN_DIR [--tile 128 --bits-per-cell 2 --variation 0.1 ...]``: flags and the work.

The CLI (an entry module) only loads the finished run and its test data and hands them here; this module
builds the spec from the flags, runs :func:`admmcompress.hardware.analyze` (plus Monte-Carlo variation and
ADC sweeps when asked), and writes ``hardware.md`` / ``hardware.png`` into the run folder.

>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_arguments(parser)
>>> spec_from_args(parser.parse_args(["runs/x", "--tile", "64x32", "--bits-per-cell", "1"])).describe()[:26]
'64x32 tiles, 1 bit(s)/cell'
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from admmcompress.hardware.analysis import add_adc, add_variation, analyze
from admmcompress.hardware.crossbar import CrossbarSpec
from admmcompress.hardware.noise import DeviceNoise


def _tile(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--tile {text!r}: give one size (128) or ROWSxCOLS (128x64)")
    return values[0], values[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hardware`` subcommand's flags."""
    parser.add_argument("dir", help="a finished run folder (the --out of `admmcompress run`)")
    parser.add_argument("--tile", type=_tile, default=(128, 128), help="crossbar size: 128 or ROWSxCOLS")
    parser.add_argument("--bits-per-cell", type=int, default=2, help="bits per memristor cell (default 2)")
    parser.add_argument("--weight-bits", type=int, default=8, help="weight bits, sign included (default 8)")
    parser.add_argument("--signed", choices=("differential", "offset"), default="differential")
    parser.add_argument("--adc-bits", type=int, default=8, help="ADC resolution in the cost model (default 8)")
    parser.add_argument("--act-bits", type=int, default=8, help="input bits, fed bit-serially (default 8)")
    parser.add_argument("--baseline-bits", type=int, default=16, help="bits of the unpruned reference (16)")
    parser.add_argument("--pim-bits", type=int, nargs="*", default=[1, 2, 3, 4], help="SOT-MRAM weight bits")
    parser.add_argument("--variation", type=float, nargs="*", default=[], help="log-normal sigmas, e.g. 0.05 0.1")
    parser.add_argument("--stuck-on", type=float, default=0.0, help="stuck-at-on probability per cell")
    parser.add_argument("--stuck-off", type=float, default=0.0, help="stuck-at-off probability per cell")
    parser.add_argument("--draws", type=int, default=5, help="Monte-Carlo draws per noise setting (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first draw")
    parser.add_argument("--adc-sweep", type=int, nargs="*", default=[], help="ADC bits to evaluate accuracy at")
    parser.add_argument("--samples", type=int, help="evaluate on the first N test samples only")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write hardware.md/.png")


def sample(split: Any, n: int | None, seed: int = 0) -> Any:
    """``n`` samples of a dataset split drawn without replacement by a seeded permutation (test files are
    often sorted by class, so the first ``n`` would be one class); the whole split when ``n`` is None.

    >>> from admmcompress.data.files import Split
    >>> part = sample(Split(torch.arange(10.0).view(10, 1), torch.arange(10)), 4, seed=0)
    >>> len(part), bool((part.x.view(-1) == part.y).all())
    (4, True)
    """
    if n is None or n >= len(split.y):
        return split
    if n < 1:
        raise ValueError(f"--samples {n}: give a positive number of test samples")
    index = torch.randperm(len(split.y), generator=torch.Generator().manual_seed(seed))[:n]
    return dataclasses.replace(split, x=split.x[index], y=split.y[index])


def spec_from_args(args: argparse.Namespace) -> CrossbarSpec:
    """The crossbar spec the flags describe (one-line ``ValueError`` on a bad combination)."""
    rows, cols = args.tile
    return CrossbarSpec(rows, cols, args.bits_per_cell, args.weight_bits, args.signed, adc_bits=args.adc_bits)


def run_command(
    args: argparse.Namespace,
    model: nn.Module,
    example: torch.Tensor,
    evaluate: Callable[[nn.Module], float],
    title: str,
) -> str:
    """Analyze ``model`` as the flags say; returns the markdown (also saved in the run folder unless --no-save)."""
    from admmcompress.report.hardware import render_hardware, save_hardware

    spec = spec_from_args(args)
    result = analyze(model, spec, example[:1], args.baseline_bits, args.act_bits, tuple(args.pim_bits))
    noises = [DeviceNoise(sigma, args.stuck_on, args.stuck_off) for sigma in args.variation]
    if not noises and (args.stuck_on or args.stuck_off):
        noises = [DeviceNoise(0.0, args.stuck_on, args.stuck_off)]
    if noises:
        add_variation(result, model, evaluate, noises, args.draws, args.seed)
    if args.adc_sweep:
        add_adc(result, model, evaluate, args.adc_sweep, example)
    if args.no_save:
        return render_hardware(result, title)
    md, png = save_hardware(result, Path(args.dir), title)
    return render_hardware(result, title) + f"\nwritten: {md}, {png}\n"


__all__ = ["add_arguments", "run_command", "sample", "spec_from_args"]
