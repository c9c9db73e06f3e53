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
import itertools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, default_collate

from admmcompress.data.files import Split
from admmcompress.hardware.analysis import HardwareAnalysis, add_adc, add_variation, analyze
from admmcompress.hardware.crossbar import MAX_ADC_BITS, MAX_TILE, RESERVED_COLUMNS, SIGNED, CrossbarSpec
from admmcompress.hardware.noise import MAX_SIGMA, DeviceNoise
from admmcompress.messages import first_line
from admmcompress.plugins import TRUST_FLAG, TRUST_HELP
from admmcompress.train.lock import RunLocked, check_unlocked, holder_pid

MAX_WEIGHT_BITS = 16  # as CrossbarSpec and analyze() allow
MAX_ACT_BITS = 32  # bit-serial input cycles per read: more is no activation format anyone uses
MAX_DRAWS = 1000  # each draw is one pass over the test data
MAX_SEED = 2**63 - 1  # as `admmcompress run --seed`; seed + draw index stays within torch's seed range


def _tile(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(1 <= v <= MAX_TILE for v in values):
        raise argparse.ArgumentTypeError(
            f"--tile {text!r}: give one size (128) or ROWSxCOLS (128x64), each in [1, {MAX_TILE}]"
        )
    return values[0], values[1]


def _int_in(flag: str, low: int, high: int | None, example: int) -> Callable[[str], int]:
    """An argparse ``type`` that takes an integer in ``[low, high]`` (no upper bound when ``high`` is None)."""
    span = f"in [{low}, {high}]" if high is not None else f">= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: give an integer {span}, e.g. {flag} {example}")
        return value

    return parse


def _float_in(flag: str, low: float, high: float, example: float) -> Callable[[str], float]:
    """An argparse ``type`` that takes a number in ``[low, high]`` (NaN and inf refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # NaN fails the comparison too
            raise argparse.ArgumentTypeError(
                f"{flag} {text!r}: give a number in [{low:g}, {high:g}], e.g. {flag} {example}"
            )
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hardware`` subcommand's flags; every number is checked against its range here, before the run loads."""
    parser.add_argument("dir", help="a finished run folder (the --out of `admmcompress run`)")
    parser.add_argument("--tile", type=_tile, default=None,
                        help="crossbar size: 128 or ROWSxCOLS (default: the run's crossbar_* tile, else 128)")
    parser.add_argument("--bits-per-cell", type=_int_in("--bits-per-cell", 1, 8, 2), default=None,
                        help="bits per memristor cell (default: the run's conductance bits, else 2)")
    parser.add_argument("--weight-bits", type=_int_in("--weight-bits", 1, MAX_WEIGHT_BITS, 8), default=None,
                        help="weight bits, sign included (default: the run's conductance levels, else 8)")
    parser.add_argument("--signed", choices=SIGNED, default=None,
                        help="signed weights: a differential pair or one cell + an offset column per tile (default: "
                             "the scheme the run's crossbar_* rules were laid out for, else differential)")
    parser.add_argument("--adc-bits", type=_int_in("--adc-bits", 1, MAX_ADC_BITS, 8), default=8,
                        help="ADC resolution in the cost model (default 8)")
    parser.add_argument("--act-bits", type=_int_in("--act-bits", 1, MAX_ACT_BITS, 8), default=8,
                        help="input bits, fed bit-serially (default 8)")
    parser.add_argument("--baseline-bits", type=_int_in("--baseline-bits", 1, MAX_WEIGHT_BITS, 16), default=16,
                        help="bits of the unpruned reference (16)")
    parser.add_argument("--pim-bits", type=_int_in("--pim-bits", 1, MAX_WEIGHT_BITS, 2), nargs="*",
                        default=[1, 2, 3, 4], help="SOT-MRAM weight bits")
    parser.add_argument("--variation", type=_float_in("--variation", 0.0, MAX_SIGMA, 0.1), nargs="*", default=[],
                        help="log-normal sigmas, e.g. 0.05 0.1")
    parser.add_argument("--stuck-on", type=_float_in("--stuck-on", 0.0, 1.0, 0.001), default=0.0,
                        help="stuck-at-on probability per cell")
    parser.add_argument("--stuck-off", type=_float_in("--stuck-off", 0.0, 1.0, 0.001), default=0.0,
                        help="stuck-at-off probability per cell")
    parser.add_argument("--draws", type=_int_in("--draws", 1, MAX_DRAWS, 5), default=5,
                        help="Monte-Carlo draws per noise setting (default 5)")
    parser.add_argument("--seed", type=_int_in("--seed", 0, MAX_SEED, 1), default=0, help="seed of the first draw")
    parser.add_argument("--adc-sweep", type=_int_in("--adc-sweep", 2, MAX_ADC_BITS, 6), nargs="*", default=[],
                        help="ADC bits to evaluate accuracy at")
    parser.add_argument("--samples", type=_int_in("--samples", 1, None, 500),
                        help="evaluate on N test samples only (a seeded draw)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write hardware.md/.png")
    parser.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)


def sample(split: Split | Dataset, n: int | None, seed: int = 0) -> Split:
    """``n`` samples of a dataset split drawn without replacement by a seeded permutation (test files are
    often sorted by class, so the first ``n`` would be one class); the whole split when ``n`` is None. A torch
    ``Dataset`` of ``(input, class)`` items (a run's own, by import path) is read into a :class:`Split` of the
    samples drawn; an ``IterableDataset`` gives its first ``n``.

    >>> part = sample(Split(torch.arange(10.0).view(10, 1), torch.arange(10)), 4, seed=0)
    >>> len(part), bool((part.x.view(-1) == part.y).all())
    (4, True)
    """
    if n is not None and n < 1:
        raise ValueError(f"--samples {n}: give a positive number of test samples")
    if not isinstance(split, Split):
        return _read_samples(split, n, seed)
    if n is None or n >= len(split.y):
        return split
    index = torch.randperm(len(split.y), generator=torch.Generator().manual_seed(seed))[:n]
    return dataclasses.replace(split, x=split.x[index], y=split.y[index])


def _read_samples(dataset: Dataset, n: int | None, seed: int) -> Split:
    """The drawn items of a torch Dataset as one in-memory Split (the analysis evaluates it many times over),
    collated as a DataLoader would (numpy arrays and numbers become tensors)."""
    if isinstance(dataset, IterableDataset):
        if n is None:  # a stream may not end: reading it whole could never return
            raise ValueError("the run's test dataset is an IterableDataset: give --samples N to read its first N items")
        items = list(itertools.islice(iter(dataset), n))
    else:
        size = len(dataset)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
        items = [dataset[int(i)] for i in order[: size if n is None else n]]
    if not items:
        raise ValueError("the run's test dataset is empty: the hardware analysis needs test samples to evaluate")
    try:
        batch = default_collate(items)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"the run's test items do not collate into one batch ({first_line(err)}); use the hardware "
                         "package's functions (analyze, add_variation) with your own evaluation") from None
    x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) and len(batch) >= 2 else (batch, None)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or y.dim() != 1 \
            or y.is_floating_point():
        raise ValueError(f"the run's test dataset gives {type(items[0]).__name__} items that are not (input, class) "
                         "pairs; admmcompress hardware measures accuracy on those: use the hardware package's "
                         "functions (analyze, add_variation) with your own evaluation")
    return Split(x, y)


DEFAULT_LAYOUT = {"tile": (128, 128), "bits_per_cell": 2, "weight_bits": 8}


def spec_from_args(args: argparse.Namespace, run_layout: dict | None = None) -> CrossbarSpec:
    """The crossbar spec the flags describe; a flag not given takes the run's own layout (``layout_of_run``), then
    the defaults (one-line ``ValueError`` on a bad combination).

    The run's ``tile`` is the block its crossbar_* rules pruned, the weight columns of a tile
    (:meth:`CrossbarSpec.structure_options`): the offset scheme's tile has one reference column more.
    """
    layout = run_layout or {}
    chosen = {key: getattr(args, key) if getattr(args, key, None) is not None else layout.get(key, default)
              for key, default in DEFAULT_LAYOUT.items()}
    # the run's bits (its conductance rules) or the flags' tell its scheme apart; the default bits do not
    stated = all(getattr(args, key, None) is not None or key in layout for key in ("bits_per_cell", "weight_bits"))
    inferred = signed_of_run(layout, chosen["bits_per_cell"], chosen["weight_bits"]) if stated else None
    signed = getattr(args, "signed", None) or inferred or "differential"
    rows, cols = chosen["tile"]
    if getattr(args, "tile", None) is None and "tile" in layout:
        cols += RESERVED_COLUMNS[signed]
    return CrossbarSpec(rows, cols, chosen["bits_per_cell"], chosen["weight_bits"], signed, adc_bits=args.adc_bits)


def signed_of_run(run_layout: dict | None, bits_per_cell: int, weight_bits: int) -> str | None:
    """The signed scheme the run's crossbar_* rules were laid out for: the one that, at these bits, takes the
    rules' columns per weight; None when the rules state none, or both schemes or neither take that many.

    >>> signed_of_run({"columns_per_weight": 3}, 2, 5), signed_of_run({"columns_per_weight": 4}, 2, 5)
    ('offset', 'differential')
    """
    wanted = (run_layout or {}).get("columns_per_weight")
    fits = [signed for signed in SIGNED if _columns_per_weight(bits_per_cell, weight_bits, signed) == wanted]
    return fits[0] if wanted is not None and len(fits) == 1 else None


def _columns_per_weight(bits_per_cell: int, weight_bits: int, signed: str) -> int | None:
    """Columns one weight takes in a scheme (None for bits no spec takes: the spec itself then says why)."""
    try:
        return CrossbarSpec(1, MAX_TILE, bits_per_cell, weight_bits, signed).columns_per_weight
    except ValueError:
        return None


def layout_of_run(stages: list) -> dict:
    """The crossbar layout a run trained for, read from its plans (the last rule that states each wins): a
    ``conductance`` rule's ``bits`` per cell and ``bits x cells + 1`` weight bits (sign included), a
    ``crossbar_*`` rule's tile. Without them the command costed a default 8-bit chip, not the one the run was
    compressed for (a review's finding: 92 tiles where the run's own layout needs 48). The run does not record
    its signed scheme: :func:`spec_from_args` tells it from ``columns_per_weight`` (:func:`signed_of_run`)."""
    found: dict = {}
    for stage in stages:
        for rule in getattr(stage.plan, "rules", []):
            structure = rule.structure
            if structure.kind == "conductance":
                found["bits_per_cell"] = structure.bits
                found["weight_bits"] = structure.bits * structure.cells + 1
            elif structure.kind.startswith("crossbar_") and getattr(structure, "tile", None):
                found["tile"] = tuple(structure.tile)
                found["columns_per_weight"] = structure.columns_per_weight
    return found


def layout_note(spec: CrossbarSpec, run_layout: dict | None) -> str:
    """A line where the costed mapping's tile blocks differ from those the run's crossbar_* rules pruned ("")."""
    layout = run_layout or {}
    wanted = layout.get("columns_per_weight")
    if wanted is None:
        return ""
    fix = "so its tiles do not line up with the pruned blocks; pass the {} the run was trained for{}.\n\n"
    if wanted != spec.columns_per_weight:
        other = signed_of_run(layout, spec.bits_per_cell, spec.weight_bits)
        # the run records no scheme, and at bits it does not state an offset run is not told apart: name the flag
        hint = f" (or --signed {other}: at these bits it takes {wanted})" if other not in (None, spec.signed) else ""
        return (f"Note: the run's crossbar_* rules pruned tile blocks for {wanted} column(s) per weight, but this "
                f"mapping takes {spec.columns_per_weight} ({spec.describe().split(' (')[0]}), "
                + fix.format("--weight-bits / --bits-per-cell", hint))
    # The pruned blocks are rows x (cols // columns per weight) of the rule's tile: another --tile misaligns them as
    # surely as other bits do (only the bits were compared, so --tile 64 on a run pruned at 128 said nothing)
    tile, ours = tuple(layout.get("tile", ())), tuple(spec.structure_options()["tile"])
    if tile and tile != ours:
        return (f"Note: the run's crossbar_* rules pruned the blocks of {tile[0]}x{tile[1]} tiles, but this mapping "
                f"takes {ours[0]}x{ours[1]} cells of each tile for weights ({spec.describe().split(' (')[0]}), "
                + fix.format("--tile", ""))
    return ""


# Training inputs the ADC full scales are calibrated on (the model's own inputs, not the evaluated test inputs).
ADC_CALIBRATION = 256


def run_command(
    args: argparse.Namespace,
    model: nn.Module,
    example: torch.Tensor,
    evaluate: Callable[[nn.Module], float],
    title: str,
    run_layout: dict | None = None,
) -> str:
    """Analyze ``model`` as the flags say (a flag not given: the run's ``run_layout``); returns the markdown (also
    saved in the run folder unless --no-save)."""
    from admmcompress.report.hardware import render_hardware

    spec = spec_from_args(args, run_layout)
    if not args.no_save:  # a folder it could not save into: refused before minutes of analysis
        if not os.access(args.dir, os.W_OK | os.X_OK):
            raise ValueError(f"'{args.dir}' is read-only for this user, so hardware.md/.png cannot be written there; "
                             "make it writable or pass --no-save to print the analysis only")
        check_unlocked(args.dir, SAVE_REFUSED)
    result = analyze(model, spec, example[:1], args.baseline_bits, args.act_bits, tuple(args.pim_bits))
    noises = [DeviceNoise(sigma, args.stuck_on, args.stuck_off) for sigma in args.variation]
    if not noises and (args.stuck_on or args.stuck_off):
        noises = [DeviceNoise(0.0, args.stuck_on, args.stuck_off)]
    if noises:
        add_variation(result, model, evaluate, noises, args.draws, args.seed)
    if args.adc_sweep:
        add_adc(result, model, evaluate, args.adc_sweep, example)
    note = layout_note(spec, run_layout)
    if args.no_save:
        return note + render_hardware(result, title)
    return note + render_hardware(result, title) + _save(result, Path(args.dir), title)


SAVE_REFUSED = "hardware writes hardware.md/.png there, so run it once it has ended, or pass --no-save"


def _save(result: HardwareAnalysis, folder: Path, title: str) -> str:
    """Write hardware.md/.png into the run folder holding its lock, after removing what a killed ``hardware`` left
    of them; the line naming them. A command that took the folder during the analysis (a run, a report) keeps it:
    the analysis is then printed only, with a note, rather than lost."""
    from admmcompress.command_locks import clean_leftovers, hold_run_folder, say_removed
    from admmcompress.report.hardware import save_hardware

    try:
        with hold_run_folder(folder, SAVE_REFUSED, elsewhere="pass --no-save"):
            say_removed(clean_leftovers(folder, targets=["hardware.md", "hardware.png"]), folder)
            md, png = save_hardware(result, folder, title)
    except RunLocked:
        pid = holder_pid(folder)
        print(f"admmcompress: note: another admmcompress command{f' (pid {pid})' if pid else ''} "
              f"took '{folder}' during the analysis, so hardware.md/.png were not saved; printed only: rerun once it "
              "has ended", file=sys.stderr)
        return ""
    return f"\nwritten: {md}, {png}\n"


__all__ = [
    "add_arguments", "layout_of_run", "layout_note", "run_command", "sample", "signed_of_run", "spec_from_args",
]
