"""The optional compiled GRU/LSTM sequence kernel: same outputs as torch (slow: it compiles on first use)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from admmcompress.executors import blocksparse_cpp
from admmcompress.executors.blockmatrix import BlockSparseMatrix
from admmcompress.executors.blocksparse import (
    BlockSparseGRU,
    BlockSparseLinear,
    BlockSparseLSTM,
    candidates,
    to_blocksparse,
)
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan
from admmcompress.structures import Block

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("private_rng")]


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


@pytest.fixture()
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def pruned(module: nn.Module, block, compression: float = 4) -> nn.Module:
    wrapper = nn.ModuleDict({"m": module}).eval()
    hard_prune(wrapper, Plan({"m": Block(compression=compression, block=block)}).resolve(wrapper))
    return wrapper["m"]


def close(a, b) -> None:
    if isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            close(x, y)
    else:
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# Sizes large enough that a product splits over two threads (> 2 x 32768 multiply-adds per call).
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize(
    ("kind", "hidden", "rows", "pruned_rows"),
    [
        ("linear", 0, 16, 16),
        ("conv", 0, 16, 16),
        ("gru", 128, 16, 16),
        ("lstm", 128, 16, 16),
        ("gru", 24, 16, 8),
        ("lstm", 20, 8, 4),
        ("gru", 40, 8, 8),  # r = 8: the 8-row tiles, and slices whose units are not whole 16-wide tiles
        ("lstm", 120, 8, 8),
    ],
)
def test_compiled_candidates_equal_the_masked_dense_layer(ext, threads, n_threads, kind, hidden, rows, pruned_rows):
    """Every layer type at 1 and 2 threads. Hidden 24 / 20 is not a multiple of r: gates straddle row blocks
    (pruned in smaller blocks; a row block keeps the union) and the sequence takes the unfused path."""
    torch.set_num_threads(n_threads)
    if kind == "linear":
        dense, x = pruned(nn.Linear(256, 512), (16, 4)), torch.randn(9, 256)
    elif kind == "conv":
        # 7 x 5 outputs: 35 per image (two tiles of 16 and a padded tail), 70 for both
        dense, x = pruned(nn.Conv2d(16, 32, 3, padding=1), (16, 9)), torch.randn(2, 16, 7, 5)
    else:
        cls = nn.GRU if kind == "gru" else nn.LSTM
        dense = pruned(cls(32, hidden, num_layers=2, bidirectional=True), (pruned_rows, 1), compression=3)
        x = torch.randn(5, 20, 32)  # 20: one tile of 16 inputs and 4 row by row
    impls = candidates(dense, block_rows=rows, name=kind)
    assert "cpp" in impls
    with torch.inference_mode():
        close(impls["cpp"](x), dense(x))
        close(impls["cpp"](x[:1]), dense(x[:1]))  # one row, one image, one step: the small-input paths


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("rows", [16, 8])
def test_sequences_split_their_batch_over_two_threads(ext, threads, kind, rows):
    """From 16 inputs per thread a sequence runs each part of its batch on its own thread (own state, no
    barrier): 40 inputs in parts of 20 (a tile of 16 and 4 rows each), both directions, a given initial state,
    equal the dense layer; so does the hidden-unit split when the split is switched off."""
    torch.set_num_threads(2)
    cls = nn.GRU if kind == "gru" else nn.LSTM
    dense = pruned(cls(32, 64, num_layers=2, bidirectional=True), (rows, 1), compression=3)
    fast = (BlockSparseGRU if kind == "gru" else BlockSparseLSTM).from_dense(dense, block_rows=rows, kernel="cpp")
    x = torch.randn(7, 40, 32)
    h0 = torch.randn(4, 40, 64)
    state = h0 if kind == "gru" else (h0, torch.randn(4, 40, 64))
    before = ext.set_batch_split_rows(16)
    try:
        for split_rows in (16, 10**9):
            ext.set_batch_split_rows(split_rows)
            with torch.inference_mode():
                close(fast(x, state), dense(x, state))
    finally:
        ext.set_batch_split_rows(before)


def test_unbalanced_row_blocks_split_by_work(ext, threads):
    """One row block keeps every column, the others one: chunks of equal work, outputs exact at 2 threads."""
    torch.set_num_threads(2)
    w = torch.zeros(512, 1024)
    w[:16] = torch.randn(16, 1024)
    w[16:, 7] = torch.randn(496)
    matrix = BlockSparseMatrix(w, 16, impl="cpp", bias=torch.randn(512))
    counts = blocksparse_cpp.packed(matrix)[3]
    assert counts[0] == 1024 and set(counts[1:].tolist()) == {1}  # padding is skipped, not multiplied
    x = torch.randn(40, 1024)
    close(matrix(x), x @ w.T + matrix.bias0.reshape(-1))


def test_the_kernel_is_built_with_openmp_and_follows_torch_threads(ext, threads):
    """Built with OpenMP on torch's own runtime: ``torch.set_num_threads`` is the kernel's thread count."""
    for n in (1, 2):
        torch.set_num_threads(n)
        assert ext.threads_compiled() == n


def test_a_model_with_compiled_layers_saves_and_loads(ext, tmp_path):
    model = nn.Sequential(pruned(nn.Linear(64, 64), (16, 4)), nn.ReLU(), pruned(nn.Linear(64, 32), (16, 4))).eval()
    x = torch.randn(3, 64)
    expected = model(x)
    to_blocksparse(model, block_rows=16, impl="cpp")
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert loaded[0].matrix.impl == "cpp"
    close(loaded(x), expected)


def test_products_split_into_chunks_of_equal_work(ext, threads):
    """Up to four chunks per thread, cut where the kept columns (the work) are equal; a block heavier than a
    chunk is a chunk of its own (no empty chunks); small products and one thread stay whole."""
    torch.set_num_threads(2)
    even = torch.full((32,), 100, dtype=torch.int64)
    assert ext.product_chunks(even, 16, 8) == list(range(0, 33, 4))  # 8 chunks of 4 blocks
    heavy_first = torch.tensor([3000] + [10] * 31)  # block 0 alone is most of the work
    assert ext.product_chunks(heavy_first, 16, 8) == [0, 1, 32]
    assert ext.product_chunks(torch.full((4,), 10, dtype=torch.int64), 16, 1) == [0, 4]  # ~700 MACs: one chunk
    torch.set_num_threads(1)
    assert ext.product_chunks(even, 16, 8) == [0, 32]


@pytest.mark.parametrize("n_threads", [1, 2])
def test_tiled_products_equal_dense_for_any_batch_and_width(ext, threads, n_threads):
    """From 16 inputs the kernel transposes them (16 x 16 register tiles, ragged edges element by element,
    each thread its own copy of a slab): every batch and width, whole tiles or not."""
    torch.set_num_threads(n_threads)
    for in_features in (37, 100, 3072):
        dense = pruned(nn.Linear(in_features, 64), (16, 1))
        fast = BlockSparseLinear.from_dense(dense, block_rows=16, impl="cpp")
        for n in (16, 17, 33, 40):
            x = torch.randn(n, in_features)
            with torch.inference_mode():
                close(fast(x), dense(x))


@pytest.mark.parametrize("n_threads", [1, 2])
def test_products_of_many_inputs_run_slab_by_slab(ext, threads, n_threads):
    """Products run over slabs of about 64 Ki input floats (at least 32 rows, whole tiles of 16), each thread
    transposing a slab for itself: several slabs, a last slab of a few rows, and no rows at all, equal dense."""
    torch.set_num_threads(n_threads)
    for in_features, batches in ((4096, (0, 33, 75)), (100, (650,))):  # slabs of 32 and of 640 rows
        dense = pruned(nn.Linear(in_features, 64), (16, 1))
        fast = BlockSparseLinear.from_dense(dense, block_rows=16, impl="cpp")
        for n in batches:
            x = torch.randn(n, in_features)
            with torch.inference_mode():
                close(fast(x), dense(x))


def test_the_slab_size_can_be_tuned_and_refuses_nonsense(ext):
    """``set_slab_floats`` (a tuning knob): small slabs give the same products; zero is refused."""
    dense = pruned(nn.Linear(64, 32), (16, 1))
    fast = BlockSparseLinear.from_dense(dense, block_rows=16, impl="cpp")
    x = torch.randn(100, 64)
    before = ext.set_slab_floats(1)  # the 32-row minimum: four slabs, the last of 4 rows
    try:
        with torch.inference_mode():
            close(fast(x), dense(x))
        with pytest.raises(RuntimeError, match="positive"):
            ext.set_slab_floats(0)
    finally:
        ext.set_slab_floats(before)
    assert ext.set_slab_floats(before) == before


def test_kernel_arguments_follow_the_buffers(ext):
    """The kernel's arguments are kept between calls (32-bit indices), and rebuilt when the buffers change."""
    first = pruned(nn.Linear(48, 32), (16, 1))
    second = copy.deepcopy(first)
    with torch.no_grad():
        second.weight.mul_(-1.5)
        second.bias.add_(1.0)
    fast = BlockSparseLinear.from_dense(first, block_rows=16, impl="cpp")
    args = blocksparse_cpp.packed(fast.matrix)
    assert args[0].dtype == torch.int32 and blocksparse_cpp.packed(fast.matrix) is args
    x = torch.randn(3, 48)
    other = BlockSparseLinear.from_dense(second, block_rows=16, impl="cpp")
    fast.load_state_dict(other.state_dict())  # loaded weights: counts are derived again, so are the arguments
    assert blocksparse_cpp.packed(fast.matrix) is not args
    close(fast(x), second(x))
    fast.matrix.values0 = fast.matrix.values0 * 2  # a reassigned buffer
    close(fast(x), 2 * (second(x) - second.bias) + second.bias)
    with torch.no_grad():
        fast.matrix.values0.mul_(0.5)  # written in place: seen too
    close(fast(x), second(x))


def test_a_replaced_pattern_is_read_with_its_own_counts(ext):
    """Buffers replaced by another pattern with more kept columns: the counts are derived again (reading the
    old counts would run past each row block)."""
    sparse = pruned(nn.Linear(64, 32), (16, 1), compression=8)
    denser = copy.deepcopy(sparse)
    with torch.no_grad():
        denser.weight.copy_(torch.randn(32, 64))
    fast = BlockSparseLinear.from_dense(sparse, block_rows=16, impl="cpp")
    x = torch.randn(3, 64)
    close(fast(x), sparse(x))
    other = BlockSparseLinear.from_dense(denser, block_rows=16, impl="cpp").matrix
    fast.matrix.index0, fast.matrix.values0 = other.index0, other.values0
    close(fast(x), denser(x))


def test_a_pickle_leaves_the_kernel_arguments_out(ext):
    fast = BlockSparseLinear.from_dense(pruned(nn.Linear(64, 32), (16, 1)), block_rows=16, impl="cpp")
    fast(torch.randn(2, 64))
    assert "_kernel_args" in fast.matrix.__dict__ and "_kernel_args" not in fast.matrix.__getstate__()


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_evenly_pruned_sequences_read_the_saved_layout(ext, threads, cls):
    """Row blocks with equal column counts (per-block pruning): the kernel reads the padded buffer itself."""
    torch.set_num_threads(2)
    dense = cls(64, 64, bidirectional=True).eval()
    gates = 3 if cls is nn.GRU else 4
    with torch.no_grad():
        for name, param in dense.named_parameters():
            if name.startswith("weight"):
                param.copy_(Block(compression=4, block=(16, 4), per_block=True, gates=gates).project(param))
    fast = candidates(dense, block_rows=16, name="rnn")["cpp"]
    matrices = [m for m in fast.modules() if isinstance(m, BlockSparseMatrix)]
    assert all(blocksparse_cpp.packed(m)[1].data_ptr() == m.values0.data_ptr() for m in matrices)
    x = torch.randn(6, 20, 64)
    with torch.inference_mode():
        close(fast(x), dense(x))


def test_hooks_on_the_inner_matrix_still_run(ext):
    """The layer skips the matrix's module call only while nothing hooks the matrix."""
    fast = BlockSparseLinear.from_dense(pruned(nn.Linear(48, 32), (16, 1)), block_rows=16, impl="cpp")
    seen = []
    fast.matrix.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    fast(torch.randn(2, 48))
    assert seen == [torch.Size([2, 32])]


def test_a_model_saved_after_running_loads_and_runs(ext, tmp_path):
    """A whole-model pickle taken after a forward (the kept kernel arguments included) loads and runs."""
    model = nn.Sequential(pruned(nn.Linear(64, 32), (16, 4))).eval()
    x = torch.randn(3, 64)
    expected = model(x)
    to_blocksparse(model, block_rows=16, impl="cpp")
    close(model(x), expected)
    torch.save(model, tmp_path / "model.pt")
    close(torch.load(tmp_path / "model.pt", weights_only=False)(x), expected)


@pytest.mark.parametrize("per_block", [False, True])
def test_padding_is_dropped_from_the_kernel_copy_when_it_is_large(ext, threads, per_block):
    """Uneven row blocks (global top-k) get an unpadded kernel copy; even ones read the saved buffer itself."""
    torch.set_num_threads(2)
    dense = nn.Linear(256, 512)
    with torch.no_grad():
        dense.weight.copy_(Block(compression=6, block=(16, 4), per_block=per_block).project(dense.weight))
    fast = BlockSparseLinear.from_dense(dense, block_rows=16, impl="cpp")
    index, values, offsets, counts, _ = blocksparse_cpp.packed(fast.matrix)
    slots = fast.matrix.values0.shape[1]
    if per_block:
        assert values.data_ptr() == fast.matrix.values0.data_ptr() and offsets.tolist() == [
            b * slots for b in range(32)
        ]
    else:
        assert values.shape[0] == int(counts.sum()) < 32 * slots
        assert offsets.tolist() == (torch.cumsum(counts, 0) - counts).tolist()
    for n in (1, 5, 40):
        x = torch.randn(n, 256)
        with torch.inference_mode():
            close(fast(x), dense(x))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            line = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


@pytest.fixture(scope="module", params=["native", "haswell"])
def any_build(request):
    """The kernel as this CPU builds it, and its AVX2 build (no AVX-512: row-wise passes, no register tiles)."""
    if request.param == "haswell" and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU does not run AVX2 + FMA code")
    module = blocksparse_cpp.load(march=request.param)
    if module is None:
        pytest.skip("no C++ compiler / torch headers here")
    return module


@pytest.mark.parametrize("r", [4, 8, 16, 32])
def test_every_batch_pass_equals_dense(any_build, threads, r):
    """Batches 1..40 cover every pass size (equal passes of up to 6 inputs on AVX2, 3 at r = 32; on AVX-512
    16-input tiles, then passes of up to 4), with and without bias, on both builds."""
    torch.set_num_threads(2)
    w = Block(compression=3, block=(r, 1)).project(torch.randn(4 * r, 70))
    for bias in (torch.randn(4 * r), torch.empty(0)):
        matrix = BlockSparseMatrix(w, r, impl="cpp", bias=bias if bias.numel() else None)
        args = blocksparse_cpp.packed(matrix)
        for n in (*range(1, 18), 23, 31, 32, 33, 40):
            x = torch.randn(n, 70)
            expected = x @ w.T + (bias if bias.numel() else 0)
            close(any_build.bsmm(x, *args, 4 * r), expected)


def test_every_sequence_batch_equals_dense_on_both_builds(any_build):
    """The fused GRU step on each build, at batches that take the wide, four, two and single passes."""
    dense = pruned(nn.GRU(16, 32), (16, 1), compression=3)
    w_ih, b_ih = dense.weight_ih_l0.detach(), dense.bias_ih_l0.detach()
    hh = BlockSparseMatrix(dense.weight_hh_l0.detach(), 16, impl="cpp", bias=dense.bias_hh_l0.detach())
    for n in (1, 3, 7, 13, 20):
        x, h0 = torch.randn(5, n, 16), torch.randn(n, 32)
        with torch.inference_mode():
            out, h = any_build.gru_sequence(x @ w_ih.T + b_ih, h0, *blocksparse_cpp.packed(hh), False)
            expected, h_expected = dense(x, h0.unsqueeze(0))
        close(out, expected)
        close(h, h_expected[0])


def test_the_compiled_product_refuses_an_input_of_the_wrong_width(ext):
    """The kernel reads input columns by index without bounds checks: a wrong width is refused before it runs."""
    matrix = BlockSparseMatrix(pruned(nn.Linear(64, 32), (4, 1)).weight.detach(), 4, impl="cpp")
    with pytest.raises(ValueError, match="input has 8 features, expected 64"):
        matrix(torch.randn(2, 8))
    with pytest.raises(ValueError, match="input has 8 features, expected 64"):
        matrix.forward_transposed(torch.randn(8, 2))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_layers_fuse_their_input_product_into_the_steps(any_build, kind, n_threads):
    """gru_layer / lstm_layer compute each step's input product inside the sequence from 16 inputs per serial
    part (a tile of 16 and a ragged rest on AVX-512, passes on AVX2), else all steps' first: every batch around
    the thresholds, both directions, equals the dense layer on both builds."""
    torch.set_num_threads(n_threads)
    cls = nn.GRU if kind == "gru" else nn.LSTM
    dense = pruned(cls(24, 32), (16, 1), compression=3)
    ih = BlockSparseMatrix(dense.weight_ih_l0.detach(), 16, impl="cpp", bias=dense.bias_ih_l0.detach())
    hh = BlockSparseMatrix(dense.weight_hh_l0.detach(), 16, impl="cpp", bias=dense.bias_hh_l0.detach())
    args = (*blocksparse_cpp.packed(ih), *blocksparse_cpp.packed(hh))
    for n in (1, 15, 16, 17, 31, 32, 33, 45):
        x, h0, c0 = torch.randn(6, n, 24), torch.randn(n, 32), torch.randn(n, 32)
        for reverse in (False, True):
            xs = x.flip(0) if reverse else x
            with torch.inference_mode():
                if kind == "gru":
                    out, h = any_build.gru_layer(x, h0, *args, reverse)
                    expected, h_expected = dense(xs, h0.unsqueeze(0))
                else:
                    out, h, c = any_build.lstm_layer(x, h0, c0, *args, reverse)
                    expected, (h_expected, c_expected) = dense(xs, (h0.unsqueeze(0), c0.unsqueeze(0)))
                    close(c, c_expected[0])
            close(out.flip(0) if reverse else out, expected)
            close(h, h_expected[0])


@pytest.mark.parametrize("cls", [BlockSparseGRU, BlockSparseLSTM])
def test_a_sequence_of_the_wrong_width_or_state_is_refused(cls):
    """The compiled layer reads input and state columns by index: wrong shapes are refused before it runs."""
    dense = (nn.GRU if cls is BlockSparseGRU else nn.LSTM)(12, 16)
    fast = cls.from_dense(dense, block_rows=8, kernel="cpp")
    with pytest.raises(ValueError, match="input has 5 features, expected input_size=12"):
        fast(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="input of 4 dimensions"):
        fast(torch.randn(3, 2, 12, 1))
    bad = torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match=r"initial state of shape \(1, 2, 8\), expected \(1, 2, 16\)"):
        fast(torch.randn(3, 2, 12), bad if cls is BlockSparseGRU else (bad, bad))
    if cls is BlockSparseLSTM:  # nn.LSTM takes (h, c) as a list too
        x, h, c = torch.randn(3, 2, 12), torch.randn(1, 2, 16), torch.randn(1, 2, 16)
        with torch.inference_mode():
            close(fast(x, [h, c]), dense(x, (h, c)))


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("r", [8, 16])
def test_im2col_products_run_slab_by_slab_through_a_copy(ext, threads, n_threads, r):
    """bsmm_t forced onto its slab path (small slabs, no size or kept-weight threshold) equals the dense product for
    column counts with and without a ragged last tile and slab, with and without bias; the settings come back."""
    torch.set_num_threads(n_threads)
    w = Block(compression=3, block=(r, 1)).project(torch.randn(5 * r, 70))
    bias = torch.randn(5 * r)
    before = ext.set_slab_floats_t(70 * 32, 0, 0)  # slabs of 32 columns
    try:
        for b in (bias, None):
            matrix = BlockSparseMatrix(w, r, impl="cpp", bias=b)
            for n in (32, 33, 47, 64, 100, 161):
                xt = torch.randn(70, n)
                close(matrix.forward_transposed(xt), xt.T @ w.T + (0 if b is None else b))
    finally:
        assert ext.set_slab_floats_t(*before) == [70 * 32, 0, 0]
    with pytest.raises(RuntimeError, match="slab_floats_t must be positive"):
        ext.set_slab_floats_t(0, 0, 0)


def test_im2col_slab_switch_follows_the_l3_size(ext):
    """load() sets the switch to twice this machine's L3 (64 MiB where none is reported); fit_caches changes only the
    switch, for an L3 of any size."""
    from admmcompress.cpu_caches import l3_bytes

    current = ext.set_slab_floats_t(262144, 0, 24)
    ext.set_slab_floats_t(*current)
    assert current[1] == blocksparse_cpp.slabs_t_from_floats(l3_bytes())
    try:
        blocksparse_cpp.fit_caches(ext, l3=260 << 20)  # a large-L3 Xeon: a 144 MiB im2col matrix stays in place
        assert ext.set_slab_floats_t(*current) == [current[0], 2 * (260 << 20) // 4, current[2]]
        blocksparse_cpp.fit_caches(ext, l3=0)
        assert ext.set_slab_floats_t(*current) == [current[0], 1 << 24, current[2]]
    finally:
        ext.set_slab_floats_t(*current)


def test_tracing_and_gradients_take_the_torch_path(ext):
    """torch.jit.trace cannot see into the kernel (it recorded an empty tensor: outputs of 1e31), and the kernel's
    outputs carry no gradient: both take the gather path, which gives the masked dense result."""
    torch.manual_seed(0)
    dense = nn.Linear(16, 32)
    with torch.no_grad():
        dense.weight.copy_(Block(compression=3, block=(4, 1)).project(dense.weight))
    fast = BlockSparseLinear.from_dense(dense, block_rows=4, impl="cpp")
    x = torch.randn(3, 16)
    traced = torch.jit.trace(fast, (x,), check_trace=False)
    close(traced(torch.ones(3, 16)), dense(torch.ones(3, 16)))
    xg = x.clone().requires_grad_(True)
    fast(xg).sum().backward()
    close(xg.grad, dense.weight.sum(0).expand(3, 16))
    rnn = nn.GRU(16, 16)
    with torch.no_grad():
        for name, weight in rnn.named_parameters():
            if name.startswith("weight"):
                weight.copy_(Block(compression=3, block=(16, 4), gates=3).project(weight))
    fast_rnn = BlockSparseGRU.from_dense(rnn, block_rows=16, kernel="cpp").eval()
    seq = torch.randn(5, 2, 16)
    traced_rnn = torch.jit.trace(fast_rnn, (seq,), check_trace=False)
    close(traced_rnn(seq)[0], rnn(seq)[0])
    seq_g = seq.clone().requires_grad_(True)
    fast_rnn(seq_g)[0].sum().backward()
    assert seq_g.grad is not None and torch.isfinite(seq_g.grad).all()


def _small_layer(kind: str):
    """A pruned 8 -> 16 GRU/LSTM layer, the compiled layer entry points' arguments, and its hidden matrix."""
    dense = pruned((nn.GRU if kind == "gru" else nn.LSTM)(8, 16), (16, 1), compression=2)
    ih = BlockSparseMatrix(dense.weight_ih_l0.detach(), 16, impl="cpp", bias=dense.bias_ih_l0.detach())
    hh = BlockSparseMatrix(dense.weight_hh_l0.detach(), 16, impl="cpp", bias=dense.bias_hh_l0.detach())
    return dense, (*blocksparse_cpp.packed(ih), *blocksparse_cpp.packed(hh)), hh


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_nan_and_infinite_gate_inputs_give_what_torch_gives(any_build, kind):
    """The gate math's own exp clamps its argument: a NaN must come back as NaN (torch's result) rather than pass
    through a float-to-int conversion, and infinities must saturate the gates as torch's sigmoid/tanh do."""
    dense, args, _ = _small_layer(kind)
    x, h0, c0 = torch.randn(3, 20, 8), torch.randn(20, 16), torch.randn(20, 16)
    x[0, 0, 0], x[1, 1, :], x[2, 2, :] = float("nan"), float("inf"), -float("inf")
    with torch.inference_mode():
        if kind == "gru":
            out, _ = any_build.gru_layer(x, h0, *args, False)
            expected, _ = dense(x, h0.unsqueeze(0))
        else:
            out, _, _ = any_build.lstm_layer(x, h0, c0, *args, False)
            expected, _ = dense(x, (h0.unsqueeze(0), c0.unsqueeze(0)))
    assert torch.equal(out.isnan(), expected.isnan()) and expected.isnan().any()
    torch.testing.assert_close(out.nan_to_num(0.0), expected.nan_to_num(0.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_the_entry_points_refuse_states_of_the_wrong_shape(ext, kind):
    """Direct callers of the compiled entry points (the Python layers check first) get torch's one-line error
    instead of a read past the state."""
    _, args, hh = _small_layer(kind)
    x, good, short = torch.randn(3, 4, 8), torch.randn(4, 16), torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="the state must be a float32 \\(batch, hidden\\) tensor"):
        if kind == "gru":
            ext.gru_layer(x, short, *args, False)
        else:
            ext.lstm_layer(x, short, short, *args, False)
    if kind == "lstm":
        with pytest.raises(RuntimeError, match="the cell state must be float32"):
            ext.lstm_layer(x, good, short, *args, False)
    with pytest.raises(RuntimeError, match="inputs must be a float32"):
        (ext.gru_layer if kind == "gru" else ext.lstm_layer)(x.double(), good, *([good] if kind == "lstm" else []),
                                                             *args, False)
    gate_inputs = torch.randn(3, 4, 5 * 16)
    with pytest.raises(RuntimeError, match="gate inputs must be [34] x hidden wide"):
        if kind == "gru":
            ext.gru_sequence(gate_inputs, good, *blocksparse_cpp.packed(hh), False)
        else:
            ext.lstm_sequence(gate_inputs, good, good, *blocksparse_cpp.packed(hh), False)
