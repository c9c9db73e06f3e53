"""The per-shape implementation choice: a pure function of its table, and every candidate exact.

The compiled kernel is switched off here (its loader patched to return ``None``, as on a machine without a
compiler) so these tests stay fast; test_blocksparse_cpp.py runs the compiled candidates (slow: it compiles).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from admmcompress.executors import blocksparse_choice, blocksparse_cpp, get_executor
from admmcompress.executors.blockmatrix import BlockSparseMatrix
from admmcompress.executors.blocksparse import (
    BlockSparseGRU,
    BlockSparseLinear,
    BlockSparseLSTM,
    MeasuredChoice,
    candidates,
    choice_report,
    to_blocksparse,
)
from admmcompress.executors.blocksparse_choice import pick
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan
from admmcompress.structures import Block
from admmcompress.timing import LatencyCache

pytestmark = pytest.mark.usefixtures("private_rng")

ATOL = 1e-4  # the bound against the masked dense model


@pytest.fixture()
def threads():
    """Restores torch's thread count after a test changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def pruned(module: nn.Module, block=(4, 4), compression: float = 4) -> nn.Module:
    wrapper = nn.ModuleDict({"m": module})
    hard_prune(wrapper, Plan({"m": Block(compression=compression, block=block)}).resolve(wrapper))
    return module.eval()


def close(a, b) -> None:
    if isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            close(x, y)
    else:
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


class FixedTable:
    """An injected table: ms by (implementation, batch); timing anything would be a failure."""

    def __init__(self, ms: dict[tuple[str, int], float]):
        self.ms = ms

    def get(self, key: str) -> float | None:
        impl = key.rsplit("|", 1)[1]
        batch = int(key.split("|batch=")[1].split("|")[0])
        return self.ms[(impl, batch)]

    def put(self, key: str, ms: float) -> None:
        raise AssertionError(f"timed {key} although the table had it")


# --- the decision ----------------------------------------------------------------------------


def test_pick_takes_the_fastest_and_breaks_ties_by_candidate_order():
    table = {
        32: {"bsr": 1.0, "dense": 1.0, "torch": 2.0},  # a tie: dense comes first in CANDIDATES
        1: {"dense": 3.0, "torch": 1.0, "cpp": 1.0, "bsr": 0.5},
        8: {"dense": 3.0, "torch": 1.0, "cpp": 1.0},  # torch before cpp
    }
    assert pick(table) == {1: "bsr", 8: "torch", 32: "dense"}
    assert pick(dict(reversed(list(table.items())))) == pick(table)  # order of the table does not matter


def test_pick_errors_name_the_problem():
    with pytest.raises(ValueError, match="batch 1 has no 'dense' time"):
        pick({1: {"torch": 1.0}})
    with pytest.raises(ValueError, match=r"unknown implementation\(s\) \['mkl'\]"):
        pick({1: {"dense": 1.0, "mkl": 0.5}})


def test_measured_choice_runs_the_choice_of_the_nearest_timed_batch_below():
    impls = {name: nn.Linear(3, 2) for name in ("dense", "torch", "cpp")}
    layer = MeasuredChoice(impls, {2: "cpp", 8: "torch", 32: "dense"}, batch_dim=0, batched_ndim=2)
    got = [layer.implementation(b) for b in (1, 2, 7, 8, 31, 32, 500)]
    assert got == ["cpp", "cpp", "cpp", "torch", "torch", "dense", "dense"]
    x = torch.randn(9, 3)
    close(layer(x), impls["torch"](x))  # 9 rows: batch 8's choice
    close(layer(x[0]), impls["cpp"](x[0]))  # unbatched: batch 1
    with pytest.raises(ValueError, match=r"the choice names \['bsr'\]; pass those implementations"):
        MeasuredChoice(impls, {1: "bsr"}, 0, 2)


# --- every candidate equals the masked dense layer ---------------------------------------------


def layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    return {
        "linear": (pruned(nn.Linear(32, 16)), torch.randn(5, 32)),
        "conv": (pruned(nn.Conv2d(4, 8, 3, padding=1), block=(4, 9)), torch.randn(2, 4, 6, 5)),
        "gru": (pruned(nn.GRU(8, 8, num_layers=2)), torch.randn(6, 3, 8)),
        "lstm": (pruned(nn.LSTM(8, 8, batch_first=True, bidirectional=True)), torch.randn(3, 6, 8)),
    }


@pytest.mark.parametrize("kind", ["linear", "conv", "gru", "lstm"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_every_candidate_equals_the_masked_dense_layer(no_compiler, threads, kind, n_threads):
    torch.set_num_threads(n_threads)
    dense, x = layers()[kind]
    impls = candidates(dense, block_rows=4, name=kind)
    assert set(impls) == {"dense", "torch", "bsr"}  # no compiler here: no "cpp"
    expected = dense(x)
    with torch.inference_mode():
        for module in impls.values():
            close(module(x), expected)


def test_bsr_candidate_is_left_out_where_r_does_not_tile_the_weight(no_compiler):
    linear = pruned(nn.Linear(30, 16), block=(4, 3))
    assert set(candidates(linear, block_rows=4, name="fc")) == {"dense", "torch"}
    with pytest.raises(ValueError, match=r"impl='bsr' needs square 4x4 blocks tiling the 16x30 weight"):
        BlockSparseMatrix(linear.weight, 4, impl="bsr")


# --- conversion ----------------------------------------------------------------------------------


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean(2).transpose(1, 2)  # (B, W, 8)
        return self.fc(self.lstm(x)[0])


def tagger() -> Tagger:
    model = Tagger().eval()
    plan = Plan({n: Block(compression=4, block=(4, 4)) for n in ("conv", "lstm", "fc")})
    hard_prune(model, plan.resolve(model))
    return model


def test_an_injected_table_decides_every_layer_without_timing(no_compiler):
    model, x = tagger(), torch.randn(2, 4, 5, 6)
    expected = model(x)
    table = FixedTable(
        {("dense", 1): 2.0, ("torch", 1): 1.0, ("bsr", 1): 3.0, ("dense", 2): 1.0, ("torch", 2): 1.5, ("bsr", 2): 0.5}
    )
    names = to_blocksparse(model, block_rows=4, choose="measured", batches=(1, 2), example=x, table=table)
    assert names == ["conv", "lstm", "fc"]
    report = choice_report(model)
    assert report.layers == {name: {1: "torch", 2: "bsr"} for name in names}
    assert report.dense_layers == report.dense_points == 0.0
    assert set(model.fc.impls) == {"torch", "bsr"}  # only what the choice uses is kept
    with torch.inference_mode():
        close(model(x), expected)  # batch 2: bsr
        close(model(x[:1]), expected[:1])  # batch 1: torch


def test_dense_everywhere_is_reported(no_compiler):
    model = nn.Sequential(pruned(nn.Linear(16, 8)), nn.ReLU(), pruned(nn.Linear(8, 8)))
    table = FixedTable({("dense", 1): 1.0, ("torch", 1): 2.0, ("bsr", 1): 2.0})
    to_blocksparse(model, block_rows=4, choose="measured", table=table, layers=["0"])
    ms = {("dense", 1): 1.0, ("torch", 1): 0.5, ("bsr", 1): 2.0}
    to_blocksparse(model, block_rows=4, choose="measured", table=FixedTable(ms), layers=["2"])
    assert type(model[0]) is nn.Linear and isinstance(model[2], BlockSparseLinear)  # one choice: no dispatcher
    report = choice_report(model)
    assert report.layers == {"0": {1: "dense"}, "2": {1: "torch"}}
    assert report.dense_layers == report.dense_points == 0.5


def test_measured_once_then_read_from_the_cache(no_compiler, tmp_path, monkeypatch):
    model = nn.Sequential(pruned(nn.Linear(32, 32)), nn.ReLU(), pruned(nn.GRU(8, 8)))
    model2 = nn.Sequential(pruned(nn.Linear(32, 32)), nn.ReLU(), pruned(nn.GRU(8, 8)))
    model2.load_state_dict(model.state_dict())
    table = LatencyCache(blocksparse_choice.TABLE, folder=tmp_path)
    to_blocksparse(model, block_rows=4, choose="measured", batches=(1, 3), table=table, rounds=1, steps=4)
    assert len(table) == 2 * 2 * 3  # 2 layers x 2 batches x (dense, torch, bsr)

    def no_timing(*args, **kwargs):
        raise AssertionError("timed although the cache had every entry")

    monkeypatch.setattr(blocksparse_choice, "time_interleaved", no_timing)
    reread = LatencyCache(blocksparse_choice.TABLE, folder=tmp_path)
    to_blocksparse(model2, block_rows=4, choose="measured", batches=(1, 3), table=reread, steps=4)
    assert choice_report(model2).layers == choice_report(model).layers  # the same table, the same choice
    x = torch.randn(4, 3, 8)
    close(model2[2](x), model[2](x))


def test_a_table_from_another_kernel_version_is_measured_again(no_compiler, tmp_path, monkeypatch):
    """The compiled kernel's version is part of every key: a faster kernel is not judged by old timings."""
    table = LatencyCache(blocksparse_choice.TABLE, folder=tmp_path)
    to_blocksparse(nn.Sequential(pruned(nn.Linear(32, 32))), block_rows=4, choose="measured", batches=(1,),
                   table=table, rounds=1)
    assert len(table) == 3
    monkeypatch.setattr(blocksparse_cpp, "VERSION", blocksparse_cpp.VERSION + 1)
    to_blocksparse(nn.Sequential(pruned(nn.Linear(32, 32))), block_rows=4, choose="measured", batches=(1,),
                   table=table, rounds=1)
    assert len(table) == 6  # measured again under the new version's keys


def test_measured_conversion_errors_name_the_fix(no_compiler):
    with pytest.raises(ValueError, match=r"layer 'conv' \(Conv2d\): choose='measured' needs the image size; pass"):
        to_blocksparse(tagger(), choose="measured", table=FixedTable({}))
    with pytest.raises(ValueError, match=r"batches=\[0\] must be positive integers"):
        to_blocksparse(tagger(), choose="measured", batches=(0,))
    with pytest.raises(ValueError, match="choose='fast'; choose 'fixed' or 'measured'"):
        to_blocksparse(tagger(), choose="fast")


# --- no compiler: every "cpp" request runs the torch path ------------------------------------------


def test_without_a_compiler_cpp_requests_fall_back_to_torch(no_compiler):
    assert not blocksparse_cpp.available()
    linear = pruned(nn.Linear(32, 16))
    assert BlockSparseMatrix(linear.weight, 4, impl="cpp").impl == "gather"
    gru = pruned(nn.GRU(8, 8))
    assert BlockSparseGRU.from_dense(gru, 4, kernel="cpp").kernel == "torch"
    x = torch.randn(5, 2, 8)
    close(BlockSparseGRU.from_dense(gru, 4, kernel="cpp")(x), gru(x))


def test_a_model_built_with_the_kernel_runs_where_it_cannot_be_loaded(monkeypatch):
    """A model converted with ``kernel="cpp"`` and loaded on a machine without a compiler still runs."""
    lstm = pruned(nn.LSTM(8, 8))
    fast = BlockSparseLSTM.from_dense(lstm, 4)
    fast.kernel = "cpp"  # as unpickled from a machine that had the kernel
    for matrix in (*fast.ih, *fast.hh):
        matrix.impl = "cpp"
    monkeypatch.setattr(blocksparse_cpp, "load", lambda verbose=False: None)
    x = torch.randn(5, 2, 8)
    close(fast(x), lstm(x))


def test_a_converted_model_saves_and_loads(no_compiler, tmp_path):
    model, x = tagger(), torch.randn(2, 4, 5, 6)
    expected = model(x)
    table = FixedTable(
        {("dense", 1): 2.0, ("torch", 1): 1.0, ("bsr", 1): 3.0, ("dense", 2): 1.0, ("torch", 2): 1.5, ("bsr", 2): 0.5}
    )
    to_blocksparse(model, block_rows=4, choose="measured", batches=(1, 2), example=x, table=table)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert choice_report(loaded).layers == choice_report(model).layers
    with torch.inference_mode():
        close(loaded(x), expected)
        close(loaded(x[:1]), expected[:1])


def test_the_executor_passes_the_choice_options_and_example(no_compiler):
    model, x = tagger(), torch.randn(2, 4, 5, 6)
    table = FixedTable({("dense", 2): 1.0, ("torch", 2): 0.5, ("bsr", 2): 2.0})
    fast = get_executor("blocksparse").convert(
        model, example=x, block_rows=4, choose="measured", batches=(2,), table=table
    )
    assert choice_report(fast).layers == {"conv": {2: "torch"}, "lstm": {2: "torch"}, "fc": {2: "torch"}}
    assert choice_report(model).layers == {}  # the original is left alone
    with torch.inference_mode():
        close(fast(x), model(x))


@pytest.fixture()
def fresh_loader():
    """``load`` is cached once per process: cleared around a test that patches what it calls."""
    blocksparse_cpp._BUILT.clear()
    yield
    blocksparse_cpp._BUILT.clear()


def test_the_loader_falls_back_to_one_thread_then_to_nothing(fresh_loader, monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    calls = []

    def no_openmp(name, extra_cflags, **kwargs):
        calls.append(name)
        if "-fopenmp" in extra_cflags:
            raise RuntimeError("omp.h: No such file")
        return "serial module"

    monkeypatch.setattr(cpp_extension, "load_inline", no_openmp)
    with pytest.warns(RuntimeWarning, match=r"built without OpenMP \(RuntimeError: omp.h: No such file\)"):
        assert blocksparse_cpp.load() == "serial module"
    assert calls == [blocksparse_cpp.extension_name(), blocksparse_cpp.extension_name() + "_serial"]

    def no_compiler(name, **kwargs):
        raise OSError("c++: command not found")

    flags = []
    monkeypatch.setattr(
        cpp_extension, "load_inline", lambda name, extra_cflags, **kw: flags.append((name, extra_cflags))
    )
    blocksparse_cpp.load(march="haswell")  # another target: its own flag and cache name
    assert flags[0][0] == blocksparse_cpp.extension_name("haswell") != blocksparse_cpp.extension_name()
    assert "-march=haswell" in flags[0][1] and "-march=native" not in flags[0][1]

    blocksparse_cpp._BUILT.clear()
    monkeypatch.setattr(cpp_extension, "load_inline", no_compiler)
    with pytest.warns(RuntimeWarning, match=r"kernel unavailable \(OSError: c\+\+: command not found\); using torch"):
        assert blocksparse_cpp.load() is None


def test_a_build_target_that_is_not_a_march_name_is_refused():
    with pytest.raises(ValueError, match="not a gcc -march name"):
        blocksparse_cpp.load(march="native; rm -rf /")


def test_the_build_target_comes_from_the_environment_at_import(tmp_path):
    """Read when admmcompress is imported (load() runs on every product); a bad value names the variable."""
    code = "from admmcompress.executors import blocksparse_cpp as b; print(b.DEFAULT_MARCH); b.load()"
    env = {**os.environ, blocksparse_cpp.MARCH_ENV: "-march=x"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0 and done.stdout.strip() == "-march=x"
    assert "not a gcc -march name" in done.stderr and "ADMMCOMPRESS_KERNEL_MARCH" in done.stderr


def test_threads_loading_at_once_build_once(fresh_loader, monkeypatch):
    import threading
    import time

    import torch.utils.cpp_extension as cpp_extension

    calls = []

    def slow_build(name, **kwargs):
        calls.append(name)
        time.sleep(0.2)
        return object()

    monkeypatch.setattr(cpp_extension, "load_inline", slow_build)
    got = []
    threads = [threading.Thread(target=lambda: got.append(blocksparse_cpp.load())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len({id(m) for m in got}) == 1


def test_a_table_from_another_build_target_is_measured_again(no_compiler, tmp_path, monkeypatch):
    """The build target is in the key too: AVX2 timings (ADMMCOMPRESS_KERNEL_MARCH=haswell) never decide for the
    native build."""
    table = LatencyCache(blocksparse_choice.TABLE, folder=tmp_path)
    convert = lambda: to_blocksparse(nn.Sequential(pruned(nn.Linear(32, 32))), block_rows=4,  # noqa: E731
                                     choose="measured", batches=(1,), table=table, rounds=1)
    convert()
    monkeypatch.setattr(blocksparse_cpp, "DEFAULT_MARCH", "haswell")
    convert()
    assert len(table) == 6



def test_a_target_this_cpu_cannot_run_is_refused_before_building(fresh_loader, monkeypatch):
    """Code for a newer CPU would die of an illegal instruction: the loader names the missing instruction set."""
    import shutil

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setattr(blocksparse_cpp, "cpu_flags", lambda: "flags\t\t: fpu sse sse2 avx")
    assert blocksparse_cpp.target_problem("native") == ""
    with pytest.raises(ValueError, match=r"-march=haswell uses avx2, bmi2, f16c, fma, which this CPU lacks"):
        blocksparse_cpp.load(march="haswell")
