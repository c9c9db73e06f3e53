"""The optional compiled GRU/LSTM sequence kernel: same outputs as torch (slow: it compiles on first use)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.executors import blocksparse_cpp
from admmcompress.executors.blocksparse import BlockSparseGRU, BlockSparseLinear, BlockSparseLSTM
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan
from admmcompress.structures import Block

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ext():
    module = blocksparse_cpp.load()
    if module is None:
        pytest.skip("no C++ compiler / torch headers here")
    return module


@pytest.fixture(autouse=True)
def _private_rng():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("kwargs", [{}, {"num_layers": 2, "bidirectional": True, "batch_first": True}])
def test_compiled_sequences_equal_torch(ext, cls, kwargs):
    wrapper = nn.ModuleDict({"m": cls(12, 16, **kwargs)}).eval()
    hard_prune(wrapper, Plan({"m": Block(compression=5, block=(8, 1))}).resolve(wrapper))
    rnn = wrapper["m"]
    fast = (BlockSparseGRU if cls is nn.GRU else BlockSparseLSTM).from_dense(rnn, block_rows=8, kernel="cpp")
    assert fast.kernel == "cpp"
    x = torch.randn(7, 3, 12)
    for a, b in zip(fast(x), rnn(x), strict=True):
        if isinstance(a, tuple):
            for p, q in zip(a, b, strict=True):
                torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_product_equals_the_torch_product(ext):
    w = Block(compression=4, block=(4, 1), allow_ragged=True).project(torch.randn(30, 20))
    layer = nn.Linear(20, 30)
    with torch.no_grad():
        layer.weight.copy_(w)
    fast = BlockSparseLinear.from_dense(layer, block_rows=4)
    x = torch.randn(5, 20)
    out = ext.bsmm(x, *blocksparse_cpp.packed(fast.matrix), 30)
    torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-5)


def test_matrix_impl_cpp_equals_dense(ext):
    w = Block(compression=4, block=(16, 1)).project(torch.randn(64, 40))
    bias = torch.randn(64)
    layer = nn.Linear(40, 64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(bias)
    fast = BlockSparseLinear.from_dense(layer, block_rows=16, impl="cpp")
    assert fast.matrix.impl == "cpp"
    for n in (1, 6):
        x = torch.randn(n, 40)
        torch.testing.assert_close(fast(x), layer(x), atol=1e-5, rtol=1e-5)
