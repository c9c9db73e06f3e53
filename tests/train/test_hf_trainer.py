"""The Hugging Face Trainer callback: ADMM in ``trainer.train()``, hard prune, masked fine-tuning."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from admmcompress.plan import Plan, Rule  # noqa: E402
from admmcompress.structures import NM, Unstructured  # noqa: E402
from admmcompress.train.hf_trainer import ADMMTrainerCallback  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    """Class = whether token 1 appears: learnable in a few steps."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 50, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids[self.labels == 1, 3] = 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def classifier():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BertForSequenceClassification(config)


def train(model, callback, tmp_path, epochs: int, **extra):
    args = transformers.TrainingArguments(
        str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=16, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_steps=2, use_cpu=True, disable_tqdm=True, **extra,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    return trainer


def test_admm_then_masked_fine_tune_in_one_train_call(tmp_path):
    model = classifier()
    plan = Plan([Rule(NM(n=2, m=4), match="*intermediate.dense")])
    callback = ADMMTrainerCallback(plan, admm_epochs=2, options={"rho": 1e-2}, update_every_steps=2)
    trainer = train(model, callback, tmp_path, epochs=3)
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    runs = (weight.detach().reshape(-1, 4) != 0).sum(1)
    assert callback.driver is None and callback.masks is not None
    assert int(runs.max()) <= 2 and int((weight == 0).sum()) == weight.numel() // 2  # 2:4 held through fine-tune
    logged = [entry for entry in trainer.state.log_history if "admm/penalty" in entry]
    assert logged and all(entry["admm/penalty"] >= 0 for entry in logged)
    assert any(key.startswith("admm/") and key != "admm/penalty" for key in logged[-1])


def test_the_penalty_gradient_is_added_once_before_each_optimizer_step(tmp_path):
    """What the trainer calls, in its order: backward of the data loss, then on_pre_optimizer_step."""
    from types import SimpleNamespace

    model = classifier()
    plan = Plan([Rule(Unstructured(sparsity=0.9), match="*intermediate.dense")])
    callback = ADMMTrainerCallback(plan, admm_epochs=1, options={"rho": 0.5})
    args = SimpleNamespace(fp16=False, gradient_accumulation_steps=2)
    callback.on_train_begin(args, SimpleNamespace(global_step=0, max_steps=4), None, model=model, optimizer=None)
    callback.driver.step()  # Z, U away from W so the penalty's gradient is not zero
    batch = Tokens()[0]
    out = model(**{k: v.unsqueeze(0) for k, v in batch.items()})
    out.loss.backward()
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    data_grad = weight.grad.clone()
    (expected,) = torch.autograd.grad(callback.driver.penalty(), weight)
    callback.on_pre_optimizer_step(args, None, None)
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(weight.grad, data_grad + expected)


def test_resuming_a_trainer_checkpoint_is_refused_not_silently_restarted():
    from types import SimpleNamespace

    plan = Plan([Rule(Unstructured(sparsity=0.5), match="*intermediate.dense")])
    callback = ADMMTrainerCallback(plan, admm_epochs=1)
    args = SimpleNamespace(fp16=False, gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match="would restart ADMM from scratch"):
        callback.on_train_begin(args, SimpleNamespace(global_step=12, max_steps=20), None, model=classifier())


def test_bad_arguments_are_one_clear_line():
    plan = Plan([Rule(Unstructured(sparsity=0.5), match="*intermediate.dense")])
    with pytest.raises(ValueError, match="admm_epochs=0 must be an integer >= 1"):
        ADMMTrainerCallback(plan, admm_epochs=0)
    with pytest.raises(ValueError, match="update_every_steps=0 must be a positive integer"):
        ADMMTrainerCallback(plan, admm_epochs=1, update_every_steps=0)
    with pytest.raises(ValueError, match="nope"):
        ADMMTrainerCallback(plan, admm_epochs=1, method="nope")
