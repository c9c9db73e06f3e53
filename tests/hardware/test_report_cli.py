"""The hardware report ('modelled' on every cost figure, constants printed, plot written) and the CLI
end to end: a tiny run with the variation-aware driver and crossbar structures, then `admmcompress hardware`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from admmcompress.cli import main
from admmcompress.hardware import CrossbarSpec, DeviceNoise, add_adc, add_variation, analyze
from admmcompress.report.hardware import plot_hardware, render_hardware

COST_WORDS = ("area", "power", "energy", "latency")


def assert_every_cost_figure_is_modelled(text: str) -> None:
    """Every table column naming a cost (area, power, energy, latency) says "modelled", and so does every
    sentence that states a modelled reduction; returns nothing, fails naming the first unlabelled one."""
    lines = text.splitlines()
    headers = [line for line, below in zip(lines, lines[1:], strict=False) if below.startswith("|---")]
    assert headers, "no tables found"
    for header in headers:
        for cell in (c.strip() for c in header.strip("|").split("|")):
            if any(w in cell for w in COST_WORDS):
                assert "modelled" in cell, f"column '{cell}' is not labelled modelled"
    for line in lines:
        if line.startswith(("Compacted", "SOT-MRAM", "Where the area", "Accuracy under", "Accuracy vs")):
            assert "modelled" in line, line


def test_report_labels_every_modelled_figure_and_prints_its_constants(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 40), torch.nn.ReLU(), torch.nn.Linear(40, 10))
    with torch.no_grad():
        model[0].weight[:, 150:] = 0.0
    x = torch.randn(20, 300)
    result = analyze(model, CrossbarSpec(), x[:1], pim_bits=(1, 4))
    add_variation(result, model, lambda m: float(m(x).argmax(1).eq(0).float().mean() * 100),
                  [DeviceNoise(sigma=0.1)], draws=2)
    add_adc(result, model, lambda m: 50.0, [4, 8], x)
    text = render_hardware(result, "Hardware: toy")
    assert text.startswith("## Hardware: toy (modelled")
    assert_every_cost_figure_is_modelled(text)
    assert "| CrossbarConstants.adc_area | 1200 | um^2 | ISAAC" in text
    assert "| PIMConstants.cell_area | 0.12 | um^2 |" in text
    assert "| 1 | " in text and "| 4 | " in text  # SOT-MRAM rows for 1 and 4 bits
    assert "Accuracy vs ADC resolution (modelled ADC" in text
    assert result.to_dict()["modelled"] is True
    png = plot_hardware(result, tmp_path / "hw.png")
    assert png.stat().st_size > 1000


@pytest.fixture(scope="module")
def crossbar_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hw")
    spec = {
        "name": "tiny_crossbar",
        "seed": 1,
        "threads": 1,
        "plugins": ["admmcompress.hardware.variation"],
        "model": {"name": "lenet300100"},
        "data": {"dataset": "mnist", "batch_size": 64, "train_limit": 256, "test_limit": 100},
        "pretrain": {"epochs": 1},
        "stages": [{
            "plan": {"rules": [
                {"match": "fc1", "structure": "crossbar_tile", "sparsity": 0.5, "tile": [128, 128],
                 "columns_per_weight": 8},
                {"match": "fc*", "structure": "conductance", "bits": 2},
            ]},
            "method": "variation_admm",
            "options": {"rho": 1.0e-2, "sigma": 0.1},
            "admm": {"epochs": 1},
            "retrain": {"epochs": 1},
        }],
    }
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp / "out"
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
    return out


def test_cli_hardware_costs_the_layout_the_run_was_trained_for(crossbar_run, capsys):
    """Without flags it costed a default 8-bit chip, whatever the run's conductance levels (a review's finding);
    where the run's own tile blocks assumed another column count, a note says so."""
    capsys.readouterr()
    assert main(["hardware", str(crossbar_run), "--no-save", "--samples", "20", "--pim-bits", "2"]) == 0
    printed = capsys.readouterr().out
    assert "128x128 tiles, 2 bit(s)/cell, 3-bit weights" in printed  # conductance bits 2, cells 1: 3 bits, signed
    assert printed.startswith("Note: the run's crossbar_* rules pruned tile blocks for 8 column(s) per weight, but "
                              "this mapping takes 2")
    assert main(["hardware", str(crossbar_run), "--no-save", "--samples", "20", "--pim-bits", "2",
                 "--weight-bits", "8"]) == 0
    printed = capsys.readouterr().out
    assert "2 bit(s)/cell, 8-bit weights" in printed and not printed.startswith("Note:")


@pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")
def test_cli_hardware_on_a_variation_aware_crossbar_run(crossbar_run, capsys):
    out: Path = crossbar_run
    capsys.readouterr()
    code = main(["hardware", str(out), "--variation", "0.1", "--draws", "2", "--adc-sweep", "6", "24", "--pim-bits",
                 "2", "--samples", "50", "--weight-bits", "8"])
    printed = capsys.readouterr().out
    assert code == 0
    # full scales from 256 training inputs: a 24-bit ADC is exact on the evaluated test inputs (set on 8 test
    # inputs, it clipped others and changed the accuracy, a review's finding)
    assert "full scales set on 256 training inputs" in printed
    clean = re.search(r"clean (\d+\.\d+)%", printed).group(1)
    assert f"| 24 | {clean} |" in printed
    assert (out / "hardware.md").is_file() and (out / "hardware.png").is_file()
    assert_every_cost_figure_is_modelled(printed)
    fc1 = next(line for line in printed.splitlines() if line.startswith("| fc1 |"))
    # fc1 is 300x784: 16 outputs x 128 inputs per tile -> 19 x 7 = 133 tiles; half the tile blocks pruned.
    cells = [c.strip() for c in fc1.strip("|").split("|")]
    assert cells[4] == "133" and int(cells[5]) == 66
    assert "| - | 0.1 | 0 | 0 |" in printed
    stage = json.loads((out / "metrics.json").read_text())["metrics"]["stages"][0]
    assert len(stage["admm_history"]) >= 1  # the variation_admm driver (a plugin) drove the stage


def test_cli_hardware_errors_are_one_line(tmp_path, capsys):
    assert main(["hardware", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("admmcompress: error:") and "model.safetensors" in err[0]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--tile", "100000000"], "argument --tile: --tile '100000000': give one size (128) or ROWSxCOLS (128x64), "
                                  "each in [1, 4096]"),
        (["--tile", "64x100000"], "each in [1, 4096]"),
        (["--adc-bits", "5000"], "argument --adc-bits: --adc-bits '5000': give an integer in [1, 24]"),
        (["--act-bits", "100000"], "give an integer in [1, 32]"),
        (["--draws", "100000000"], "give an integer in [1, 1000]"),
        (["--pim-bits", "2", "4096"], "--pim-bits '4096': give an integer in [1, 16]"),
        (["--adc-sweep", "64"], "--adc-sweep '64': give an integer in [2, 24]"),
        (["--seed", str(2**70)], "--seed '1180591620717411303424': give an integer in [0, 9223372036854775807]"),
        (["--variation", "nan"], "--variation 'nan': give a number in [0, 3]"),
        (["--stuck-on", "2"], "--stuck-on '2': give a number in [0, 1]"),
        (["--samples", "0"], "--samples '0': give an integer >= 1"),
    ],
)
def test_cli_hardware_numbers_out_of_range_are_one_line_before_the_run_loads(tmp_path, capsys, flags, expected):
    # tmp_path holds no run: the flag must be refused first (the old code went on to load the run, or allocated
    # a 1e8 x 1e8 tile grid and died with torch's RuntimeError)
    with pytest.raises(SystemExit) as code:
        main(["hardware", str(tmp_path), *flags])
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("admmcompress hardware: error: "), err
    assert expected in err[0]


def test_cli_hardware_on_a_read_only_run_is_one_line_before_the_analysis(crossbar_run, capsys, monkeypatch):
    """The analysis takes minutes with --variation: a folder it cannot write hardware.md into is refused first."""
    from admmcompress import run_hardware

    real_access = os.access
    monkeypatch.setattr(run_hardware.os, "access", lambda p, mode: Path(p) != crossbar_run and real_access(p, mode))
    monkeypatch.setattr(run_hardware, "analyze", lambda *a, **k: pytest.fail("analysed a folder it cannot write"))
    capsys.readouterr()
    assert main(["hardware", str(crossbar_run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"admmcompress: error: '{crossbar_run}' is read-only for this user, so hardware.md/.png cannot "
                   "be written there; make it writable or pass --no-save to print the analysis only"]


def test_sample_reads_a_torch_dataset_into_a_seeded_split():
    from torch.utils.data import IterableDataset, TensorDataset

    from admmcompress.run_hardware import sample

    x, y = torch.randn(30, 4), torch.arange(30)
    part = sample(TensorDataset(x, y), 10, seed=3)
    assert len(part) == 10 and torch.equal(part.x, x[part.y])  # items kept whole, drawn across the split
    assert not torch.equal(part.y, torch.arange(10))
    assert torch.equal(sample(TensorDataset(x, y), None).y.sort().values, y)

    class Stream(IterableDataset):
        def __iter__(self):
            return ((x[i], int(y[i])) for i in range(30))

    assert torch.equal(sample(Stream(), 5).y, torch.arange(5))

    class Unlabelled(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"pixels": x[i]}

    with pytest.raises(ValueError, match="the run's test dataset gives dict items that are not \\(input, class\\) "
                                         "pairs; admmcompress hardware measures accuracy on those"):
        sample(Unlabelled(), 2)

    class Endless(IterableDataset):
        def __iter__(self):
            while True:
                yield x[0], 1

    with pytest.raises(ValueError, match="is an IterableDataset: give --samples N to read its first N items"):
        sample(Endless(), None)  # read whole, it would never return

    class Arrays(torch.utils.data.Dataset):  # training takes numpy items through DataLoader's collate: so does this
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return x[i].numpy(), int(y[i])

    part = sample(Arrays(), 4, seed=1)
    assert part.x.dtype == torch.float32 and torch.equal(part.x, x[part.y])


def test_a_reference_too_wide_for_the_tile_names_baseline_bits():
    spec = CrossbarSpec(rows=16, cols=16, bits_per_cell=1, weight_bits=4)  # 6 columns per weight: fits
    with pytest.raises(ValueError) as err:
        analyze(torch.nn.Sequential(torch.nn.Linear(64, 32)), spec, pim_bits=())
    assert str(err.value) == (
        "hardware: the unpruned 16-bit reference (--baseline-bits 16) takes 30 columns per weight, more than the 16 "
        "of a tile; lower --baseline-bits (at most 9 fits) or use wider tiles"
    )
    # 9 bits: 8 slices x 2 cells fill the 16 columns, 1 output x 16 inputs per tile
    assert analyze(torch.nn.Linear(64, 32), spec, baseline_bits=9, pim_bits=()).baseline.total("dense") == 128


def test_sot_mram_reference_too_wide_for_the_subarray_names_baseline_bits():
    with pytest.raises(ValueError, match=r"^hardware: the unpruned 16-bit SOT-MRAM reference \(--baseline-bits 16\) "
                                         r"takes 16 columns per weight, more than the 8 of a sub-array; lower "
                                         r"--baseline-bits or use wider sub-arrays$"):
        analyze(torch.nn.Linear(64, 32), CrossbarSpec(), pim_bits=(2,), pim_subarray=(8, 8))


def test_cli_hardware_reference_too_wide_is_one_line(crossbar_run, capsys):
    capsys.readouterr()
    code = main(["hardware", str(crossbar_run), "--tile", "16", "--bits-per-cell", "1", "--weight-bits", "4",
                 "--no-save", "--pim-bits"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("admmcompress: error: hardware: the unpruned 16-bit "), err
    assert "lower --baseline-bits (at most 9 fits) or use wider tiles" in err[0]


def test_a_mapping_larger_than_its_reference_reports_the_change_with_a_sign():
    # 8-bit weights against a 2-bit reference: twice the tiles, so every figure grows by 100%.
    text = render_hardware(analyze(torch.nn.Sequential(torch.nn.Linear(64, 32)), CrossbarSpec(), baseline_bits=2,
                                   pim_bits=()))
    line = next(line for line in text.splitlines() if line.startswith("Compacted"))
    assert "2.00x more tiles, area +100.00%, power +100.00%, energy +100.00%." in line, line
    smaller = render_hardware(analyze(torch.nn.Linear(256, 64), CrossbarSpec(), pim_bits=()))
    line = next(line for line in smaller.splitlines() if line.startswith("Compacted"))
    assert "2.00x fewer tiles, area -50.00%, power -50.00%, energy -50.00%." in line, line
