"""Under torchrun, what each rank's share of a batch must hold, refused up front in one line: a training set
smaller than the process count (no step would train), and a global batch that leaves some rank a single sample
where a BatchNorm layer sees one value per channel from each sample (torch's own error at the first step
otherwise). A conv BatchNorm on HxW > 1 maps trains on one sample per rank: it is not refused. Advice that
continues a torchrun run says to launch it with torchrun again.

Most checks build the ``Runner`` in one process with ``Distributed(rank, N)`` (the refusals come before any
collective); one test starts two gloo workers to show a one-sample share of a conv BatchNorm really trains.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from admmcompress.data.datasets import BatchLoader, Split
from admmcompress.train.config import RunConfig
from admmcompress.train.distributed import (
    BATCHNORM_NEEDS_TWO,
    Distributed,
    ShardedLoader,
    _digest,
    batchnorm_inputs,
)
from admmcompress.train.runner import Runner
from admmcompress.train.trial_forward import share_needs


def _config(batch_size: int = 16, epochs: int = 1) -> RunConfig:
    return RunConfig.from_dict({"seed": 3, "model": {"name": "net"}, "data": {"batch_size": batch_size},
                                "pretrain": {"epochs": epochs, "optimizer": {"name": "sgd", "lr": 0.1}},
                                "stages": []})


def _vectors(n: int) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(n, 20, generator=g), torch.randint(0, 4, (n,), generator=g))


def _images(n: int) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 4, (n,), generator=g))


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))


def _bn1d_net() -> nn.Module:  # BatchNorm1d on (N, C): one value per channel from each sample
    torch.manual_seed(1)
    return nn.Sequential(nn.BatchNorm1d(20), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))


def _conv_bn_net() -> nn.Module:  # BatchNorm2d on 4x4 maps: 16 values per channel from each sample
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 4))


def _pooled_bn_net() -> nn.Module:  # BatchNorm2d on a 1x1 map: one value per channel, as BatchNorm1d on (N, C)
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4, 4))


class _AuxiliaryHead(nn.Module):
    """A conv body and, in training only (as Inception's auxiliary classifier), a head with BatchNorm1d."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = _conv_bn_net()
        self.aux = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out + 0 * self.aux(x) if self.training else out


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --- a training set smaller than the processes: refused, not zero steps -----------------------------------
def test_a_training_set_smaller_than_the_process_count_is_refused_not_run_without_steps():
    with pytest.raises(ValueError) as err:
        Runner(_config(), _mlp(), _vectors(1), _vectors(4), progress=False, dist=Distributed(0, 2))
    message = _one_line(err)
    assert message.startswith("the training set holds 1 sample(s), too few to give each of the 2 processes a sample")
    assert "no step would train; give at least 2 training samples or run one process (without torchrun)" in message
    with pytest.raises(ValueError, match=r"holds 2 sample\(s\), too few .* the 3 processes a sample.*at least 3 "
                                         r"training samples or run at most 2 processes"):
        ShardedLoader(BatchLoader(_vectors(2), 4), Distributed(1, 3))
    assert len(ShardedLoader(BatchLoader(_vectors(3), 4), Distributed(0, 3))) == 1  # one sample each: trains


def test_a_batchnorm_training_set_below_two_samples_a_process_is_refused():
    with pytest.raises(ValueError) as err:
        Runner(_config(), _bn1d_net(), _vectors(3), _vectors(4), progress=False, dist=Distributed(0, 2))
    message = _one_line(err)
    assert "holds 3 sample(s), too few to give each of the 2 processes 2 samples (BatchNorm layer '0' sees one " \
           "value per channel" in message
    assert message.endswith("give at least 4 training samples or run one process (without torchrun)")


# --- BatchNorm and a global batch below 2N ------------------------------------------------------------------
@pytest.mark.parametrize("make, layer", [(_bn1d_net, "0"), (_pooled_bn_net, "2")])
def test_a_batch_that_leaves_a_one_value_batchnorm_a_single_sample_is_refused_up_front(make, layer):
    data = _vectors(32) if make is _bn1d_net else _images(32)
    with pytest.raises(ValueError) as err:
        Runner(_config(batch_size=3), make(), data, data, progress=False, dist=Distributed(1, 2))
    message = _one_line(err)
    assert message.startswith("data.batch_size=3 split over the 2 processes gives some of them a single sample")
    assert f"BatchNorm layer '{layer}' sees one value per channel from each sample" in message
    assert "Expected more than 1 value per channel" in message  # the error it replaces, so it can be recognised
    assert message.endswith("give data.batch_size >= 4 or run one process (without torchrun)")
    with pytest.raises(ValueError, match=r"data\.batch_size=5 split over the 3 processes .* give data\.batch_size "
                                         r">= 6 or run at most 2 processes"):
        Runner(_config(batch_size=5), make(), data, data, progress=False, dist=Distributed(0, 3))


def test_a_conv_batchnorm_on_larger_maps_trains_on_one_sample_a_process():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither refused nor skipped, with no warning
        data = _images(34)  # 17 batches of 2: one sample per rank at every step
        runner = Runner(_config(batch_size=2), _conv_bn_net(), data, data, progress=False, dist=Distributed(0, 2))
        assert len(runner.loader) == 17
        data = _images(35)  # batches 16, 16, 3: the last gives one rank a single sample, and is kept
        assert len(Runner(_config(), _conv_bn_net(), data, data, progress=False, dist=Distributed(0, 2)).loader) == 3


def test_a_batchnorm_that_only_training_calls_is_seen():
    data = _images(32)
    with pytest.raises(ValueError, match="BatchNorm layer 'aux.2' sees one value per channel"):
        Runner(_config(batch_size=2), _AuxiliaryHead(), data, data, progress=False, dist=Distributed(0, 2))


def test_a_dataset_by_import_path_gets_the_same_refusal():
    from torch.utils.data import TensorDataset

    vectors, images = _vectors(32), _images(32)
    with pytest.raises(ValueError, match=r"^data\.batch_size=2 split over the 2 processes .*BatchNorm layer '0'.*"
                                         r"give data\.batch_size >= 4"):
        Runner(_config(batch_size=2), _bn1d_net(), TensorDataset(vectors.x, vectors.y),
               TensorDataset(vectors.x, vectors.y), progress=False, dist=Distributed(0, 2))
    Runner(_config(batch_size=2), _conv_bn_net(), TensorDataset(images.x, images.y),
           TensorDataset(images.x, images.y), progress=False, dist=Distributed(0, 2))


def test_the_trial_forward_leaves_the_model_and_the_random_generator_as_they_were():
    model, config = _AuxiliaryHead(), _config()
    model.body[1].eval()  # a frozen BatchNorm in a training model: modes are put back one by one
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert share_needs(model, _images(2).x, config)[0] == 2
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and model.aux.training and not model.body[1].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # running statistics and num_batches_tracked too
    assert share_needs(_mlp(), _vectors(2).x, config) == (1, "")


def test_the_conservative_rule_holds_where_the_trial_forward_fails():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _conv_bn_net()

        def forward(self, x):
            if self.training and not torch.is_grad_enabled():
                raise RuntimeError("this model only trains with gradients")
            return self.net(x)

    assert share_needs(Fails(), _images(2).x, _config()) == (2, BATCHNORM_NEEDS_TWO)


def test_batchnorm_inputs_counts_the_values_per_channel_of_one_sample():
    with batchnorm_inputs(_pooled_bn_net()) as seen:
        _pooled_bn_net().eval()(_images(2).x)  # another model's forward: not recorded
    assert seen == {}
    model = _pooled_bn_net()
    with batchnorm_inputs(model) as seen:
        model.eval()(_images(2).x)
    assert seen == {"2": 1}
    model(_images(2).x)
    assert seen == {"2": 1} and not model[2]._forward_pre_hooks  # the hooks are off after the block


# --- two processes: a one-sample share of a conv BatchNorm trains --------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_sample_worker(rank: int, port: int, result_dir: str) -> None:
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    ctx = Distributed.from_env()
    data = _images(8)
    runner = Runner(_config(batch_size=2), _conv_bn_net(), data, data, progress=False, dist=ctx)
    steps = len(runner.loader)
    runner.run()
    result = {"steps": steps, "weights": _digest(runner.model.state_dict())}
    Path(result_dir, f"{rank}.json").write_text(json.dumps(result))
    del runner
    gc.collect()
    ctx.close()


def test_two_processes_train_a_conv_batchnorm_on_one_sample_each(tmp_path):
    mp.spawn(_one_sample_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert [r["steps"] for r in results] == [4, 4]  # 8 samples in batches of 2: one sample per rank per step
    assert results[0]["weights"] == results[1]["weights"]
    assert results[0]["weights"] != _digest(_conv_bn_net().state_dict())  # it trained


# --- advice that continues a torchrun run relaunches it with torchrun -----------------------------------------
def test_continue_advice_under_torchrun_says_to_launch_with_torchrun_again(tmp_path):
    assert Distributed().relaunch_note() == ""
    note = Distributed(0, 2).relaunch_note()
    assert "all 2 processes" in note and "torchrun --standalone --nproc-per-node 2 -m admmcompress run" in note
    assert "--nnodes 2 --nproc-per-node 4" in Distributed(3, 8, local_world_size=4).relaunch_note()
    data = _vectors(32)
    Runner(_config(), _mlp(), data, data, out_dir=tmp_path, progress=False).run()  # a checkpoint to continue from
    one, two = (Runner(_config(), _mlp(), data, data, out_dir=tmp_path, progress=False, dist=ctx)
                for ctx in (Distributed(), Distributed(0, 2)))
    for runner in (one, two):
        runner.from_cli, runner._saved, runner._resumed = True, True, False
    assert one._diverged_advice().endswith(f"--out {tmp_path}")
    advice = two._diverged_advice()
    assert f"with --resume --allow-config-change --out {tmp_path} (all 2 processes, launched again with torchrun " \
           "--standalone --nproc-per-node 2 -m admmcompress run ...)" in advice


# --- a Dataset by import path: DistributedSampler pads the ranks' shares to one length ------------------------------
def test_a_dataset_loader_drops_a_last_batch_leaving_each_rank_one_sample_where_batchnorm_needs_two():
    from torch.utils.data import TensorDataset

    from admmcompress.data.imported import DatasetLoader

    data = TensorDataset(torch.randn(6, 3), torch.zeros(6, dtype=torch.long))  # 3 a rank: batches of 2, then 1
    kept = DatasetLoader(data, 4, rank=0, world_size=2)
    assert [len(b[0]) for b in kept] == [2, 1]
    with pytest.warns(RuntimeWarning, match="leaves each process 1 sample"):
        dropped = DatasetLoader(data, 4, rank=0, world_size=2, min_rows=2, why="BatchNorm layer '0' ...")
    assert [len(b[0]) for b in dropped] == [2] and len(dropped) == 1
    with pytest.raises(ValueError, match=r"^the training set holds 2 sample\(s\), too few to give each of the 2 "
                                         r"processes 2 \(BatchNorm layer '0' \.\.\.\), so no step would train"):
        DatasetLoader(TensorDataset(torch.randn(2, 3)), 4, rank=1, world_size=2, min_rows=2,
                      why="BatchNorm layer '0' ...")


@pytest.mark.filterwarnings("ignore:pretrain")
def test_one_process_skips_a_last_batch_of_one_sample_that_batchnorm_cannot_train_on():
    """9 samples in batches of 8: the last holds one, which BatchNorm1d on (N, C) cannot normalize in training
    (torch stopped the run at the end of its first epoch); it is skipped with a warning, as under torchrun."""
    from torch.utils.data import TensorDataset

    data = _vectors(9)
    with pytest.warns(RuntimeWarning, match="the last batch of each epoch holds a single sample, and BatchNorm"):
        runner = Runner(_config(batch_size=8), _bn1d_net(), data, data, progress=False, epoch_lines=False)
    assert len(runner.loader) == 1
    runner.run()
    with pytest.warns(RuntimeWarning, match="it is skipped"):
        runner = Runner(_config(batch_size=8), _bn1d_net(), TensorDataset(data.x, data.y), data, progress=False,
                        epoch_lines=False)
    runner.run()
    with pytest.raises(ValueError, match=r"^data\.batch_size=1 gives a single sample per step, and BatchNorm layer"):
        Runner(_config(batch_size=1), _bn1d_net(), data, data, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a conv BatchNorm on 4x4 maps trains on the last sample
        Runner(_config(batch_size=8), _conv_bn_net(), _images(9), _images(9), progress=False, epoch_lines=False)


@pytest.mark.filterwarnings("ignore:the last batch")
def test_weight_averaging_re_estimates_batchnorm_without_the_one_sample_last_batch():
    cfg = RunConfig.from_dict({"seed": 3, "model": {"name": "net"}, "data": {"batch_size": 8}, "stages": [],
                               "pretrain": {"epochs": 2, "average_from_epoch": 1,
                                            "optimizer": {"name": "sgd", "lr": 0.1}}})
    data = _vectors(9)
    runner = Runner(cfg, _bn1d_net(), data, data, progress=False, epoch_lines=False)
    runner.run()  # stopped in update_bn on the last batch of one sample
    assert runner.metrics["weight_average"]["pretrain"]["snapshots"] >= 1


def test_a_sized_iterable_dataset_ends_the_epoch_before_a_one_sample_last_batch():
    from torch.utils.data import IterableDataset

    data = _vectors(9)

    class Nine(IterableDataset):
        def __len__(self):
            return 9

        def __iter__(self):
            yield from zip(data.x, data.y, strict=True)

    with pytest.warns(RuntimeWarning, match=r"the IterableDataset's last batch holds 1 sample\(s\) and BatchNorm"):
        Runner(_config(batch_size=8), _bn1d_net(), Nine(), data, progress=False, epoch_lines=False).run()


def test_one_process_with_a_single_training_sample_and_batchnorm_is_one_line_without_process_advice():
    from torch.utils.data import TensorDataset

    data = _vectors(1)
    for train in (data, TensorDataset(data.x, data.y)):
        with pytest.raises(ValueError, match=r"^the training set holds 1 sample.*give at least 2 training samples$"):
            Runner(_config(batch_size=8), _bn1d_net(), train, data, progress=False)
