"""A model that steps a recurrent cell (LSTMCell, GRUCell, RNNCell) over time itself: the batch of a sequence-first
example (T, B, F) is read off the cells' calls, so budgets (MACs per sample) and the crossbar mapping (passes per
sample) count the same as for the batch-first layout; cells whose batch is not the example's dim 1 say nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.drivers.budget import gemm_shapes, structured_cost
from admmcompress.hardware.crossbar import output_positions
from admmcompress.plan.graph import cell_samples, run_example

T, B, F = 5, 3, 4


pytestmark = pytest.mark.usefixtures("private_rng")  # seeded, the global RNG restored after


class CellLoop(nn.Module):
    """A Linear over the whole sequence, a cell stepped over time by the model's own loop, a head on the last state."""

    def __init__(self, cell: type[nn.RNNCellBase], batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp, self.cell, self.head = nn.Linear(F, 8), cell(8, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inp(x)
        steps = y.unbind(1 if self.batch_first else 0)
        h = torch.zeros(steps[0].shape[0], 6)
        state = (h, h) if isinstance(self.cell, nn.LSTMCell) else h
        for step in steps:
            state = self.cell(step, state)
        return self.head(state[0] if isinstance(state, tuple) else state)


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_a_sequence_first_cell_loop_counts_as_the_same_loop_batch_first(cell):
    """Before: the (5, 3, 4) example was taken for 5 samples, so 'inp' made 3 passes per sample (not 5) and the
    budget counted 108 MACs per sample (not 172)."""
    seq_first, batch_first = CellLoop(cell, batch_first=False), CellLoop(cell, batch_first=True)
    x = torch.randn(T, B, F)
    assert run_example(seq_first, x, []) == B and run_example(batch_first, x.transpose(0, 1), []) == B
    first, batched = gemm_shapes(seq_first, x), gemm_shapes(batch_first, x.transpose(0, 1))
    assert first == batched
    assert (first["inp.weight"].positions, first["inp.weight"].in_shape) == (T, (T, F))
    assert (first["head.weight"].positions, first["head.weight"].in_shape) == (1, (6,))
    assert structured_cost(first, {}, "macs") == 8 * F * T + 2 * 6 == 172
    passes = output_positions(seq_first, x)
    assert passes == output_positions(batch_first, x.transpose(0, 1)) == {"inp": T, "cell": T, "head": 1}


def test_a_batch_first_cell_loop_is_unchanged():
    """The cells' batch is the example's dim 0: nothing moves (3 samples, as before the cells were asked)."""
    model, x = CellLoop(nn.LSTMCell, batch_first=True), torch.randn(B, T, F)
    assert run_example(model, x, []) == B
    shapes = gemm_shapes(model, x)
    assert (shapes["inp.weight"].positions, shapes["head.weight"].positions) == (T, 1)
    assert output_positions(model, x) == {"inp": T, "cell": T, "head": 1}


class Folded(nn.Module):
    """A cell run once on every (sample, step) pair folded into its batch, from zero state: its batch (B*T) is no
    axis of the example."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.cell, self.head = nn.Linear(F, 8), nn.LSTMCell(8, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.cell(self.inp(x).flatten(0, 1))[0])


@pytest.mark.parametrize(("shape", "samples", "per_row"), [((2, 6, F), 2, 6), ((T, B, F), T, B)])
def test_a_cell_batch_that_is_no_example_axis_falls_back_to_dim_0(shape, samples, per_row):
    """Batch-first (2, 6, 4): 12 rows per cell call, 2 samples (right). Sequence-first (5, 3, 4): 15 rows, taken for
    5 samples as before (the cells cannot say which axis is the batch)."""
    model, x = Folded(), torch.randn(*shape)
    assert run_example(model, x, []) == samples
    shapes = gemm_shapes(model, x)
    assert (shapes["inp.weight"].positions, shapes["head.weight"].positions) == (per_row, per_row)
    assert output_positions(model, x) == {"inp": per_row, "cell": 1, "head": per_row}


class Words(nn.Module):
    """A character-level cell stepped over the characters of every word, the words folded into its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.cell, self.head = nn.Linear(F, 8), nn.GRUCell(8, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, words, chars, F)
        y = self.inp(x).flatten(0, 1)
        h = torch.zeros(y.shape[0], 6)
        for char in y.unbind(1):
            h = self.cell(char, h)
        return self.head(h)


def test_one_batch_first_sample_whose_cell_batch_is_its_dim_1_stays_one_sample():
    """(1, 4 words, 6 chars, 4): the cell's batch is 4, the example's dim 1, but dim 0 has one entry (a single step
    of a sequence-first loop would look the same), so the example is one sample, not 4."""
    model, x = Words(), torch.randn(1, 4, 6, F)
    assert run_example(model, x, []) == 1
    shapes = gemm_shapes(model, x)
    assert (shapes["inp.weight"].positions, shapes["head.weight"].positions) == (4 * 6, 4)
    assert output_positions(model, x) == {"inp": 24, "cell": 6, "head": 4}


def test_cell_samples_takes_only_a_loop_over_dim_0_on_one_batch():
    one, two, x = nn.LSTMCell(2, 3), nn.GRUCell(2, 3), torch.zeros(T, B, 2)
    assert cell_samples({one: [B] * T, two: [B] * 2 * T}, x) == B  # a cell stepped twice per step (both ways)
    assert cell_samples({one: [B] * T, two: [B] * 4}, x) is None  # 'two' does not step over dim 0
    assert cell_samples({one: [B] * T, two: [2] * T}, x) is None  # two batches
    assert cell_samples({one: [None] * T}, x) is None  # unbatched calls
    assert cell_samples({one: [T] * T}, torch.zeros(T, T, 2)) is None  # dim 0 or dim 1: the same either way
    assert cell_samples({}, x) is None and cell_samples({one: [B] * T}, {"mask": True}) is None


@pytest.mark.parametrize("along", [0, 1])
def test_a_cell_loop_beside_a_sequence_first_lstm_keeps_the_lstms_batch(along):
    """Stepping over time (dim 0) the cells agree with the nn.LSTM on 3; stepping over the batch (dim 1, cell batch
    5) they say nothing, and the LSTM's 3 stands as before."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.cell, self.head = nn.LSTM(F, 6), nn.LSTMCell(6, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.lstm(x)[0]  # (T, B, 6)
            state = None
            for step in y.unbind(along):
                state = self.cell(step, state)
            return self.head(y)

    model, x = Mixed(), torch.randn(T, B, F)
    assert run_example(model, x, []) == B
    assert gemm_shapes(model, x)["head.weight"].positions == T
    assert output_positions(model, x) == {"lstm": T, "cell": T if along == 0 else B, "head": T}


class ListCell(nn.RNNCellBase):
    """A user's cell that returns its state as a list (no ``.dim()`` on the output itself)."""

    def __init__(self) -> None:
        super().__init__(4, 4, bias=True, num_chunks=1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> list[torch.Tensor]:
        y = self.fc(x)
        return [y, y]


class ListCellLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = ListCell()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.cell(step)[0] for step in x.unbind(0)])


def test_a_cell_returning_a_list_is_read_like_any_other():
    shapes = gemm_shapes(ListCellLoop(), torch.randn(T, B, 4))
    assert shapes["cell.fc.weight"].positions == T  # one call per step of each of the B sequences


def test_run_example_puts_back_every_layers_own_mode():
    model = nn.Sequential(nn.Linear(F, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    run_example(model, torch.randn(B, F), [])
    assert [m.training for m in model] == [True, False, True] and model.training


class PerSampleWords(nn.Module):
    """Batch-first (B, words, F), stepping a cell over each sample's words at once: cell(x[b]) has the shape of a
    sequence-first step, so only the output (led by B) tells the two apart."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.fc = nn.GRUCell(4, 6), nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.fc(self.cell(x[b])).mean(0) for b in range(x.shape[0])])


def test_a_batch_first_model_stepping_a_cell_over_each_samples_words_stays_batch_first():
    x = torch.randn(2, 8, 4)
    assert run_example(PerSampleWords(), x, []) == 2
    assert gemm_shapes(PerSampleWords(), x)["fc.weight"].positions == 8  # 8 words of one sample
    assert output_positions(PerSampleWords(), x)["fc"] == 8
    assert gemm_shapes(PerSampleWords(), x[:1])["fc.weight"].positions == 8  # as for one sample alone
