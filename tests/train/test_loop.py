"""Training pieces: LR schedules, update cadence, evaluation, divergence detection."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from admmcompress.data.datasets import BatchLoader, Split
from admmcompress.models import LeNet300100
from admmcompress.train.config import ADMMPhaseConfig, OptimizerConfig, PhaseConfig
from admmcompress.train.loop import (
    TrainingDiverged,
    evaluate,
    learning_rate,
    make_optimizer,
    train_epoch,
    update_period_steps,
)

BASE = 0.1


def phase(cls=PhaseConfig, **kwargs):
    return cls(optimizer=OptimizerConfig(name="sgd", lr=BASE), **kwargs)


def test_constant_schedule():
    cfg = phase(epochs=3, lr_schedule="constant")
    assert [learning_rate(cfg, s, 10) for s in (0, 7, 29, 30, 1000)] == [BASE] * 5


def test_cosine_schedule_at_known_steps():
    cfg = phase(epochs=2, lr_schedule="cosine")  # 20 steps in all
    assert learning_rate(cfg, 0, 10) == pytest.approx(BASE)
    assert learning_rate(cfg, 10, 10) == pytest.approx(BASE / 2)
    assert learning_rate(cfg, 5, 10) == pytest.approx(BASE * 0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(cfg, 20, 10) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(cfg, 25, 10) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    values = [learning_rate(cfg, s, 10) for s in range(21)]
    assert values == sorted(values, reverse=True)


def test_cosine_schedule_with_zero_epochs_does_not_divide_by_zero():
    cfg = phase(epochs=0, lr_schedule="cosine")
    assert learning_rate(cfg, 0, 10) == pytest.approx(BASE)


def test_admm_reset_schedule_per_epoch_updates():
    cfg = phase(ADMMPhaseConfig, epochs=3, update_every_epochs=1)
    assert cfg.lr_schedule == "admm_reset"
    steps = 9  # one ADMM iteration = 9 steps: thirds of 3 steps each
    got = [learning_rate(cfg, s, steps) for s in range(0, 27)]
    expected = ([BASE] * 3 + [BASE / 10] * 3 + [BASE / 100] * 3) * 3
    assert got == pytest.approx(expected)


def test_admm_reset_schedule_every_k_epochs():
    cfg = phase(ADMMPhaseConfig, epochs=4, update_every_epochs=2)
    steps = 3  # period 6 steps
    got = [learning_rate(cfg, s, steps) for s in range(12)]
    assert got == pytest.approx(([BASE] * 2 + [BASE / 10] * 2 + [BASE / 100] * 2) * 2)


def test_admm_reset_schedule_every_n_steps():
    cfg = phase(ADMMPhaseConfig, epochs=2, update_every_steps=6)
    got = [learning_rate(cfg, s, 100) for s in (0, 1, 2, 3, 4, 5, 6, 8, 10, 12)]
    assert got == pytest.approx(
        [BASE, BASE, BASE / 10, BASE / 10, BASE / 100, BASE / 100, BASE, BASE / 10, BASE / 100, BASE]
    )


def test_admm_reset_on_a_plain_phase_spans_the_whole_phase():
    cfg = phase(epochs=3, lr_schedule="admm_reset")
    got = [learning_rate(cfg, s, 3) for s in range(9)]
    assert got == pytest.approx([BASE] * 3 + [BASE / 10] * 3 + [BASE / 100] * 3)


def test_update_period_steps():
    assert update_period_steps(phase(ADMMPhaseConfig, epochs=5, update_every_epochs=2), 7) == 14
    assert update_period_steps(phase(ADMMPhaseConfig, epochs=5, update_every_steps=3), 7) == 3
    assert update_period_steps(phase(epochs=5), 7) == 35
    assert update_period_steps(phase(epochs=0), 7) == 1


@pytest.mark.parametrize(
    ("name", "cls"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_make_optimizer(name, cls):
    model = nn.Linear(3, 2)
    opt = make_optimizer(model, OptimizerConfig(name=name, lr=0.5, weight_decay=0.01))
    assert isinstance(opt, cls)
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.01
    assert opt.state == {}


class Constant(nn.Module):
    """Always predicts class 3."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        logits = torch.zeros(len(x), 10) + self.w
        logits[:, 3] = 1.0
        return logits


def test_evaluate_returns_percent_and_restores_the_mode():
    data = Split(torch.zeros(8, 1, 2, 2), torch.tensor([3, 3, 3, 5, 5, 3, 1, 2]))
    model = Constant()
    model.train()
    assert evaluate(model, data, batch_size=3) == pytest.approx(50.0)
    assert model.training
    model.eval()
    assert evaluate(model, data) == pytest.approx(50.0)
    assert not model.training


def test_evaluate_on_empty_data_is_zero():
    assert evaluate(Constant(), Split(torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.long))) == 0.0


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_train_epoch_reduces_loss_and_counts_steps():
    torch.manual_seed(0)
    model = LeNet300100()
    loader = BatchLoader(_data(64), batch_size=16, seed=0)
    opt = make_optimizer(model, OptimizerConfig(name="adam", lr=1e-3))
    seen_lrs, steps = [], []

    def lr_at(step):
        seen_lrs.append(step)
        return 1e-3

    first = train_epoch(model, loader, opt, lr_at, first_step=8, after_step=steps.append, progress=False)
    assert steps == [9, 10, 11, 12]
    assert seen_lrs == [8, 9, 10, 11]
    for _ in range(5):
        last = train_epoch(model, loader, opt, lambda s: 1e-3, first_step=0, progress=False)
    assert last["loss"] < first["loss"]
    assert first["penalty"] == 0.0


def test_train_epoch_adds_the_penalty():
    torch.manual_seed(0)
    model = LeNet300100()
    loader = BatchLoader(_data(32), batch_size=16, seed=0)
    opt = make_optimizer(model, OptimizerConfig(name="sgd", lr=1e-3))
    out = train_epoch(
        model, loader, opt, lambda s: 1e-3, 0, penalty=lambda: model.fc1.weight.pow(2).sum(), progress=False
    )
    assert out["penalty"] > 0


class NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)[:, :4]) * float("nan")


def test_train_epoch_raises_when_the_loss_is_nan():
    model = NaNModel()
    before = model.fc.weight.detach().clone()
    loader = BatchLoader(_data(32), batch_size=16, seed=0)
    opt = make_optimizer(model, OptimizerConfig(name="sgd", lr=0.01))
    with pytest.raises(
        TrainingDiverged,
        match=r"stage1/prune epoch 2/3: loss became nan at step 5; lower the learning "
        r"rate \(now 0.01\) or rho",  # the runner adds where to --resume from
    ):
        train_epoch(
            model, loader, opt, lambda s: 0.01, first_step=5, desc="stage1/prune epoch 2/3", progress=False
        )
    # the bad batch never reached the weights
    assert torch.equal(model.fc.weight, before)


def test_train_epoch_raises_when_a_huge_lr_blows_up():
    torch.manual_seed(0)
    model = LeNet300100()
    loader = BatchLoader(_data(256), batch_size=16, seed=0)
    opt = make_optimizer(model, OptimizerConfig(name="sgd", lr=1e30, momentum=0.0))
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf)"):
        train_epoch(model, loader, opt, lambda s: 1e30, first_step=0, progress=False)


def test_training_diverged_is_a_runtime_error():
    assert issubclass(TrainingDiverged, RuntimeError)


def test_label_smoothing_changes_the_trained_loss_not_the_reported_one():
    results = []
    for smoothing in (0.0, 0.2):
        torch.manual_seed(0)
        model = LeNet300100()
        loader = BatchLoader(_data(32), batch_size=16, seed=0)
        opt = make_optimizer(model, OptimizerConfig(name="sgd", lr=0.1))
        losses = train_epoch(model, loader, opt, lambda s: 0.1, 0, progress=False, label_smoothing=smoothing)
        results.append((losses["loss"], model.fc1.weight.detach().clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=0.05)  # first-step losses are the same
    assert not torch.equal(results[0][1], results[1][1])  # but the gradients differed


def test_bf16_autocast_and_channels_last_train_float32_weights():
    from admmcompress.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20")
    g = torch.Generator().manual_seed(0)
    data = Split(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    opt = make_optimizer(model, OptimizerConfig(name="sgd", lr=0.05))
    before = model.conv1.weight.detach().clone()
    losses = train_epoch(model, BatchLoader(data, 8, seed=0), opt, lambda s: 0.05, 0, progress=False,
                         autocast=torch.bfloat16, channels_last=True)
    assert math.isfinite(losses["loss"])
    assert model.conv1.weight.dtype == torch.float32 and model.conv1.weight.is_contiguous()
    assert not torch.equal(before, model.conv1.weight)


# --- the custom-loss hook -----------------------------------------------------------------------
def _trained(loss_fn=None, **kwargs):
    """fc1 of a LeNet-300-100 after one seeded epoch, and the reported losses."""
    torch.manual_seed(0)
    model = LeNet300100()
    opt = make_optimizer(model, OptimizerConfig(name="sgd", lr=0.1))
    out = train_epoch(model, BatchLoader(_data(32), 16, seed=0), opt, lambda s: 0.1, 0, progress=False,
                      loss_fn=loss_fn, **kwargs)
    return out, model.fc1.weight.detach().clone()


def test_loss_fn_that_is_cross_entropy_trains_exactly_like_the_default():
    seen = []

    def ce(batch, output, model):
        seen.append((len(batch), output.shape, type(model).__name__))
        return nn.functional.cross_entropy(output, batch[1])

    default, w_default = _trained()
    custom, w_custom = _trained(ce)
    assert torch.equal(w_default, w_custom)
    assert custom == default
    assert seen == [(2, torch.Size([16, 10]), "LeNet300100")] * 2


def test_loss_fn_replaces_the_data_loss_and_is_what_is_reported():
    def doubled(batch, output, model):
        return 2 * nn.functional.cross_entropy(output, batch[1])

    default, w_default = _trained()
    custom, w_custom = _trained(doubled)
    assert custom["loss"] == pytest.approx(2 * default["loss"], rel=0.05)  # first steps dominate
    assert not torch.equal(w_default, w_custom)


def test_loss_fn_with_language_model_batches_and_a_plain_iterable():
    """Batches of another shape (token windows, no labels) from a generator without len()."""
    from admmcompress.models import LSTMLanguageModel

    torch.manual_seed(0)
    model = LSTMLanguageModel(50, embed=8, hidden=8, num_layers=1, dropout=0.0)
    stream = torch.randint(0, 50, (41, 4))

    def windows():  # (steps, batch) inputs and next-token targets, as a 3-tuple with a tag
        for start in range(0, 40, 10):
            yield stream[start : start + 10], stream[start + 1 : start + 11], "ptb"

    def nll(batch, output, model):
        log_probs, _state = output
        return nn.functional.nll_loss(log_probs.reshape(-1, 50), batch[1].reshape(-1))

    opt = make_optimizer(model, OptimizerConfig(name="adam", lr=1e-2))
    steps = []
    first = train_epoch(model, windows(), opt, lambda s: 1e-2, 0, after_step=steps.append, progress=False,
                        loss_fn=nll, max_grad_norm=1.0)
    assert steps == [1, 2, 3, 4]
    for _ in range(5):
        last = train_epoch(model, windows(), opt, lambda s: 1e-2, 0, progress=False, loss_fn=nll)
    assert first["loss"] == pytest.approx(math.log(50), rel=0.1)
    assert last["loss"] < first["loss"]


def test_max_grad_norm_clips_the_step():
    def big(batch, output, model):
        return 1e4 * nn.functional.cross_entropy(output, batch[1])

    torch.manual_seed(0)
    start = LeNet300100().fc1.weight.detach().clone()
    _, unclipped = _trained(big)
    _, clipped = _trained(big, max_grad_norm=1e-3)
    assert (clipped - start).norm() < (unclipped - start).norm() / 100


def test_loss_fn_refuses_distillation_and_label_smoothing():
    from admmcompress.train.config import DistillConfig

    def ce(batch, output, model):
        return nn.functional.cross_entropy(output, batch[1])

    with pytest.raises(ValueError, match="cannot be combined with distillation or label smoothing"):
        _trained(ce, label_smoothing=0.1)
    with pytest.raises(ValueError, match="cannot be combined with distillation or label smoothing"):
        _trained(ce, teacher=LeNet300100(), distill=DistillConfig(alpha=0.5, temperature=4.0))


def test_loss_fn_must_return_a_scalar():
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor.*got \(16,\)"):
        _trained(lambda batch, output, model: nn.functional.cross_entropy(output, batch[1], reduction="none"))
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor.*got float"):
        _trained(lambda batch, output, model: 1.0)


def test_without_loss_fn_other_batch_shapes_get_one_clear_error():
    model = LeNet300100()
    opt = make_optimizer(model, OptimizerConfig(name="sgd", lr=0.1))
    batches = [(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), "extra")]
    with pytest.raises(ValueError, match="yielded a 3-tuple; without loss_fn a batch must be an"):
        train_epoch(model, batches, opt, lambda s: 0.1, 0, progress=False)
    with pytest.raises(ValueError, match="max_grad_norm=0 must be > 0"):
        train_epoch(model, batches, opt, lambda s: 0.1, 0, progress=False, max_grad_norm=0)


def test_the_reported_loss_is_weighted_as_the_gradient_is():
    """A rank's share weight scales its reported loss too: the mean over ranks is then the global batch's."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    batches = [(torch.randn(3, 4), torch.tensor([0, 1, 2])), (torch.randn(2, 4), torch.tensor([1, 2]))]
    weights = iter([1.2, 0.8])

    def run(loss_weight=None):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        return train_epoch(model, batches, opt, lambda s: 0.0, first_step=0, progress=False,
                           loss_weight=loss_weight)["loss"]

    plain = [float(nn.functional.cross_entropy(model(x), y)) for x, y in batches]
    assert run() == pytest.approx(sum(plain) / 2)
    assert run(lambda batch: next(weights)) == pytest.approx((1.2 * plain[0] + 0.8 * plain[1]) / 2)
