"""Block-sparse executor: same outputs as the dense (masked) layers, for every supported layer type."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.executors.blocksparse import (
    BlockSparseCell,
    BlockSparseConv2d,
    BlockSparseGRU,
    BlockSparseLinear,
    BlockSparseLSTM,
    BlockSparseMatrix,
    block_rows_from,
    to_blocksparse,
)
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan
from admmcompress.structures import Block, Unstructured

pytestmark = pytest.mark.usefixtures("private_rng")


ATOL = 1e-5  # the issue asks for <= 1e-4


def block_pruned(module: nn.Module, compression: float = 4, block=(4, 2), **kwargs) -> nn.Module:
    """Prune every weight matrix of ``module`` with the Block structure (as training would)."""
    torch.manual_seed(0)
    wrapper = nn.ModuleDict({"m": module})
    hard_prune(wrapper, Plan({"m": Block(compression=compression, block=block, **kwargs)}).resolve(wrapper))
    return module.eval()


def close(a, b) -> None:
    if isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            close(x, y)
    else:
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


# --- the matrix ------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["gather", "csr", "dense"])
@pytest.mark.parametrize("buckets", [1, 3])
@pytest.mark.parametrize("batch", [1, 5, 20])  # 20: the batch-last layout (ROWS_LAST_FROM)
def test_matrix_product_equals_dense(impl, buckets, batch):
    torch.manual_seed(1)
    # 30 rows in blocks of 4: the last block is ragged
    w = Block(compression=5, block=(4, 8), allow_ragged=True).project(torch.randn(30, 40))
    m = BlockSparseMatrix(w, block_rows=4, impl=impl, buckets=buckets)
    x = torch.randn(batch, 40)
    close(m(x), x @ w.T)


def test_any_mask_packs_exactly_and_shared_columns_store_no_padding():
    torch.manual_seed(2)
    w = Unstructured(sparsity=0.7).project(torch.randn(12, 10))  # rows of a block differ: union of columns
    x = torch.randn(3, 10)
    close(BlockSparseMatrix(w, block_rows=4)(x), x @ w.T)
    balanced = Block(sparsity=0.75, block=(4, 8), per_block=True).project(torch.randn(8, 16))
    m = BlockSparseMatrix(balanced, block_rows=4)
    assert m.stored_values == int(torch.count_nonzero(balanced)) == m.nonzeros  # no padding when balanced


def test_buckets_pad_less_than_one_bucket():
    w = torch.zeros(8, 16)
    w[:4, :12] = 1.0  # block 0 keeps 12 columns, block 1 keeps 2
    w[4:, :2] = 1.0
    assert BlockSparseMatrix(w, 4).stored_columns == 24
    assert BlockSparseMatrix(w, 4, buckets=2).stored_columns == 14


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"impl": "mkl"}, r"impl='mkl'; choose one of \('gather', 'cpp', 'csr', 'dense', 'bsr'\)"),
        ({"block_rows": 0}, r"block_rows=0 must be a positive integer"),
        ({"buckets": 0}, r"buckets=0 must be a positive integer"),
    ],
)
def test_matrix_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockSparseMatrix(torch.ones(4, 4), **kwargs)


# --- layers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_leading_dims(bias):
    linear = block_pruned(nn.Linear(24, 16, bias=bias))
    fast = BlockSparseLinear.from_dense(linear, block_rows=4)
    x = torch.randn(2, 3, 24)
    close(fast(x), linear(x))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"stride": 2, "padding": 1},
        {"padding": (2, 1), "dilation": 2},
        {"padding": "same"},
        {"padding": "valid", "bias": False},
    ],
)
def test_conv2d_im2col_equals_conv(kwargs):
    conv = block_pruned(nn.Conv2d(3, 8, 3, **kwargs), block=(4, 9))
    fast = BlockSparseConv2d.from_dense(conv, block_rows=4)
    x = torch.randn(2, 3, 9, 7)
    close(fast(x), conv(x))
    close(fast(x[0]), conv(x[0]))  # unbatched


def test_conv2d_refuses_grouped_convolution_with_the_fix():
    expected = r"layer 'dw' \(Conv2d\): cannot run block-sparse with groups=4.*leave it dense"
    with pytest.raises(ValueError, match=expected):
        BlockSparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=4), name="dw")


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_layers": 2, "batch_first": True},
        {"bidirectional": True, "num_layers": 2},
        {"bias": False},
    ],
)
def test_recurrent_layers_equal_torch(cls, kwargs):
    rnn = block_pruned(cls(6, 8, **kwargs), block=(4, 2))
    fast = (BlockSparseGRU if cls is nn.GRU else BlockSparseLSTM).from_dense(rnn, block_rows=4)
    x = torch.randn(5, 3, 6)
    close(fast(x), rnn(x))
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    h0 = torch.randn(layers, 5 if rnn.batch_first else 3, 8)
    hx = h0 if cls is nn.GRU else (h0, torch.randn_like(h0))
    close(fast(x, hx), rnn(x, hx))
    unbatched_hx = h0[:, 0] if cls is nn.GRU else (h0[:, 0], hx[1][:, 0])
    close(fast(x[:, 0], unbatched_hx), rnn(x[:, 0], unbatched_hx))


@pytest.mark.parametrize("cls", [nn.GRUCell, nn.LSTMCell])
def test_cells_equal_torch(cls):
    cell = block_pruned(cls(6, 8), block=(4, 2))
    fast = BlockSparseCell.from_dense(cell, block_rows=4)
    x, h = torch.randn(3, 6), torch.randn(3, 8)
    hx = h if cls is nn.GRUCell else (h, torch.randn(3, 8))
    close(fast(x, hx), cell(x, hx))
    close(fast(x), cell(x))
    close(fast(x[0]), cell(x[0]))


def test_recurrent_refusals_name_the_fix():
    with pytest.raises(ValueError, match=r"layer 'lm' \(LSTM\): proj_size=4 is not supported.*leave it"):
        BlockSparseLSTM.from_dense(nn.LSTM(6, 8, proj_size=4), name="lm")
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(4, 2, 6), [4, 3])
    with pytest.raises(ValueError, match="packed sequences are not supported; pad them"):
        BlockSparseGRU.from_dense(nn.GRU(6, 8))(packed)


# --- swapping into a model ---------------------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.cell = nn.LSTMCell(8, 8)
        self.fc = nn.Linear(8, 4)
        self.head = nn.Linear(4, 3)  # left dense

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean(2).transpose(1, 2)  # (B, W, 8) sequence over the width
        x, _ = self.gru(x)
        x, _ = self.lstm(x)
        h, _ = self.cell(x[:, -1])
        return self.head(torch.relu(self.fc(h)))


def test_to_blocksparse_swaps_every_supported_pruned_layer_with_equal_outputs():
    torch.manual_seed(3)
    model = Mixed().eval()
    plan = Plan(
        {
            "conv": Block(compression=4, block=(4, 9)),
            "gru": Block(compression=4, block=(4, 4)),
            "lstm": Block(compression=4, block=(8, 4)),
            "cell": Block(compression=4, block=(4, 4)),
            "fc": Block(compression=4, block=(2, 4)),
        }
    )
    hard_prune(model, plan.resolve(model))
    x = torch.randn(2, 2, 6, 5)
    expected = model(x)
    rows = block_rows_from(plan, model)
    assert rows == {"conv": 4, "gru": 4, "lstm": 8, "cell": 4, "fc": 2}
    assert to_blocksparse(model, block_rows=rows) == ["conv", "gru", "lstm", "cell", "fc"]
    assert isinstance(model.gru, BlockSparseGRU) and isinstance(model.head, nn.Linear)
    assert model.lstm.ih[0].block_rows == 8
    with torch.inference_mode():
        close(model(x), expected)


def test_to_blocksparse_errors_name_the_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"the model has no layer\(s\) \['2'\]"):
        to_blocksparse(model, layers=["2"])
    with pytest.raises(ValueError, match=r"\{'1': 'BatchNorm1d'\} cannot be converted; supported types are"):
        to_blocksparse(model, layers=["1"])
    with pytest.raises(ValueError, match="the model itself is a single layer; wrap it"):
        to_blocksparse(nn.Linear(4, 4), layers=[""])
    assert to_blocksparse(model) == []  # dense layers stay dense (below min_sparsity)


def test_loading_another_pattern_recounts_the_kept_columns():
    """``counts0`` (each block's kept columns, what the compiled kernel reads) follows ``load_state_dict``."""
    a, b = torch.zeros(8, 16), torch.zeros(8, 16)
    a[:4, :6], a[4:, :2] = 1.0, 2.0  # kept columns per block: 6 and 2
    b[:4, :3], b[4:, 10:16] = 3.0, 4.0  # 3 and 6: the same padded width, another pattern
    m, other = BlockSparseMatrix(a, 4), BlockSparseMatrix(b, 4)
    assert m.counts0.tolist() == [6, 2] and "counts0" not in m.state_dict()
    m.load_state_dict(other.state_dict())
    assert m.counts0.tolist() == [3, 6]
    x = torch.randn(2, 16)
    close(m(x), x @ b.T)
