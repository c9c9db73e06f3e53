"""ADMM under torch.distributed: sharded batches, rank checks, and real 2-process gloo runs against 1 process.

The torchrun tests launch ``torchrun --standalone --nproc-per-node 2 -m admmcompress.cli run`` on the CPU
(gloo) with the equal-state debug check on, and compare with one in-process run of the same config and global
batch: the masks must be identical and the final accuracy within ``ACCURACY_TOLERANCE`` points (the ranks'
gradient all-reduce sums in another order than one process, so weights differ by float rounding only).
Exact mask equality therefore holds where no weight sits within that rounding of its layer's pruning threshold:
ADMM from a pretrained model, as here; a run trained from scratch over many epochs can flip a few such near-ties
(measured: 22 of 235,200 fc1 entries of LeNet-300-100 after 5 epochs from scratch with Adam).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file

from admmcompress.cli import main
from admmcompress.data.augment import Augment
from admmcompress.data.datasets import BatchLoader, Split
from admmcompress.train.config import LoggingConfig, RunConfig
from admmcompress.train.distributed import (
    Distributed,
    RankMismatch,
    ShardedLoader,
    _digest,
    evaluate,
    shard,
    sync_batchnorm,
    wrap,
)
from admmcompress.train.logging import EpochLogger, csv_text
from admmcompress.train.loop import evaluate as evaluate_one
from admmcompress.train.runner import STATE_FILE, read_progress

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

# One process and two see the same global batches; their weights differ by the rounding of the gradient
# all-reduce only, so final test accuracy (500 samples) may differ by a prediction or two at most.
ACCURACY_TOLERANCE = 0.5
PLUGIN = Path(__file__).with_name("ddp_stop_plugin.py")


# --- in-process pieces ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 5, 7, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_partition_the_range_in_order(n, world):
    ranges = [shard(n, r, world) for r in range(world)]
    assert [i for a, b in ranges for i in range(a, b)] == list(range(n))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_batches_are_the_one_process_batches_split(world):
    """Union over ranks of each step's batch == one process's batch (augmentation included); weights average to 1."""
    data = Split(torch.randn(23, 1, 6, 6), torch.arange(23))
    aug = Augment(shift=1, hflip=True)
    one = list(BatchLoader(data, 8, seed=4, augment=aug))
    ranks = [list(ShardedLoader(BatchLoader(data, 8, seed=4, augment=aug), Distributed(r, world)))
             for r in range(world)]
    assert all(len(r) == len(one) for r in ranks)  # last batch of 7 >= world: kept
    for step, (x, y) in enumerate(one):
        assert torch.equal(torch.cat([r[step][0] for r in ranks]), x)
        assert torch.equal(torch.cat([r[step][1] for r in ranks]), y)
    loaders = [ShardedLoader(BatchLoader(data, 8, seed=4), Distributed(r, world)) for r in range(world)]
    for batches in zip(*loaders, strict=True):  # each rank's loss weight: rows * world / global rows
        weights = [loader.weight(batch) for loader, batch in zip(loaders, batches, strict=True)]
        rows = [len(batch[1]) for batch in batches]
        assert weights == [r * world / sum(rows) for r in rows]
        assert sum(weights) / world == pytest.approx(1.0, abs=1e-12)


def test_sharded_loader_skips_a_last_batch_smaller_than_the_world_and_resumes_like_one_process():
    data = Split(torch.randn(9, 2), torch.arange(9))
    with pytest.warns(RuntimeWarning, match="fewer than the 3 processes"):
        loader = ShardedLoader(BatchLoader(data, 4, seed=1), Distributed(0, 3))
    assert len(loader) == 2 and len(list(loader)) == 2
    single = BatchLoader(data, 4, seed=1)
    list(single)
    assert torch.equal(loader.state_dict()["generator"], single.state_dict()["generator"])


def test_one_process_helpers_are_identities():
    ctx = Distributed()
    assert ctx.sum([1.0, 2.5]) == [1.0, 2.5] and ctx.share(7) == 7
    ctx.assert_same({"a": torch.ones(2)}, "nothing to compare")
    model = torch.nn.Linear(4, 3)
    data = Split(torch.randn(30, 4), torch.randint(0, 3, (30,)))
    assert evaluate(model, data, 7, ctx) == evaluate_one(model, data, 7)


def test_sync_batchnorm_is_refused_on_the_cpu_and_a_no_op_in_one_process():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    assert sync_batchnorm(model, Distributed()) is model  # one process: plain BatchNorm is exact
    with pytest.raises(ValueError, match="SyncBatchNorm runs on CUDA devices only.*set sync_batchnorm: false"):
        sync_batchnorm(model, Distributed(0, 2))


def test_digest_tells_values_and_structure_apart():
    a = {"Z": torch.zeros(3), "rho": 0.1, "hist": [1, {"r": 2.0}]}
    assert _digest(a) == _digest({"hist": [1, {"r": 2.0}], "rho": 0.1, "Z": torch.zeros(3)})
    assert _digest(a) != _digest({**a, "rho": 0.1000001})
    assert _digest(torch.zeros(3)) != _digest(torch.zeros(1, 3))
    assert _digest(torch.tensor([0.0])) != _digest(torch.tensor([-0.0]))  # bitwise, as ranks must agree


def test_csv_log_has_one_row_per_epoch_with_residuals_rho_and_sparsity(tmp_path):
    history = [
        {"phase": "stage1/prune", "epoch": 1, "loss": 0.5, "penalty": 0.1, "accuracy": 90.0,
         "residual": {"fc1.weight:unstructured": 0.3}, "rho": 0.01, "sparsity": {"fc1": 0.0}},
        {"phase": "stage1/retrain", "epoch": 1, "loss": 0.4, "penalty": 0.0, "accuracy": 91.0,
         "sparsity": {"fc1": 0.8}},
    ]
    logger = EpochLogger(tmp_path, LoggingConfig(csv=True))
    logger.log(history)
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0] == "phase,epoch,loss,penalty,accuracy,residual/fc1.weight:unstructured,rho,sparsity/fc1"
    assert lines[1:] == ["stage1/prune,1,0.5,0.1,90.0,0.3,0.01,0.0", "stage1/retrain,1,0.4,0.0,91.0,,,0.8"]
    assert csv_text(history) == (tmp_path / "log.csv").read_text()


def test_tensorboard_log_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = EpochLogger(tmp_path, LoggingConfig(tensorboard=True))
    history = [{"phase": "p", "epoch": 1, "loss": 0.5, "residual": {"w": 0.25}}]
    logger.log(history)
    history.append({"phase": "p", "epoch": 2, "loss": 0.25, "residual": {"w": 0.125}})
    logger.log(history)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("residual/w")] == [(0, 0.25), (1, 0.125)]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 0.5), (1, 0.25)]


def test_distributed_and_logging_config_keys_are_checked():
    base = {"model": {"name": "lenet300100"}, "pretrain": {"epochs": 1}}
    config = RunConfig.from_dict({**base, "distributed": {"check_ranks": True}, "logging": {"csv": True}})
    assert config.distributed.check_ranks and config.logging.csv and not config.logging.tensorboard
    with pytest.raises(ValueError, match=r"distributed.sync_batchnorm='yes' must be true or false"):
        RunConfig.from_dict({**base, "distributed": {"sync_batchnorm": "yes"}})
    with pytest.raises(ValueError, match=r"logging: unknown key\(s\) \['wandb'\]"):
        RunConfig.from_dict({**base, "logging": {"wandb": True}})


# --- two real gloo processes (torch.multiprocessing) ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> Distributed:
    """This worker as ``rank`` of a 2-process gloo group on ``port``, at 1 thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    return Distributed.from_env()


def _collective_worker(rank: int, port: int, result_dir: str) -> None:
    ctx = _join(rank, port)
    torch.manual_seed(0)  # the same model and data on both ranks
    model = torch.nn.Linear(5, 4)
    data = Split(torch.randn(37, 5), torch.randint(0, 4, (37,)))
    out = {"accuracy": evaluate(model, data, 6, ctx), "single": evaluate_one(model, data, 6)}
    ctx.assert_same({"w": model.weight}, "equal weights")
    try:
        ctx.assert_same({"w": model.weight + rank}, "rank-dependent weights")
        out["mismatch"] = ""
    except RankMismatch as err:
        out["mismatch"] = str(err)
    try:
        ctx.share(error=ValueError("rank 0 refuses") if rank == 0 else None)
        out["shared"] = ""
    except ValueError as err:
        out["shared"] = str(err)
    Path(result_dir, f"{rank}.json").write_text(json.dumps(out))
    ctx.close()


def test_two_gloo_ranks_evaluate_each_sample_once_and_catch_differing_state(tmp_path):
    mp.spawn(_collective_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for out in results:
        assert out["accuracy"] == out["single"]  # 19 + 18 samples counted once: the one-process figure
        assert "rank 1 differs from rank 0 in ['w']" in out["mismatch"]
    assert results[1]["shared"] == "rank 0 refuses" and results[0]["shared"] == ""


def _drift_worker(rank: int, port: int, result_dir: str) -> None:
    from admmcompress.models import create_model
    from admmcompress.train.runner import Runner

    warnings.simplefilter("ignore")
    ctx = _join(rank, port)
    out = {}
    for check in (False, True):
        config = RunConfig.from_dict({
            "model": {"name": "lenet300100"}, "plugins": [str(PLUGIN)], "pretrain": {"epochs": 0},
            "data": {"batch_size": 16}, "distributed": {"check_ranks": check},
            "stages": [{"plan": {"rules": [{"match": "fc1", "structure": "unstructured", "sparsity": 0.5}]},
                        "method": "admm_rankdiff", "admm": {"epochs": 2}, "retrain": {"epochs": 0}}],
        })
        torch.manual_seed(0)
        data = Split(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
        runner = Runner(config, create_model("lenet300100"), data, data, progress=False, dist=ctx)
        try:
            out[str(check)] = _digest(runner.run()["stages"][0]["admm_history"])
        except RankMismatch as err:
            out[str(check)] = str(err)
        del runner  # its DDP wrapper must be gone before the process group is destroyed
        gc.collect()
    Path(result_dir, f"{rank}.json").write_text(json.dumps(out))
    ctx.close()


def test_driver_state_that_drifts_across_ranks_is_rank_0s_or_an_error_in_debug_mode(tmp_path):
    """A driver adding its rank to U: rank 0's state is broadcast (equal logs), or RankMismatch in debug mode."""
    mp.spawn(_drift_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert results[0]["False"] == results[1]["False"] and "differs" not in results[0]["False"]
    assert all("rank 1 differs from rank 0 in ['driver']" in r["True"] for r in results)


def _nan_worker(rank: int, port: int, result_dir: str) -> None:
    from admmcompress.train.loop import TrainingDiverged, train_epoch

    ctx = _join(rank, port)
    torch.manual_seed(0)
    net = wrap(torch.nn.Linear(4, 3), ctx)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
    if rank == 1:
        batches[2][0][0, 0] = float("nan")  # only rank 1's third batch
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    try:
        train_epoch(net, batches, optimizer, lambda step: 0.1, 0, progress=False, all_ranks=ctx.all_true)
        outcome = "finished"
    except TrainingDiverged as err:
        outcome = str(err)
    Path(result_dir, f"{rank}.txt").write_text(outcome)
    del net
    gc.collect()
    ctx.close()


def test_a_nan_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Without the all-ranks check rank 0 would wait in the gradient all-reduce that rank 1 never joins."""
    mp.spawn(_nan_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    first, second = ((tmp_path / f"{r}.txt").read_text() for r in range(2))
    assert "NaN/inf on another rank at step 2" in first
    assert "loss became nan at step 2" in second


class _UnevenShares(torch.utils.data.IterableDataset):
    """Rank 0 yields 3 batches' worth of samples, rank 1 five: a sharding that came out uneven."""

    def __init__(self, rank: int):
        self.rank = rank

    def __len__(self) -> int:
        return 8 * (3 if self.rank == 0 else 5)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.rank)
        for _ in range(len(self)):
            yield torch.randn(4, generator=generator), torch.randint(0, 3, (), generator=generator)


def _uneven_worker(rank: int, port: int, result_dir: str) -> None:
    from admmcompress.data.imported import DatasetLoader
    from admmcompress.train.loop import train_epoch

    ctx = _join(rank, port)
    torch.manual_seed(0)
    net = wrap(torch.nn.Linear(4, 3), ctx)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = DatasetLoader(_UnevenShares(rank), 16, rank=rank, world_size=2, all_ranks=ctx.all_true,
                               least=ctx.least)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        steps = []
        train_epoch(net, loader, optimizer, lambda step: 0.1, 0, progress=False, after_step=steps.append)
        # without the agreed length: the ranks count 3 and 5 steps per epoch (other schedules, other cadences)
        unguarded = DatasetLoader(_UnevenShares(rank), 16, rank=rank, world_size=2, all_ranks=ctx.all_true)
    out = {"steps": len(steps), "len": len(loader), "unguarded_len": len(unguarded),
           "warnings": [str(w.message) for w in caught if "IterableDataset" in str(w.message)]}
    Path(result_dir, f"{rank}.json").write_text(json.dumps(out))
    del net
    gc.collect()
    ctx.close()


def test_uneven_iterable_shares_stop_every_rank_at_the_shortest_instead_of_hanging(tmp_path):
    """Without the per-batch agreement rank 1 would wait for good in the all-reduce of its 4th batch."""
    mp.spawn(_uneven_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    first, second = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert first["steps"] == second["steps"] == 3 and first["len"] == second["len"] == 3
    assert (first["unguarded_len"], second["unguarded_len"]) == (3, 5)
    assert first["warnings"] == [] and "has 5 batches and another rank's 3" in second["warnings"][0]


# --- torchrun: the CLI under 2 processes vs 1 ------------------------------------------------------------
DENSE = Path(__file__).resolve().parents[2] / "checkpoints" / "lenet5_mnist_dense.safetensors"
# ADMM from a pretrained model, as the method is used. Masks are identical when no weight lies within float
# rounding of its layer's pruning threshold; long runs from scratch can flip such near-ties (see the module doc).
SPEC = {
    "name": "ddp",
    "seed": 5,
    "threads": 1,
    "plugins": [str(PLUGIN)],
    "model": {"name": "lenet5", "dropout": 0.0},
    "data": {"dataset": "mnist", "batch_size": 32, "train_limit": 512, "test_limit": 500},
    "pretrained": str(DENSE),
    "logging": {"csv": True},
    "stages": [{
        "plan": {"rules": [{"match": "conv2", "structure": "unstructured", "sparsity": 0.8},
                           {"match": "fc1", "structure": "unstructured", "sparsity": 0.95}]},
        "method": "admm_stop",
        "options": {"rho": 1.0e-2},
        "admm": {"epochs": 3, "optimizer": {"name": "adam", "lr": 1.0e-3}},
        "retrain": {"epochs": 1, "optimizer": {"name": "adam", "lr": 1.0e-3}},
    }],
}


def _torchrun(config: Path, out: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # faulthandler: a rank that aborts (SIGABRT) prints where each of its Python threads was
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADMMCOMPRESS_CHECK_RANKS": "1", "PYTHONFAULTHANDLER": "1",
           **(extra_env or {})}
    torchrun = shutil.which("torchrun")
    command = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    return subprocess.run(
        [*command, "--standalone", "--nproc-per-node", "2", "-m", "admmcompress.cli", "run", str(config),
         "--out", str(out), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=240,
    )


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same config run by 1 process (in this process) and by 2 processes (torchrun), both to the end."""
    tmp = tmp_path_factory.mktemp("ddp")
    config = tmp / "ddp.yaml"
    config.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    assert main(["run", str(config), "--out", str(tmp / "one"), "--no-progress"]) == 0
    done = _torchrun(config, tmp / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    return config, tmp


def test_two_processes_give_the_masks_and_accuracy_of_one(runs):
    _, tmp = runs
    one, two = load_file(str(tmp / "one" / "masks.safetensors")), load_file(str(tmp / "two" / "masks.safetensors"))
    assert one.keys() == two.keys() == {"conv2.weight", "fc1.weight"}
    for key in one:
        assert torch.equal(one[key], two[key]), f"mask {key} differs between 1 and 2 processes"
    m1, m2 = _metrics(tmp / "one"), _metrics(tmp / "two")
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert abs(m1["accuracy_after"] - m2["accuracy_after"]) <= ACCURACY_TOLERANCE
    w1, w2 = load_file(str(tmp / "one" / "model.safetensors")), load_file(str(tmp / "two" / "model.safetensors"))
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-3  # float rounding, not other training
    assert "Processes (torch.distributed world size): 2" in (tmp / "two" / "report.md").read_text()
    rows = (tmp / "two" / "log.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 + 1  # header, 3 ADMM epochs, retrain: each written once, by rank 0


def test_resume_a_two_process_checkpoint_with_one_process(runs):
    """Rank 0 dies after the first ADMM update's checkpoint; one process resumes and ends on the 2-process result."""
    config, tmp = runs
    out = tmp / "killed"
    crashed = _torchrun(config, out, {"ADMM_STOP_AT": "1"})
    assert crashed.returncode != 0
    assert read_progress(out) == (0, 1)  # prune phase, after its first epoch
    assert torch.load(out / STATE_FILE, weights_only=True)["metrics"]["world_size"] == 2
    assert main(["run", str(config), "--out", str(out), "--resume", "--no-progress"]) == 0
    resumed, full = load_file(str(out / "masks.safetensors")), load_file(str(tmp / "two" / "masks.safetensors"))
    for key in full:
        assert torch.equal(resumed[key], full[key])
    assert _metrics(out)["world_size"] == 1
    assert abs(_metrics(out)["accuracy_after"] - _metrics(tmp / "two")["accuracy_after"]) <= ACCURACY_TOLERANCE


def test_ddp_own_loop_example_runs_in_one_process_and_prunes_to_the_plan():
    """examples/ddp_own_loop.py without torchrun (its 2-process run is the same code under DDP)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "ddp_own_loop.py"
    spec = importlib.util.spec_from_file_location("ddp_own_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(limit=512, epochs=1)
    assert result["world_size"] == 1
    assert result["compression"] == pytest.approx(266200 / 15010, abs=1e-9)  # fc1 20x, fc2 10x, fc3 4x


ITERABLE = '''
import os, torch
class RankShard(torch.utils.data.IterableDataset):
    """This rank's own share of 32 samples (as an IterableDataset under torchrun should yield)."""
    def __init__(self, split="train"):
        self.rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        self.n = 32 // world
    def __len__(self):
        return self.n
    def __iter__(self):
        g = torch.Generator().manual_seed(100 + self.rank)
        for _ in range(self.n):
            yield torch.randn(1, 28, 28, generator=g), torch.randint(0, 10, (), generator=g)
'''


@pytest.mark.parametrize("nan", [False, True], ids=["runs", "refused"])
def test_an_iterable_dataset_runs_under_torchrun_and_a_refusal_reaches_every_rank(tmp_path, nan):
    """Building the runner agrees on the IterableDataset's length (a collective): every rank builds it at the
    same point, so rank 0 neither waits for good (it did) nor leaves the others waiting when its preflight
    (run by rank 0 alone, after the build) refuses NaN weights."""
    from admmcompress.models import create_model

    (tmp_path / "rank_shard.py").write_text(ITERABLE)
    spec = {"name": "iterable", "seed": 0, "threads": 1, "model": {"name": "lenet300100"},
            "data": {"dataset": {"import": "rank_shard:RankShard"}, "batch_size": 8}, "pretrain": {"epochs": 1}}
    if nan:
        state = {k: v.clone() for k, v in create_model("lenet300100").state_dict().items()}
        state["fc1.weight"][0, 0] = float("nan")
        save_file(state, str(tmp_path / "nan.safetensors"))
        spec["pretrained"] = str(tmp_path / "nan.safetensors")
    config = tmp_path / "iterable.yaml"
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = _torchrun(config, tmp_path / "out", {"PYTHONPATH": str(tmp_path)})
    if not nan:
        assert done.returncode == 0, done.stderr[-3000:]
        assert _metrics(tmp_path / "out")["world_size"] == 2
    else:
        assert done.returncode != 0 and "holds 1 NaN/inf value(s)" in done.stderr, done.stderr[-3000:]


def test_a_refusal_every_rank_makes_while_building_is_one_line_on_each(tmp_path):
    """Followers build their runner beside rank 0: when all refuse the batch size, rank 0's notice to the others
    finds them gone, and its own line is shown (it was a gloo 'Connection closed by peer' traceback)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", "seed": 0, "threads": 1, "model": {"name": "lenet300100"},
                                      "data": {"dataset": "mnist", "batch_size": 1, "train_limit": 64},
                                      "pretrain": {"epochs": 1}}, sort_keys=False))
    done = _torchrun(config, tmp_path / "out")
    lines = [line for line in done.stderr.splitlines() if line.startswith("admmcompress: error: data.batch_size=1")]
    # one line per rank that got to print before torchrun stopped the group
    assert done.returncode != 0 and 1 <= len(lines) <= 2, done.stderr[-3000:]
    assert "Connection closed" not in done.stderr and "[rank0]" not in done.stderr, done.stderr[-3000:]
