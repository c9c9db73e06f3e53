"""Review 48 of the hardware model: the ADC model's calibration and arguments, and the layout note of
`admmcompress hardware` when the flags map other tiles than the run pruned."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.hardware import CrossbarSpec
from admmcompress.hardware.adc import adc_quantization
from admmcompress.run_hardware import layout_note


class CalledTwice(nn.Module):
    """One Linear called twice per forward, the second time on 100x smaller inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fc(x) * 0.01)


def test_adc_full_scale_of_a_shared_layer_covers_every_call() -> None:
    """Set on the last call only, the full scale clipped the first call's partial sums even at 16 bits."""
    torch.manual_seed(0)
    model, x = CalledTwice(), torch.randn(64, 4)
    exact = model(x)
    first = model.fc(x).abs().max().item()
    with adc_quantization(model, 16, x, inputs_per_tile=4) as adc:
        out = model(x)
    assert adc.full_scale["fc"][0] >= first
    # one ADC step of the shared full scale (~3e-5) remains; clipped, the error was the size of the output
    assert (out - exact).abs().max().item() < 0.01 * exact.abs().max().item()


@pytest.mark.parametrize("inputs_per_tile", [0, -1, True])
def test_adc_inputs_per_tile_is_checked_in_one_line(inputs_per_tile: int) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"^adc_quantization: inputs_per_tile=.* must be a positive integer"):
        with adc_quantization(model, 8, torch.randn(2, 4), inputs_per_tile=inputs_per_tile):
            pass


def test_adc_restores_each_layers_own_mode() -> None:
    """A frozen BatchNorm (eval inside a training model) came back in training mode."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model.train()
    model[1].eval()
    with adc_quantization(model, 8, torch.randn(8, 4), inputs_per_tile=4):
        pass
    assert model.training and model[0].training and not model[1].training


class Attending(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.att(x, x, x)[0].mean(1))


def test_adc_names_a_mapped_layer_it_never_converted() -> None:
    """MultiheadAttention's out_proj never runs through its own forward: no ADC on it, and it was not named."""
    model, x = Attending(), torch.randn(4, 3, 8)
    with adc_quantization(model, 8, x, inputs_per_tile=4) as adc:
        model(x)
    assert adc.skipped == ["att.out_proj"] and sorted(adc.full_scale) == ["fc"]


def test_layout_note_when_the_tile_differs_from_the_runs() -> None:
    """README: a note says when the flags map other tiles than the run's rules pruned; --tile was not compared."""
    run = {"tile": (128, 128), "columns_per_weight": 8, "bits_per_cell": 2, "weight_bits": 8}
    note = layout_note(CrossbarSpec(rows=64, cols=64), run)
    assert note.startswith("Note: the run's crossbar_* rules pruned the blocks of 128x128 tiles") and "--tile" in note
    assert layout_note(CrossbarSpec(), run) == ""
    bits = layout_note(CrossbarSpec(bits_per_cell=1), run)
    assert bits.startswith("Note: the run's crossbar_* rules pruned tile blocks for 8 column(s) per weight, but")
