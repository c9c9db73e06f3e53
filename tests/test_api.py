"""``compress(...)``: the one-call API, with ``coupling`` and ``compact`` as in a run config."""

import copy

import pytest
import torch
from torch import nn

from admmcompress import Filter, Plan, Rule, compress
from admmcompress.data.datasets import Split
from admmcompress.executors.manifest import load_compacted
from admmcompress.train.config import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")


class Residual(nn.Module):
    """conv-BN -> (grouped conv-BN-relu -> conv-BN) + skip -> pool -> Linear."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.relu(x + y).mean((2, 3)))


def data(n: int = 16, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


PLAN = Plan([Rule(Filter(sparsity=0.5), type="Conv2d")])
SHORT = {"admm": {"epochs": 1, "update_every_steps": 1}, "retrain": {"epochs": 1}, "batch_size": 8}


@pytest.mark.parametrize("method", ["admm", "gradual"])
def test_compress_with_compact_returns_a_checked_smaller_model(tmp_path, method):
    torch.manual_seed(0)
    model = Residual()
    result = compress(
        model, PLAN, data(), data(8, 1), method=method, coupling="strict", compact={"samples": 2}, out_dir=tmp_path,
        **SHORT,
    )
    figures = result.metrics["compaction"]
    assert figures["params_after"] < figures["params_before"] and figures["max_abs_diff"] <= 1e-4
    small = result.compacted
    assert small is not None and small.conv1.groups == 2 and small.conv1.out_channels == 4
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert (small.eval()(x) - result.model.eval()(x)).abs().max() <= 1e-4
    restored = load_compacted(tmp_path / "compact", Residual())
    with torch.no_grad():
        assert (restored.eval()(x) - small(x)).abs().max() == 0
    assert "## Compacted model" in result.report and "MACs per sample" in result.report


def test_compress_without_compact_has_no_compacted_model():
    torch.manual_seed(0)
    result = compress(Residual(), PLAN, data(), data(8, 1), coupling="strict", **SHORT)
    assert result.compacted is None and "compaction" not in result.metrics


def test_compact_with_an_uncoupled_residual_plan_fails_before_training():
    model = Residual()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="compaction cannot remove.*coupling: strict"):
        compress(model, PLAN, data(), data(8, 1), compact=True, **SHORT)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_progress_false_is_quiet_and_epochs_prints_a_line_each(capsys):
    """compress(progress=False) printed one line per epoch (a user review's finding): False is quiet now, 'epochs'
    gives those lines, and anything else is one line naming the choices."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from admmcompress import compress
    from admmcompress.plan import Plan
    from admmcompress.structures import Unstructured

    data = TensorDataset(torch.randn(16, 1, 4, 4), torch.randint(0, 10, (16,)))

    def call(progress):
        torch.manual_seed(0)
        return compress(nn.Sequential(nn.Flatten(), nn.Linear(16, 10)), Plan({"1": Unstructured(sparsity=0.5)}),
                        data, data, admm={"epochs": 1}, retrain={"epochs": 1}, progress=progress)

    call(False)
    assert "epoch" not in capsys.readouterr().err
    call("epochs")
    lines = [line for line in capsys.readouterr().err.splitlines() if " epoch " in line]
    assert [line.split(":")[0] for line in lines] == ["stage1/prune epoch 1/1", "stage1/retrain epoch 1/1"]
    with pytest.raises(ValueError, match=r"progress='bars'; give False \(quiet\), True \(bars\) or 'epochs'"):
        call("bars")
