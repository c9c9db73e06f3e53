"""Two gloo processes against one where batches split unevenly: per-rank RNG in checkpoints, BatchNorm under
weight averaging and in small shares, a global batch smaller than the process count (review 41).

The 2-process tests start two workers with ``torch.multiprocessing`` (gloo, one thread each) that run the
``Runner`` on tiny in-memory data; each takes a few seconds.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from admmcompress.data.datasets import BatchLoader, Split
from admmcompress.train.config import RunConfig
from admmcompress.train.distributed import Distributed, ShardedLoader, _digest, min_share
from admmcompress.train.runner import STATE_FILE, Runner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> Distributed:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    return Distributed.from_env()


def _config(batch_size: int = 16, epochs: int = 3, average_from_epoch: int | None = None) -> RunConfig:
    pretrain = {"epochs": epochs, "optimizer": {"name": "sgd", "lr": 0.1}}
    if average_from_epoch is not None:
        pretrain["average_from_epoch"] = average_from_epoch
    return RunConfig.from_dict({"seed": 3, "model": {"name": "mlp"}, "data": {"batch_size": batch_size},
                                "pretrain": pretrain, "stages": []})


def _data(n: int) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(n, 20, generator=g) * 2 + 1, torch.randint(0, 4, (n,), generator=g))


def _dropout_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))


def _bn_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.BatchNorm1d(20), nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


class _Stop(Exception):
    pass


class _StopAfterFirstCheckpoint(Runner):
    """Dies right after the checkpoint of the first epoch is written (as a kill there would)."""

    def _save(self) -> None:
        super()._save()
        if self.epoch == 1:
            raise _Stop


# --- 1. resume under DDP with dropout and an uneven last batch -------------------------------------------
def _resume_worker(rank: int, port: int, result_dir: str) -> None:
    warnings.simplefilter("ignore")
    ctx = _join(rank, port)
    data = _data(35)  # batches 16, 16, 3: the last splits 2 / 1, so the ranks draw unequal dropout counts
    config = _config()
    full = Runner(config, _dropout_net(), data, data, progress=False, dist=ctx)
    full.run()
    out = Path(result_dir, "killed")
    with pytest.raises(_Stop):
        _StopAfterFirstCheckpoint(config, _dropout_net(), data, data, out_dir=out, progress=False, dist=ctx).run()
    dist.barrier()  # rank 0 has written the checkpoint
    if rank == 0:
        shutil.copytree(out, Path(result_dir, "killed_copy"))  # for a resume with another process count
    dist.barrier()
    resumed = Runner(config, _dropout_net(), data, data, out_dir=out, progress=False, dist=ctx)
    resumed.run(resume=True)
    result = {"full": _digest(full.model.state_dict()), "resumed": _digest(resumed.model.state_dict())}
    Path(result_dir, f"{rank}.json").write_text(json.dumps(result))
    del full, resumed
    gc.collect()
    ctx.close()


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rng")
    mp.spawn(_resume_worker, args=(_free_port(), str(tmp)), nprocs=2, join=True)
    return tmp, [json.loads((tmp / f"{r}.json").read_text()) for r in range(2)]


def test_ddp_resume_with_dropout_and_an_uneven_last_batch_is_bit_identical(resumed_runs):
    tmp, results = resumed_runs
    for rank, result in enumerate(results):
        assert result["resumed"] == result["full"], f"rank {rank}: the resumed run differs from the uninterrupted"
    assert results[0]["full"] == results[1]["full"]  # DDP: equal weights on both ranks
    state = torch.load(tmp / "killed_copy" / STATE_FILE, weights_only=True)
    ranks = state["rng_ranks"]
    assert ranks.shape[0] == 2 and torch.equal(ranks[0], state["rng"])
    # what the README must say: after a batch that splits unevenly the ranks' global RNGs are no longer in step
    assert not torch.equal(ranks[0], ranks[1])


def test_a_resume_with_another_process_count_takes_rank_0s_state_and_says_it_is_not_bit_exact(resumed_runs):
    tmp, _ = resumed_runs
    data = _data(35)
    runner = Runner(_config(), _dropout_net(), data, data, out_dir=tmp / "killed_copy", progress=False)
    with pytest.warns(RuntimeWarning, match=r"resuming with 1 process\(es\) a checkpoint written by 2: .*rank 0's "
                                            r"random state.*not bit-identical"):
        runner.run(resume=True)


def test_a_one_process_checkpoint_resumes_bit_identically_and_old_checkpoints_still_load(tmp_path):
    data = _data(35)
    config = _config()
    full = Runner(config, _dropout_net(), data, data, progress=False)
    full.run()
    with pytest.raises(_Stop):
        _StopAfterFirstCheckpoint(config, _dropout_net(), data, data, out_dir=tmp_path, progress=False).run()
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["rng_ranks"].shape[0] == 1
    del state["rng_ranks"]  # a checkpoint written before per-rank states
    torch.save(state, tmp_path / STATE_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note: one process, as it was written
        resumed = Runner(config, _dropout_net(), data, data, out_dir=tmp_path, progress=False)
        resumed.run(resume=True)
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


# --- 4 and 6. BatchNorm: averaging re-estimates on all the data; a single-sample share is skipped ---------
class _Pairs(torch.utils.data.Dataset):
    """A map-style dataset (as one given by import path): read through DistributedSampler under torchrun."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i):
        return self.split.x[i], self.split.y[i]


def _bn_stats(model: nn.Module) -> dict[str, list[float]]:
    return {k: v.tolist() for k, v in model.state_dict().items() if "running" in k}


class _SeesTheAverage(Runner):
    """Keeps the data order the weight average's BatchNorm estimate starts from."""

    def _end_on_average(self, phase) -> None:
        self.loader_state = copy.deepcopy(self.loader.state_dict())
        super()._end_on_average(phase)


def _bn_worker(rank: int, port: int, result_dir: str) -> None:
    warnings.simplefilter("ignore")
    ctx = _join(rank, port)
    out = {}
    # 6: 35 samples in batches of 16: the last batch of 3 would give rank 1 a single sample
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        uneven = Runner(_config(epochs=1), _bn_net(), _data(35), _data(35), progress=False, dist=ctx)
    out["steps"] = len(uneven.loader)
    out["warnings"] = [str(w.message) for w in caught if "last batch" in str(w.message)]
    out["uneven_accuracy"] = uneven.run()["accuracy_after"]
    # 4: weight averaging re-estimates BatchNorm statistics: as one process does, on every global batch
    config, data = _config(epochs=2, average_from_epoch=1), _data(64)
    two = _SeesTheAverage(config, _bn_net(), data, data, progress=False, dist=ctx)
    two.run()
    one = copy.deepcopy(two.model)  # the same weights, estimated by one process over the same batches
    loader = BatchLoader(data, config.data.batch_size, seed=config.seed)
    loader.load_state_dict(two.loader_state)
    torch.optim.swa_utils.update_bn(loader, one)
    out["two"], out["one"] = _bn_stats(two.model), _bn_stats(one)
    # 4: a dataset read through DistributedSampler: each rank's estimate merged over the ranks
    imported = Runner(config, _bn_net(), _Pairs(data), _Pairs(data), progress=False, dist=ctx)
    imported.run()
    out["imported"] = _bn_stats(imported.model)
    Path(result_dir, f"{rank}.json").write_text(json.dumps(out))
    del uneven, two, one, imported
    gc.collect()
    ctx.close()


@pytest.fixture(scope="module")
def bn_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bn")
    mp.spawn(_bn_worker, args=(_free_port(), str(tmp)), nprocs=2, join=True)
    return [json.loads((tmp / f"{r}.json").read_text()) for r in range(2)]


def test_batchnorm_model_skips_a_last_batch_that_leaves_a_rank_one_sample(bn_runs):
    for result in bn_runs:
        assert result["steps"] == 2  # 16, 16 (the batch of 3 is skipped)
    assert "would get a single sample, which BatchNorm cannot normalize" in bn_runs[0]["warnings"][0]
    assert bn_runs[1]["warnings"] == []  # rank 0 warns
    assert bn_runs[0]["uneven_accuracy"] == bn_runs[1]["uneven_accuracy"]


def test_weight_average_batchnorm_statistics_of_two_processes_are_one_processs(bn_runs):
    """For the averaged weights, 2 processes estimate what 1 process would: over every global batch."""
    for result in bn_runs:
        assert result["one"].keys() == result["two"].keys() and len(result["one"]) == 4
        for key, value in result["one"].items():
            assert torch.allclose(torch.tensor(result["two"][key]), torch.tensor(value), atol=1e-6, rtol=1e-6), key
    assert bn_runs[0]["two"] == bn_runs[1]["two"]


def test_weight_average_batchnorm_statistics_cover_every_ranks_data_for_a_sampled_dataset(bn_runs):
    """The input BatchNorm sees the data itself: its estimate (mean of equal batches' means) is the data's mean."""
    expected = _data(64).x.mean(0)
    for result in bn_runs:
        assert torch.allclose(torch.tensor(result["imported"]["0.running_mean"]), expected, atol=1e-5)
    assert bn_runs[0]["imported"] == bn_runs[1]["imported"]


# --- in one process: the loader's checks ---------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, 1])
def test_a_global_batch_smaller_than_the_process_count_is_refused_up_front(rank):
    with pytest.raises(ValueError, match=r"^data\.batch_size=1 is smaller than the 2 processes: .*give "
                                         r"data\.batch_size >= 2") as err:
        Runner(_config(batch_size=1), _dropout_net(), _data(8), _data(8), progress=False, dist=Distributed(rank, 2))
    assert "\n" not in str(err.value) and "learning rate" not in str(err.value)
    with pytest.raises(ValueError, match=r"data\.batch_size=2 is smaller than the 3 processes"):
        ShardedLoader(BatchLoader(_data(8), 2), Distributed(0, 3))
    ShardedLoader(BatchLoader(_data(8), 2), Distributed(0, 2))  # one sample each: fine without BatchNorm


def test_single_sample_shares_are_skipped_only_for_batchnorm_and_only_under_ddp():
    assert min_share(_bn_net()) == 2 and min_share(_dropout_net()) == 1
    data = _data(35)  # last batch 3
    assert len(ShardedLoader(BatchLoader(data, 16), Distributed(0, 2))) == 3  # 2 / 1 without BatchNorm: kept
    with pytest.warns(RuntimeWarning, match="holds 3 sample.*single sample"):
        assert len(ShardedLoader(BatchLoader(data, 16), Distributed(0, 2), min_rows=2)) == 2
    assert len(ShardedLoader(BatchLoader(_data(36), 16), Distributed(0, 2), min_rows=2)) == 3  # 2 / 2: kept
    with pytest.warns(RuntimeWarning, match="single sample"):
        runner = Runner(_config(), _bn_net(), data, data, progress=False, dist=Distributed(0, 2))
    assert len(runner.loader) == 2
    assert len(Runner(_config(), _bn_net(), data, data, progress=False).loader) == 3  # one process: unchanged
