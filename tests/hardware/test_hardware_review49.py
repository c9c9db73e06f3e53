"""Review 49 of the hardware model: grouped convs mapped without their dense block-diagonal layout, the signed
scheme of a run's crossbar_* rules, and the ADC notes' reasons for a layer left exact."""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from admmcompress import Plan
from admmcompress.hardware import CrossbarSpec, map_model
from admmcompress.hardware.analysis import add_adc, analyze
from admmcompress.hardware.crossbar import GemmWeight, block_diagonal, map_blocks, map_matrix
from admmcompress.report.hardware import render_hardware
from admmcompress.run_hardware import add_arguments, layout_note, layout_of_run, signed_of_run, spec_from_args

# --- 1. grouped convs: counted from the blocks, equal to the dense block-diagonal layout's counts -------------------

GROUPED = [
    (nn.Conv2d, 12, 12, 3, 12),  # depthwise
    (nn.Conv2d, 12, 24, 3, 6),
    (nn.Conv1d, 9, 18, 5, 3),
    (nn.ConvTranspose2d, 8, 16, 3, 4),
    (nn.Conv2d, 32, 32, 7, 32),
]
SPECS = [
    CrossbarSpec(rows=16, cols=8, bits_per_cell=7, weight_bits=8),  # 4 outputs x 16 inputs a tile
    CrossbarSpec(rows=7, cols=9, bits_per_cell=4, weight_bits=4, signed="offset"),  # tiles off the group borders
    CrossbarSpec(rows=128, cols=128),
    CrossbarSpec(rows=3, cols=2, bits_per_cell=8, weight_bits=8, signed="offset"),  # one output a tile
]


def _dense_reference(name: str, blocks: torch.Tensor, spec: CrossbarSpec) -> dict:
    """What the old path gave: the block-diagonal layout built, mapped as a plain matrix; dense = the tiles the
    layout of all-ones blocks occupies."""
    reference = map_matrix(name, block_diagonal(blocks), spec).to_dict()
    reference["dense"] = map_matrix(name, block_diagonal(torch.ones_like(blocks)), spec).masked
    reference["groups"] = blocks.shape[0]
    return reference


@pytest.mark.parametrize("shape", GROUPED, ids=lambda s: f"{s[0].__name__}-{s[1]}x{s[2]}k{s[3]}g{s[4]}")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.rows}x{s.cols}-{s.signed}")
@pytest.mark.parametrize("pruning", ["none", "weights", "outputs", "inputs", "all"])
def test_a_grouped_convs_tiles_equal_those_of_its_dense_layout(shape, spec: CrossbarSpec, pruning: str) -> None:
    kind, cin, cout, k, groups = shape
    torch.manual_seed(0)
    conv = kind(cin, cout, k, groups=groups)
    gemm = GemmWeight("c", conv)
    blocks = gemm.blocks().clone()
    if pruning == "weights":
        blocks[torch.rand_like(blocks) < 0.7] = 0
    elif pruning == "outputs":
        blocks[torch.rand(blocks.shape[:2]) < 0.5] = 0
    elif pruning == "inputs":
        blocks.transpose(1, 2)[torch.rand(blocks.shape[0], blocks.shape[2]) < 0.5] = 0
    elif pruning == "all":
        blocks.zero_()
    with torch.no_grad():
        conv.weight.copy_(gemm.weight_of(blocks))
    reference = _dense_reference("0", blocks, spec)
    assert map_blocks("0", blocks, spec).to_dict() == reference
    assert map_matrix("0", block_diagonal(blocks), spec, groups=groups).to_dict() == reference
    assert map_model(nn.Sequential(conv), spec).layers[0].to_dict() == reference
    baseline = map_model(nn.Sequential(conv), spec, dense=True).layers[0]
    assert baseline.masked == baseline.dense == reference["dense"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: map_matrix("m", torch.ones(5, 6), CrossbarSpec(), groups=2), "does not split into 2 diagonal blocks"),
        (lambda: map_matrix("m", torch.ones(4, 6), CrossbarSpec(), groups=2), "nonzero weights off its 2 diagonal"),
        (lambda: map_blocks("m", torch.ones(4, 6), CrossbarSpec()), r"blocks of shape \(4, 6\); give \(groups,"),
    ],
)
def test_a_matrix_that_is_not_a_block_diagonal_layout_is_refused_in_one_line(call, message: str) -> None:
    """Counted from its diagonal blocks, a matrix with weights elsewhere would lose them from the counts."""
    with pytest.raises(ValueError, match=message) as caught:
        call()
    assert "\n" not in str(caught.value)


def _depthwise_tiles(channels: int, kernel: int, spec: CrossbarSpec) -> int:
    """Tiles of a depthwise conv's layout, worked out: tile row r holds channels [r * out, (r + 1) * out), whose
    inputs are the consecutive columns [r * out * kernel, (r + 1) * out * kernel)."""
    out_t, in_t = spec.outputs_per_tile, spec.inputs_per_tile
    tiles = 0
    for row in range(math.ceil(channels / out_t)):
        first, last = row * out_t * kernel, min((row + 1) * out_t, channels) * kernel - 1
        tiles += last // in_t - first // in_t + 1
    return tiles


def test_a_large_depthwise_conv_is_mapped_without_its_block_diagonal_layout(monkeypatch) -> None:
    """4096 channels, 7x7: its layout would be 4096 x 200,704 floats (3.3 GB); a 768-channel one took 0.8 GB."""
    channels, kernel = 4096, 7
    conv = nn.Conv2d(channels, channels, kernel, groups=channels, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)

    def refuse(*args, **kwargs):
        raise AssertionError("the mapping built a dense block-diagonal layout")

    monkeypatch.setattr(torch, "block_diag", refuse)
    spec = CrossbarSpec()
    expected = _depthwise_tiles(channels, kernel * kernel, spec)
    layer = map_model(nn.Sequential(conv), spec).layers[0]
    assert (layer.dense, layer.masked, layer.compact) == (expected, expected, expected)
    assert layer.nonzero == conv.weight.numel() and layer.groups == channels
    assert map_model(nn.Sequential(conv), spec, dense=True).total("dense") == expected


# --- 2. the signed scheme of a run: its crossbar_* rules hold the weight columns of an offset tile ---------------


def _run_layout(chip: CrossbarSpec, conductance: bool) -> dict:
    rules = [{"match": "0", "structure": "crossbar_tile", "sparsity": 0.5, **chip.structure_options()}]
    if conductance:  # its weight levels: bits_per_cell x cells + 1 (sign) = the chip's weight bits
        cells = (chip.weight_bits - 1) // chip.bits_per_cell
        rules.append({"match": "0", "structure": "conductance", "bits": chip.bits_per_cell, "cells": cells})
    return layout_of_run([SimpleNamespace(plan=Plan.from_dict({"rules": rules}))])


def _spec(flags: list[str], layout: dict) -> CrossbarSpec:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return spec_from_args(parser.parse_args(["runs/x", *flags]), layout)


CHIPS = [
    CrossbarSpec(rows=128, cols=128, bits_per_cell=2, weight_bits=5, signed="offset"),
    CrossbarSpec(rows=64, cols=32, bits_per_cell=1, weight_bits=4, signed="offset"),
    CrossbarSpec(rows=128, cols=128, bits_per_cell=2, weight_bits=5, signed="differential"),
]


@pytest.mark.parametrize("chip", CHIPS, ids=lambda c: f"{c.rows}x{c.cols}-{c.signed}")
@pytest.mark.parametrize("flags", [[], ["--signed", "{signed}"]], ids=["no-flag", "signed-flag"])
def test_a_run_is_costed_on_the_tile_and_scheme_it_was_pruned_for(chip: CrossbarSpec, flags: list[str]) -> None:
    """An offset run's rules hold rows x (cols - 1): that was taken as the tile itself, one column short."""
    layout = _run_layout(chip, conductance=True)
    spec = _spec([flag.format(signed=chip.signed) for flag in flags], layout)
    assert (spec.rows, spec.cols, spec.signed) == (chip.rows, chip.cols, chip.signed)
    assert spec.structure_options() == chip.structure_options() and layout_note(spec, layout) == ""


def test_an_offset_run_at_unstated_bits_gets_its_tile_once_the_scheme_is_named() -> None:
    """Without a conductance rule the bits are the defaults, which cannot tell the schemes apart: the note names
    --signed offset, and with it the tile is the chip's."""
    chip = CrossbarSpec(signed="offset")
    layout = _run_layout(chip, conductance=False)
    note = layout_note(_spec([], layout), layout)
    assert note.startswith("Note: the run's crossbar_* rules pruned tile blocks for") and "--signed offset" in note
    spec = _spec(["--signed", "offset"], layout)
    assert (spec.rows, spec.cols, spec.signed) == (chip.rows, chip.cols, "offset")
    assert layout_note(spec, layout) == ""


def test_the_scheme_is_not_guessed_when_both_take_the_rules_columns() -> None:
    """1-bit cells, 2-bit weights: a differential pair and an offset cell both take 2 columns per weight."""
    pair, offset = CrossbarSpec(bits_per_cell=1, weight_bits=2), CrossbarSpec(bits_per_cell=1, weight_bits=2,
                                                                               signed="offset")
    assert pair.columns_per_weight == offset.columns_per_weight
    assert signed_of_run({"columns_per_weight": pair.columns_per_weight}, 1, 2) is None
    assert signed_of_run({}, 2, 8) is None


# --- 3. the ADC notes say why each layer was left exact ----------------------------------------------------------


class WithUnused(nn.Module):
    """A covered Linear never called, a Conv1d (a kind the ADC model does not cover) and a called Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.unused = nn.Linear(8, 3)
        self.conv = nn.Conv1d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.conv(x[:, None, :]).sum(dim=(1, 2)).unsqueeze(1)


def test_the_adc_note_on_other_kinds_does_not_list_an_uncalled_linear() -> None:
    torch.manual_seed(0)
    model, x = WithUnused(), torch.randn(6, 8)
    result = add_adc(analyze(model, CrossbarSpec(), x[:1], pim_bits=()), model, lambda m: 50.0, [6], x)
    assert result.adc_exact == ["unused", "conv"] and result.adc_uncalled == ["unused"]
    lines = render_hardware(result).splitlines()
    kinds = [line for line in lines if "covers Linear and ungrouped zero-padded Conv2d layers" in line]
    uncalled = [line for line in lines if "never ran through their own forward" in line]
    assert len(kinds) == 1 and kinds[0].endswith("left exact (no ADC on their partial sums): 'conv'")
    assert len(uncalled) == 1 and uncalled[0].endswith("left exact (no ADC on their partial sums): 'unused'")
    assert result.to_dict()["adc_uncalled"] == ["unused"]
